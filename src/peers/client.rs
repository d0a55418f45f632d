//! One live peer: connect over mTLS, fetch its keys, watch for changes, and
//! install them in the trust store under the identity its CERTIFICATE proves
//! (never the name configured for the address, never what the message says).
//! Reconnects back off exponentially with full jitter; while out of contact
//! the last keys stay in use until their publisher's expiry hints. Bounded:
//! message size, key count, key policy, and time to answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use super::refresh::KeySource;
use super::tls::svid_id;
use super::{LogLimit, PeerError, TrustFeed};
use crate::engine::{BanView, KeyOrigin, KeyOrigins, MAX_KEYS_PER_ISSUER, TrustUpdate, TrustView};
use crate::identity::{SpiffeId, TrustDomain};
use crate::proto::tokend::v1 as pb;
use crate::time::{SharedClock, UnixTime};

/// The largest peer message accepted.
const MAX_PEER_MESSAGE: usize = super::MAX_JWKS_BYTES + 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter: a random delay in [0, min(max, base·2^attempt)].
fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let cap = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    Duration::from_millis(rng.gen_range(0..=cap.as_millis() as u64))
}

/// A configured live peer.
pub(crate) struct PeerClient {
    name: String,
    expected: SpiffeId,
    authority: String,
    td: TrustDomain,
    tls: Arc<rustls::ClientConfig>,
    feed: TrustFeed,
    view: TrustView,
    clock: SharedClock,
    /// The identity the last watched connection proved (marked stale on loss).
    watched: Mutex<Option<SpiffeId>>,
    /// The operator's bans: a connection presenting a banned certificate
    /// publishes nothing.
    bans: BanView,
    /// Where each key this client installs came from.
    origins: KeyOrigins,
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

/// What the server's certificate proved on one connection.
#[derive(Clone, Debug)]
struct Proven {
    identity: SpiffeId,
    /// The certificate's serial (hex).
    serial: String,
}

type Slot = Arc<Mutex<Option<Proven>>>;

/// What the server's certificate proved on this channel's connection.
fn proven(slot: &Slot) -> Result<Proven, PeerError> {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or(PeerError::NoIdentity)
}

fn status(rpc: &'static str) -> impl FnOnce(tonic::Status) -> PeerError {
    move |s| PeerError::Status {
        rpc,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

// === impl PeerClient ===

impl PeerClient {
    /// A client for peer `name` at `address` (`https://host:port`); the
    /// daemon registers `expected` with the writer before it runs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        expected: SpiffeId,
        address: &str,
        tls: &super::PeerTls,
        feed: TrustFeed,
        view: TrustView,
        clock: SharedClock,
        (bans, origins): (BanView, KeyOrigins),
    ) -> Result<Arc<Self>, PeerError> {
        let bad = |detail: String| PeerError::Address {
            name: name.to_owned(),
            address: address.to_owned(),
            detail,
        };
        let uri: Uri = address.parse().map_err(|e| bad(format!("{e}")))?;
        let authority = uri
            .authority()
            .filter(|a| a.port_u16().is_some())
            .ok_or_else(|| bad("needs host:port".into()))?
            .to_string();
        Ok(Arc::new(Self {
            name: name.to_owned(),
            expected,
            authority,
            td: tls.trust_domain().clone(),
            tls: tls.client_config().map_err(|e| bad(e.to_string()))?,
            feed,
            view,
            clock,
            watched: Mutex::default(),
            bans,
            origins,
            log_limit: LogLimit::default(),
        }))
    }

    /// A fresh channel over one mTLS connection, and the slot its connector
    /// fills with the identity the server's certificate proves.
    async fn connect(
        &self,
    ) -> Result<(pb::peer_service_client::PeerServiceClient<Channel>, Slot), PeerError> {
        let slot: Slot = Arc::default();
        let (tls, authority, td, seen) = (
            self.tls.clone(),
            self.authority.clone(),
            self.td.clone(),
            slot.clone(),
        );
        let server_name = ServerName::try_from(self.name.clone())
            .map_err(|e| PeerError::Connect(format!("server name {}: {e}", self.name)))?;
        let connector = tower::service_fn(move |_: Uri| {
            let (tls, authority, td, seen, server_name) = (
                tls.clone(),
                authority.clone(),
                td.clone(),
                seen.clone(),
                server_name.clone(),
            );
            async move {
                let tcp = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio::net::TcpStream::connect(&authority),
                )
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
                )
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .cloned();
                let der = leaf.ok_or_else(|| std::io::Error::other("no server certificate"))?;
                let identity = svid_id(&der, &td).map_err(std::io::Error::other)?;
                let serial = super::tls::serial_of(&der).map_err(std::io::Error::other)?;
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(Proven { identity, serial });
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = Endpoint::try_from(format!("http://{}", self.authority))
            .map_err(|e| PeerError::Connect(e.to_string()))?
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_with_connector(connector)
            .await
            .map_err(|e| PeerError::Connect(error_chain(&e)))?;
        let client = pb::peer_service_client::PeerServiceClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE);
        Ok((client, slot))
    }

    /// Validates a key set and installs it under the identity `proven`.
    /// Refusals keep the previous set.
    async fn install_set(&self, proven: &Proven, msg: pb::PeerKeySet) -> Result<(), PeerError> {
        let identity = &proven.identity;
        let bans = self.bans.current();
        if let Some(ban) = bans
            .of_certificate(identity.as_str(), &proven.serial)
            .or_else(|| bans.of_instance(&self.authority))
        {
            return Err(PeerError::Banned {
                serial: proven.serial.clone(),
                ban: format!("{} {}", ban.kind.as_str(), ban.value),
            });
        }
        if identity != &self.expected {
            tracing::warn!(
                configured = %self.expected,
                presented = %identity,
                claims = ?msg.issuer,
                "peer address serves another identity; filing its keys under the certificate's identity"
            );
        }
        if !self.view.current().knows(identity.as_str()) {
            return Err(PeerError::NotConfigured(identity.clone()));
        }
        let version = msg.version;
        let update = key_set_update(identity.as_str(), msg, self.clock.now())?;
        let (n, kids): (usize, Vec<String>) = match &update {
            TrustUpdate::Replace { keys, .. } => (
                keys.len(),
                keys.iter().map(|k| k.kid().to_owned()).collect(),
            ),
            _ => (0, Vec::new()),
        };
        // Provenance first: a verification must never find a key whose
        // certificate it cannot tell.
        let origin = KeyOrigin {
            serial: proven.serial.clone(),
            instance: self.authority.clone(),
        };
        self.origins.record(identity.as_str(), &origin, kids);
        self.feed.apply(update).await?;
        tracing::debug!(issuer = %identity, keys = n, version, "installed peer keys");
        metrics::gauge!("tokend_peer_keys", "issuer" => identity.to_string()).set(n as f64);
        metrics::counter!("tokend_peer_updates_total", "peer" => self.name.clone()).increment(1);
        Ok(())
    }

    fn refuse(&self, identity: Option<&SpiffeId>, error: &PeerError) {
        let issuer = identity.unwrap_or(&self.expected);
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(peer = %self.name, issuer = %issuer, error = %error, suppressed, "refused peer key set; previous set stays");
        }
        metrics::counter!("tokend_peer_refusals_total", "peer" => self.name.clone()).increment(1);
        self.feed.note(TrustUpdate::Error {
            issuer: issuer.to_string(),
            error: error.to_string(),
        });
    }

    /// One unary fetch (used for the unknown-kid refresh).
    async fn fetch_once(&self) -> Result<(), PeerError> {
        let (mut client, slot) = tokio::time::timeout(ANSWER_TIMEOUT, self.connect())
            .await
            .map_err(|_| PeerError::Timeout {
                what: "connect",
                after: ANSWER_TIMEOUT,
            })??;
        let msg = tokio::time::timeout(ANSWER_TIMEOUT, client.get_keys(pb::GetKeysRequest {}))
            .await
            .map_err(|_| PeerError::Timeout {
                what: "GetKeys",
                after: ANSWER_TIMEOUT,
            })?
            .map_err(status("GetKeys"))?
            .into_inner();
        let proven = proven(&slot)?;
        let result = self.install_set(&proven, msg).await;
        if let Err(e) = &result {
            self.refuse(Some(&proven.identity), e);
        }
        result
    }

    /// Watches until the stream ends or fails; returns whether any set arrived.
    async fn watch(&self, cancel: &CancellationToken) -> Result<bool, PeerError> {
        let (mut client, slot) = self.connect().await?;
        let mut stream =
            tokio::time::timeout(ANSWER_TIMEOUT, client.watch_keys(pb::GetKeysRequest {}))
                .await
                .map_err(|_| PeerError::Timeout {
                    what: "WatchKeys",
                    after: ANSWER_TIMEOUT,
                })?
                .map_err(status("WatchKeys"))?
                .into_inner();
        let proven = proven(&slot)?;
        let identity = proven.identity.clone();
        *self.watched.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity.clone());
        let mut got_any = false;
        loop {
            let next = if got_any {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(got_any),
                    m = stream.message() => m,
                }
            } else {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(got_any),
                    m = tokio::time::timeout(ANSWER_TIMEOUT, stream.message()) => {
                        m.map_err(|_| PeerError::Timeout { what: "WatchKeys first key set", after: ANSWER_TIMEOUT })?
                    }
                }
            };
            match next {
                Ok(Some(msg)) => {
                    if !got_any {
                        metrics::gauge!("tokend_peer_connected", "peer" => self.name.clone())
                            .set(1.0);
                    }
                    got_any = true;
                    if let Err(e) = self.install_set(&proven, msg).await {
                        if matches!(e, PeerError::WriterGone) {
                            return Ok(got_any);
                        }
                        self.refuse(Some(&identity), &e);
                        if matches!(e, PeerError::Banned { .. }) {
                            // Nothing more from this connection.
                            return Err(e);
                        }
                    }
                }
                Ok(None) => return Ok(got_any),
                Err(s) => {
                    let e = status("WatchKeys")(s);
                    self.refuse(Some(&identity), &e);
                    return Err(e);
                }
            }
        }
    }

    /// Runs until cancelled: watch, and on any failure back off and reconnect.
    pub(crate) async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            match self.watch(&cancel).await {
                Ok(true) => attempt = 0,
                Ok(false) => {}
                Err(e) => {
                    if let Some(suppressed) = self.log_limit.allow() {
                        tracing::warn!(peer = %self.name, error = %e, suppressed, "peer unreachable; keeping its last keys");
                    }
                    self.feed.note(TrustUpdate::Error {
                        issuer: self.expected.to_string(),
                        error: e.to_string(),
                    });
                }
            }
            if cancel.is_cancelled() {
                return;
            }
            let seen = self
                .watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for issuer in std::iter::once(self.expected.clone()).chain(seen) {
                self.feed.note(TrustUpdate::Stale {
                    issuer: issuer.to_string(),
                    stale: true,
                });
            }
            metrics::gauge!("tokend_peer_connected", "peer" => self.name.clone()).set(0.0);
            let delay = backoff(attempt, &mut rand::thread_rng());
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = cancel.cancelled() => return,
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

