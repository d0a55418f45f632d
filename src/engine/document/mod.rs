//! Signed key-set documents: what one instance of a service publishes about
//! its own keys, signed with its PEER CERTIFICATE's private key as a compact
//! JWS that carries the certificate chain (`x5c`). Such a document keeps its
//! authenticity over any relay (a mesh peer, etcd, a file): a verifier
//! checks the chain to the trust domain's CA and files the keys under the
//! SPIFFE ID of the certificate, never under anything the relay says.
//!
//! Pure: building and signing the claims (`build`), parsing and verifying a
//! document against the CA at an explicit `now` within size limits
//! (`check`). No clock, no I/O. The rollback check (a lower `seq` than one
//! seen from that instance) lives in the `TrustSet`, which remembers the
//! high-water marks.
//!
//! The wire form (header `{"alg":"ES256"|"RS256","typ":"tokend-keyset+jws",
//! "x5c":[leaf, intermediates…]}`):
//!
//! ```json
//! {"iss":"spiffe://td/payments","instance":"5f0c…","seq":42,
//!  "iat":1700000000,"exp":1700000300,"addr":"https://10.0.0.7:7443",
//!  "jwks":{"keys":[…RSA JWKs…]},"bound_jwks":{"keys":[…RSA JWKs…]},
//!  "revoked":["kid…"],"key_exp":{"kid":1700003900}}
//! ```
//!
//! `bound_jwks` (added after 0.1; absent means none) lists the keys the
//! instance signs bound tokens (`cnf.jkt`) with: a class of their own, never
//! listed in `jwks`. A verifier of an earlier release ignores the claim and
//! so cannot verify bound tokens signed by them; it verifies everything else
//! as before. `revoked` and `key_exp` cover both classes.
//!
//! Its `typ` and `x5c` make it unusable as a token (the token verifier
//! refuses both), and a token is refused here (wrong `typ`, no `x5c`).

mod build;
mod check;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub use self::build::{DocumentKey, DocumentKeyError, sign_document};
pub use self::check::verify_document;
use super::trust::{MAX_KEYS_PER_ISSUER, MAX_REVOKED_PER_ISSUER};
use crate::identity::{SpiffeId, TrustDomain};
use crate::jose::PublicKey;
use crate::time::UnixTime;

/// The JWS `typ` of a key-set document.
pub const DOCUMENT_TYPE: &str = "tokend-keyset+jws";
/// The largest document accepted by default, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 128 * 1024;
/// The longest lifetime (`exp - iat`) a verifier accepts by default: the
/// bound on how long a withheld revocation can go unseen.
pub const MAX_DOCUMENT_LIFETIME: Duration = Duration::from_secs(3600);
/// How long a document is valid when `[peer_api] document_lifetime` is
/// not set (it is re-signed at half of it).
pub const DEFAULT_DOCUMENT_LIFETIME: Duration = Duration::from_secs(300);
/// Certificates in `x5c` at most (leaf and intermediates).
pub(crate) const MAX_CHAIN_LEN: usize = 4;
/// The longest instance id, in bytes.
pub(crate) const MAX_INSTANCE_LEN: usize = 64;
/// The longest `addr`, in bytes.
pub(crate) const MAX_ADDR_LEN: usize = 256;

/// What a document may hold and how old it may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocumentLimits {
    /// Bytes of the compact JWS.
    pub max_bytes: usize,
    /// Keys in its JWKS.
    pub max_keys: usize,
    /// Revoked kids.
    pub max_revoked: usize,
    /// Certificates in `x5c`.
    pub max_chain: usize,
    /// Longest `exp - iat`.
    pub max_lifetime: Duration,
    /// Tolerated clock difference on `iat` and `exp`.
    pub clock_skew: Duration,
}

impl Default for DocumentLimits {
    fn default() -> Self {
        Self {
            max_bytes: MAX_DOCUMENT_BYTES,
            max_keys: MAX_KEYS_PER_ISSUER,
            max_revoked: MAX_REVOKED_PER_ISSUER,
            max_chain: MAX_CHAIN_LEN,
            max_lifetime: MAX_DOCUMENT_LIFETIME,
            clock_skew: Duration::from_secs(30),
        }
    }
}

