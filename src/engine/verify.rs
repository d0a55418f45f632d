//! Verification as a pure decision: `verify_at(token, audience, now, policy,
//! anchors)` checks, in this order, structure → algorithm → issuer known →
//! kid in THAT issuer's set, in the key class the token's `cnf` demands
//! (`find_key`) → signature → exp/nbf/iat with clock skew →
//! audience → lifetime ≤ max_ttl → required claims and the subject rule →
//! delegation links. It returns the verified claims (with the one-time ids
//! the caller must still claim), a refusal, or "needs keys": an unknown kid
//! (or a signature that fails) under a peer issuer, which a refresh of that
//! issuer may cure. The async shell in `engine` refreshes once and retries.

use std::time::Duration;

use serde_json::{Map, Value};

use super::delegation;
use super::replay::OneTimeId;
use super::trust::{Anchors, Lookup};
use crate::jose::{self, BOUND_KID_SUFFIX, MAX_JTI_LEN, int_claim, names_audience, str_claim};
use crate::keys::KeyClass;
use crate::reason::{Reason, Refusal, refuse};
use crate::time::UnixTime;

/// Verification limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// Longest lifetime (exp − iat) accepted.
    pub max_ttl: Duration,
    /// Clock skew tolerated on exp, nbf and iat.
    pub clock_skew: Duration,
}

/// A token that passed every check but the replay claim.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Issuer identity.
    pub issuer: String,
    /// Subject (the original caller, for a delegated token).
    pub subject: String,
    /// The key that signed it.
    pub kid: String,
    /// Expiry.
    pub expires_at: UnixTime,
    /// Every claim.
    pub claims: Map<String, Value>,
    /// One-time ids in the token and its links, to claim before accepting.
    pub one_time: Vec<OneTimeId>,
    /// Every key the decision rested on (the token's and its links'): a
    /// remembered result holds only while each is still in its issuer's set.
    pub keys: Vec<KeyUse>,
    /// The earliest instant it is valid (nbf and iat, before skew).
    pub not_before: UnixTime,
    /// `claims` as JSON, written once: a remembered result is shared by
    /// every later hit, which then answers without serializing again.
    pub(super) claims_json: std::sync::OnceLock<String>,
}

impl Verified {
    /// The claims as a JSON object, serialized on first use only.
    pub fn claims_json(&self) -> &str {
        self.claims_json.get_or_init(|| {
            // A map of JSON values always serializes; "{}" is unreachable.
            serde_json::to_string(&self.claims).unwrap_or_else(|_| "{}".into())
        })
    }
}

/// One key a verification used: whose, which kid, which material, and
/// which class of the issuer's keys held it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    /// The issuer whose set held it.
    pub issuer: String,
    /// Its kid (the key's thumbprint, without a bound token's suffix: what
    /// a ban by kid and the key origins name).
    pub kid: String,
    /// Its `PublicKey::fingerprint`.
    pub fingerprint: [u8; 32],
    /// The class it was found in (a legacy bound token: `Signing`).
    pub class: KeyClass,
}

/// Why `verify_at` did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unverified {
    /// Final.
    Refused(Refusal),
    /// A refresh of `issuer` may cure it; if it does not, `refusal` stands.
    NeedKeys {
        /// The peer issuer whose keys to fetch again.
        issuer: String,
        /// The answer if fresh keys do not help.
        refusal: Refusal,
    },
}

impl From<Refusal> for Unverified {
    fn from(r: Refusal) -> Self {
        Unverified::Refused(r)
    }
}

impl Unverified {
    /// The refusal this outcome ends in if nothing more is done.
    pub fn into_refusal(self) -> Refusal {
        match self {
            Unverified::Refused(r) | Unverified::NeedKeys { refusal: r, .. } => r,
        }
    }

    /// The same outcome with `context` before its detail.
    pub(super) fn context(self, context: impl std::fmt::Display + Copy) -> Self {
        match self {
            Unverified::Refused(r) => Unverified::Refused(r.context(context)),
            Unverified::NeedKeys { issuer, refusal } => Unverified::NeedKeys {
                issuer,
                refusal: refusal.context(context),
            },
        }
    }
}

/// A token whose structure, algorithm, issuer, kid and signature all passed.
pub(super) struct Signed {
    pub(super) issuer: String,
    pub(super) kid: String,
    pub(super) claims: Map<String, Value>,
    /// The fingerprint of the key that verified it.
    pub(super) key: [u8; 32],
    /// The class the key was found in.
    pub(super) class: KeyClass,
}

impl Signed {
    pub(super) fn key_use(&self) -> KeyUse {
        let kid = self.kid.strip_suffix(BOUND_KID_SUFFIX).unwrap_or(&self.kid);
        KeyUse {
            issuer: self.issuer.clone(),
            kid: kid.to_owned(),
            fingerprint: self.key,
            class: self.class,
        }
    }
}