/// The trust update a peer's key-set message asks for, filed under `issuer`
/// (the identity its certificate proved): the size, key-count and key-policy
/// checks every delivery passes before it reaches the writer. Pure.
pub(crate) fn key_set_update(
    issuer: &str,
    msg: pb::PeerKeySet,
    at: UnixTime,
) -> Result<TrustUpdate, PeerError> {
    if msg.jwks_json.len() > super::MAX_JWKS_BYTES {
        return Err(PeerError::TooLarge(msg.jwks_json.len()));
    }
    let keys = crate::jose::parse_jwks(msg.jwks_json.as_bytes(), MAX_KEYS_PER_ISSUER)?;
    let expires = msg
        .key_expires_at
        .into_iter()
        .map(|(kid, t)| (kid, UnixTime::from_secs(t)))
        .collect();
    Ok(TrustUpdate::Replace {
        issuer: issuer.to_owned(),
        keys,
        revoked: msg.revoked_kids,
        expires,
        at,
    })
}

/// What a peer client makes of a `PeerKeySet` before the trust writer sees
/// it: the update filed under `issuer`, or why the set is refused (too
/// large, not a JWKS, too many keys, a key outside the import policy, a
/// duplicate kid). The daemon runs exactly these checks on every delivery;
/// this is on the crate's face for tooling and the fuzz harness (`fuzz/`).
pub fn peer_key_set_update(
    issuer: &str,
    msg: pb::PeerKeySet,
    at: UnixTime,
) -> Result<TrustUpdate, String> {
    key_set_update(issuer, msg, at).map_err(|e| e.to_string())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
