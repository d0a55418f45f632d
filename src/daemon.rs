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
use crate::config::PeerSource;
use crate::keys::{KeyError, KeyStore, KeyView, Lifecycle, rotation};
use crate::listen::{FdCaps, ListenLimits};
use crate::mint::{MintPolicy, Minter};
use crate::peers::{JwksFileSource, PeerClient, PeerKeysApi, PeerTls};
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
    /// Cancelled when the daemon shuts down: long-lived streams end on it.
    pub shutdown: CancellationToken,
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
    peer_server: Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
    caps: FdCaps,
    peer_addr: Option<std::net::SocketAddr>,
    peer_clients: Vec<Arc<PeerClient>>,
    file_peers: Vec<Arc<JwksFileSource>>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// At most one on-demand refresh of an issuer per second: a flood of tokens
/// with random kids costs each peer one fetch a second, and a peer that
/// restarts with a new key is learnt on its first token.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How long in-flight calls may run after a shutdown signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

// === impl Daemon ===

impl Daemon {
    /// Loads keys, peers and binds the sockets. Nothing is served yet.
    pub async fn build(config: Config, clock: SharedClock) -> Result<Self, DaemonError> {
        // First, so everything from key loading on is counted.
        if let Some(addr) = config.metrics_listen {
            crate::telemetry::serve_metrics(addr).map_err(DaemonError::Metrics)?;
        }
        let caps = fd_caps(&config);
        let now = clock.now();
        let lifecycle = Lifecycle {
            interval: secs(config.rotation.interval),
            publish_ahead: secs(config.rotation.publish_ahead),
            grace: secs(config.tokens.max_ttl) + secs(config.tokens.clock_skew),
        };
        let (store, keys) = KeyStore::open(
            &config.keys_dir,
            lifecycle,
            config.rotation.key_bits,
            clock.clone(),
        )
        .await?;

        let trust = Arc::new(TrustStore::new(MIN_REFRESH_INTERVAL));
        install_own_keys(&trust, &keys, config.id.as_str(), now);
        let peer_tls = match &config.peer_api {
            Some(p) => Some(
                PeerTls::load(p, &config.trust_domain, &config.id).map_err(DaemonError::Peers)?,
            ),
            None => None,
        };
        let mut peer_clients = Vec::new();
        let mut file_peers = Vec::new();
        for peer in &config.peers {
            match (&peer.source, &peer_tls) {
                (PeerSource::JwksFile(path), _) => {
                    let source = JwksFileSource::install(
                        peer.id.as_str(),
                        path.clone(),
                        trust.clone(),
                        clock.clone(),
                    )
                    .map_err(DaemonError::Peers)?;
                    file_peers.push(source);
                }
                (PeerSource::Address(addr), Some(tls)) => {
                    let client = PeerClient::install(
                        &peer.name,
                        peer.id.clone(),
                        addr,
                        tls,
                        trust.clone(),
                        clock.clone(),
                    )
                    .map_err(DaemonError::Peers)?;
                    peer_clients.push(client);
                }
                (PeerSource::Address(addr), None) => {
                    return Err(DaemonError::Peers(format!(
                        "peer {} at {addr} needs [peer_api] for mTLS",
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
        );
        let (peer_server, peer_addr) = match (&config.peer_api, &peer_tls) {
            (Some(p), Some(tls)) => {
                let listener = tokio::net::TcpListener::bind(p.listen).await.map_err(|e| {
                    DaemonError::Socket(format!(
                        "cannot listen on peer_api.listen {}: {e}",
                        p.listen
                    ))
                })?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| DaemonError::Socket(e.to_string()))?;
                let server = tls.rustls_server_config().map_err(DaemonError::Peers)?;
                (Some((listener, server)), Some(addr))
            }
            _ => (None, None),
        };
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
            shutdown: CancellationToken::new(),
        });
        Ok(Self {
            core,
            store,
            commands: rx,
            listener,
            socket,
            peer_server,
            caps,
            peer_addr,
            peer_clients,
            file_peers,
        })
    }

    /// The shared core (for in-process tests and the demo).
    pub fn core(&self) -> Arc<Core> {
        self.core.clone()
    }

    /// The address the peer API listens on (its real port when configured as 0).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.peer_addr
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
            peer_server,
            caps,
            peer_addr,
            peer_clients,
            file_peers,
        } = self;
        let limits = core.config.limits;
        let listen = |max_connections| ListenLimits {
            max_connections,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
        };
        let cancel = core.shutdown.clone();
        let tracker = TaskTracker::new();
        let id = core.config.id.to_string();

        tracker.spawn(
            rotation::run(store, commands, core.clock.clone(), cancel.clone())
                .instrument(tracing::info_span!("rotation", id = %id)),
        );
        tracker.spawn(watch_own_keys(core.clone(), cancel.clone()));
        if let Some((tcp, tls)) = peer_server {
            let api = PeerKeysApi::new(
                core.config.id.clone(),
                core.config.trust_domain.clone(),
                core.keys.clone(),
                core.clock.clone(),
                cancel.clone(),
                limits.peer_watches_per_caller,
            );
            let stop = cancel.clone();
            let peer_listen = listen(caps.peer);
            tracker.spawn(async move {
                let served = crate::peers::serve(
                    tcp,
                    tls,
                    api,
                    &limits,
                    peer_listen,
                    stop.cancelled_owned(),
                );
                if let Err(e) = served.await {
                    tracing::error!(error = %e, "peer API server failed");
                }
            });
        }
        for source in file_peers {
            tracker.spawn(source.watch(cancel.clone()));
        }
        for client in peer_clients {
            let span = tracing::info_span!("peer", peer = ?client);
            tracker.spawn(client.run(cancel.clone()).instrument(span));
        }

        tracing::info!(
            id = %id,
            socket = %socket.display(),
            peer_api = %peer_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            kid = %core.keys.current().signing_key(core.clock.now()).map(|k| k.kid().to_owned()).unwrap_or_default(),
            "tokend serving"
        );
        let stop = cancel.clone();
        let serve = crate::api::serve(listener, core, listen(caps.local), async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop.cancelled() => {}
            }
            // Ends the long-lived streams (SPIFFE bundles, peer watches) so the
            // graceful drain below only waits for ordinary calls.
            stop.cancel();
        });
        let drained = cancel.clone();
        let result = tokio::select! {
            r = serve => r,
            _ = async move {
                drained.cancelled().await;
                tokio::time::sleep(DRAIN_GRACE).await;
            } => {
                tracing::warn!("calls still in flight after {DRAIN_GRACE:?}; closing anyway");
                Ok(())
            }
        };
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

/// Raises the NOFILE soft limit and fits both listeners' caps under it.
fn fd_caps(config: &Config) -> FdCaps {
    let limits = &config.limits;
    let peer = if config.peer_api.is_some() {
        limits.peer_connections
    } else {
        0
    };
    let nofile = match crate::listen::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file descriptor limit; caps kept as configured");
            return FdCaps {
                local: limits.local_connections,
                peer,
                scaled: false,
            };
        }
    };
    let caps = crate::listen::fit_to_fds(nofile, limits.local_connections, peer);
    if caps.scaled {
        tracing::warn!(
            nofile,
            reserved = crate::listen::RESERVED_FDS,
            local_connections = caps.local,
            peer_connections = caps.peer,
            "connection caps lowered to fit the file descriptor limit"
        );
    }
    tracing::debug!(
        nofile,
        local = caps.local,
        peer = caps.peer,
        "connection caps"
    );
    caps
}

fn install_own_keys(trust: &TrustStore, keys: &KeyView, own: &str, now: i64) {
    if let Err(e) = trust.install_own(own, &keys.current(), now) {
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