/// Validity times of a token.
#[derive(Clone, Copy)]
pub(super) struct Times {
    pub(super) exp: UnixTime,
    pub(super) iat: UnixTime,
    /// The later of nbf and iat.
    pub(super) not_before: UnixTime,
}

/// Verifies `token` for `audience` at `now` against `anchors`. Pure.
pub fn verify_at(
    token: &str,
    audience: &str,
    now: UnixTime,
    policy: &VerifyPolicy,
    anchors: &Anchors<'_>,
) -> Result<Verified, Unverified> {
    // 1-5. structure, algorithm, issuer, kid in that issuer's set, signature
    let signed = check_signed(token, now, anchors)?;
    let mut keys = vec![signed.key_use()];
    let Signed {
        issuer,
        kid,
        claims,
        ..
    } = signed;
    // 6. time
    let times = check_times(&claims, now, policy)?;
    // 7. audience
    if !names_audience(&claims, audience)? {
        return Err(Refusal::new(
            Reason::WrongAudience,
            format!("token is not for {audience}"),
        )
        .into());
    }
    // 8. lifetime
    check_lifetime(&times, policy)?;
    // 9. required claims, and the subject rule (sub = iss unless delegated)
    let subject = str_claim(&claims, "sub")?.to_owned();
    let jti = str_claim(&claims, "jti")?;
    if jti.is_empty() || jti.len() > MAX_JTI_LEN {
        return Err(Refusal::new(
            Reason::Malformed,
            format!("claim jti must be 1 to {MAX_JTI_LEN} bytes"),
        )
        .into());
    }
    let mut one_time = Vec::new();
    if is_one_time(&claims) {
        one_time.push(OneTimeId {
            issuer: issuer.clone(),
            jti: jti.to_owned(),
            forget_at: times.exp + policy.clock_skew,
        });
    }
    // 10. delegation links, each a verified token of its own
    match claims.get("act") {
        None if subject != issuer => {
            return Err(Refusal::new(
                Reason::Malformed,
                format!("sub {subject:?} differs from iss without an act (delegation) claim"),
            )
            .into());
        }
        None => {}
        Some(act) => {
            let outer = delegation::Outer {
                actor: &issuer,
                subject: &subject,
                times,
                claims: &claims,
            };
            let links = delegation::check_chain(outer, act, now, policy, anchors)?;
            one_time.extend(links.one_time);
            keys.extend(links.keys);
        }
    }
    Ok(Verified {
        subject,
        issuer,
        kid,
        expires_at: times.exp,
        not_before: times.not_before,
        claims,
        one_time,
        keys,
        claims_json: std::sync::OnceLock::new(),
    })
}

/// Whether a claims set is a one-time token.
pub(super) fn is_one_time(claims: &Map<String, Value>) -> bool {
    claims.get("one_time") == Some(&Value::Bool(true))
}

/// Steps 1-5: structure, algorithm, issuer known, kid in that issuer's set
/// only, signature.
pub(super) fn check_signed(
    token: &str,
    now: UnixTime,
    anchors: &Anchors<'_>,
) -> Result<Signed, Unverified> {
    let parts = jose::parse(token)?;
    jose::check_alg(&parts)?;
    let Ok(claims) = parts.claims else {
        return Err(Refusal::new(Reason::Malformed, "payload is not a JSON object").into());
    };
    let issuer = str_claim(&claims, "iss")?.to_owned();
    if !anchors.knows(&issuer) {
        return Err(Refusal::new(
            Reason::UnknownIssuer,
            format!("issuer {issuer:?} is not this sidecar nor a configured peer"),
        )
        .into());
    }
    let Some(kid) = parts.kid else {
        return Err(Refusal::new(Reason::MissingClaim, "header kid is missing").into());
    };
    let need_keys = |refusal: Refusal| -> Unverified {
        if anchors.is_peer(&issuer) {
            Unverified::NeedKeys {
                issuer: issuer.clone(),
                refusal,
            }
        } else {
            Unverified::Refused(refusal)
        }
    };
    let (found, class) = find_key(anchors, &issuer, &kid, &claims, now)?;
    let key = match found {
        Lookup::Found(k) => k,
        Lookup::Revoked => {
            return Err(Refusal::new(
                Reason::RevokedKey,
                format!("key {kid} was revoked by {issuer}"),
            )
            .into());
        }
        Lookup::UnknownIssuer => {
            return Err(Refusal::new(
                Reason::UnknownIssuer,
                format!("issuer {issuer:?} is not this sidecar nor a configured peer"),
            )
            .into());
        }
        Lookup::UnknownKid => {
            return Err(need_keys(Refusal::new(
                Reason::UnknownKid,
                format!("key {kid} is not in the key set of {issuer}"),
            )));
        }
    };
    if !key.verify(parts.signing_input.as_bytes(), parts.signature) {
        // A key poisoned by a relay (or a set gone stale) is cured by the
        // issuer's own fresh set: refresh once, as for an unknown kid.
        return Err(need_keys(Refusal::new(
            Reason::BadSignature,
            format!("signature does not verify under {issuer} key {kid}"),
        )));
    }
    Ok(Signed {
        issuer,
        kid,
        claims,
        key: key.fingerprint(),
        class,
    })
}

