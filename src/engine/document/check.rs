//! Verifying a document, in this order: size → structure and header policy
//! → chain to the trust domain's CA at `now` → exactly one URI SAN, a SPIFFE
//! ID of the trust domain → signature under the leaf's key → claims (types,
//! limits) → times (`iat`, `exp`, lifetime) → the claimed identity equals
//! the certificate's. Each refusal is its own `DocumentError`.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use ring::signature::{self, UnparsedPublicKey};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime as TlsTime};
use serde_json::{Map, Value};
use x509_parser::oid_registry::{OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::{GeneralName, X509Certificate};

use super::{
    DOCUMENT_TYPE, DocumentAnchors, DocumentClaims, DocumentError, DocumentLimits, MAX_ADDR_LEN,
    MAX_INSTANCE_LEN, VerifiedDocument,
};
use crate::identity::SpiffeId;
use crate::jose::{Jwk, PublicKey, parse_object};
use crate::time::UnixTime;

static PROVIDER: LazyLock<CryptoProvider> = LazyLock::new(rustls::crypto::ring::default_provider);

fn malformed(detail: impl Into<String>) -> DocumentError {
    DocumentError::Malformed(detail.into())
}

fn tls_time(t: UnixTime) -> TlsTime {
    TlsTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(t.as_secs()).unwrap_or(0),
    ))
}

/// Verifies `bytes` as a key-set document of `anchors`' trust domain at
/// `now`, within `limits`. Pure. The result's identity is the certificate's.
pub fn verify_document(
    bytes: &[u8],
    anchors: &DocumentAnchors,
    now: UnixTime,
    limits: &DocumentLimits,
) -> Result<VerifiedDocument, DocumentError> {
    if bytes.len() > limits.max_bytes {
        return Err(DocumentError::TooLarge {
            size: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text"))?;
    let mut it = text.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(malformed("not a compact JWS (three dot-separated parts)"));
    };
    let header = decode_object(h, "header")?;
    let alg = header_policy(&header)?;
    let chain = x5c(&header, limits)?;
    let leaf = check_chain(&chain, anchors, now)?;
    let certified = certificate_identity(&leaf, anchors)?;
    let signature = B64
        .decode(s)
        .map_err(|_| malformed("signature is not base64url"))?;
    check_signature(&leaf, &alg, &text[..h.len() + 1 + p.len()], &signature)?;
    let payload = decode_object(p, "payload")?;
    let claims = claims(&payload, certified, limits)?;
    check_times(&claims, now, limits)?;
    Ok(VerifiedDocument {
        usable_until: claims.expires_at + limits.clock_skew,
        claims,
        jws: Arc::from(text),
        serial: serial_hex(leaf.raw_serial()),
    })
}

fn decode_object(part: &str, what: &str) -> Result<Map<String, Value>, DocumentError> {
    let raw = B64
        .decode(part)
        .map_err(|_| malformed(format!("{what} is not base64url")))?;
    parse_object(&raw).map_err(|e| malformed(format!("{what}: {e}")))
}

/// `typ` must be ours, no `crit`, no other key source than `x5c`; the alg.
fn header_policy(header: &Map<String, Value>) -> Result<String, DocumentError> {
    match header.get("typ") {
        Some(Value::String(t)) if t == DOCUMENT_TYPE => {}
        other => {
            return Err(malformed(format!(
                "header typ {other:?} is not {DOCUMENT_TYPE:?}"
            )));
        }
    }
    if header.contains_key("crit") {
        return Err(malformed("header has crit extensions"));
    }
    for other in ["jwk", "jku", "x5u", "kid"] {
        if header.contains_key(other) {
            return Err(malformed(format!(
                "header parameter {other} is not accepted"
            )));
        }
    }
    match header.get("alg") {
        Some(Value::String(a)) => Ok(a.clone()),
        _ => Err(malformed("header alg is missing or not a string")),
    }
}

/// The `x5c` certificates, DER, leaf first.
fn x5c(
    header: &Map<String, Value>,
    limits: &DocumentLimits,
) -> Result<Vec<CertificateDer<'static>>, DocumentError> {
    let Some(Value::Array(certs)) = header.get("x5c") else {
        return Err(malformed("header x5c is missing or not an array"));
    };
    if certs.is_empty() {
        return Err(DocumentError::BadChain("x5c is empty".into()));
    }
    if certs.len() > limits.max_chain {
        return Err(DocumentError::BadChain(format!(
            "x5c holds {} certificates, over the limit of {}",
            certs.len(),
            limits.max_chain
        )));
    }
    certs
        .iter()
        .map(|c| match c {
            Value::String(s) => STANDARD
                .decode(s)
                .map(CertificateDer::from)
                .map_err(|_| malformed("an x5c entry is not base64")),
            _ => Err(malformed("an x5c entry is not a string")),
        })
        .collect()
}

/// A certificate serial as lowercase hex, leading zero bytes dropped (the
/// form `engine::bans` and the peer TLS print).
fn serial_hex(raw: &[u8]) -> String {
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    crate::engine::normalize_serial(&hex).unwrap_or(hex)
}

/// The leaf, once the chain leads to the CA at `now`.
fn check_chain<'c>(
    chain: &'c [CertificateDer<'static>],
    anchors: &DocumentAnchors,
    now: UnixTime,
) -> Result<X509Certificate<'c>, DocumentError> {
    let bad = |e: String| DocumentError::BadChain(e);
    let leaf_der = chain.first().ok_or_else(|| bad("x5c is empty".into()))?;
    let parsed = rustls::server::ParsedCertificate::try_from(leaf_der)
        .map_err(|e| bad(format!("leaf: {e}")))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &anchors.roots(),
        &chain[1..],
        tls_time(now),
        PROVIDER.signature_verification_algorithms.all,
    )
    .map_err(|e| bad(e.to_string()))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| bad(format!("leaf does not parse: {e}")))?;
    Ok(leaf)
}

