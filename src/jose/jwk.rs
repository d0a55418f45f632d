//! RSA public keys as JWKs (RFC 7517) and their RFC 7638 thumbprints, with the
//! import policy every key from outside passes: RSA only, RS256 only, 2048 to
//! 8192 bits. A `PublicKey` is what the verifier checks signatures with.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::DecodingKey;
use serde::{Deserialize, Serialize};

/// The smallest modulus tokend accepts from anyone.
pub(super) const MIN_RSA_BITS: usize = 2048;
/// The largest modulus ring verifies.
pub(super) const MAX_RSA_BITS: usize = 8192;

/// Why a JWK or JWKS was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwkError {
    /// `kty` other than RSA.
    #[error("key type {0:?} is not RSA")]
    NotRsa(String),
    /// `alg` present and not RS256.
    #[error("key algorithm {0:?} is not RS256")]
    WrongAlg(String),
    /// `use` present and not `sig`.
    #[error("key use {0:?} is not \"sig\"")]
    WrongUse(String),
    /// `n` or `e` not base64url.
    #[error("key member {0} is not base64url")]
    BadBase64(&'static str),
    /// Modulus outside 2048..=8192 bits.
    #[error("RSA modulus of {0} bits is outside {MIN_RSA_BITS}..={MAX_RSA_BITS}")]
    BadSize(usize),
    /// Exponent even, below 3, or longer than 33 bits (ring's limits).
    #[error("RSA public exponent is not acceptable")]
    BadExponent,
    /// The document is not a JWKS.
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    /// More keys than the caller allows.
    #[error("key set holds {0} keys, over the limit of {1}")]
    TooManyKeys(usize, usize),
    /// Two keys of one set share a kid.
    #[error("duplicate kid {0:?} in key set")]
    DuplicateKid(String),
}

/// One RSA JWK as it travels (public members only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    /// Key type: always "RSA" for tokend.
    pub kty: String,
    /// Key id: RFC 7638 thumbprint for keys tokend makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Intended algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Intended use.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// Modulus, base64url big-endian.
    #[serde(default)]
    pub n: String,
    /// Exponent, base64url big-endian.
    #[serde(default)]
    pub e: String,
}

/// A JWK Set document.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// A verified-usable RSA public key with its kid.
#[derive(Clone)]
pub struct PublicKey {
    kid: String,
    n: Vec<u8>,
    e: Vec<u8>,
    /// SHA-256 over the modulus and exponent: tells two keys under one kid apart.
    fingerprint: [u8; 32],
    decoding: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("bits", &self.bits())
            .finish()
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[i..]
}

// === impl PublicKey ===

impl PublicKey {
    /// Builds a key from big-endian modulus and exponent, checking the policy.
    /// The kid is the RFC 7638 thumbprint unless `kid` is given.
    pub fn from_components(n: &[u8], e: &[u8], kid: Option<String>) -> Result<Self, JwkError> {
        super::provider::install();
        let n = strip_leading_zeros(n).to_vec();
        let e = strip_leading_zeros(e).to_vec();
        let bits = bit_len(&n);
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(JwkError::BadSize(bits));
        }
        // ring: odd, at least 3, at most 33 bits.
        let e_ok =
            e.len() <= 5 && bit_len(&e) <= 33 && e.last().is_some_and(|l| l & 1 == 1) && e != [1];
        if !e_ok {
            return Err(JwkError::BadExponent);
        }
        let kid = kid.unwrap_or_else(|| thumbprint(&n, &e));
        let decoding = DecodingKey::from_rsa_raw_components(&n, &e);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&(n.len() as u64).to_be_bytes());
        ctx.update(&n);
        ctx.update(&e);
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(ctx.finish().as_ref());
        Ok(Self {
            kid,
            n,
            e,
            fingerprint,
            decoding,
        })
    }

    /// Imports a JWK under the policy (RSA, RS256, sig, 2048..=8192 bits).
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, JwkError> {
        if jwk.kty != "RSA" {
            return Err(JwkError::NotRsa(jwk.kty.clone()));
        }
        if let Some(alg) = &jwk.alg
            && alg != "RS256"
        {
            return Err(JwkError::WrongAlg(alg.clone()));
        }
        if let Some(u) = &jwk.use_
            && u != "sig"
        {
            return Err(JwkError::WrongUse(u.clone()));
        }
        let n = B64
            .decode(jwk.n.as_bytes())
            .map_err(|_| JwkError::BadBase64("n"))?;
        let e = B64
            .decode(jwk.e.as_bytes())
            .map_err(|_| JwkError::BadBase64("e"))?;
        Self::from_components(&n, &e, jwk.kid.clone())
    }

    /// The key id tokens name in their header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Whether the kid is the RFC 7638 thumbprint of the key (as for every
    /// key tokend makes): then no other key material can carry this kid.
    pub fn kid_is_thumbprint(&self) -> bool {
        self.kid == thumbprint(&self.n, &self.e)
    }

    /// A digest of the key material, whatever its kid.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        bit_len(&self.n)
    }

    /// The public JWK, with `alg` RS256 and `use` sig.
    pub fn to_jwk(&self) -> Jwk {
        Jwk {
            kty: "RSA".into(),
            kid: Some(self.kid.clone()),
            alg: Some("RS256".into()),
            use_: Some("sig".into()),
            n: B64.encode(&self.n),
            e: B64.encode(&self.e),
        }
    }

    /// Checks an RS256 signature (base64url text) over `signing_input`, through
    /// jsonwebtoken and the ring provider. False on any failure.
    pub fn verify(&self, signing_input: &[u8], signature_b64: &str) -> bool {
        jsonwebtoken::crypto::verify(
            signature_b64,
            signing_input,
            &self.decoding,
            jsonwebtoken::Algorithm::RS256,
        )
        .unwrap_or(false)
    }
}

