//! The daemon: builds every component from a `Config` and runs them until
//! shutdown. The only module that knows all the others; it hands each
//! service only the handles it uses. `Sidecar` builds one in-process (temp
//! dir, port 0, injected clock) for tests and the demo.

mod sidecar;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use self::sidecar::{RunningSidecar, Sidecar, SidecarError};
use crate::api::{AdminApi, Callers, LocalApi, SocketError, SpiffeApi, TokenApi};
use crate::config::{Config, PeerSource};
use crate::engine::{Engine, TrustUpdate, TrustView};
use crate::keys::{Command, KeyError, KeyStore, KeyView};
use crate::peers::{
    JwksFileSource, PeerClient, PeerError, PeerKeysApi, PeerTls, Refresher, TlsError, TrustFeed,
    TrustWriter,
};
use crate::time::SharedClock;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Key store trouble.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The local socket.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The peer TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A peer source could not be set up.
    #[error(transparent)]
    Peers(#[from] PeerError),
    /// A TCP listener could not be bound.
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        /// Which setting.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The metrics exporter could not start.
    #[error("cannot serve metrics on {addr}: {detail}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        detail: String,
    },
    /// The gRPC server failed.
    #[error("local API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl DaemonError {
    /// Whether the error is a usage/configuration problem (exit 64) rather than a runtime one.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            DaemonError::Keys(KeyError::Disk(_)) | DaemonError::Tls(_) | DaemonError::Peers(_)
        )
    }
}

/// At most one on-demand refresh of an issuer per second: a flood of tokens
/// with random kids costs each peer one fetch a second, and a peer that
/// restarts with a new key is learnt on its first token.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How long in-flight calls may run after a shutdown signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The peer API, bound and ready to serve.
struct PeerServer {
    tcp: TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    api: PeerKeysApi,
}

/// Where peer keys come from, before they run.
struct TrustSources {
    writer: TrustWriter,
    view: TrustView,
    clients: Vec<Arc<PeerClient>>,
    files: Vec<Arc<JwksFileSource>>,
    refresher: Refresher,
}

/// A built, not yet running, sidecar.
pub struct Daemon {
    id: String,
    store: KeyStore,
    keys: KeyView,
    commands: mpsc::Receiver<Command>,
    writer: TrustWriter,
    clients: Vec<Arc<PeerClient>>,
    files: Vec<Arc<JwksFileSource>>,
    api: LocalApi,
    listener: UnixListener,
    socket: PathBuf,
    keys_dir: PathBuf,
    peer_server: Option<PeerServer>,
    peer_addr: Option<SocketAddr>,
    clock: SharedClock,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("id", &self.id)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

// === impl Daemon ===

impl Daemon {
    /// Loads keys and peers and binds the sockets. Nothing is served yet.
    pub async fn build(config: Config, clock: SharedClock) -> Result<Self, DaemonError> {
        // First, so everything from key loading on is counted.
        if let Some(addr) = config.metrics_listen {
            crate::telemetry::serve_metrics(addr)
                .map_err(|detail| DaemonError::Metrics { addr, detail })?;
        }
        let (store, keys) = open_keys(&config, &clock).await?;
        let peer_tls = match &config.peer_api {
            Some(p) => Some(PeerTls::load(
                p,
                &config.trust_domain,
                &config.id,
                clock.now(),
            )?),
            None => None,
        };
        let sources = trust_sources(&config, peer_tls.as_ref(), &clock)?;
        let engine = Arc::new(
            Engine::new(
                config.id.clone(),
                config.tokens.mint_policy(),
                config.tokens.verify_policy(),
                keys.clone(),
                sources.view.clone(),
                clock.clone(),
            )
            .with_refresher(
                Arc::new(sources.refresher),
                crate::engine::DEFAULT_REFRESH_WAIT,
            ),
        );
        let shutdown = CancellationToken::new();
        let (peer_server, peer_addr) = match (&config.peer_api, &peer_tls) {
            (Some(p), Some(tls)) => {
                let tcp =
                    TcpListener::bind(p.listen)
                        .await
                        .map_err(|source| DaemonError::Listen {
                            what: "peer_api.listen",
                            addr: p.listen,
                            source,
                        })?;
                let addr = tcp.local_addr().map_err(|source| DaemonError::Listen {
                    what: "peer_api.listen",
                    addr: p.listen,
                    source,
                })?;
                let api = PeerKeysApi::new(
                    config.id.clone(),
                    config.trust_domain.clone(),
                    keys.clone(),
                    shutdown.clone(),
                );
                let server = PeerServer {
                    tcp,
                    tls: tls.server_config(),
                    api,
                };
                (Some(server), Some(addr))
            }
            _ => (None, None),
        };
        let listener = crate::api::bind(&config.socket, config.socket_mode)?;
        let (commands_tx, commands) = mpsc::channel(16);
        let callers = Callers::new(config.allowed_uids.clone());
        let api = LocalApi {
            token: TokenApi::new(engine.clone(), config.trust_domain.clone(), callers.clone()),
            admin: AdminApi::new(
                config.id.clone(),
                keys.clone(),
                sources.view.clone(),
                commands_tx,
                clock.clone(),
                callers.clone(),
                config.admin_uids.clone(),
            ),
            spiffe: SpiffeApi::new(engine, callers, shutdown.clone()),
        };
        Ok(Self {
            id: config.id.to_string(),
            store,
            keys,
            commands,
            writer: sources.writer,
            clients: sources.clients,
            files: sources.files,
            api,
            listener,
            socket: config.socket,
            keys_dir: config.keys_dir,
            peer_server,
            peer_addr,
            clock,
            shutdown,
        })
    }

