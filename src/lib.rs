//! tokend: a service-to-service token sidecar.
//!
//! The crate is layered; a module only uses modules of the layers below it.
//!
//! 1. Vocabulary (pure): `reason` (the stable refusal codes and `Refusal`),
//!    `time` (`UnixTime`, the `Clock`: the only wall-clock reader),
//!    `identity` (trust domains, SPIFFE IDs, audiences), `proto` (generated).
//! 2. `jose`: the token format (claim names and limits, compact JWS, JWK
//!    import, the ring provider for jsonwebtoken). Pure.
//! 3. `keys`: this sidecar's signing keys, their crash-safe directory, the
//!    rotation planner (pure) and its loop; published as `KeySet` snapshots.
//! 4. `engine`: mint, verify (`verify_at`, pure, at an explicit `now`),
//!    delegation, one-time claims, and immutable `TrustSet` snapshots. Opens
//!    no socket and no file.
//! 5. `peers` (trust sources feeding one writer: mTLS peers, JWKS files; and
//!    the peer-facing server) and `api` (the local gRPC services, each with
//!    its own handles; the one refusal → status mapping).
//! 6. `config` (TOML → typed sections that build their policies), `ca`
//!    (the trust domain's CA), `telemetry`, `shutdown`.
//! 7. `daemon`: the only module that knows every other; `Daemon` for the
//!    binary, `Sidecar` in-process for tests and the demo.
//! 8. `cli`: the command line, on top.

mod api;
mod ca;
mod cli;
mod config;
mod daemon;
mod engine;
mod identity;
mod jose;
mod keys;
mod peers;
mod proto;
mod reason;
mod shutdown;
mod telemetry;
mod time;

pub use crate::api::{REASON_KEY, connect, detail_of, reason_of};
pub use crate::ca::{init as ca_init, issue as ca_issue};
pub use crate::cli::{Cli, EXIT_USAGE, run as run_cli};
pub use crate::config::check_config;
pub use crate::daemon::{Daemon, DaemonError, RunningSidecar, Sidecar};
pub use crate::engine::{
    Engine, MintPolicy, MintRequest, Minted, TrustSet, TrustUpdate, TrustView, Unverified,
    Verified, VerifyPolicy, verify_at,
};
pub use crate::identity::{SpiffeId, TrustDomain};
pub use crate::jose::{Jwk, Parts, PublicKey, check_signature};
pub use crate::keys::{
    KeyError, KeyStore, KeyView, Lifecycle, SigningKey, generate_pkcs8, parse_pkcs8_pem,
};
pub use crate::peers::peer_key_set_update;
pub use crate::reason::{Reason, Refusal};
pub use crate::telemetry::{LogFormat, init as init_logs};
pub use crate::time::{Clock, ManualClock, SharedClock, Sleep, SystemClock, TokioClock, UnixTime};

/// The generated gRPC clients and messages, for callers of the sidecar.
pub mod pb {
    pub use crate::proto::spiffe;
    pub use crate::proto::tokend::v1 as tokend;
}