/// RFC 7638 JWK thumbprint of an RSA key: base64url(SHA-256 of the canonical JSON).
pub(super) fn thumbprint(n: &[u8], e: &[u8]) -> String {
    let canonical = format!(
        r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
        B64.encode(strip_leading_zeros(e)),
        B64.encode(strip_leading_zeros(n))
    );
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

fn bit_len(be: &[u8]) -> usize {
    let be = strip_leading_zeros(be);
    match be.first() {
        None => 0,
        Some(&top) => (be.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
    }
}

/// Parses a JWKS document and imports every key, refusing the whole set on
/// the first bad key or duplicate kid (a partial set would hide the problem),
/// or when it holds more than `max_keys` keys (checked before any import).
pub(crate) fn parse_jwks(text: &[u8], max_keys: usize) -> Result<Vec<PublicKey>, JwkError> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| JwkError::NotJwks(e.to_string()))?;
    if set.keys.len() > max_keys {
        return Err(JwkError::TooManyKeys(set.keys.len(), max_keys));
    }
    let mut out: Vec<PublicKey> = Vec::with_capacity(set.keys.len());
    for jwk in &set.keys {
        let key = PublicKey::from_jwk(jwk)?;
        if out.iter().any(|k| k.kid == key.kid) {
            return Err(JwkError::DuplicateKid(key.kid));
        }
        out.push(key);
    }
    Ok(out)
}

/// Serialises keys as a JWKS JSON document.
pub(crate) fn to_jwks_json<'a>(keys: impl IntoIterator<Item = &'a PublicKey>) -> String {
    let set = JwkSet {
        keys: keys.into_iter().map(PublicKey::to_jwk).collect(),
    };
    serde_json::to_string(&set).unwrap_or_else(|_| r#"{"keys":[]}"#.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 section 3.1: the published thumbprint of the example key.
    #[test]
    fn rfc7638_example_thumbprint() {
        let n = B64
            .decode("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
            .expect("b64");
        let e = B64.decode("AQAB").expect("b64");
        assert_eq!(
            thumbprint(&n, &e),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    /// Short keys, non-RSA keys, wrong alg and even exponents are refused by name.
    #[test]
    fn import_policy() {
        let short = Jwk {
            kty: "RSA".into(),
            kid: None,
            alg: None,
            use_: None,
            n: B64.encode([0xffu8; 128]),
            e: "AQAB".into(),
        };
        assert_eq!(
            PublicKey::from_jwk(&short).err(),
            Some(JwkError::BadSize(1024))
        );
        let ec = Jwk {
            kty: "EC".into(),
            ..short.clone()
        };
        assert_eq!(
            PublicKey::from_jwk(&ec).err(),
            Some(JwkError::NotRsa("EC".into()))
        );
        let ok_n = B64.encode([0xffu8; 256]);
        let hs = Jwk {
            alg: Some("HS256".into()),
            n: ok_n.clone(),
            ..short.clone()
        };
        assert_eq!(
            PublicKey::from_jwk(&hs).err(),
            Some(JwkError::WrongAlg("HS256".into()))
        );
        let even = Jwk {
            e: B64.encode([2u8]),
            n: ok_n.clone(),
            ..short.clone()
        };
        assert_eq!(
            PublicKey::from_jwk(&even).err(),
            Some(JwkError::BadExponent)
        );
        let good = Jwk { n: ok_n, ..short };
        assert_eq!(PublicKey::from_jwk(&good).expect("2048-bit").bits(), 2048);
        assert!(matches!(parse_jwks(b"[1,2]", 8), Err(JwkError::NotJwks(_))));
    }
}
