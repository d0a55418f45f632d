//! The daemon: builds every component from a `Config` and runs them until
//! shutdown. The only module that knows all the others.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::keys::{KeyError, KeyStore, KeyView, Lifecycle, rotation};
use crate::mint::{MintPolicy, Minter};
use crate::peers::JwksFileSource;
use crate::verify::{Policy, TrustStore, Verifier};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Key store trouble.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// Socket trouble.
    #[error("{0}")]
    Socket(String),
    /// A peer source could not be set up.
    #[error("{0}")]
    Peers(String),
    /// Metrics listener.
    #[error("{0}")]
    Metrics(String),
    /// The gRPC server failed.
    #[error("local API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl DaemonError {
    /// Whether the error is a usage/configuration problem (exit 64) rather than a runtime one.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            DaemonError::Keys(KeyError::Disk(_)) | DaemonError::Peers(_)
        )
    }
}

/// Everything the API handlers share.
pub struct Core {
    /// The validated configuration.
    pub config: Config,
    /// Mints this sidecar's tokens.
    pub minter: Minter,
    /// Verifies incoming tokens.
    pub verifier: Verifier,
    /// This sidecar's keys.
    pub keys: KeyView,
    /// Time.
    pub clock: SharedClock,
    /// Requests to the rotation task.
    pub commands: mpsc::Sender<rotation::Command>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.config.id)
            .finish_non_exhaustive()
    }
}

/// A built, not yet running, sidecar.
pub struct Daemon {
    core: Arc<Core>,
    store: KeyStore,
    commands: mpsc::Receiver<rotation::Command>,
    listener: UnixListener,
    socket: PathBuf,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

// === impl Daemon ===

impl Daemon {
    /// Loads keys, peers and binds the socket. Nothing is served yet.
    pub async fn build(config: Config, clock: SharedClock) -> Result<Self, DaemonError> {
        let now = clock.now();
        let lifecycle = Lifecycle {
            interval: secs(config.rotation.interval),
            publish_ahead: secs(config.rotation.publish_ahead),
            grace: secs(config.tokens.max_ttl) + secs(config.tokens.clock_skew),
        };
        let (store, keys) =
            KeyStore::open(&config.keys_dir, lifecycle, config.rotation.key_bits, now).await?;

        let trust = Arc::new(TrustStore::new(5));
        trust.register(config.id.as_str(), "self".into(), None);
        install_own_keys(&trust, &keys, config.id.as_str(), now);
        for peer in &config.peers {
            match &peer.source {
                crate::config::PeerSource::JwksFile(path) => {
                    JwksFileSource::install(
                        peer.id.as_str(),
                        path.clone(),
                        trust.clone(),
                        clock.clone(),
                    )
                    .map_err(DaemonError::Peers)?;
                }
                crate::config::PeerSource::Address(addr) => {
                    return Err(DaemonError::Peers(format!(
                        "peer {} at {addr}: live peers over mTLS are not supported by this build",
                        peer.name
                    )));
                }
            }
        }

        let minter = Minter::new(
            config.id.clone(),
            keys.clone(),
            MintPolicy {
                default_ttl: config.tokens.default_ttl.as_secs(),
                max_ttl: config.tokens.max_ttl.as_secs(),
            },
        );
        let verifier = Verifier::new(
            config.id.clone(),
            trust,
            Policy {
                max_ttl: secs(config.tokens.max_ttl),
                clock_skew: secs(config.tokens.clock_skew),
            },
            clock.clone(),
        );
        if let Some(addr) = config.metrics_listen {
            crate::telemetry::serve_metrics(addr).map_err(DaemonError::Metrics)?;
        }
        let listener =
            crate::api::bind(&config.socket, config.socket_mode).map_err(DaemonError::Socket)?;
        let (tx, rx) = mpsc::channel(16);
        let socket = config.socket.clone();
        let core = Arc::new(Core {
            config,
            minter,
            verifier,
            keys,
            clock,
            commands: tx,
        });
        Ok(Self {
            core,
            store,
            commands: rx,
            listener,
            socket,
        })
    }

    /// The shared core (for in-process tests and the demo).
    pub fn core(&self) -> Arc<Core> {
        self.core.clone()
    }

    /// Serves until `shutdown` completes; in-flight calls finish, background
    /// tasks stop, and the socket file is removed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
        let Daemon {
            core,
            store,
            commands,
            listener,
            socket,
        } = self;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let id = core.config.id.to_string();

        tracker.spawn(
            rotation::run(store, commands, core.clock.clone(), cancel.clone())
                .instrument(tracing::info_span!("rotation", id = %id)),
        );
        tracker.spawn(watch_own_keys(core.clone(), cancel.clone()));

        tracing::info!(
            id = %id,
            socket = %socket.display(),
            kid = %core.keys.current().signing_key(core.clock.now()).map(|k| k.kid().to_owned()).unwrap_or_default(),
            "tokend serving"
        );
        let stop = cancel.clone();
        let result = crate::api::serve(listener, core, async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop.cancelled() => {}
            }
        })
        .await;
        cancel.cancel();
        tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 10s");
        }
        if let Err(e) = std::fs::remove_file(&socket) {
            tracing::warn!(socket = %socket.display(), error = %e, "could not remove socket");
        }
        tracing::info!("tokend stopped");
        Ok(result?)
    }
}

fn install_own_keys(trust: &TrustStore, keys: &KeyView, own: &str, now: i64) {
    let set = keys.current();
    let published = set.published().cloned().collect();
    let revoked = set.revoked_kids().map(str::to_owned).collect();
    if let Err(e) = trust.replace(own, published, revoked, now) {
        tracing::error!(error = %e, "cannot install own keys in the trust store");
    }
}

/// Keeps this sidecar's own entry of the trust store equal to its published keys.
async fn watch_own_keys(core: Arc<Core>, cancel: CancellationToken) {
    let mut rx = core.keys.subscribe();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                install_own_keys(core.verifier.trust(), &core.keys, core.config.id.as_str(), core.clock.now());
            }
        }
    }
}
