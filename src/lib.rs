//! tokend: a service-to-service token sidecar.
//!
//! The crate is layered; a module only uses modules of the layers below it
//! (`.ci/check-layers` checks every `crate::` path).
//!
//! 0. Vocabulary (pure): `reason` (the stable refusal codes and `Refusal`),
//!    `time` (`UnixTime`, the `Clock`: the only wall-clock reader),
//!    `identity` (trust domains, SPIFFE IDs, audiences), `proto`
//!    (generated), `shutdown` (signals, stream cancellation).
//! 1. `jose`: the token format (claim names and limits, compact JWS, strict
//!    JSON, JWK import, the ring provider for jsonwebtoken). Pure.
//! 2. `keys`: this sidecar's signing keys (and, in `bound/`, the keys bound
//!    tokens are signed with), their crash-safe directory, the rotation
//!    planner (pure) and its loop; published as `KeySet` snapshots.
//! 3. `engine`: mint, verify (`verify_at`, pure, at an explicit `now`), the
//!    verify cache, delegation, one-time claims, immutable `TrustSet`
//!    snapshots, ext_authz access rules. Opens no socket and no file.
//! 4. `config`: TOML → typed sections that build their policies.
//! 5. `listen`: both listeners' caps, deadlines and accept back-off;
//!    `audit`: the hash-chained audit trail (below `api`, which records
//!    into it); `bans`: the operator's bans, persisted in the keys
//!    directory.
//! 6. `peers` (trust sources feeding one writer; the peer-facing server),
//!    `api` (the local gRPC services, each with its own handles; the one
//!    refusal → status mapping), `telemetry`, `replay_log` (the one-time
//!    claims journal).
//! 7. `directory`: etcd as a relay (signed key-set documents published and
//!    watched, fed to the peers' trust writer) and the replay store shared
//!    by a service's replicas.
//! 8. `ca`: the trust domain's CA and peer certificates.
//! 9. `daemon`: the only module that knows every other; `Daemon` for the
//!    binary, `Sidecar` in-process for tests and the demo.
//! 10. `cli`: the command line, on top.

mod api;
mod audit;
mod bans;
mod ca;
mod cli;
mod config;
mod daemon;
mod directory;
mod engine;
mod identity;
mod jose;
mod keys;
mod listen;
mod peers;
mod proto;
mod reason;
mod replay_log;
mod shutdown;
mod telemetry;
mod time;

pub use crate::api::{
    DPOP_NONCE_KEY, ERROR_DOMAIN, REASON_KEY, ServeError, connect, detail_of, reason_of,
};
pub use crate::audit::AuditError;
pub use crate::ca::{IssueSpec, init as ca_init, issue as ca_issue, issue_with as ca_issue_with};
pub use crate::cli::{Cli, EXIT_USAGE, run as run_cli};
pub use crate::config::check_config;
pub use crate::daemon::{Daemon, DaemonError, RunningSidecar, Sidecar, SidecarError};
pub use crate::engine::{
    Ban, BanKind, BanList, BanView, DEFAULT_DOCUMENT_LIFETIME, DEFAULT_INSTANCE, DOCUMENT_TYPE,
    DocumentAnchors, DocumentClaims, DocumentError, DocumentKey, DocumentKeyError, DocumentLimits,
    DocumentState, Engine, InstanceKeys, IssuerKeys, KeyOrigin, KeyOrigins, MAX_DOCUMENT_BYTES,
    MAX_DOCUMENT_LIFETIME, MintPolicy, MintRequest, Minted, SetError, SignedDocument, TrustSet,
    TrustUpdate, TrustView, Unverified, Verified, VerifiedDocument, VerifyPolicy, sign_document,
    verify_at, verify_document,
};
pub use crate::identity::{SpiffeId, TrustDomain};
pub use crate::jose::{Jwk, Parts, PublicKey, check_signature};
pub use crate::keys::{
    InstanceState, KeyClass, KeyError, KeyStore, KeyView, Lifecycle, SigningKey, generate_pkcs8,
    parse_pkcs8_pem,
};
pub use crate::peers::{
    DirectFetcher, DocumentHandle, DocumentPublisher, DocumentSink, PeerError, PublishError,
    peer_key_set_update,
};
pub use crate::reason::{Reason, Refusal};
pub use crate::telemetry::{LogFormat, init as init_logs};
pub use crate::time::{Clock, ManualClock, SharedClock, Sleep, SystemClock, TokioClock, UnixTime};

/// The generated gRPC clients and messages, for callers of the sidecar.
pub mod pb {
    pub use crate::proto::spiffe;
    pub use crate::proto::tokend::v1 as tokend;
}
