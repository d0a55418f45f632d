//! The ring-backed `CryptoProvider` for jsonwebtoken: RS256 only. jsonwebtoken
//! does the JWS framing; every signature is made and checked by ring here.
//!
//! jsonwebtoken hands the signer DER on every call, so the key pair is parsed
//! each time; `cargo bench --bench tokend` shows that parse is within noise of
//! the RSA signature itself, so no cache is kept.

use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::jwk::ThumbprintHash;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, RsaKeyPair};

/// The provider tokend installs: RS256 signing and verification through ring.
static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_pkcs8,
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
        ec_pub_components_from_private_key: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
        ed_pub_components_from_private_key: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
        compute_digest,
    },
};

/// Installs the ring provider as jsonwebtoken's process default. Idempotent;
/// every constructor of a signing or verifying key calls it first.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which tokend never does.
        let _ = RING_PROVIDER.install_default();
    });
}

fn new_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    if *alg != Algorithm::RS256 {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    Ok(Box::new(Rs256Signer(parsed_key_pair(key.as_bytes())?)))
}

fn new_verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    if *alg != Algorithm::RS256 {
        return Err(ErrorKind::UnsupportedAlgorithm.into());
    }
    match key.kind() {
        jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e } => Ok(Box::new(Rs256Verifier {
            n: n.clone(),
            e: e.clone(),
        })),
        _ => Err(ErrorKind::InvalidKeyFormat.into()),
    }
}

fn parsed_key_pair(der: &[u8]) -> jsonwebtoken::errors::Result<RsaKeyPair> {
    RsaKeyPair::from_pkcs8(der).map_err(|e| JwtError::from(ErrorKind::InvalidRsaKey(e.to_string())))
}

struct Rs256Signer(RsaKeyPair);

impl signature::Signer<Vec<u8>> for Rs256Signer {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let mut out = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(&sig::RSA_PKCS1_SHA256, &SystemRandom::new(), msg, &mut out)
            .map_err(|_| signature::Error::new())?;
        Ok(out)
    }
}

impl JwtSigner for Rs256Signer {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

/// An RSA public key as modulus and exponent (the only kind tokend imports).
struct Rs256Verifier {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl signature::Verifier<Vec<u8>> for Rs256Verifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        sig::RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&sig::RSA_PKCS1_2048_8192_SHA256, msg, signature)
        .map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for Rs256Verifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

fn rsa_components_from_pkcs8(der: &[u8]) -> jsonwebtoken::errors::Result<(Vec<u8>, Vec<u8>)> {
    let kp = parsed_key_pair(der)?;
    let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(kp.public());
    Ok((c.n, c.e))
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> jsonwebtoken::errors::Result<Vec<u8>> {
    let alg = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}
