//! Building and signing a document: the claims as JSON, signed with the
//! instance's peer-certificate key (ECDSA P-256 as `tokend ca issue` makes
//! it → ES256; an RSA certificate key → RS256), the chain in `x5c`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Map, Value, json};

use super::{DOCUMENT_TYPE, DocumentClaims};

/// Why a peer certificate's key cannot sign documents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentKeyError {
    /// Neither an ECDSA P-256 nor an RSA PKCS#8 key.
    #[error("the peer key is neither ECDSA P-256 nor RSA PKCS#8: {0}")]
    Unsupported(String),
    /// No certificate was given.
    #[error("no certificate to carry in x5c")]
    NoCertificate,
    /// The key is not the leaf certificate's.
    #[error("the peer key does not belong to the leaf certificate")]
    Mismatch,
    /// The leaf certificate does not parse.
    #[error("the leaf certificate does not parse: {0}")]
    Certificate(String),
    /// ring refused to sign.
    #[error("signing failed")]
    Sign,
}

enum Signer {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

/// A peer certificate's private key and chain, ready to sign documents.
pub struct DocumentKey {
    signer: Signer,
    /// `x5c`: standard base64 DER, leaf first.
    x5c: Vec<String>,
    rng: SystemRandom,
}

impl std::fmt::Debug for DocumentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentKey")
            .field("alg", &self.alg())
            .field("key", &"...")
            .finish()
    }
}

// === impl DocumentKey ===

impl DocumentKey {
    /// The key (PKCS#8 DER) and the chain (DER, leaf first) of a peer
    /// certificate; the key must be the leaf's.
    pub fn from_pkcs8(pkcs8: &[u8], chain: &[Vec<u8>]) -> Result<Self, DocumentKeyError> {
        let rng = SystemRandom::new();
        let signer = match EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &rng,
        ) {
            Ok(k) => Signer::Es256(k),
            Err(ec) => match RsaKeyPair::from_pkcs8(pkcs8) {
                Ok(k) => Signer::Rs256(k),
                Err(rsa) => {
                    return Err(DocumentKeyError::Unsupported(format!(
                        "ECDSA: {ec}; RSA: {rsa}"
                    )));
                }
            },
        };
        let leaf = chain.first().ok_or(DocumentKeyError::NoCertificate)?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| DocumentKeyError::Certificate(e.to_string()))?;
        let public = match &signer {
            Signer::Es256(k) => k.public_key().as_ref().to_vec(),
            Signer::Rs256(k) => k.public_key().as_ref().to_vec(),
        };
        if cert.public_key().subject_public_key.data.as_ref() != public.as_slice() {
            return Err(DocumentKeyError::Mismatch);
        }
        Ok(Self {
            signer,
            x5c: chain.iter().map(|c| STANDARD.encode(c)).collect(),
            rng,
        })
    }

    /// The JWS algorithm this key signs with.
    pub fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Es256(_) => "ES256",
            Signer::Rs256(_) => "RS256",
        }
    }

    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, DocumentKeyError> {
        match &self.signer {
            Signer::Es256(k) => k
                .sign(&self.rng, input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| DocumentKeyError::Sign),
            Signer::Rs256(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &self.rng, input, &mut sig)
                    .map_err(|_| DocumentKeyError::Sign)?;
                Ok(sig)
            }
        }
    }
}

/// The JSON payload of `claims`.
pub(super) fn payload(claims: &DocumentClaims) -> Value {
    let keys: Vec<_> = claims.keys.iter().map(|k| k.to_jwk()).collect();
    let bound: Vec<_> = claims.bound_keys.iter().map(|k| k.to_jwk()).collect();
    let key_exp: Map<String, Value> = claims
        .key_expires
        .iter()
        .map(|(k, t)| (k.clone(), Value::from(t.as_secs())))
        .collect();
    let mut p = json!({
        "iss": claims.identity.as_str(),
        "instance": claims.instance,
        "seq": claims.seq,
        "iat": claims.issued_at.as_secs(),
        "exp": claims.expires_at.as_secs(),
        "jwks": { "keys": keys },
        "revoked": claims.revoked,
        "key_exp": key_exp,
    });
    if let (Some(addr), Some(obj)) = (&claims.address, p.as_object_mut()) {
        obj.insert("addr".into(), Value::String(addr.clone()));
    }
    if let (false, Some(obj)) = (bound.is_empty(), p.as_object_mut()) {
        obj.insert("bound_jwks".into(), json!({ "keys": bound }));
    }
    p
}

/// Signs `claims` with `key` as a compact JWS carrying `key`'s chain.
pub fn sign_document(
    claims: &DocumentClaims,
    key: &DocumentKey,
) -> Result<String, DocumentKeyError> {
    let header = json!({ "alg": key.alg(), "typ": DOCUMENT_TYPE, "x5c": key.x5c });
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload(claims).to_string())
    );
    let sig = key.sign(input.as_bytes())?;
    Ok(format!("{input}.{}", B64.encode(sig)))
}
