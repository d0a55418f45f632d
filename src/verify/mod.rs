//! Token verification. `Verifier::verify(token, audience, now)` checks, in this
//! order: structure → algorithm → issuer known → kid in THAT issuer's set
//! (one single-flight refresh on a miss) → signature → exp/nbf/iat with clock
//! skew → audience → lifetime ≤ max_ttl → required claims → one-time replay.
//! Every refusal is an `Error` naming its `Reason`.

mod delegation;
mod jws;
mod keysets;
mod replay;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use self::delegation::{MAX_DELEGATION_DEPTH, PREV_TOKEN, chain_depth};
use self::jws::check_alg;
pub use self::jws::{MAX_TOKEN_LEN, Parts, check_signature, parse};
pub use self::keysets::{
    IssuerSnapshot, Lookup, MAX_KEYS_PER_ISSUER, MAX_REVOKED_PER_ISSUER, Refresh, SetError,
    TrustStore,
};
pub use self::replay::{ReplayCache, Seen};
use crate::identity::SpiffeId;
use crate::reason::Reason;

/// The longest `jti` accepted, in bytes.
pub const MAX_JTI_LEN: usize = 256;
/// One-time token ids remembered per issuer.
const REPLAY_PER_ISSUER: usize = 50_000;

/// A refusal: the reason code and a human detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Error {
    /// The stable code.
    pub reason: Reason,
    /// What exactly was wrong.
    pub detail: String,
}

fn fail<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Error> {
    Err(Error {
        reason,
        detail: detail.into(),
    })
}

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Issuer identity.
    pub issuer: String,
    /// Subject.
    pub subject: String,
    /// The key that signed it.
    pub kid: String,
    /// Expiry.
    pub expires_at: i64,
    /// Every claim.
    pub claims: Map<String, Value>,
}

/// Verification limits.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Longest lifetime (exp − iat) accepted, seconds.
    pub max_ttl: i64,
    /// Clock skew tolerated on exp/nbf/iat, seconds.
    pub clock_skew: i64,
}

/// The verifier of one sidecar.
pub struct Verifier {
    own: SpiffeId,
    trust: Arc<TrustStore>,
    policy: Policy,
    replay: ReplayCache,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

fn int_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, Error> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| Error {
                reason: Reason::Malformed,
                detail: format!("claim {name} is not a number"),
            }),
    }
}

