//! The claims vocabulary: which names tokend alone sets, the size limits
//! every minter and verifier agrees on, and typed reads of claim values that
//! refuse with the right reason.

use serde_json::{Map, Value};

use crate::reason::{Reason, Refusal, refuse};

/// Claims only tokend sets; a caller can never give or override them.
/// `cnf` names the proof key a bound token is confirmed by (RFC 7800, 9449).
pub(crate) const REGISTERED_CLAIMS: [&str; 10] = [
    "iss", "sub", "aud", "iat", "nbf", "exp", "jti", "act", "one_time", "cnf",
];
/// The largest caller-claims document accepted, in bytes.
pub(crate) const MAX_CLAIMS_LEN: usize = 4096;
/// The longest token accepted, in bytes.
pub(crate) const MAX_TOKEN_LEN: usize = 8192;
/// The longest `jti` accepted, in bytes.
pub(crate) const MAX_JTI_LEN: usize = 256;
/// What a bound token's header `kid` adds to its signing key's thumbprint.
/// Bound tokens are signed by bound keys, which no published JWKS (`tokend
/// jwks`, JWKS files, SPIFFE bundles) lists at all; the suffix also makes a
/// bearer verifier that selects its key by `kid` (PyJWT's `PyJWKClient`,
/// Envoy `jwt_authn`, the SPIFFE libraries) refuse without a lookup, and
/// marks the legacy form an earlier release minted over a signing key. The
/// header is signed, so it cannot be edited away. tokend verifiers resolve
/// it to the key and require `cnf`.
pub(crate) const BOUND_KID_SUFFIX: &str = ".dpop";

/// The member of `act` holding the token the actor exchanged (RFC 8693 link).
pub(crate) const PREV_TOKEN: &str = "prev_token";

/// An integer claim (`exp`, `iat`, `nbf`), if present; a non-number is malformed.
pub(crate) fn int_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| {
                Refusal::new(Reason::Malformed, format!("claim {name} is not a number"))
            }),
    }
}

/// A required string claim: absent is `missing_claim`, another type `malformed`.
pub(crate) fn str_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a str, Refusal> {
    match claims.get(name) {
        None => refuse(Reason::MissingClaim, format!("claim {name} is missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => refuse(Reason::Malformed, format!("claim {name} is not a string")),
    }
}

/// Whether `aud` (a string or an array) names `audience`; `Err` if it is neither.
pub(crate) fn names_audience(claims: &Map<String, Value>, audience: &str) -> Result<bool, Refusal> {
    match claims.get("aud") {
        None => refuse(Reason::MissingClaim, "claim aud is missing"),
        Some(Value::String(a)) => Ok(a == audience),
        Some(Value::Array(list)) => Ok(list.iter().any(|a| a.as_str() == Some(audience))),
        Some(_) => refuse(
            Reason::Malformed,
            "claim aud is neither a string nor an array",
        ),
    }
}
