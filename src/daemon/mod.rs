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
use crate::api::{AdminApi, Callers, ExtAuthzApi, LocalApi, SocketError, SpiffeApi, TokenApi};
use crate::audit::{Audit, AuditWriter};
use crate::config::{Config, LimitsConfig, PeerSource};
use crate::directory::{Directory, EtcdReplay};
use crate::engine::{
    BanView, Engine, KeyOrigins, MemoryReplay, ReplayStore, TrustUpdate, TrustView,
};
use crate::engine::{DocumentLimits, SignedDocument};
use crate::keys::InstanceState;
use crate::keys::{Command, KeyClass, KeyError, KeyStore, KeyView, OwnKeys, ProofKeyStore};
use crate::listen::{FdCaps, ListenLimits};
use crate::peers::{
    DirectFetcher, DocumentPublisher, DocumentSink, ExpiryPolicy, JwksFileSource, PeerContext,
    PeerError, PeerGroup, PeerKeysApi, PeerTls, PublishError, Refresher, TlsError, TrustWriter,
};
use crate::replay_log::JournalReplay;
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
    /// The first signed key-set document could not be made.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The bans file cannot be read.
    #[error(transparent)]
    Bans(#[from] crate::bans::BanError),
    /// The replay journal cannot be read or written.
    #[error(transparent)]
    Replay(#[from] crate::replay_log::JournalError),
    /// The `[directory]` etcd client could not be set up.
    #[error(transparent)]
    Directory(#[from] crate::directory::EtcdSetupError),
    /// The audit file cannot be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The gRPC server failed.
    #[error("local API server failed: {0}")]
    Serve(#[from] crate::api::ServeError),
    /// The system's random source failed (for the DPoP nonce secret).
    #[error("cannot make the DPoP nonce secret: {0}")]
    Randomness(String),
}

impl DaemonError {
    /// Whether the error is a usage/configuration problem (exit 64) rather than a runtime one.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            DaemonError::Keys(KeyError::Disk(_))
                | DaemonError::Tls(_)
                | DaemonError::Peers(_)
                | DaemonError::Directory(_)
                | DaemonError::Bans(_)
        )
    }
}

/// At most one on-demand refresh of an issuer per second: a flood of tokens
/// with random kids costs each peer one fetch a second, and a peer that
/// restarts with a new key is learnt on its first token.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How long in-flight calls may run after a shutdown signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The peer API, bound and ready to serve, and the publisher of the
/// documents it serves (none when the peer key cannot sign them).
struct PeerServer {
    addr: SocketAddr,
    tcp: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    api: PeerKeysApi,
    publisher: Option<DocumentPublisher>,
}

/// Where peer keys come from, before they run.
struct TrustSources {
    writer: TrustWriter,
    view: TrustView,
    groups: Vec<Arc<PeerGroup>>,
    files: Vec<Arc<JwksFileSource>>,
    refresher: Refresher,
    documents: Option<DocumentSink>,
}

/// A built, not yet running, sidecar.
pub struct Daemon {
    id: String,
    store: KeyStore,
    keys: KeyView,
    commands: mpsc::Receiver<Command>,
    /// The bound-token signing keys' store (`keys_dir/bound/`).
    bound_store: KeyStore,
    bound_commands: mpsc::Receiver<Command>,
    writer: TrustWriter,
    groups: Vec<Arc<PeerGroup>>,
    files: Vec<Arc<JwksFileSource>>,
    document_sink: Option<DocumentSink>,
    direct: Option<DirectFetcher>,
    directory: Option<Directory>,
    /// The etcd log-in still to be done (it failed at start).
    etcd_login: Option<crate::directory::Login>,
    api: LocalApi,
    listener: UnixListener,
    socket: PathBuf,
    keys_dir: PathBuf,
    limits: LimitsConfig,
    caps: FdCaps,
    peer_server: Option<PeerServer>,
    peer_addr: Option<SocketAddr>,
    /// The peer TLS material, reloaded from its files while serving.
    peer_tls: Option<(PeerTls, ExpiryPolicy)>,
    /// The fleet-wide ban document's file, polled while serving.
    ban_document: Option<(crate::bans::DocumentSource, Arc<crate::bans::BanStore>)>,
    health: tonic_health::server::HealthReporter,
    clock: SharedClock,
    shutdown: CancellationToken,
    audit: AuditWriter,
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
        let caps = fd_caps(&config);
        let (audit, audit_writer) = crate::audit::start(&config.audit, clock.clone())?;
        let ((store, keys), (bound_store, bound_keys)) = open_keys(&config, &clock).await?;
        let own_keys = OwnKeys {
            signing: keys.clone(),
            bound: bound_keys.clone(),
        };
        let (etcd, etcd_login) = match &config.directory {
            Some(d) => {
                let (client, login) = crate::directory::connect(d).await?;
                (Some(client), login)
            }
            None => (None, None),
        };
        let replay = replay_store(&config, etcd.as_ref(), &clock)?;
        let peer_tls = match &config.peer_api {
            Some(p) => Some(PeerTls::load(
                p,
                &config.trust_domain,
                &config.id,
                clock.now(),
            )?),
            None => None,
        };
        let (ban_store, bans) = crate::bans::BanStore::open(&config.keys_dir)?;
        let ban_document = match &config.bans {
            Some(b) => Some((
                crate::bans::DocumentSource::new(
                    &b.document,
                    &b.signer,
                    config.trust_domain.as_str(),
                )?,
                ban_store.clone(),
            )),
            None => None,
        };
        let origins = KeyOrigins::default();
        let containment = (bans.clone(), origins.clone());
        let sources = trust_sources(&config, peer_tls.as_ref(), &clock, &containment)?;
        let engine = Arc::new(with_nonces(
            &config,
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
            )
            .with_replay(replay)
            .with_bans(bans, origins)
            .with_verify_cache(config.tokens.verify_cache)
            .with_proof_keys(open_proof_keys(&config)?)
            .with_proof_window(config.tokens.proof_window)
            .with_bound_keys(bound_keys),
        )?);
        let shutdown = CancellationToken::new();
        let peer_server = match (&config.peer_api, &peer_tls) {
            (Some(p), Some(tls)) => {
                Some(bind_peer_api(&config, p, tls, &own_keys, &clock, &shutdown).await?)
            }
            _ => None,
        };
        let peer_addr = peer_server.as_ref().map(|p| p.addr);
        let peer_tls = peer_tls.zip(config.peer_api.as_ref()).map(|(tls, p)| {
            let policy = ExpiryPolicy { warn_at: p.warn_at };
            (tls, policy)
        });
        let listener = crate::api::bind(&config.socket, config.socket_mode)?;
        let (commands_tx, commands) = mpsc::channel(16);
        let (bound_tx, bound_commands) = mpsc::channel(16);
        let mut api = local_api(
            &config,
            engine,
            &own_keys,
            &sources.view,
            (commands_tx, bound_tx),
            &clock,
            &shutdown,
            audit,
        );
        let directory = match (&config.directory, etcd, &sources.documents, &peer_server) {
            (Some(d), Some(client), Some(sink), Some(server)) => Some(Directory::new(
                client,
                d,
                &config.trust_domain,
                &config.name,
                sink.clone(),
                server.publisher.as_ref().map(DocumentPublisher::subscribe),
            )),
            _ => None,
        };
        api.directory_health = directory.as_ref().map(Directory::health);
        api.admin = api.admin.with_bans(ban_store);
        if peer_tls.is_some() {
            // The peer TLS watch sets the peer API's status (NOT_SERVING once
            // its certificate expired); shutdown turns it NOT_SERVING too.
            api.health.register(crate::peers::PEER_SERVICE);
        }
        let health = api.health.reporter();
        Ok(Self {
            id: config.id.to_string(),
            store,
            keys,
            commands,
            bound_store,
            bound_commands,
            writer: sources.writer,
            groups: sources.groups,
            files: sources.files,
            direct: match (&sources.documents, &peer_tls) {
                (Some(sink), Some((tls, _))) => Some(DirectFetcher::new(
                    sink.clone(),
                    tls.client_config()?,
                    tls.trust_domain().clone(),
                )),
                _ => None,
            },
            document_sink: sources.documents,
            directory,
            etcd_login,
            api,
            listener,
            socket: config.socket,
            keys_dir: config.keys_dir,
            limits: config.limits,
            caps,
            peer_server,
            peer_addr,
            peer_tls,
            ban_document,
            health,
            clock,
            shutdown,
            audit: audit_writer,
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

    /// This instance's signed key-set documents (the current one, then each
    /// new one), when it serves a peer API: what a relay (the directory)
    /// publishes.
    pub fn documents(&self) -> Option<tokio::sync::watch::Receiver<Arc<SignedDocument>>> {
        self.peer_server
            .as_ref()
            .and_then(|p| p.publisher.as_ref())
            .map(DocumentPublisher::subscribe)
    }

    /// The publisher's handle: `fresh()` gives the current document, signed
    /// anew first if it is past half its life or older than the key set.
    pub fn document_handle(&self) -> Option<crate::peers::DocumentHandle> {
        self.peer_server
            .as_ref()
            .and_then(|p| p.publisher.as_ref())
            .map(DocumentPublisher::handle)
    }

    /// Where a relay (the directory) hands the documents it receives: they
    /// are verified and installed exactly as a peer's. Present when the
    /// peer API (its CA) is configured.
    pub fn document_sink(&self) -> Option<DocumentSink> {
        self.document_sink.clone()
    }

    /// Serves until `shutdown` completes; in-flight calls finish, background
    /// tasks stop, and the socket file is removed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), DaemonError> {
        let cancel = self.shutdown.clone();
        let tracker = TaskTracker::new();
        let limits = self.limits;
        let listen = |max_connections| ListenLimits {
            max_connections,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
        };
        let kid = self
            .keys
            .current()
            .signing_key(self.clock.now())
            .map(|k| k.kid().to_owned())
            .unwrap_or_default();
        tracker.spawn(
            crate::keys::run_rotation(
                self.store,
                self.commands,
                self.clock.clone(),
                cancel.clone(),
            )
            .instrument(tracing::info_span!("rotation", id = %self.id)),
        );
        tracker.spawn(
            crate::keys::run_rotation(
                self.bound_store,
                self.bound_commands,
                self.clock.clone(),
                cancel.clone(),
            )
            .instrument(tracing::info_span!("bound_rotation", id = %self.id)),
        );
        tracker.spawn(self.writer.run(cancel.clone()));
        if let Some(direct) = self.direct {
            tracker.spawn(direct.run(cancel.clone()));
        }
        if let Some(login) = self.etcd_login {
            tracker.spawn(login.run(cancel.clone()));
        }
        if let Some(directory) = self.directory {
            directory.spawn(&tracker, &cancel);
        }
        if let Some((source, store)) = self.ban_document {
            tracker.spawn(
                crate::bans::watch_document(source, store, cancel.clone())
                    .instrument(tracing::info_span!("ban_document")),
            );
        }
        if let Some((tls, policy)) = self.peer_tls {
            tracker.spawn(
                crate::peers::watch_tls(
                    tls,
                    self.clock.clone(),
                    policy,
                    self.health.clone(),
                    cancel.clone(),
                )
                .instrument(tracing::info_span!("peer_tls")),
            );
        }
        if let Some(PeerServer {
            tcp,
            tls,
            api,
            publisher,
            ..
        }) = self.peer_server
        {
            if let Some(publisher) = publisher {
                tracker.spawn(publisher.run(cancel.clone()));
            }
            let stop = cancel.clone();
            let peer_listen = listen(self.caps.peer);
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
        for source in self.files {
            tracker.spawn(source.watch(cancel.clone()));
        }
        for group in self.groups {
            tracker.spawn(group.run(cancel.clone()));
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
        // On shutdown every service turns NOT_SERVING, then `cancel` ends the
        // long-lived streams (health watches, SPIFFE bundles, peer watches) so
        // the graceful drain below only waits for ordinary calls.
        let serve = crate::api::serve(
            self.listener,
            self.api,
            limits,
            listen(self.caps.local),
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = stop.cancelled() => {}
                }
            },
        );
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
        // The services (and their audit handles) are gone: the writer drains
        // its queue, flushes and stops.
        let audit = tokio::task::spawn_blocking(move || self.audit.finish());
        if tokio::time::timeout(Duration::from_secs(5), audit)
            .await
            .is_err()
        {
            tracing::warn!("the audit writer did not finish within 5s");
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            tracing::warn!(socket = %self.socket.display(), error = %e, "could not remove socket");
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

/// Where one-time ids are claimed: in etcd, shared by every replica, with
/// `[directory]`; otherwise in the journal of the keys directory.
fn replay_store(
    config: &Config,
    etcd: Option<&etcd_client::Client>,
    clock: &SharedClock,
) -> Result<Arc<dyn ReplayStore>, DaemonError> {
    match (&config.directory, etcd) {
        (Some(d), Some(client)) => Ok(Arc::new(EtcdReplay::new(
            client.clone(),
            &d.prefix,
            &config.name,
        ))),
        _ => Ok(Arc::new(JournalReplay::open(
            &config.keys_dir,
            MemoryReplay::default(),
            clock.now(),
        )?)),
    }
}

/// Binds the peer API's listener; its service serves the own keys and the
/// documents of a publisher signing with the peer certificate's key.
async fn bind_peer_api(
    config: &Config,
    p: &crate::config::PeerApiConfig,
    tls: &PeerTls,
    keys: &OwnKeys,
    clock: &SharedClock,
    shutdown: &CancellationToken,
) -> Result<PeerServer, DaemonError> {
    let err = |source| DaemonError::Listen {
        what: "peer_api.listen",
        addr: p.listen,
        source,
    };
    let tcp = TcpListener::bind(p.listen).await.map_err(err)?;
    let addr = tcp.local_addr().map_err(err)?;
    let advertise = p
        .advertise
        .clone()
        .or_else(|| (!addr.ip().is_unspecified()).then(|| format!("https://{addr}")));
    if advertise.is_none() {
        tracing::warn!(listen = %addr, "peer_api.listen is an unspecified address and peer_api.advertise is not set: documents carry no address, so verifiers cannot fetch them directly");
    }
    // The key is read for every signature (and the anchors for every
    // check), so renewed peer material is followed.
    let publisher = match tls.document_key() {
        Ok(_) => {
            let instance = InstanceState::open(&config.keys_dir).map_err(KeyError::from)?;
            let signer = tls.clone();
            Some(
                DocumentPublisher::new(
                    config.id.clone(),
                    Arc::new(move || signer.document_key().map_err(|e| e.to_string())),
                    instance,
                    keys.clone(),
                    clock.clone(),
                    p.document_lifetime,
                    advertise,
                )?
                .resigning_on(tls.reloads()),
            )
        }
        Err(e) => {
            // A peer key that served before documents existed (a SEC1 or
            // PKCS#1 file, another curve) keeps working for plain key sets.
            tracing::warn!(error = %e, "the peer key cannot sign key-set documents; serving plain key sets only (reissue the certificate with `tokend ca issue` for documents)");
            None
        }
    };
    let mut api = PeerKeysApi::new(
        config.id.clone(),
        config.trust_domain.clone(),
        keys.clone(),
        shutdown.clone(),
        config.limits.peer_watches_per_caller,
    );
    if let Some(p) = &publisher {
        api = api.with_documents(p.handle());
    }
    Ok(PeerServer {
        addr,
        tcp,
        tls: tls.rustls_server_config()?,
        api,
        publisher,
    })
}

/// The local services, each with only the handles it uses (one argument
/// per handle, so what each service gets stays visible here).
#[allow(clippy::too_many_arguments)]
fn local_api(
    config: &Config,
    engine: Arc<Engine>,
    keys: &OwnKeys,
    trust: &TrustView,
    commands: (mpsc::Sender<Command>, mpsc::Sender<Command>),
    clock: &SharedClock,
    shutdown: &CancellationToken,
    audit: Audit,
) -> LocalApi {
    let callers = Callers::new(config.allowed_uids.clone());
    LocalApi {
        token: TokenApi::new(
            engine.clone(),
            config.trust_domain.clone(),
            callers.clone(),
            audit.clone(),
        ),
        admin: AdminApi::new(
            config.id.clone(),
            keys.clone(),
            trust.clone(),
            commands,
            clock.clone(),
            callers.clone(),
            config.admin_uids.clone(),
            audit.clone(),
        ),
        spiffe: SpiffeApi::new(engine.clone(), callers.clone(), shutdown.clone(), audit),
        ext_authz: ExtAuthzApi::new(
            engine,
            config.trust_domain.clone(),
            callers,
            config.ext_authz.clone(),
        ),
        directory_health: None,
        health: crate::api::LocalHealth::new(shutdown.clone()),
    }
}

/// Opens the keys directory (the signing keys) and its `bound/`
/// subdirectory (the bound-token signing keys), and applies the first
/// rotation plan of each, so both classes have a key before anything is
/// served. On a fresh directory (or the first start over a directory of an
/// earlier release, for `bound/`) the two RSA keys are generated at once,
/// each on the blocking pool: on two cores the start takes about as long
/// as with one key. Generating the bound key here rather than at the first
/// bound mint keeps the RSA keygen out of every request's path and lets
/// peers learn the key (with the first key set and document) before any
/// token it signs reaches them.
async fn open_keys(
    config: &Config,
    clock: &SharedClock,
) -> Result<((KeyStore, KeyView), (KeyStore, KeyView)), KeyError> {
    let open = |class| {
        KeyStore::open_class(
            &config.keys_dir,
            class,
            config.lifecycle(),
            config.rotation.key_bits,
            clock.clone(),
        )
    };
    let (mut store, keys) = open(KeyClass::Signing).await?;
    let (mut bound, bound_keys) = open(KeyClass::Bound).await?;
    let now = clock.now();
    tokio::try_join!(store.apply_plan(now), bound.apply_plan(now))?;
    Ok(((store, keys), (bound, bound_keys)))
}

/// Opens this instance's proof keys (`keys_dir/proof`), rotated with the
/// signing keys and kept as long as a token bound to them may live.
/// Requires server nonces in DPoP proofs when `[tokens] proof_nonce =
/// "required"`, under a secret of this process alone.
fn with_nonces(config: &Config, engine: Engine) -> Result<Engine, DaemonError> {
    if !config.tokens.proof_nonce_required {
        return Ok(engine);
    }
    let nonces = crate::engine::Nonces::random().map_err(|r| DaemonError::Randomness(r.detail))?;
    Ok(engine.with_proof_nonces(nonces))
}

fn open_proof_keys(config: &Config) -> Result<Arc<ProofKeyStore>, KeyError> {
    let lc = config.lifecycle();
    let store = ProofKeyStore::open(&config.keys_dir, lc.interval, lc.grace)?;
    Ok(Arc::new(store))
}

/// Registers every configured peer with the trust writer and loads the
/// JWKS files (a bad file stops the start, naming it).
fn trust_sources(
    config: &Config,
    tls: Option<&PeerTls>,
    clock: &SharedClock,
    containment: &(BanView, KeyOrigins),
) -> Result<TrustSources, DaemonError> {
    let (mut writer, feed, view) = TrustWriter::new();
    let mut refresher = Refresher::new(MIN_REFRESH_INTERVAL);
    let (mut groups, mut files) = (Vec::new(), Vec::new());
    let documents = tls.map(|t| {
        let anchors = t.clone();
        DocumentSink::new(
            Arc::new(move || anchors.document_anchors()),
            DocumentLimits {
                clock_skew: config.tokens.clock_skew,
                ..DocumentLimits::default()
            },
            (feed.clone(), view.clone()),
            clock.clone(),
            containment.clone(),
        )
    });
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
            PeerSource::Addresses(addresses) => {
                let (Some(tls), Some(documents)) = (tls, &documents) else {
                    return Err(PeerError::Address {
                        name: peer.name.clone(),
                        address: addresses.join(", "),
                        detail: "needs [peer_api] for mTLS".into(),
                    }
                    .into());
                };
                let cx = PeerContext {
                    tls: tls.client_config()?,
                    td: tls.trust_domain().clone(),
                    feed: feed.clone(),
                    view: view.clone(),
                    documents: documents.clone(),
                    clock: clock.clone(),
                    bans: containment.0.clone(),
                    origins: containment.1.clone(),
                };
                let group = PeerGroup::new(&peer.name, peer.id.clone(), addresses.clone(), cx)?;
                writer
                    .apply(TrustUpdate::Register {
                        issuer: issuer.to_owned(),
                        source: group.source(),
                    })
                    .map_err(PeerError::from)?;
                refresher.add(issuer, group.clone());
                groups.push(group);
            }
        }
    }
    Ok(TrustSources {
        writer,
        view,
        groups,
        files,
        refresher,
        documents,
    })
}