fn str_claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Result<&'a str, Error> {
    match claims.get(name) {
        None => fail(Reason::MissingClaim, format!("claim {name} is missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => fail(Reason::Malformed, format!("claim {name} is not a string")),
    }
}

/// Whether `aud` (a string or an array) names `audience`; `Err` if it is neither.
fn names_audience(claims: &Map<String, Value>, audience: &str) -> Result<bool, Error> {
    match claims.get("aud") {
        None => fail(Reason::MissingClaim, "claim aud is missing"),
        Some(Value::String(a)) => Ok(a == audience),
        Some(Value::Array(list)) => Ok(list.iter().any(|a| a.as_str() == Some(audience))),
        Some(_) => fail(
            Reason::Malformed,
            "claim aud is neither a string nor an array",
        ),
    }
}

/// A token whose structure, algorithm, issuer, kid and signature all passed.
struct Signed {
    issuer: String,
    kid: String,
    claims: Map<String, Value>,
}

/// Validity times of a token.
struct Times {
    exp: i64,
    iat: i64,
}

// === impl Verifier ===

impl Verifier {
    /// A verifier for the sidecar `own`, trusting `trust`.
    pub fn new(own: SpiffeId, trust: Arc<TrustStore>, policy: Policy) -> Self {
        Self {
            own,
            trust,
            policy,
            replay: ReplayCache::new(REPLAY_PER_ISSUER),
        }
    }

    /// This sidecar's identity: the default audience.
    pub fn own(&self) -> &SpiffeId {
        &self.own
    }

    /// The trust store, for inspection.
    pub fn trust(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    /// Verifies `token` for `audience` at `now`.
    pub async fn verify(&self, token: &str, audience: &str, now: i64) -> Result<Verified, Error> {
        let started = std::time::Instant::now();
        let result = self.verify_inner(token, audience, now).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.reason.as_str(),
        };
        metrics::counter!("tokend_verify_total", "result" => outcome).increment(1);
        metrics::histogram!("tokend_verify_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    /// Steps 1-5: structure, algorithm, issuer known, kid in that issuer's
    /// set only (one refresh on a miss), signature.
    async fn check_signed(&self, token: &str, now: i64) -> Result<Signed, Error> {
        let parts = parse(token)?;
        check_alg(&parts)?;
        let Ok(claims) = parts.claims else {
            return fail(Reason::Malformed, "payload is not a JSON object");
        };
        let issuer = str_claim(&claims, "iss")?.to_owned();
        let unknown_issuer = || {
            fail(
                Reason::UnknownIssuer,
                format!("issuer {issuer:?} is not this sidecar nor a configured peer"),
            )
        };
        let Some(kid) = parts.kid else {
            // Issuer before kid, as the check order says (cold path: two lookups).
            return if self.trust.knows(&issuer) {
                fail(Reason::MissingClaim, "header kid is missing")
            } else {
                unknown_issuer()
            };
        };
        // One lookup answers both "issuer known?" and "kid in its set?".
        let mut lookup = self.trust.lookup(&issuer, &kid, now);
        if matches!(lookup, Lookup::UnknownIssuer) {
            return unknown_issuer();
        }
        if matches!(lookup, Lookup::UnknownKid) {
            let ticket = self.trust.refresh_ticket(&issuer);
            self.trust.refresh(&issuer, ticket).await;
            lookup = self.trust.lookup(&issuer, &kid, now);
        }
        let key = match lookup {
            Lookup::Found(k) => k,
            Lookup::Revoked => {
                return fail(
                    Reason::RevokedKey,
                    format!("key {kid} was revoked by {issuer}"),
                );
            }
            Lookup::UnknownIssuer => return unknown_issuer(),
            Lookup::UnknownKid => {
                return fail(
                    Reason::UnknownKid,
                    format!("key {kid} is not in the key set of {issuer}"),
                );
            }
        };
        if !key.verify(parts.signing_input.as_bytes(), parts.signature) {
            return fail(
                Reason::BadSignature,
                format!("signature does not verify under {issuer} key {kid}"),
            );
        }
        Ok(Signed {
            issuer,
            kid,
            claims,
        })
    }

    /// Steps 6 and 8 at instant `at`: exp, nbf, iat with skew, then the lifetime.
    fn check_times(&self, claims: &Map<String, Value>, at: i64) -> Result<Times, Error> {
        let skew = self.policy.clock_skew;
        let Some(exp) = int_claim(claims, "exp")? else {
            return fail(Reason::MissingClaim, "claim exp is missing");
        };
        if at > exp.saturating_add(skew) {
            return fail(
                Reason::Expired,
                format!("expired at {exp}, now {at} (skew {skew}s)"),
            );
        }
        let nbf = int_claim(claims, "nbf")?;
        if let Some(nbf) = nbf
            && at.saturating_add(skew) < nbf
        {
            return fail(
                Reason::NotYetValid,
                format!("not before {nbf}, now {at} (skew {skew}s)"),
            );
        }
        let Some(iat) = int_claim(claims, "iat")? else {
            return fail(Reason::MissingClaim, "claim iat is missing");
        };
        if at.saturating_add(skew) < iat {
            return fail(
                Reason::NotYetValid,
                format!("issued in the future at {iat}, now {at} (skew {skew}s)"),
            );
        }
        Ok(Times { exp, iat })
    }

    fn check_lifetime(&self, t: &Times) -> Result<(), Error> {
        let lifetime = t.exp.saturating_sub(t.iat);
        if lifetime > self.policy.max_ttl {
            return fail(
                Reason::LifetimeTooLong,
                format!(
                    "lifetime {lifetime}s exceeds max_ttl {}s",
                    self.policy.max_ttl
                ),
            );
        }
        Ok(())
    }

    async fn verify_inner(&self, token: &str, audience: &str, now: i64) -> Result<Verified, Error> {
        // 1-5. structure, algorithm, issuer, kid in that issuer's set, signature
        let Signed {
            issuer,
            kid,
            claims,
        } = self.check_signed(token, now).await?;
        // 6. time
        let times = self.check_times(&claims, now)?;
        // 7. audience
        if !names_audience(&claims, audience)? {
            return fail(
                Reason::WrongAudience,
                format!("token is not for {audience}"),
            );
        }
        // 8. lifetime
        self.check_lifetime(&times)?;
        // 9. required claims, and the subject rule (sub = iss unless delegated)
        let subject = str_claim(&claims, "sub")?;
        let jti = str_claim(&claims, "jti")?;
        if jti.is_empty() || jti.len() > MAX_JTI_LEN {
            return fail(
                Reason::Malformed,
                format!("claim jti must be 1 to {MAX_JTI_LEN} bytes"),
            );
        }
        match claims.get("act") {
            None if subject != issuer => {
                return fail(
                    Reason::Malformed,
                    format!("sub {subject:?} differs from iss without an act (delegation) claim"),
                );
            }
            None => {}
            Some(act) => {
                self.check_chain(&issuer, subject, &times, &claims, act, now)
                    .await?
            }
        }
        // 10. one-time tokens
        if claims.get("one_time") == Some(&Value::Bool(true)) {
            let skew = self.policy.clock_skew;
            match self
                .replay
                .check(&issuer, jti, times.exp.saturating_add(skew), now)
            {
                Seen::First => {}
                Seen::Again => {
                    return fail(
                        Reason::Replayed,
                        format!("one-time token {jti} was already used"),
                    );
                }
                Seen::Full => {
                    return fail(
                        Reason::Unavailable,
                        "replay cache is full; cannot accept one-time tokens",
                    );
                }
            }
        }
        Ok(Verified {
            subject: subject.to_owned(),
            issuer,
            kid,
            expires_at: times.exp,
            claims,
        })
    }
}