/// The trust domain and its CA: what a document's chain must lead to.
#[derive(Clone)]
pub struct DocumentAnchors {
    td: TrustDomain,
    roots: Roots,
}

/// The CA roots: fixed, or read afresh at each verification.
#[derive(Clone)]
enum Roots {
    Fixed(Arc<RootCertStore>),
    /// The roots in use now (a CA bundle that is reloaded while serving).
    Current(Arc<dyn Fn() -> Arc<RootCertStore> + Send + Sync>),
}

impl std::fmt::Debug for DocumentAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentAnchors")
            .field("td", &self.td)
            .field(
                "roots",
                &match self.roots {
                    Roots::Fixed(_) => "fixed",
                    Roots::Current(_) => "current CA bundle",
                },
            )
            .finish()
    }
}

// === impl DocumentAnchors ===

impl DocumentAnchors {
    /// Anchors for `td` with these CA roots (the peer TLS roots).
    pub fn new(td: TrustDomain, roots: Arc<RootCertStore>) -> Self {
        Self {
            td,
            roots: Roots::Fixed(roots),
        }
    }

    /// Anchors for `td` whose roots `current` returns at each verification:
    /// the peer CA bundle as it is now, so a rolled CA is followed.
    pub fn live(
        td: TrustDomain,
        current: impl Fn() -> Arc<RootCertStore> + Send + Sync + 'static,
    ) -> Self {
        Self {
            td,
            roots: Roots::Current(Arc::new(current)),
        }
    }

    /// The roots to verify against now.
    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        match &self.roots {
            Roots::Fixed(r) => r.clone(),
            Roots::Current(f) => f(),
        }
    }

    /// Anchors for `td` from the CA certificate(s) in PEM.
    pub fn from_ca_pem(td: TrustDomain, pem: &[u8]) -> Result<Self, DocumentError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| DocumentError::BadChain(format!("CA PEM: {e}")))?;
            roots
                .add(c)
                .map_err(|e| DocumentError::BadChain(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(DocumentError::BadChain("no CA certificate given".into()));
        }
        Ok(Self::new(td, Arc::new(roots)))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }
}

/// What one instance says about its keys: the claims of a document.
#[derive(Clone, Debug)]
pub struct DocumentClaims {
    /// The identity the document speaks for; must be its certificate's.
    pub identity: SpiffeId,
    /// The publishing instance's stable id (from its keys directory).
    pub instance: String,
    /// Grows with every document of this instance, across restarts.
    pub seq: u64,
    /// When it was signed.
    pub issued_at: UnixTime,
    /// After this its keys are not usable unless a newer document arrives.
    pub expires_at: UnixTime,
    /// The instance's own peer API (`https://host:port`), for a direct fetch.
    pub address: Option<String>,
    /// The public keys it signs with (or will, or did).
    pub keys: Vec<PublicKey>,
    /// The public keys it signs bound tokens with (claim `bound_jwks`).
    pub bound_keys: Vec<PublicKey>,
    /// Kids it revoked: refused for the whole identity.
    pub revoked: Vec<String>,
    /// kid → the latest instant a token it signed may still be valid.
    pub key_expires: BTreeMap<String, UnixTime>,
}

/// A document that passed every check of `verify_document`.
#[derive(Clone, Debug)]
pub struct VerifiedDocument {
    /// Its claims; `identity` is the certificate's SPIFFE ID.
    pub claims: DocumentClaims,
    /// The instant its keys stop being usable without a newer document:
    /// `exp` plus the clock skew the verifier allows.
    pub usable_until: UnixTime,
    /// The compact JWS as received (to relay it on, or show it).
    pub jws: Arc<str>,
    /// The serial of its signing (leaf) certificate, lowercase hex as
    /// `tokend` prints serials: what a ban by serial matches.
    pub serial: String,
}

/// A document this instance signed, as its publisher hands it out.
#[derive(Clone, Debug)]
pub struct SignedDocument {
    /// The compact JWS.
    pub jws: Arc<str>,
    /// Whose keys (this sidecar's identity).
    pub identity: SpiffeId,
    /// This instance's id.
    pub instance: String,
    /// Its sequence number.
    pub seq: u64,
    /// When it was signed.
    pub issued_at: UnixTime,
    /// When it expires.
    pub expires_at: UnixTime,
}

