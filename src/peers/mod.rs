//! Peers: trust *sources* and the peer-facing server. Live peers speak
//! `PeerService` over mTLS (`client`, `server`, `tls`); offline peers are
//! JWKS files (`file`). Every source feeds the one `TrustWriter` (`writer`)
//! that publishes immutable trust snapshots, and can be asked to fetch again
//! through the `Refresher` (`refresh`) the engine calls on an unknown kid.

mod client;
mod connect;
mod direct;
mod documents;
mod file;
mod group;
mod keyset;
mod publisher;
mod refresh;
mod server;
mod tls;
mod writer;

use std::time::Duration;

pub(crate) use self::client::PeerContext;
pub use self::direct::DirectFetcher;
pub use self::documents::DocumentSink;
pub(crate) use self::file::{JwksFileSource, MAX_JWKS_BYTES};
pub(crate) use self::group::PeerGroup;
pub use self::keyset::peer_key_set_update;
pub use self::publisher::{DocumentHandle, DocumentPublisher, PublishError};
pub(crate) use self::refresh::Refresher;
pub(crate) use self::server::{PeerKeysApi, serve};
pub(crate) use self::tls::{
    ExpiryPolicy, PEER_SERVICE, PeerTls, TlsError, uri_sans, watch as watch_tls,
};
pub(crate) use self::writer::{TrustFeed, TrustWriter};
use crate::engine::SetError;
use crate::identity::SpiffeId;
use crate::jose::JwkError;

/// Why a source could not deliver a key set. Peer-provided text is kept in
/// fields printed with `{:?}`, so a newline in it cannot forge a log line.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The address in the config is not usable.
    #[error("peer {name} address {address:?}: {detail}")]
    Address {
        /// The configured peer.
        name: String,
        /// The address.
        address: String,
        /// Why.
        detail: String,
    },
    /// TCP, TLS or HTTP/2 connection failure.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The peer did not answer in time.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// Which step.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The peer answered with an error status.
    #[error("{rpc}: peer answered {code:?}: {message:?}")]
    Status {
        /// Which call.
        rpc: &'static str,
        /// The gRPC code.
        code: tonic::Code,
        /// The peer's message, escaped when shown.
        message: String,
    },
    /// The connection proved no SPIFFE ID.
    #[error("the TLS connection proved no peer identity")]
    NoIdentity,
    /// A signed key-set document is refused (its reason names why).
    #[error(transparent)]
    Document(#[from] crate::engine::DocumentError),
    /// A peer connection proved one identity and served a document of another.
    #[error("the connection proved {proven} but served a key-set document of {document}")]
    ProvenMismatch {
        /// The identity the TLS certificate proved.
        proven: SpiffeId,
        /// The identity of the document's certificate.
        document: SpiffeId,
    },
    /// The certificate proves an identity this sidecar does not trust.
    #[error("{0} (from its certificate) is not a configured peer; keys ignored")]
    NotConfigured(SpiffeId),
    /// The set is larger than accepted.
    #[error("key set of {0} bytes exceeds {MAX_JWKS_BYTES} bytes")]
    TooLarge(usize),
    /// A key listed both as a signing key and as a bound-token key.
    #[error("key {0:?} is listed both in jwks_json and in bound_jwks_json")]
    BoundOverlap(String),
    /// A key of the set fails the import policy.
    #[error(transparent)]
    Jwk(#[from] JwkError),
    /// The trust writer refused the set.
    #[error(transparent)]
    Set(#[from] SetError),
    /// A JWKS file could not be used.
    #[error("JWKS file {path}: {detail}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// The connection presented a banned certificate, or the key set or
    /// document comes from a banned certificate, identity or instance: it
    /// is refused.
    #[error("key set from a banned certificate or instance (serial {serial}; ban: {ban}); refused")]
    Banned {
        /// The serial of the certificate the connection presented, or of
        /// the document's signing certificate.
        serial: String,
        /// The ban it falls under.
        ban: String,
    },
    /// The stream of updates ended.
    #[error("the peer ended its key stream")]
    StreamEnded,
    /// The trust writer has stopped (shutdown).
    #[error("the trust writer has stopped")]
    WriterGone,
}

/// At most one warning a second per source: a peer flooding bad sets must
/// not flood the log. Suppressed warnings are counted into the next one.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    state: std::sync::Mutex<(Option<tokio::time::Instant>, u64)>,
}

impl LogLimit {
    /// Whether to log now, and how many were suppressed since the last one.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}
