//! tokend: a service-to-service token sidecar.
//!
//! Each service runs one tokend. It keeps the service's RS256 keys
//! (`keys`: store, rotation, revocation), mints short-lived JWTs (`mint`),
//! verifies incoming tokens against per-issuer key sets (`verify`) filled from
//! its own keys and from peers over mTLS or JWKS files (`peers`), exchanges
//! tokens for delegated ones (`exchange`), and serves all of it over gRPC on
//! a Unix socket (`api`: tokend.v1, the SPIFFE Workload API, health).
//!
//! Layout: `config` → `daemon` builds everything; `cli` is the command line;
//! `ca` the trust domain's CA and peer certificates; `reason` the stable
//! refusal codes; `identity` the SPIFFE names; `clock` the only wall-clock
//! reader; `crypto` the ring provider for jsonwebtoken; `jwk` public keys and
//! thumbprints; `telemetry` logs and metrics; `shutdown` signals and
//! stream cancellation; `listen` the connection caps, handshake and idle
//! deadlines and accept back-off of both listeners; `proto` the generated code.

pub mod api;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod exchange;
pub mod identity;
pub mod jwk;
pub mod keys;
pub mod listen;
pub mod mint;
pub mod peers;
pub mod proto;
pub mod reason;
pub mod shutdown;
pub mod telemetry;
pub mod verify;
