//! The compact JWS layer: split, decode, and the algorithm policy (RS256
//! only; no `crit`, no embedded or remote keys; `typ` JWT or JOSE), and the
//! signature check under one given key. Nothing here knows about issuers.
//! Header and payload are read strictly: a duplicated member name or nesting
//! past `strict_json::MAX_DEPTH` is `malformed`, never last-wins.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value};

use super::MAX_TOKEN_LEN;
use super::jwk::PublicKey;
use super::strict_json::{StrictJsonError, parse_object};
use crate::reason::{Reason, Refusal, refuse as fail};

/// The split, decoded parts of a compact JWS. Nothing here is trusted yet.
#[derive(Debug)]
pub struct Parts<'a> {
    /// `alg` header.
    pub alg: String,
    /// `kid` header.
    pub kid: Option<String>,
    /// Decoded claims (a JSON object), or the raw payload if not JSON.
    pub claims: Result<Map<String, Value>, Vec<u8>>,
    /// The header object.
    pub header: Map<String, Value>,
    /// `header.payload`, the bytes the signature covers, exactly as sent.
    pub signing_input: &'a str,
    /// The signature, base64url.
    pub signature: &'a str,
}

/// Splits and decodes a compact JWS (structure and algorithm checks only).
pub(crate) fn parse(token: &str) -> Result<Parts<'_>, Refusal> {
    if token.len() > MAX_TOKEN_LEN {
        return fail(
            Reason::Malformed,
            format!(
                "token is {} bytes, over the {MAX_TOKEN_LEN}-byte limit",
                token.len()
            ),
        );
    }
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return fail(
            Reason::Malformed,
            "not a compact JWS (expected three dot-separated parts)",
        );
    };
    let signing_input = &token[..h.len() + 1 + p.len()];
    let header_bytes = B64
        .decode(h)
        .map_err(|_| Refusal::new(Reason::Malformed, "header is not base64url"))?;
    let header = match parse_object(&header_bytes) {
        Ok(h) => h,
        Err(StrictJsonError::NotJson(_) | StrictJsonError::NotObject) => {
            return fail(Reason::Malformed, "header is not a JSON object");
        }
        Err(e) => return fail(Reason::Malformed, format!("header: {e}")),
    };
    let payload = B64
        .decode(p)
        .map_err(|_| Refusal::new(Reason::Malformed, "payload is not base64url"))?;
    if s.is_empty() || B64.decode(s).is_err() {
        return fail(Reason::Malformed, "signature is empty or not base64url");
    }
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        Some(_) => return fail(Reason::Malformed, "header alg is not a string"),
        None => return fail(Reason::Malformed, "header has no alg"),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return fail(Reason::Malformed, "header kid is not a string"),
    };
    // A payload that is not a JSON object is carried as bytes (the RFC 7520
    // vectors sign plain text; the verifier refuses it later), but JSON that
    // breaks the strict rules is refused here, naming the problem.
    let claims = match parse_object(&payload) {
        Ok(m) => Ok(m),
        Err(StrictJsonError::NotJson(_) | StrictJsonError::NotObject) => Err(payload),
        Err(e) => return fail(Reason::Malformed, format!("payload: {e}")),
    };
    Ok(Parts {
        alg,
        kid,
        claims,
        header,
        signing_input,
        signature: s,
    })
}

/// Checks the structure, algorithm and signature under one known key: the
/// signature layer the full verifier is built on, and the one test vectors use.
pub fn check_signature<'a>(token: &'a str, key: &PublicKey) -> Result<Parts<'a>, Refusal> {
    let parts = parse(token)?;
    check_alg(&parts)?;
    if !key.verify(parts.signing_input.as_bytes(), parts.signature) {
        return fail(
            Reason::BadSignature,
            format!("signature does not verify under key {}", key.kid()),
        );
    }
    Ok(parts)
}

/// The algorithm policy: RS256 only, `typ` JWT or JOSE, no `crit`, no
/// embedded or remote keys.
pub(crate) fn check_alg(parts: &Parts<'_>) -> Result<(), Refusal> {
    if parts.alg != "RS256" {
        return fail(
            Reason::UnsupportedAlg,
            format!("alg {:?} is not accepted; only RS256", parts.alg),
        );
    }
    match parts.header.get("typ") {
        None => {}
        Some(Value::String(t))
            if t.eq_ignore_ascii_case("JWT") || t.eq_ignore_ascii_case("JOSE") => {}
        Some(other) => {
            return fail(
                Reason::Malformed,
                format!("header typ {other} is not JWT: another kind of JWS"),
            );
        }
    }
    if parts.header.contains_key("crit") {
        return fail(
            Reason::UnsupportedAlg,
            "header has crit extensions tokend does not implement",
        );
    }
    for embedded in ["jwk", "jku", "x5u", "x5c"] {
        if parts.header.contains_key(embedded) {
            return fail(
                Reason::UnsupportedAlg,
                format!("header parameter {embedded} (embedded or remote key) is not accepted"),
            );
        }
    }
    Ok(())
}
