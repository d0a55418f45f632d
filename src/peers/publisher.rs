//! This instance's signed key-set documents. `DocumentPublisher` owns the
//! instance's sequence (`keys::InstanceState`) and signs with the peer
//! certificate's key — read afresh for every signature (the daemon reads
//! the reloadable peer TLS material), so a renewed certificate signs the
//! next document; it signs a document at once, again on every key-set
//! change (rotation, revocation), on every certificate reload
//! (`resigning_on`), and again
//! at half of the document lifetime, and
//! hands the current one out through a `watch` of `Arc<SignedDocument>`:
//! the peer API serves it (`GetDocument`, `WatchDocuments`), and any relay
//! (the etcd directory) publishes it. `GetDocument` asks the
//! `DocumentHandle` for a fresh one, so a fetch never gets a document past
//! half its life or older than the key set, even before the loop ran. A
//! failure to sign is logged and retried; the previous document stays
//! current until it expires.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{DocumentClaims, DocumentKey, SignedDocument, sign_document};
use crate::identity::SpiffeId;
use crate::keys::{InstanceState, OwnKeys, OwnSet};
use crate::time::{SharedClock, UnixTime};

/// How soon a failed signature is retried.
const RETRY: Duration = Duration::from_secs(5);

/// Why a document could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The sequence reservation could not be written.
    #[error("cannot reserve a document sequence: {0}")]
    Sequence(#[from] crate::keys::DiskError),
    /// The key refused to sign.
    #[error("cannot sign the key-set document: {0}")]
    Sign(#[from] crate::engine::DocumentKeyError),
    /// The peer certificate's key could not be read.
    #[error("the peer certificate's key cannot sign key-set documents: {0}")]
    Key(String),
}

/// Where the signing key comes from: read for every signature, so a
/// renewed peer certificate is picked up (the daemon reads it from
/// `PeerTls`).
pub(crate) type SignerSource = Arc<dyn Fn() -> Result<DocumentKey, String> + Send + Sync>;

/// Signs and re-signs this instance's key-set document.
pub struct DocumentPublisher {
    shared: Arc<Shared>,
    /// Peer certificate reloads, each answered with a new signature.
    reloads: Option<watch::Receiver<u64>>,
}

/// A handle on the publisher: the current document, signed anew on demand
/// when it is past half its life or older than the key set. Cheap to clone.
#[derive(Clone)]
pub struct DocumentHandle {
    shared: Arc<Shared>,
}

struct Shared {
    identity: SpiffeId,
    key: SignerSource,
    keys: OwnKeys,
    clock: SharedClock,
    lifetime: Duration,
    address: Option<String>,
    /// The sequence, and the key-set version the current document lists.
    state: std::sync::Mutex<State>,
    tx: watch::Sender<Arc<SignedDocument>>,
}

struct State {
    instance: InstanceState,
    version: u64,
}

impl std::fmt::Debug for DocumentPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentPublisher")
            .field("identity", &self.shared.identity)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DocumentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentHandle")
            .field("identity", &self.shared.identity)
            .finish_non_exhaustive()
    }
}

/// The claims of a document for `set` signed at `now`.
fn claims_for(
    identity: &SpiffeId,
    instance: &str,
    seq: u64,
    set: &OwnSet,
    now: UnixTime,
    lifetime: Duration,
    address: Option<&str>,
) -> DocumentClaims {
    DocumentClaims {
        identity: identity.clone(),
        instance: instance.to_owned(),
        seq,
        issued_at: now,
        expires_at: now + lifetime,
        address: address.map(str::to_owned),
        keys: set.signing.published().cloned().collect(),
        bound_keys: set.bound.published().cloned().collect(),
        revoked: set.revoked_kids(),
        key_expires: set.expiry_hints(),
    }
}

/// Half of a document's life: when it is signed anew.
fn half_life(doc: &SignedDocument) -> UnixTime {
    doc.issued_at + doc.expires_at.since(doc.issued_at) / 2
}

// === impl DocumentPublisher ===

impl DocumentPublisher {
    /// A publisher for `identity`, signing with the key `key` gives at
    /// each signature, sequencing with `instance`, documents valid for
    /// `lifetime` and naming `address` (the peer API, `https://host:port`)
    /// for a direct fetch. Signs the first document at once.
    pub(crate) fn new(
        identity: SpiffeId,
        key: SignerSource,
        mut instance: InstanceState,
        keys: OwnKeys,
        clock: SharedClock,
        lifetime: Duration,
        address: Option<String>,
    ) -> Result<Self, PublishError> {
        let set = keys.current();
        let first = sign(
            &identity,
            &key,
            &mut instance,
            &set,
            clock.now(),
            lifetime,
            address.as_deref(),
        )?;
        let (tx, _) = watch::channel(Arc::new(first));
        Ok(Self {
            shared: Arc::new(Shared {
                identity,
                key,
                keys,
                clock,
                lifetime,
                address,
                state: std::sync::Mutex::new(State {
                    instance,
                    version: set.version(),
                }),
                tx,
            }),
            reloads: None,
        })
    }

