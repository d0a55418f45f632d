//! The stable reason codes of DESIGN.md: the one vocabulary every refusal is
//! expressed in, on the wire (`tokend-reason` metadata), on the CLI
//! (`rejected: <reason>: <detail>`) and in metrics. Pure: no tonic here.

use std::fmt;
use std::str::FromStr;

/// Why a token or request was refused. The string forms are a public contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a compact JWS, bad base64, bad JSON, or a bad request field.
    Malformed,
    /// `alg` is not RS256 (or the header asks for something we do not do).
    UnsupportedAlg,
    /// `iss` is not this sidecar nor a configured peer.
    UnknownIssuer,
    /// `kid` is not in the issuer's key set (even after a refresh).
    UnknownKid,
    /// The RSA signature does not verify under the issuer's key.
    BadSignature,
    /// `exp` has passed (beyond clock skew).
    Expired,
    /// `nbf` or `iat` lies in the future (beyond clock skew).
    NotYetValid,
    /// `aud` does not name the expected audience.
    WrongAudience,
    /// A required claim or header parameter is absent.
    MissingClaim,
    /// `exp - iat` exceeds the verifier's `max_ttl`, or a requested ttl does.
    LifetimeTooLong,
    /// A one-time token presented a second time.
    Replayed,
    /// Signed by a key its issuer has revoked.
    RevokedKey,
    /// The caller may not use this operation.
    PermissionDenied,
    /// A dependency (a key, a peer) is not available right now.
    Unavailable,
    /// A token bound to a proof key (`cnf.jkt`) came without a DPoP proof,
    /// or as a plain bearer token (RFC 9449 §7.2).
    MissingProof,
    /// The DPoP proof does not prove possession for this request: bad
    /// structure or `typ`, not ES256, a private or other key, a signature,
    /// method, URI, token hash or time that does not match, or a replay.
    BadProof,
    /// The verifier requires a server nonce (RFC 9449 §9, `[tokens]
    /// proof_nonce = "required"`) and the proof carries none, or one this
    /// verifier replica did not issue or that has expired. The refusal
    /// carries a fresh nonce (`dpop-nonce`) to prove again with.
    UseDpopNonce,
}

impl Reason {
    /// Every reason, in the order of DESIGN.md.
    pub const ALL: [Reason; 17] = [
        Reason::Malformed,
        Reason::UnsupportedAlg,
        Reason::UnknownIssuer,
        Reason::UnknownKid,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::WrongAudience,
        Reason::MissingClaim,
        Reason::LifetimeTooLong,
        Reason::Replayed,
        Reason::RevokedKey,
        Reason::PermissionDenied,
        Reason::Unavailable,
        Reason::MissingProof,
        Reason::BadProof,
        Reason::UseDpopNonce,
    ];

    /// The stable wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnsupportedAlg => "unsupported_alg",
            Reason::UnknownIssuer => "unknown_issuer",
            Reason::UnknownKid => "unknown_kid",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongAudience => "wrong_audience",
            Reason::MissingClaim => "missing_claim",
            Reason::LifetimeTooLong => "lifetime_too_long",
            Reason::Replayed => "replayed",
            Reason::RevokedKey => "revoked_key",
            Reason::PermissionDenied => "permission_denied",
            Reason::Unavailable => "unavailable",
            Reason::MissingProof => "missing_proof",
            Reason::BadProof => "bad_proof",
            Reason::UseDpopNonce => "use_dpop_nonce",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the stable reason code and a human detail naming what exactly
/// was wrong. The one error every decision below the API is expressed in;
/// `api::status` is the only place that turns it into a wire status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Refusal {
    /// The stable code.
    pub reason: Reason,
    /// What exactly was wrong.
    pub detail: String,
}

impl Refusal {
    /// A refusal for `reason`, saying `detail`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    /// The same refusal with `context` put before its detail.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Self {
            reason: self.reason,
            detail: format!("{context}: {}", self.detail),
        }
    }
}

/// `Err(Refusal)`, for the many early returns of the checks.
pub(crate) fn refuse<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(reason, detail))
}

/// A string that is not one of the reason codes.
#[derive(Debug, thiserror::Error)]
#[error("unknown reason code {0:?}")]
pub struct UnknownReason(String);

impl FromStr for Reason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code round-trips through its string form, and the forms are distinct.
    #[test]
    fn round_trip_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>().expect("parses"), r);
            assert!(seen.insert(r.as_str()));
        }
        assert!("nonsense".parse::<Reason>().is_err());
    }
}