/// The key a token names, in the class its claims demand, with the class
/// it was found in. Bearer tokens (no `cnf`) are checked against the
/// issuer's signing keys only: a token a bound key signed without `cnf`
/// is refused (`malformed`), so a bound key never vouches for a bearer
/// token. Bound tokens (`cnf.jkt`) are checked against the bound keys;
/// the one exception is the form an earlier release minted — kid
/// `<kid>.dpop` over a signing key — accepted (with its proof, as every
/// bound token) so a rolling upgrade fails no call. A `cnf` token naming a
/// signing key by its plain kid is refused (`malformed`).
fn find_key<'a>(
    anchors: &Anchors<'a>,
    issuer: &str,
    kid: &str,
    claims: &Map<String, Value>,
    now: UnixTime,
) -> Result<(Lookup<'a>, KeyClass), Refusal> {
    let bound_to = super::dpop::bound_key(claims)?;
    let suffixed = kid.ends_with(BOUND_KID_SUFFIX);
    let found = |class| (anchors.lookup(issuer, kid, now, class), class);
    if bound_to.is_none() {
        // A bound token's kid on a token bound to nothing: not one tokend made.
        if suffixed {
            return refuse(
                Reason::Malformed,
                format!("kid {kid} is a bound token's, but the token has no cnf.jkt"),
            );
        }
        return match found(KeyClass::Signing) {
            (Lookup::UnknownKid, _) if matches!(found(KeyClass::Bound).0, Lookup::Found(_)) => {
                refuse(
                    Reason::Malformed,
                    format!(
                        "key {kid} of {issuer} signs bound tokens only, but the token has no cnf.jkt"
                    ),
                )
            }
            other => Ok(other),
        };
    }
    match found(KeyClass::Bound) {
        (Lookup::UnknownKid, _) => match found(KeyClass::Signing) {
            // The legacy form: `<kid>.dpop` over a signing key.
            legacy @ (Lookup::Found(_), _) if suffixed => Ok(legacy),
            (Lookup::Found(_), _) => refuse(
                Reason::Malformed,
                format!(
                    "the token is bound (cnf.jkt) but key {kid} of {issuer} is a bearer signing key: bound tokens are signed by bound keys"
                ),
            ),
            other => Ok(other),
        },
        other => Ok(other),
    }
}

/// Step 6 at instant `at`: exp, nbf and iat, each with the skew.
pub(super) fn check_times(
    claims: &Map<String, Value>,
    at: UnixTime,
    policy: &VerifyPolicy,
) -> Result<Times, Refusal> {
    let skew = policy.clock_skew;
    let Some(exp) = int_claim(claims, "exp")?.map(UnixTime::from_secs) else {
        return refuse(Reason::MissingClaim, "claim exp is missing");
    };
    if at > exp + skew {
        return refuse(
            Reason::Expired,
            format!("expired at {exp}, now {at} (skew {}s)", skew.as_secs()),
        );
    }
    let nbf = int_claim(claims, "nbf")?.map(UnixTime::from_secs);
    if let Some(nbf) = nbf
        && at + skew < nbf
    {
        return refuse(
            Reason::NotYetValid,
            format!("not before {nbf}, now {at} (skew {}s)", skew.as_secs()),
        );
    }
    let Some(iat) = int_claim(claims, "iat")?.map(UnixTime::from_secs) else {
        return refuse(Reason::MissingClaim, "claim iat is missing");
    };
    if at + skew < iat {
        return refuse(
            Reason::NotYetValid,
            format!(
                "issued in the future at {iat}, now {at} (skew {}s)",
                skew.as_secs()
            ),
        );
    }
    Ok(Times {
        exp,
        iat,
        not_before: nbf.map_or(iat, |n| n.max(iat)),
    })
}

/// Step 8: the lifetime `exp - iat` within `max_ttl`.
pub(super) fn check_lifetime(t: &Times, policy: &VerifyPolicy) -> Result<(), Refusal> {
    let lifetime = t.exp.since(t.iat);
    if lifetime > policy.max_ttl {
        return refuse(
            Reason::LifetimeTooLong,
            format!(
                "lifetime {}s exceeds max_ttl {}s",
                lifetime.as_secs(),
                policy.max_ttl.as_secs()
            ),
        );
    }
    Ok(())
}
