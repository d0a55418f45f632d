//! Peers: where other issuers' public keys come from. This module holds the
//! offline source (`[[peers]] jwks_file`); each source fills its issuer's set
//! in the verifier's `TrustStore` and can be asked to refresh it.

mod file;

pub use self::file::{JwksFileSource, MAX_JWKS_BYTES};
