//! ES256 (ECDSA P-256 with SHA-256) for proof-of-possession: the sidecar's
//! proof key (`ProofKey`, a ring `EcdsaKeyPair`), its public EC JWK and RFC
//! 7638 thumbprint, and the check of an ES256 signature under a public EC
//! JWK that a DPoP proof carries in its header. Tokens themselves stay RS256
//! (`jws`); ES256 signs only proofs. Pure: no clock, no I/O.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{
    self as sig, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use serde_json::{Map, Value};

/// A P-256 coordinate is 32 bytes.
const COORD_LEN: usize = 32;

/// Why EC key material or an EC JWK was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EcKeyError {
    /// The PKCS#8 document is not a P-256 private key ring accepts.
    #[error("not a P-256 PKCS#8 private key: {0}")]
    Pkcs8(String),
    /// No randomness for key generation or signing.
    #[error("no randomness available")]
    Random,
    /// The JWK is not a public P-256 key in the expected form.
    #[error("{0}")]
    Jwk(String),
}

/// This sidecar's proof key: signs DPoP proofs and names itself by its
/// thumbprint, the `cnf.jkt` of every token bound to it. Never leaves the
/// sidecar; its `Debug` prints no key material.
pub(crate) struct ProofKey {
    pair: EcdsaKeyPair,
    jkt: String,
    x: String,
    y: String,
}

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofKey")
            .field("jkt", &self.jkt)
            .finish_non_exhaustive()
    }
}

// === impl ProofKey ===

impl ProofKey {
    /// A fresh P-256 key: its PKCS#8 document (to store) and the key.
    pub(crate) fn generate() -> Result<(Vec<u8>, ProofKey), EcKeyError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| EcKeyError::Random)?;
        let der = doc.as_ref().to_vec();
        let key = Self::from_pkcs8(&der)?;
        Ok((der, key))
    }

    /// The key stored as `der` (PKCS#8, P-256).
    pub(crate) fn from_pkcs8(der: &[u8]) -> Result<ProofKey, EcKeyError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| EcKeyError::Pkcs8(e.to_string()))?;
        // ring gives the public key as the uncompressed point 04 || X || Y.
        let point = pair.public_key().as_ref();
        let (Some(&4), true) = (point.first(), point.len() == 1 + 2 * COORD_LEN) else {
            return Err(EcKeyError::Pkcs8("unexpected public point encoding".into()));
        };
        let x = B64.encode(&point[1..=COORD_LEN]);
        let y = B64.encode(&point[1 + COORD_LEN..]);
        let jkt = ec_thumbprint(&x, &y);
        Ok(ProofKey { pair, jkt, x, y })
    }

    /// The RFC 7638 thumbprint of the public key: a bound token's `cnf.jkt`.
    pub(crate) fn jkt(&self) -> &str {
        &self.jkt
    }

    /// The public JWK (`kty`, `crv`, `x`, `y`; nothing private), for the
    /// proof header.
    pub(crate) fn public_jwk(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("kty".into(), "EC".into());
        m.insert("crv".into(), "P-256".into());
        m.insert("x".into(), self.x.clone().into());
        m.insert("y".into(), self.y.clone().into());
        m
    }

    /// Signs `input`: the 64-byte JWS form (r || s), base64url.
    pub(crate) fn sign(&self, input: &[u8]) -> Result<String, EcKeyError> {
        let s = self
            .pair
            .sign(&SystemRandom::new(), input)
            .map_err(|_| EcKeyError::Random)?;
        Ok(B64.encode(s.as_ref()))
    }
}

/// The RFC 7638 thumbprint of a P-256 public key given by its base64url
/// coordinates: SHA-256 of `{"crv":"P-256","kty":"EC","x":…,"y":…}`.
pub(crate) fn ec_thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    B64.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

/// A public P-256 key read from a JWK a proof carries: checked to be EC,
/// P-256, public only (a `d` member is refused), with 32-byte coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EcPublicKey {
    x: String,
    y: String,
    point: Vec<u8>,
}

// === impl EcPublicKey ===