/// Exactly one URI SAN, a SPIFFE ID of the trust domain.
fn certificate_identity(
    leaf: &X509Certificate<'_>,
    anchors: &DocumentAnchors,
) -> Result<SpiffeId, DocumentError> {
    let uris: Vec<String> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(DocumentError::BadChain(format!("leaf SAN: {e}"))),
    };
    let [uri] = uris.as_slice() else {
        return Err(DocumentError::SanCount(uris.len()));
    };
    let foreign = || DocumentError::ForeignIdentity {
        uri: uri.clone(),
        td: anchors.td.to_string(),
    };
    let id = SpiffeId::parse(uri).map_err(|_| foreign())?;
    if id.trust_domain() != anchors.td.as_str() {
        return Err(foreign());
    }
    Ok(id)
}

/// The signature under the leaf's key, with the alg that key type implies.
fn check_signature(
    leaf: &X509Certificate<'_>,
    alg: &str,
    input: &str,
    sig: &[u8],
) -> Result<(), DocumentError> {
    let spki = leaf.public_key();
    let key = spki.subject_public_key.data.as_ref();
    let algorithm: &dyn signature::VerificationAlgorithm = match (alg, &spki.algorithm.algorithm) {
        ("ES256", oid) if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY => &signature::ECDSA_P256_SHA256_FIXED,
        ("RS256", oid) if *oid == OID_PKCS1_RSAENCRYPTION => &signature::RSA_PKCS1_2048_8192_SHA256,
        _ => return Err(DocumentError::UnsupportedAlg(alg.to_owned())),
    };
    UnparsedPublicKey::new(algorithm, key)
        .verify(input.as_bytes(), sig)
        .map_err(|_| DocumentError::BadSignature)
}

fn int(payload: &Map<String, Value>, name: &str) -> Result<i64, DocumentError> {
    payload
        .get(name)
        .and_then(Value::as_i64)
        .ok_or_else(|| malformed(format!("claim {name} is missing or not an integer")))
}

fn string<'a>(payload: &'a Map<String, Value>, name: &str) -> Result<&'a str, DocumentError> {
    payload
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| malformed(format!("claim {name} is missing or not a string")))
}

/// The claims, typed and within limits; `iss` must be `certified`.
fn claims(
    payload: &Map<String, Value>,
    certified: SpiffeId,
    limits: &DocumentLimits,
) -> Result<DocumentClaims, DocumentError> {
    let claimed = string(payload, "iss")?;
    if claimed != certified.as_str() {
        return Err(DocumentError::IdentityMismatch {
            claimed: claimed.to_owned(),
            certified,
        });
    }
    let instance = string(payload, "instance")?;
    if instance.is_empty()
        || instance.len() > MAX_INSTANCE_LEN
        || !instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(malformed(format!(
            "instance must be 1 to {MAX_INSTANCE_LEN} of [A-Za-z0-9._-]"
        )));
    }
    let seq = payload
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| malformed("claim seq is missing or not a non-negative integer"))?;
    let address = match payload.get("addr") {
        None => None,
        Some(Value::String(a)) if a.len() <= MAX_ADDR_LEN && a.starts_with("https://") => {
            Some(a.clone())
        }
        Some(_) => {
            return Err(malformed(format!(
                "claim addr must be an https:// URL of at most {MAX_ADDR_LEN} bytes"
            )));
        }
    };
    Ok(DocumentClaims {
        identity: certified,
        instance: instance.to_owned(),
        seq,
        issued_at: UnixTime::from_secs(int(payload, "iat")?),
        expires_at: UnixTime::from_secs(int(payload, "exp")?),
        address,
        keys: keys(payload, "jwks", limits)?,
        bound_keys: bound_keys(payload, limits)?,
        revoked: revoked(payload, limits)?,
        key_expires: key_expires(payload, limits)?,
    })
}

