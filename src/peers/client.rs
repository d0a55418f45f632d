//! One live peer connection (one address, so one instance behind it at a
//! time): connect over mTLS, watch the instance's signed key-set documents
//! (or, from a release without them, its plain key sets), and install them
//! in the trust store under the identity its CERTIFICATE proves (never the
//! name configured for the address, never what the message says). A
//! document is checked exactly as one relayed by anyone else, and the
//! identity the TLS connection proved must also be the document's.
//! A connection presenting a banned certificate (serial or identity), or
//! dialled at a banned instance address, delivers nothing; a document also
//! meets the bans on its own signing certificate and instance (in the
//! `DocumentSink`, as relayed ones do), and where each installed key came
//! from is recorded (`KeyOrigins`) so a later ban reaches it. Reconnects back off exponentially with full jitter; while out of contact
//! the last keys stay in use until their document expires or their
//! publisher's expiry hints pass. Bounded: message size, key count, key
//! policy, and time to answer.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use super::connect::{
    ANSWER_TIMEOUT, PeerApi, Proven, Slot, authority_of, connect, proven, status,
};
use super::keyset::key_set_parts;
use super::refresh::KeySource;
use super::{DocumentSink, LogLimit, PeerError, TrustFeed};
use crate::engine::{BanView, KeyOrigin, KeyOrigins, TrustUpdate, TrustView};
use crate::identity::{SpiffeId, TrustDomain};
use crate::proto::tokend::v1 as pb;
use crate::time::SharedClock;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter: a random delay in [0, min(max, base·2^attempt)].
fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let cap = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    Duration::from_millis(rng.gen_range(0..=cap.as_millis() as u64))
}

/// One message of a watch: a signed document, or a plain set from a
/// release without documents.
enum Delivery {
    Document(pb::KeySetDocument),
    Set(pb::PeerKeySet),
}

impl From<pb::KeySetDocument> for Delivery {
    fn from(d: pb::KeySetDocument) -> Self {
        Delivery::Document(d)
    }
}

impl From<pb::PeerKeySet> for Delivery {
    fn from(s: pb::PeerKeySet) -> Self {
        Delivery::Set(s)
    }
}

/// What this client's connections delivered, to mark stale on loss.
#[derive(Debug, Default)]
struct Delivered {
    /// The identity the last connection proved.
    identity: Option<SpiffeId>,
    /// Instances installed through this address.
    instances: HashSet<String>,
    /// The document instance last served at this address.
    last_document_instance: Option<String>,
}

/// A configured live peer at one address.
pub(crate) struct PeerClient {
    name: String,
    expected: SpiffeId,
    /// The address as configured (with the resolved IP when it was a name).
    address: String,
    /// Where to dial: `host:port`.
    authority: String,
    td: TrustDomain,
    tls: Arc<rustls::ClientConfig>,
    feed: TrustFeed,
    view: TrustView,
    documents: DocumentSink,
    clock: SharedClock,
    /// The operator's bans: a connection presenting a banned certificate
    /// delivers nothing.
    bans: BanView,
    /// Where each plain key set this client installs came from.
    origins: KeyOrigins,
    delivered: Mutex<Delivered>,
    /// Refusals of this peer's sets are logged at most once a second.
    log_limit: LogLimit,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("name", &self.name)
            .field("authority", &self.authority)
            .finish()
    }
}

/// Everything a peer client needs besides its address.
#[derive(Clone, Debug)]
pub(crate) struct PeerContext {
    /// The client side of the peer TLS (its hooks read the current,
    /// reloadable material at each handshake).
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// The trust domain.
    pub(crate) td: TrustDomain,
    /// The trust writer's feed.
    pub(crate) feed: TrustFeed,
    /// The trust snapshots.
    pub(crate) view: TrustView,
    /// Where documents are verified and installed.
    pub(crate) documents: DocumentSink,
    /// The clock.
    pub(crate) clock: SharedClock,
    /// The operator's bans.
    pub(crate) bans: BanView,
    /// Where each peer key came from.
    pub(crate) origins: KeyOrigins,
}

// === impl PeerClient ===