impl EcPublicKey {
    /// Reads a public EC JWK, naming what is wrong with it.
    pub(crate) fn from_jwk(jwk: &Map<String, Value>) -> Result<Self, EcKeyError> {
        let bad = |m: &str| EcKeyError::Jwk(m.to_owned());
        // A private member means the key left its holder: never accept it.
        for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            if jwk.contains_key(private) {
                return Err(EcKeyError::Jwk(format!(
                    "jwk carries the private member {private:?}: a proof must carry a public key only"
                )));
            }
        }
        if jwk.get("kty").and_then(Value::as_str) != Some("EC") {
            return Err(bad("jwk kty is not EC"));
        }
        if jwk.get("crv").and_then(Value::as_str) != Some("P-256") {
            return Err(bad("jwk crv is not P-256"));
        }
        let coord = |name: &str| -> Result<(String, Vec<u8>), EcKeyError> {
            let Some(Value::String(s)) = jwk.get(name) else {
                return Err(EcKeyError::Jwk(format!("jwk {name} is missing")));
            };
            let bytes = B64
                .decode(s)
                .map_err(|_| EcKeyError::Jwk(format!("jwk {name} is not base64url")))?;
            if bytes.len() != COORD_LEN {
                return Err(EcKeyError::Jwk(format!("jwk {name} is not 32 bytes")));
            }
            Ok((s.clone(), bytes))
        };
        let (x, xb) = coord("x")?;
        let (y, yb) = coord("y")?;
        let mut point = Vec::with_capacity(1 + 2 * COORD_LEN);
        point.push(4);
        point.extend_from_slice(&xb);
        point.extend_from_slice(&yb);
        Ok(Self { x, y, point })
    }

    /// Its RFC 7638 thumbprint.
    pub(crate) fn thumbprint(&self) -> String {
        ec_thumbprint(&self.x, &self.y)
    }

    /// Whether `signature_b64` (r || s, base64url) is an ES256 signature of
    /// `input` under this key. A point off the curve never verifies.
    pub(crate) fn verify(&self, input: &[u8], signature_b64: &str) -> bool {
        let Ok(s) = B64.decode(signature_b64) else {
            return false;
        };
        sig::UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.point)
            .verify(input, &s)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thumbprint of the public key of RFC 9449 §4.1's example proof is
    /// the `jkt` RFC 9449 §6.1 gives for it.
    #[test]
    fn rfc9449_example_thumbprint() {
        let jwk: Map<String, Value> = serde_json::from_str(
            r#"{"kty":"EC","x":"l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
                "y":"9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA","crv":"P-256"}"#,
        )
        .expect("json");
        let key = EcPublicKey::from_jwk(&jwk).expect("public EC key");
        assert_eq!(
            key.thumbprint(),
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
        );
    }

    /// A generated key signs what its public JWK verifies; its thumbprint is
    /// that of its JWK; another input or key does not verify.
    #[test]
    fn generated_key_round_trip() {
        let (der, key) = ProofKey::generate().expect("generate");
        let again = ProofKey::from_pkcs8(&der).expect("reload");
        assert_eq!(again.jkt(), key.jkt());
        let public = EcPublicKey::from_jwk(&key.public_jwk()).expect("public");
        assert_eq!(public.thumbprint(), key.jkt());
        let s = key.sign(b"hello").expect("sign");
        assert!(public.verify(b"hello", &s));
        assert!(!public.verify(b"hellO", &s));
        let (_, other) = ProofKey::generate().expect("generate");
        let s2 = other.sign(b"hello").expect("sign");
        assert!(!public.verify(b"hello", &s2));
        assert!(!format!("{key:?}").contains(&B64.encode(&der)));
    }

    /// Private members, other key types and curves, and short coordinates
    /// are refused, each named.
    #[test]
    fn import_refusals() {
        let (_, key) = ProofKey::generate().expect("generate");
        let mut with_d = key.public_jwk();
        with_d.insert("d".into(), "AAAA".into());
        let e = EcPublicKey::from_jwk(&with_d).expect_err("d");
        assert!(e.to_string().contains("private member \"d\""), "{e}");
        let mut rsa = key.public_jwk();
        rsa.insert("kty".into(), "RSA".into());
        assert!(EcPublicKey::from_jwk(&rsa).is_err());
        let mut p384 = key.public_jwk();
        p384.insert("crv".into(), "P-384".into());
        assert!(EcPublicKey::from_jwk(&p384).is_err());
        let mut short = key.public_jwk();
        short.insert("x".into(), "AAAA".into());
        assert!(EcPublicKey::from_jwk(&short).is_err());
    }
}