    /// Whether to keep a standby key for revocations (default yes). In-process
    /// test sidecars that never revoke turn it off: it is one more RSA key
    /// generation per start, which the test runtime then waits for.
    pub fn standby_key(mut self, on: bool) -> Self {
        self.store.set_standby(on);
        self
    }

    /// The address the peer API listens on (its real port when configured as 0).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// Serves until `shutdown` completes; in-flight calls finish, background
    /// tasks stop, and the socket file is removed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
        let cancel = self.shutdown.clone();
        let tracker = TaskTracker::new();
        let kid = self
            .keys
            .current()
            .signing_key(self.clock.now())
            .map(|k| k.kid().to_owned())
            .unwrap_or_default();
        tracker.spawn(
            crate::keys::run_rotation(self.store, self.commands, self.clock, cancel.clone())
                .instrument(tracing::info_span!("rotation", id = %self.id)),
        );
        tracker.spawn(self.writer.run(cancel.clone()));
        if let Some(PeerServer { tcp, tls, api }) = self.peer_server {
            let stop = cancel.clone();
            tracker.spawn(async move {
                if let Err(e) = crate::peers::serve(tcp, tls, api, stop.cancelled_owned()).await {
                    tracing::error!(error = %e, "peer API server failed");
                }
            });
        }
        for source in self.files {
            tracker.spawn(source.watch(cancel.clone()));
        }
        for client in self.clients {
            let span = tracing::info_span!("peer", peer = ?client);
            tracker.spawn(client.run(cancel.clone()).instrument(span));
        }
        tracing::info!(
            id = %self.id,
            socket = %self.socket.display(),
            keys_dir = %self.keys_dir.display(),
            peer_api = %self.peer_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            kid = %kid,
            "tokend serving"
        );
        let stop = cancel.clone();
        let serve = crate::api::serve(self.listener, self.api, async move {
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
        if let Err(e) = std::fs::remove_file(&self.socket) {
            tracing::warn!(socket = %self.socket.display(), error = %e, "could not remove socket");
        }
        tracing::info!("tokend stopped");
        Ok(result?)
    }
}

/// Opens the keys directory and applies the first rotation plan, so a
/// signing key exists before anything is served.
async fn open_keys(config: &Config, clock: &SharedClock) -> Result<(KeyStore, KeyView), KeyError> {
    let (mut store, keys) = KeyStore::open(
        &config.keys_dir,
        config.lifecycle(),
        config.rotation.key_bits,
        clock.clone(),
    )
    .await?;
    store.apply_plan(clock.now()).await?;
    Ok((store, keys))
}

/// Registers every configured peer with the trust writer and loads the
/// JWKS files (a bad file stops the start, naming it).
fn trust_sources(
    config: &Config,
    tls: Option<&PeerTls>,
    clock: &SharedClock,
) -> Result<TrustSources, DaemonError> {
    let (mut writer, feed, view) = TrustWriter::new();
    let mut refresher = Refresher::new(MIN_REFRESH_INTERVAL);
    let (mut clients, mut files) = (Vec::new(), Vec::new());
    for peer in &config.peers {
        let issuer = peer.id.as_str();
        match &peer.source {
            PeerSource::JwksFile(path) => {
                let source = JwksFileSource::new(issuer, path.clone(), feed.clone(), clock.clone());
                writer
                    .apply(source.registration())
                    .map_err(PeerError::from)?;
                writer.apply(source.read()?).map_err(PeerError::from)?;
                refresher.add(issuer, source.clone());
                files.push(source);
            }
            PeerSource::Address(addr) => {
                let client = peer_client(&peer.name, peer, addr, tls, &feed, &view, clock)?;
                writer
                    .apply(TrustUpdate::Register {
                        issuer: issuer.to_owned(),
                        source: format!("peer:{addr}"),
                    })
                    .map_err(PeerError::from)?;
                refresher.add(issuer, client.clone());
                clients.push(client);
            }
        }
    }
    Ok(TrustSources {
        writer,
        view,
        clients,
        files,
        refresher,
    })
}

fn peer_client(
    name: &str,
    peer: &crate::config::PeerConfig,
    addr: &str,
    tls: Option<&PeerTls>,
    feed: &TrustFeed,
    view: &TrustView,
    clock: &SharedClock,
) -> Result<Arc<PeerClient>, PeerError> {
    let Some(tls) = tls else {
        return Err(PeerError::Address {
            name: name.to_owned(),
            address: addr.to_owned(),
            detail: "needs [peer_api] for mTLS".into(),
        });
    };
    PeerClient::new(
        name,
        peer.id.clone(),
        addr,
        tls,
        feed.clone(),
        view.clone(),
        clock.clone(),
    )
}