impl PeerClient {
    /// A client for peer `name` at `address` (`https://host:port`), dialling
    /// `dial` instead of the address's host when given (one resolved
    /// address of a name); the daemon registers `expected` with the writer
    /// before it runs.
    pub(crate) fn new(
        name: &str,
        expected: SpiffeId,
        address: &str,
        dial: Option<SocketAddr>,
        cx: &PeerContext,
    ) -> Result<Arc<Self>, PeerError> {
        let authority = match dial {
            Some(a) => a.to_string(),
            None => authority_of(address).map_err(|detail| PeerError::Address {
                name: name.to_owned(),
                address: address.to_owned(),
                detail,
            })?,
        };
        let label = match dial {
            Some(a) => format!("{address} ({a})"),
            None => address.to_owned(),
        };
        Ok(Arc::new(Self {
            name: name.to_owned(),
            expected,
            address: label,
            authority,
            td: cx.td.clone(),
            tls: cx.tls.clone(),
            feed: cx.feed.clone(),
            view: cx.view.clone(),
            documents: cx.documents.clone(),
            clock: cx.clock.clone(),
            bans: cx.bans.clone(),
            origins: cx.origins.clone(),
            delivered: Mutex::default(),
            log_limit: LogLimit::default(),
        }))
    }

    /// The address this client dials, as shown in sources.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    async fn connect(&self) -> Result<(PeerApi, Slot), PeerError> {
        connect(&self.authority, &self.name, self.tls.clone(), &self.td).await
    }

    fn source(&self) -> String {
        format!("peer:{}", self.address)
    }

    fn delivered(&self) -> std::sync::MutexGuard<'_, Delivered> {
        self.delivered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn warn_if_unexpected(&self, identity: &SpiffeId, claims: &str) {
        if identity != &self.expected {
            tracing::warn!(
                configured = %self.expected,
                presented = %identity,
                claims = ?claims,
                "peer address serves another identity; filing its keys under the certificate's identity"
            );
        }
    }

    /// Refuses everything from a connection whose certificate or address
    /// is banned.
    fn check_bans(&self, proven: &Proven) -> Result<(), PeerError> {
        proven.check_bans(&self.bans.current(), &self.authority)
    }

    /// Validates a plain key set (a release without documents) and installs
    /// it as this address's instance under the identity `proven`; its keys'
    /// origin is the connection's certificate and the address (`host:port`).
    async fn install_set(&self, proven: &Proven, msg: pb::PeerKeySet) -> Result<(), PeerError> {
        self.check_bans(proven)?;
        let identity = &proven.identity;
        self.warn_if_unexpected(identity, &msg.issuer);
        if !self.view.current().knows(identity.as_str()) {
            return Err(PeerError::NotConfigured(identity.clone()));
        }
        let version = msg.version;
        let super::keyset::SetParts {
            keys,
            bound,
            revoked,
            expires,
        } = key_set_parts(msg)?;
        let at = self.clock.now();
        let n = keys.len();
        let instance = self.source();
        let origin = KeyOrigin {
            serial: proven.serial.clone(),
            instance: self.authority.clone(),
            address: None,
        };
        let kids: Vec<String> = keys
            .iter()
            .chain(&bound)
            .map(|k| k.kid().to_owned())
            .collect();
        // New kids get their origin before they can be found; known ones
        // keep theirs until the writer took the set.
        self.origins
            .record_new(identity.as_str(), &origin, kids.iter().cloned());
        self.feed
            .apply(TrustUpdate::Instance {
                issuer: identity.to_string(),
                instance: instance.clone(),
                source: self.source(),
                keys,
                bound,
                revoked,
                expires,
                at,
            })
            .await?;
        self.origins.record(identity.as_str(), &origin, kids);
        self.delivered().instances.insert(instance);
        tracing::debug!(issuer = %identity, keys = n, version, "installed peer keys");
        self.count_update();
        Ok(())
    }

    /// Verifies and installs a signed document served over a connection
    /// that proved `proven` (the sink checks the document's own bans).
    async fn install_document(
        &self,
        proven: &Proven,
        msg: pb::KeySetDocument,
    ) -> Result<(), PeerError> {
        self.check_bans(proven)?;
        let identity = &proven.identity;
        self.warn_if_unexpected(identity, "<signed document>");
        let doc = self
            .documents
            .install(msg.jws.as_bytes(), Some(identity), &self.source())
            .await?;
        let instance = doc.claims.instance.clone();
        let previous = {
            let mut d = self.delivered();
            d.instances.insert(instance.clone());
            d.last_document_instance.replace(instance.clone())
        };
        // Another instance now answers at this address: the one before left it.
        if let Some(prev) = previous.filter(|p| *p != instance) {
            self.documents.gone(identity.as_str(), &prev).await?;
            self.delivered().instances.remove(&prev);
        }
        tracing::debug!(issuer = %identity, instance, seq = doc.claims.seq, "installed peer document");
        self.count_update();
        Ok(())
    }

    fn count_update(&self) {
        metrics::counter!("tokend_peer_updates_total", "peer" => self.name.clone()).increment(1);
    }

    fn refuse(&self, identity: Option<&SpiffeId>, error: &PeerError) {
        let issuer = identity.unwrap_or(&self.expected);
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(peer = %self.name, address = %self.address, issuer = %issuer, error = %error, suppressed, "refused peer key set; previous set stays");
        }
        let kind = match error {
            PeerError::Document(e) => e.kind(),
            PeerError::Banned { .. } => "banned",
            _ => "other",
        };
        metrics::counter!("tokend_peer_refusals_total", "peer" => self.name.clone(), "kind" => kind)
            .increment(1);
        // Shown under the identity the certificate proved, and under the
        // one configured for this address when that differs.
        for issuer in
            std::iter::once(issuer).chain((issuer != &self.expected).then_some(&self.expected))
        {
            self.feed.note(TrustUpdate::Error {
                issuer: issuer.to_string(),
                error: error.to_string(),
            });
        }
    }

    /// One unary fetch (used for the unknown-kid refresh): the document,
    /// or the plain set from a release without documents.
    pub(crate) async fn fetch_once(&self) -> Result<(), PeerError> {
        let timeout = |what| PeerError::Timeout {
            what,
            after: ANSWER_TIMEOUT,
        };
        let (mut client, slot) = tokio::time::timeout(ANSWER_TIMEOUT, self.connect())
            .await
            .map_err(|_| timeout("connect"))??;
        let doc = tokio::time::timeout(
            ANSWER_TIMEOUT,
            client.get_document(pb::GetDocumentRequest {}),
        )
        .await
        .map_err(|_| timeout("GetDocument"))?;
        let proven = proven(&slot)?;
        let identity = proven.identity.clone();
        let result = match doc {
            Ok(d) => self.install_document(&proven, d.into_inner()).await,
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                let msg =
                    tokio::time::timeout(ANSWER_TIMEOUT, client.get_keys(pb::GetKeysRequest {}))
                        .await
                        .map_err(|_| timeout("GetKeys"))?
                        .map_err(status("GetKeys"))?
                        .into_inner();
                self.install_set(&proven, msg).await
            }
            Err(s) => Err(status("GetDocument")(s)),
        };
        if let Err(e) = &result {
            self.refuse(Some(&identity), e);
        }
        result
    }

    /// The next message of a watch: `None` when it ended or `cancel` fired;
    /// the first one must come within `ANSWER_TIMEOUT`.
    async fn next<T>(
        &self,
        stream: &mut Streaming<T>,
        first: bool,
        rpc: &'static str,
        cancel: &CancellationToken,
    ) -> Result<Option<T>, PeerError> {
        let next = if first {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                m = tokio::time::timeout(ANSWER_TIMEOUT, stream.message()) => {
                    m.map_err(|_| PeerError::Timeout { what: rpc, after: ANSWER_TIMEOUT })?
                }
            }
        } else {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                m = stream.message() => m,
            }
        };
        next.map_err(status(rpc))
    }

    /// Watches until the stream ends or fails; returns whether anything
    /// arrived. Prefers documents; a peer that answers UNIMPLEMENTED (an
    /// older release) is watched for plain key sets instead.
    async fn watch(&self, cancel: &CancellationToken) -> Result<bool, PeerError> {
        let (mut client, slot) = self.connect().await?;
        let opened = tokio::time::timeout(
            ANSWER_TIMEOUT,
            client.watch_documents(pb::GetDocumentRequest {}),
        )
        .await
        .map_err(|_| PeerError::Timeout {
            what: "WatchDocuments",
            after: ANSWER_TIMEOUT,
        })?;
        let proven = proven(&slot)?;
        let identity = proven.identity.clone();
        self.delivered().identity = Some(identity.clone());
        match opened {
            Ok(stream) => {
                self.follow(stream.into_inner(), "WatchDocuments", &proven, cancel)
                    .await
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                let stream =
                    tokio::time::timeout(ANSWER_TIMEOUT, client.watch_keys(pb::GetKeysRequest {}))
                        .await
                        .map_err(|_| PeerError::Timeout {
                            what: "WatchKeys",
                            after: ANSWER_TIMEOUT,
                        })?
                        .map_err(status("WatchKeys"))?
                        .into_inner();
                self.follow(stream, "WatchKeys", &proven, cancel).await
            }
            Err(s) => {
                let e = status("WatchDocuments")(s);
                self.refuse(Some(&identity), &e);
                Err(e)
            }
        }
    }

    /// Installs every message of `stream` (of `rpc`) under `identity` until
    /// it ends, fails or `cancel` fires; returns whether anything arrived.
    /// A refused message is noted and the stream followed on.
    async fn follow<T: Into<Delivery>>(
        &self,
        mut stream: Streaming<T>,
        rpc: &'static str,
        proven: &Proven,
        cancel: &CancellationToken,
    ) -> Result<bool, PeerError> {
        let identity = &proven.identity;
        let mut got_any = false;
        loop {
            let msg = self.next(&mut stream, !got_any, rpc, cancel).await;
            let Some(msg) = self.received(msg, identity, &mut got_any)? else {
                return Ok(got_any);
            };
            let installed = match msg.into() {
                Delivery::Document(d) => self.install_document(proven, d).await,
                Delivery::Set(s) => self.install_set(proven, s).await,
            };
            if let Err(e) = installed {
                if matches!(e, PeerError::WriterGone) {
                    return Ok(got_any);
                }
                self.refuse(Some(identity), &e);
                if matches!(e, PeerError::Banned { .. }) {
                    // Nothing more from this connection.
                    return Err(e);
                }
            }
        }
    }

    /// Books a received message: marks the peer connected on the first.
    fn received<T>(
        &self,
        msg: Result<Option<T>, PeerError>,
        identity: &SpiffeId,
        got_any: &mut bool,
    ) -> Result<Option<T>, PeerError> {
        match msg {
            Ok(Some(m)) => {
                if !*got_any {
                    metrics::gauge!("tokend_peer_connected", "peer" => self.name.clone()).set(1.0);
                }
                *got_any = true;
                Ok(Some(m))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.refuse(Some(identity), &e);
                Err(e)
            }
        }
    }

    /// Marks what this address delivered stale (contact lost) or gone.
    fn mark(&self, gone: bool) {
        let (identity, instances) = {
            let d = self.delivered();
            (d.identity.clone(), d.instances.clone())
        };
        for issuer in std::iter::once(self.expected.clone()).chain(identity) {
            for instance in &instances {
                self.feed.note(if gone {
                    TrustUpdate::InstanceGone {
                        issuer: issuer.to_string(),
                        instance: instance.clone(),
                        at: self.clock.now(),
                    }
                } else {
                    TrustUpdate::InstanceStale {
                        issuer: issuer.to_string(),
                        instance: instance.clone(),
                        stale: true,
                    }
                });
            }
        }
    }

    /// Runs until cancelled: watch, and on any failure back off and
    /// reconnect. `retired` (the address left the peer's DNS answer) marks
    /// what it delivered gone when it is cancelled.
    pub(crate) async fn run(
        self: Arc<Self>,
        cancel: CancellationToken,
        retired: CancellationToken,
    ) {
        let mut attempt = 0u32;
        loop {
            match self.watch(&cancel).await {
                Ok(true) => attempt = 0,
                Ok(false) => {}
                Err(e) => {
                    if let Some(suppressed) = self.log_limit.allow() {
                        tracing::warn!(peer = %self.name, address = %self.address, error = %e, suppressed, "peer unreachable; keeping its last keys");
                    }
                    self.feed.note(TrustUpdate::Error {
                        issuer: self.expected.to_string(),
                        error: e.to_string(),
                    });
                }
            }
            if cancel.is_cancelled() {
                if retired.is_cancelled() {
                    self.mark(true);
                }
                return;
            }
            self.mark(false);
            metrics::gauge!("tokend_peer_connected", "peer" => self.name.clone()).set(0.0);
            let delay = backoff(attempt, &mut rand::thread_rng());
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = cancel.cancelled() => {
                    if retired.is_cancelled() {
                        self.mark(true);
                    }
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

impl KeySource for PeerClient {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<(), PeerError>> + Send + '_>> {
        Box::pin(self.fetch_once())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Backoff grows exponentially, is capped, and is jittered below the cap.
    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let cap = BACKOFF_MIN
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_MAX);
            let d = backoff(attempt, &mut rng);
            assert!(d <= cap && d <= BACKOFF_MAX);
        }
        let draws: std::collections::HashSet<_> = (0..20).map(|_| backoff(10, &mut rng)).collect();
        assert!(draws.len() > 10, "jittered");
    }
}