/// Why a document is refused. Each names its reason; `kind` is a stable
/// short code for metrics, logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// Not a compact JWS, bad base64, bad JSON, a missing or mistyped claim.
    #[error("key-set document is malformed: {0}")]
    Malformed(String),
    /// More bytes than the limit.
    #[error("key-set document of {size} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// More keys than the limit.
    #[error("key-set document lists {count} keys, over the limit of {max}")]
    TooManyKeys {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More revoked kids than the limit.
    #[error("key-set document lists {count} revoked kids, over the limit of {max}")]
    TooManyRevoked {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An `alg` other than ES256/RS256, or one that does not fit the
    /// certificate's key.
    #[error("key-set document algorithm {0:?} is not accepted for its certificate's key")]
    UnsupportedAlg(String),
    /// The chain does not lead to the trust domain's CA (foreign CA,
    /// expired certificate, garbage certificate, too long a chain).
    #[error("key-set document certificate does not chain to the trust domain's CA: {0}")]
    BadChain(String),
    /// The leaf certificate has no URI SAN, or more than one.
    #[error("key-set document certificate carries {0} URI SANs; exactly one SPIFFE ID is required")]
    SanCount(usize),
    /// The certificate's identity is not of this trust domain.
    #[error("key-set document certificate names {uri:?}, not an identity of trust domain {td}")]
    ForeignIdentity {
        /// The URI SAN.
        uri: String,
        /// This trust domain.
        td: String,
    },
    /// The signature does not verify under the certificate's key.
    #[error("key-set document signature does not verify under its certificate's key")]
    BadSignature,
    /// `exp` has passed (beyond the skew).
    #[error("key-set document expired at {exp}, now {now} (skew {skew}s)")]
    Expired {
        /// Its `exp`.
        exp: UnixTime,
        /// Now.
        now: UnixTime,
        /// The skew allowed, in seconds.
        skew: u64,
    },
    /// `iat` is in the future (beyond the skew).
    #[error("key-set document issued in the future at {iat}, now {now} (skew {skew}s)")]
    IssuedInFuture {
        /// Its `iat`.
        iat: UnixTime,
        /// Now.
        now: UnixTime,
        /// The skew allowed, in seconds.
        skew: u64,
    },
    /// `exp - iat` is longer than the limit (or negative).
    #[error("key-set document lifetime of {lifetime}s is not within 1s..={max}s")]
    LifetimeTooLong {
        /// `exp - iat`, in seconds.
        lifetime: i64,
        /// The limit, in seconds.
        max: u64,
    },
    /// The document speaks for another identity than its certificate proves.
    #[error("key-set document claims {claimed:?} but its certificate proves {certified}")]
    IdentityMismatch {
        /// The `iss` claim.
        claimed: String,
        /// The certificate's SPIFFE ID.
        certified: SpiffeId,
    },
}

// === impl DocumentError ===

impl DocumentError {
    /// A stable short code: `malformed`, `too_large`, `too_many_keys`,
    /// `too_many_revoked`, `unsupported_alg`, `bad_chain`, `san_count`,
    /// `foreign_identity`, `bad_signature`, `expired`, `issued_in_future`,
    /// `lifetime_too_long`, `identity_mismatch`.
    pub fn kind(&self) -> &'static str {
        match self {
            DocumentError::Malformed(_) => "malformed",
            DocumentError::TooLarge { .. } => "too_large",
            DocumentError::TooManyKeys { .. } => "too_many_keys",
            DocumentError::TooManyRevoked { .. } => "too_many_revoked",
            DocumentError::UnsupportedAlg(_) => "unsupported_alg",
            DocumentError::BadChain(_) => "bad_chain",
            DocumentError::SanCount(_) => "san_count",
            DocumentError::ForeignIdentity { .. } => "foreign_identity",
            DocumentError::BadSignature => "bad_signature",
            DocumentError::Expired { .. } => "expired",
            DocumentError::IssuedInFuture { .. } => "issued_in_future",
            DocumentError::LifetimeTooLong { .. } => "lifetime_too_long",
            DocumentError::IdentityMismatch { .. } => "identity_mismatch",
        }
    }
}
