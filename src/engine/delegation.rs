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

use super::replay::OneTimeId;
use super::trust::Anchors;
use super::verify::{
    KeyUse, Signed, Times, Unverified, VerifyPolicy, check_lifetime, check_signed, check_times,
    is_one_time,
};
use crate::jose::{self, PREV_TOKEN, REGISTERED_CLAIMS, names_audience, str_claim};
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// The most delegation links a token may carry.
pub(crate) const MAX_DELEGATION_DEPTH: usize = 3;

/// The token a link was exchanged into, as far as the link must agree with it.
pub(super) struct Outer<'a> {
    /// Its issuer: the actor who exchanged the link.
    pub(super) actor: &'a str,
    /// The subject the whole chain speaks for.
    pub(super) subject: &'a str,
    /// Its validity times.
    pub(super) times: Times,
    /// Its claims.
    pub(super) claims: &'a Map<String, Value>,
}

/// What a chain's links add to the outer token's verification.
#[derive(Default)]
pub(super) struct Links {
    /// One-time ids of one-time links.
    pub(super) one_time: Vec<OneTimeId>,
    /// The keys the links were signed with.
    pub(super) keys: Vec<KeyUse>,
}

/// The claims a caller set: everything but the registered claims tokend owns.
fn caller_claims(claims: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<_> = claims
        .iter()
        .filter(|(k, _)| !REGISTERED_CLAIMS.contains(&k.as_str()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// How many delegation links a claims set carries (read without checking:
/// use it on claims that passed verification).
pub(crate) fn chain_depth(claims: &Map<String, Value>) -> usize {
    let mut depth = 0;
    let mut act = claims.get("act").cloned();
    while let Some(Value::Object(a)) = act {
        depth += 1;
        act = a
            .get(PREV_TOKEN)
            .and_then(Value::as_str)
            .and_then(|p| jose::parse(p).ok())
            .and_then(|parts| parts.claims.ok())
            .and_then(|mut c| c.remove("act"));
    }
    depth
}

/// The token embedded in one `act` link, signed by its own issuer.
fn signed_link(
    act: &Value,
    actor: &str,
    now: UnixTime,
    anchors: &Anchors<'_>,
) -> Result<Signed, Unverified> {
    let Value::Object(a) = act else {
        return Err(Refusal::new(Reason::Malformed, "claim act is not an object").into());
    };
    if a.get("sub").and_then(Value::as_str) != Some(actor) {
        return Err(Refusal::new(
            Reason::Malformed,
            format!("act.sub must name the issuer {actor}"),
        )
        .into());
    }
    let Some(Value::String(prev)) = a.get(PREV_TOKEN) else {
        return Err(
            Refusal::new(Reason::MissingClaim, format!("act.{PREV_TOKEN} is missing")).into(),
        );
    };
    check_signed(prev, now, anchors)
}

/// What one link must agree with in the token exchanged from it: addressed
/// to the actor, same subject, valid when exchanged, not outlived, and the
/// same caller claims. Returns the link's times.
fn check_link(outer: &Outer<'_>, p: &Signed, policy: &VerifyPolicy) -> Result<Times, Refusal> {
    if !names_audience(&p.claims, outer.actor)? {
        return Err(Refusal::new(
            Reason::WrongAudience,
            format!("the exchanged token was not for {}", outer.actor),
        ));
    }
    let p_sub = str_claim(&p.claims, "sub")?;
    if p_sub != outer.subject {
        return Err(Refusal::new(
            Reason::Malformed,
            format!("subject {p_sub:?} differs from {:?}", outer.subject),
        ));
    }
    // P must have been valid when it was exchanged, and T may not outlive it.
    let p_times = check_times(&p.claims, outer.times.iat, policy)?;
    check_lifetime(&p_times, policy)?;
    // Exact, no skew: the exchange caps exp at the received token's, and a
    // per-link allowance would add up along a chain.
    if outer.times.exp > p_times.exp {
        return Err(Refusal::new(
            Reason::LifetimeTooLong,
            "outlives the token it was exchanged for",
        ));
    }
    // The subject's claims travel unchanged: an actor cannot add roles.
    if caller_claims(outer.claims) != caller_claims(&p.claims) {
        return Err(Refusal::new(
            Reason::Malformed,
            "claims differ from those of the exchanged token",
        ));
    }
    Ok(p_times)
}

/// Walks the delegation chain of the token `outer`, whose `act` claim is
/// `act`, up to `MAX_DELEGATION_DEPTH` links; returns the one-time ids of
/// its links. The chain must end at a token whose subject is its issuer.
pub(super) fn check_chain(
    outer: Outer<'_>,
    act: &Value,
    now: UnixTime,
    policy: &VerifyPolicy,
    anchors: &Anchors<'_>,
) -> Result<Links, Unverified> {
    let mut links = Links::default();
    let (mut actor, mut times, mut claims) =
        (outer.actor.to_owned(), outer.times, outer.claims.clone());
    let mut act = act.clone();
    for depth in 1..=MAX_DELEGATION_DEPTH {
        let ctx = LinkContext(depth);
        let p = signed_link(&act, &actor, now, anchors).map_err(|e| e.context(ctx))?;
        let here = Outer {
            actor: &actor,
            subject: outer.subject,
            times,
            claims: &claims,
        };
        let p_times = check_link(&here, &p, policy).map_err(|e| e.context(ctx))?;
        links.keys.push(p.key_use());
        if is_one_time(&p.claims) {
            let jti = str_claim(&p.claims, "jti").map_err(|e| e.context(ctx))?;
            links.one_time.push(OneTimeId {
                issuer: p.issuer.clone(),
                jti: jti.to_owned(),
                forget_at: p_times.exp + policy.clock_skew,
            });
        }
        let Some(next) = p.claims.get("act").cloned() else {
            if str_claim(&p.claims, "sub").ok() == Some(p.issuer.as_str()) {
                return Ok(links);
            }
            return Err(Refusal::new(
                Reason::Malformed,
                format!("delegation link {depth}: chain does not end at its subject's own token"),
            )
            .into());
        };
        act = next;
        actor = p.issuer;
        times = p_times;
        claims = p.claims;
    }
    Err(Refusal::new(
        Reason::Malformed,
        format!("delegation chain longer than {MAX_DELEGATION_DEPTH} links"),
    )
    .into())
}

/// "delegation link N", the context every refusal of a link carries.
#[derive(Clone, Copy)]
struct LinkContext(usize);

impl std::fmt::Display for LinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "delegation link {}", self.0)
    }
}
