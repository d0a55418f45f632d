#![allow(unreachable_pub, missing_docs, clippy::unwrap_used)]
//! The one integration-test binary: sidecars in-process on a shared manual
//! clock (`inproc`) or as real `tokend` processes (`support`, for what only a
//! process shows), on temp sockets, driven through the CLI and over gRPC,
//! plus the published test vectors.

#[path = "it/support.rs"]
mod support;
#[path = "it/tools.rs"]
mod tools;

#[path = "it/inproc.rs"]
mod inproc;

#[path = "it/audit.rs"]
mod audit;
#[path = "it/pki.rs"]
mod pki;

#[path = "it/bans.rs"]
mod bans;
#[path = "it/bound_keys.rs"]
mod bound_keys;
#[path = "it/certs.rs"]
mod certs;
#[path = "it/cli.rs"]
mod cli;
#[path = "it/config.rs"]
mod config;
#[path = "it/deploy.rs"]
mod deploy;
#[path = "it/directory.rs"]
mod directory;
#[path = "it/directory_auth.rs"]
mod directory_auth;
#[path = "it/directory_tls.rs"]
mod directory_tls;
#[path = "it/dpop.rs"]
mod dpop;
#[path = "it/dpop_node.rs"]
mod dpop_node;
#[path = "it/dpop_nonce.rs"]
mod dpop_nonce;
#[path = "it/ecosystem.rs"]
mod ecosystem;
#[path = "it/envoy.rs"]
mod envoy;
#[path = "it/etcd.rs"]
mod etcd;
#[path = "it/exchange.rs"]
mod exchange;
#[path = "it/ext_authz.rs"]
mod ext_authz;
#[path = "it/hardening.rs"]
mod hardening;
#[path = "it/interop.rs"]
mod interop;
#[path = "it/keyfiles.rs"]
mod keyfiles;
#[path = "it/limits.rs"]
mod limits;
#[path = "it/mint_verify.rs"]
mod mint_verify;
#[path = "it/observability.rs"]
mod observability;
#[path = "it/peers.rs"]
mod peers;
#[path = "it/prometheus.rs"]
mod prometheus;
#[path = "it/replicas.rs"]
mod replicas;
#[path = "it/robustness.rs"]
mod robustness;
#[path = "it/rotation.rs"]
mod rotation;
#[path = "it/shared_replay.rs"]
mod shared_replay;
#[path = "it/vectors.rs"]
mod vectors;
