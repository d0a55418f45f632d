//! Delegation chains (RFC 8693 `act`). A service that received token P may
//! exchange it at its own sidecar for token T to a next service. T keeps P's
//! subject, names the exchanging service as `act.sub` (= T's issuer), and
//! carries P itself in `act.prev_token`, so every link is verifiable by any
//! verifier: a compromised middle service cannot claim to act for someone
//! whose token it never received.
//!
//! For T (issuer X, subject S, act {sub, prev_token: P}) a verifier checks:
//! `act.sub` = X; P is signed by its own issuer's key; P was for X (its
//! `aud`); P's subject is S; P was valid when T was issued (T.iat within
//! P's validity, with skew); T does not outlive P (exactly, so no allowance
//! adds up along a chain); T carries P's caller claims unchanged (an actor
//! cannot add roles); P's lifetime is within max_ttl; and P's own chain,
//! recursively, up to `MAX_DELEGATION_DEPTH` links. The chain ends at a
//! token whose subject is its issuer.

use serde_json::{Map, Value};

use super::{Error, Times, Verifier, fail, names_audience, str_claim};
use crate::reason::Reason;

/// The member of `act` holding the token the actor exchanged.
pub const PREV_TOKEN: &str = "prev_token";
/// The most delegation links a token may carry.
pub const MAX_DELEGATION_DEPTH: usize = 3;

/// The claims a caller set: everything but the registered claims tokend owns.
fn caller_claims(claims: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<_> = claims
        .iter()
        .filter(|(k, _)| !crate::mint::REGISTERED_CLAIMS.contains(&k.as_str()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

fn link_err(depth: usize, e: Error) -> Error {
    Error {
        reason: e.reason,
        detail: format!("delegation link {depth}: {}", e.detail),
    }
}

/// How many delegation links a claims set carries (read without checking:
/// use it on claims that passed `verify`).
pub fn chain_depth(claims: &Map<String, Value>) -> usize {
    let mut depth = 0;
    let mut act = claims.get("act").cloned();
    while let Some(Value::Object(a)) = act {
        depth += 1;
        act = a
            .get(PREV_TOKEN)
            .and_then(Value::as_str)
            .and_then(|p| super::parse(p).ok())
            .and_then(|parts| parts.claims.ok())
            .and_then(|mut c| c.remove("act"));
    }
    depth
}

// === impl Verifier ===

impl Verifier {
    /// Walks the delegation chain of a token issued by `actor` for `subject`.
    pub(super) async fn check_chain(
        &self,
        actor: &str,
        subject: &str,
        outer: &Times,
        outer_claims: &Map<String, Value>,
        act: &Value,
        now: i64,
    ) -> Result<(), Error> {
        let mut outer_claims = outer_claims.clone();
        let mut actor = actor.to_owned();
        let mut outer = Times {
            exp: outer.exp,
            iat: outer.iat,
        };
        let mut act = act.clone();
        for depth in 1..=MAX_DELEGATION_DEPTH {
            let Value::Object(a) = &act else {
                return fail(Reason::Malformed, "claim act is not an object");
            };
            if a.get("sub").and_then(Value::as_str) != Some(actor.as_str()) {
                return fail(
                    Reason::Malformed,
                    format!("delegation link {depth}: act.sub must name the issuer {actor}"),
                );
            }
            let Some(Value::String(prev)) = a.get(PREV_TOKEN) else {
                return fail(
                    Reason::MissingClaim,
                    format!("delegation link {depth}: act.{PREV_TOKEN} is missing"),
                );
            };
            let p = self
                .check_signed(prev, now)
                .await
                .map_err(|e| link_err(depth, e))?;
            if !names_audience(&p.claims, &actor).map_err(|e| link_err(depth, e))? {
                return fail(
                    Reason::WrongAudience,
                    format!("delegation link {depth}: the exchanged token was not for {actor}"),
                );
            }
            let p_sub = str_claim(&p.claims, "sub").map_err(|e| link_err(depth, e))?;
            if p_sub != subject {
                return fail(
                    Reason::Malformed,
                    format!("delegation link {depth}: subject {p_sub:?} differs from {subject:?}"),
                );
            }
            // P must have been valid when it was exchanged, and T may not outlive it.
            let p_times = self
                .check_times(&p.claims, outer.iat)
                .map_err(|e| link_err(depth, e))?;
            self.check_lifetime(&p_times)
                .map_err(|e| link_err(depth, e))?;
            // Exact, no skew: the exchange caps exp at the received token's,
            // and a per-link allowance would add up along a chain.
            if outer.exp > p_times.exp {
                return fail(
                    Reason::LifetimeTooLong,
                    format!("delegation link {depth}: outlives the token it was exchanged for"),
                );
            }
            // The subject's claims travel unchanged: an actor cannot add roles.
            if caller_claims(&outer_claims) != caller_claims(&p.claims) {
                return fail(
                    Reason::Malformed,
                    format!(
                        "delegation link {depth}: claims differ from those of the exchanged token"
                    ),
                );
            }
            match p.claims.get("act") {
                None if p_sub == p.issuer => return Ok(()),
                None => {
                    return fail(
                        Reason::Malformed,
                        format!(
                            "delegation link {depth}: chain does not end at its subject's own token"
                        ),
                    );
                }
                Some(next) => {
                    act = next.clone();
                    actor = p.issuer;
                    outer = p_times;
                    outer_claims = p.claims;
                }
            }
        }
        fail(
            Reason::Malformed,
            format!("delegation chain longer than {MAX_DELEGATION_DEPTH} links"),
        )
    }
}
