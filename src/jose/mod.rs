//! The token format, below everything that mints or verifies: claim names
//! and limits (`claims`), the compact-JWS layer and its algorithm policy
//! (`jws`), RSA JWK import and RFC 7638 thumbprints (`jwk`), and the ring
//! `CryptoProvider` jsonwebtoken signs and verifies through (`provider`),
//! and the ES256 proof key and EC JWKs of proof of possession (`es256`).
//! Pure: no clock, no I/O, no issuers.

mod claims;
mod es256;
mod jwk;
mod jws;
mod provider;
mod strict_json;

pub(crate) use self::claims::{
    BOUND_KID_SUFFIX, MAX_CLAIMS_LEN, MAX_JTI_LEN, MAX_TOKEN_LEN, PREV_TOKEN, REGISTERED_CLAIMS,
    int_claim, names_audience, str_claim,
};
pub(crate) use self::es256::{EcPublicKey, ProofKey};
pub use self::jwk::{Jwk, PublicKey};
pub(crate) use self::jwk::{JwkError, parse_jwks, to_jwks_json};
pub use self::jws::{Parts, check_signature};
pub(crate) use self::jws::{check_alg, parse};
pub(crate) use self::provider::install as install_provider;
pub(crate) use self::strict_json::parse_object;