    /// The same publisher, also re-signing as soon as `reloads` reports a
    /// reloaded peer certificate (its signer reads the current material),
    /// so the document's chain follows a renewal at once.
    pub(crate) fn resigning_on(mut self, mut reloads: watch::Receiver<u64>) -> Self {
        reloads.mark_unchanged();
        self.reloads = Some(reloads);
        self
    }

    /// A handle for the peer API and relays.
    pub fn handle(&self) -> DocumentHandle {
        DocumentHandle {
            shared: self.shared.clone(),
        }
    }

    /// Every document this publisher signs, the current one first.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SignedDocument>> {
        self.shared.tx.subscribe()
    }

    /// Re-signs on every key-set change, every certificate reload and at
    /// half life, until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        let shared = self.shared;
        let mut reloads = self.reloads;
        let mut changes = shared.keys.signing.subscribe();
        changes.mark_unchanged();
        let mut bound_changes = shared.keys.bound.subscribe();
        bound_changes.mark_unchanged();
        let mut retry_at: Option<UnixTime> = None;
        // A reload seen and not yet signed for (kept until a signature succeeds).
        let mut force = false;
        loop {
            let half = half_life(&shared.tx.borrow());
            let wake = retry_at.map_or(half, |r| r.min(half));
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                changed = bound_changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some(()) = reloaded(&mut reloads) => {
                    tracing::info!("peer certificate reloaded; re-signing the key-set document with it");
                    force = true;
                }
                _ = shared.clock.sleep_until(wake) => {}
            }
            match shared.fresh(force) {
                Ok(_) => {
                    retry_at = None;
                    force = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sign the key-set document; the previous one stays until it expires");
                    retry_at = Some(shared.clock.now() + RETRY);
                }
            }
        }
    }
}

// === impl DocumentHandle ===

impl DocumentHandle {
    /// The current document, signed anew first if it is past half its life
    /// or lists an older key set (so a fetch never gets a document about to
    /// expire, however the clock moved); the last one if signing fails.
    pub fn fresh(&self) -> Arc<SignedDocument> {
        match self.shared.fresh(false) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sign the key-set document; serving the previous one");
                self.shared.tx.borrow().clone()
            }
        }
    }

    /// Every document the publisher signs, the current one first.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SignedDocument>> {
        self.shared.tx.subscribe()
    }
}

// === impl Shared ===

impl Shared {
    fn fresh(&self, force: bool) -> Result<Arc<SignedDocument>, PublishError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now();
        let set = self.keys.current();
        let current = self.tx.borrow().clone();
        if !force && state.version == set.version() && now < half_life(&current) {
            return Ok(current);
        }
        let doc = Arc::new(sign(
            &self.identity,
            &self.key,
            &mut state.instance,
            &set,
            now,
            self.lifetime,
            self.address.as_deref(),
        )?);
        state.version = set.version();
        tracing::debug!(seq = doc.seq, exp = %doc.expires_at, "signed key-set document");
        metrics::counter!("tokend_documents_signed_total").increment(1);
        self.tx.send_replace(doc.clone());
        Ok(doc)
    }
}

/// Resolves on the next certificate reload; never without a reloadable
/// source (or once its sender is gone).
async fn reloaded(reloads: &mut Option<watch::Receiver<u64>>) -> Option<()> {
    if let Some(r) = reloads
        && r.changed().await.is_ok()
    {
        return Some(());
    }
    std::future::pending().await
}

fn sign(
    identity: &SpiffeId,
    key: &SignerSource,
    instance: &mut InstanceState,
    set: &OwnSet,
    now: UnixTime,
    lifetime: Duration,
    address: Option<&str>,
) -> Result<SignedDocument, PublishError> {
    let key = key().map_err(PublishError::Key)?;
    let seq = instance.next_seq()?;
    let claims = claims_for(identity, instance.id(), seq, set, now, lifetime, address);
    let jws = sign_document(&claims, &key)?;
    Ok(SignedDocument {
        jws: Arc::from(jws),
        identity: identity.clone(),
        instance: instance.id().to_owned(),
        seq,
        issued_at: now,
        expires_at: claims.expires_at,
    })
}