/// The bound-token keys (`bound_jwks`, absent: none); no key of both classes.
fn bound_keys(
    payload: &Map<String, Value>,
    limits: &DocumentLimits,
) -> Result<Vec<PublicKey>, DocumentError> {
    if !payload.contains_key("bound_jwks") {
        return Ok(Vec::new());
    }
    let bound = keys(payload, "bound_jwks", limits)?;
    let signing = keys(payload, "jwks", limits)?;
    if let Some(k) = bound
        .iter()
        .find(|b| signing.iter().any(|s| s.kid() == b.kid()))
    {
        return Err(malformed(format!(
            "key {:?} is listed in both jwks and bound_jwks",
            k.kid()
        )));
    }
    Ok(bound)
}

/// The keys of the JWKS claim `name`, each under its thumbprint, no kid twice.
fn keys(
    payload: &Map<String, Value>,
    name: &str,
    limits: &DocumentLimits,
) -> Result<Vec<PublicKey>, DocumentError> {
    let Some(Value::Array(jwks)) = payload
        .get(name)
        .and_then(|j| j.as_object())
        .and_then(|j| j.get("keys"))
    else {
        return Err(malformed(format!(
            "claim {name} is not a JWKS ({{\"keys\":[…]}})"
        )));
    };
    if jwks.len() > limits.max_keys {
        return Err(DocumentError::TooManyKeys {
            count: jwks.len(),
            max: limits.max_keys,
        });
    }
    let mut out: Vec<PublicKey> = Vec::with_capacity(jwks.len());
    for j in jwks {
        let jwk: Jwk = serde_json::from_value(j.clone())
            .map_err(|e| malformed(format!("a key of {name}: {e}")))?;
        let key = PublicKey::from_jwk(&jwk).map_err(|e| malformed(format!("{name}: {e}")))?;
        // Keys travel under their thumbprint, so no key of a document can
        // take the kid of another key (a colliding kid would shadow it).
        if !key.kid_is_thumbprint() {
            return Err(malformed(format!(
                "{name}: kid {:?} is not the key's RFC 7638 thumbprint",
                key.kid()
            )));
        }
        if out.iter().any(|k| k.kid() == key.kid()) {
            return Err(malformed(format!("{name}: duplicate kid {:?}", key.kid())));
        }
        out.push(key);
    }
    Ok(out)
}

fn revoked(
    payload: &Map<String, Value>,
    limits: &DocumentLimits,
) -> Result<Vec<String>, DocumentError> {
    let Some(Value::Array(list)) = payload.get("revoked") else {
        return Err(malformed("claim revoked is missing or not an array"));
    };
    if list.len() > limits.max_revoked {
        return Err(DocumentError::TooManyRevoked {
            count: list.len(),
            max: limits.max_revoked,
        });
    }
    list.iter()
        .map(|k| match k.as_str() {
            Some(k) if !k.is_empty() && k.len() <= 128 => Ok(k.to_owned()),
            _ => Err(malformed("a revoked kid is not a string of 1 to 128 bytes")),
        })
        .collect()
}

fn key_expires(
    payload: &Map<String, Value>,
    limits: &DocumentLimits,
) -> Result<BTreeMap<String, UnixTime>, DocumentError> {
    let Some(Value::Object(map)) = payload.get("key_exp") else {
        return Err(malformed("claim key_exp is missing or not an object"));
    };
    if map.len() > 2 * limits.max_keys + limits.max_revoked {
        return Err(DocumentError::TooManyKeys {
            count: map.len(),
            max: limits.max_keys,
        });
    }
    map.iter()
        .map(|(k, t)| match t.as_i64() {
            Some(t) => Ok((k.clone(), UnixTime::from_secs(t))),
            None => Err(malformed(format!("key_exp of {k:?} is not an integer"))),
        })
        .collect()
}

/// `iat` not in the future, `exp` not past, lifetime within the limit.
fn check_times(
    c: &DocumentClaims,
    now: UnixTime,
    limits: &DocumentLimits,
) -> Result<(), DocumentError> {
    let skew = limits.clock_skew;
    if c.issued_at > now + skew {
        return Err(DocumentError::IssuedInFuture {
            iat: c.issued_at,
            now,
            skew: skew.as_secs(),
        });
    }
    if c.expires_at <= now - skew {
        return Err(DocumentError::Expired {
            exp: c.expires_at,
            now,
            skew: skew.as_secs(),
        });
    }
    let lifetime = c.expires_at.as_secs().saturating_sub(c.issued_at.as_secs());
    if lifetime <= 0 || lifetime as u64 > limits.max_lifetime.as_secs() {
        return Err(DocumentError::LifetimeTooLong {
            lifetime,
            max: limits.max_lifetime.as_secs(),
        });
    }
    Ok(())
}
