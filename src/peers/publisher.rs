//! This instance's signed key-set documents. `DocumentPublisher` owns the
//! instance's sequence (`keys::InstanceState`) and signs with the peer
//! certificate's key — the CURRENT one when it follows the reloadable peer
//! TLS material (`signing_with_current`), so a renewed certificate signs
//! the next document; it signs a document at once, again on every key-set
//! change (rotation, revocation), on every certificate reload, and again
//! at half of the document lifetime, and
//! hands the current one out through a `watch` of `Arc<SignedDocument>`:
//! the peer API serves it (`GetDocument`, `WatchDocuments`), and any relay
//! (the etcd directory) publishes it. A failure to sign is logged and
//! retried; the previous document stays current until it expires.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::PeerTls;
use crate::engine::{DocumentClaims, DocumentKey, SignedDocument, sign_document};
use crate::identity::SpiffeId;
use crate::keys::{InstanceState, KeySet, KeyView};
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
    /// The current peer certificate's key cannot sign documents.
    #[error("cannot sign the key-set document: {0}")]
    Key(String),
}

/// The key documents are signed with.
enum Signer {
    /// One key, for the publisher's life.
    Fixed(DocumentKey),
    /// The peer TLS material in use at each signature.
    Current(PeerTls),
}

/// Signs and re-signs this instance's key-set document.
pub struct DocumentPublisher {
    identity: SpiffeId,
    key: Signer,
    instance: InstanceState,
    keys: KeyView,
    clock: SharedClock,
    lifetime: Duration,
    address: Option<String>,
    tx: watch::Sender<Arc<SignedDocument>>,
}

impl std::fmt::Debug for DocumentPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentPublisher")
            .field("identity", &self.identity)
            .field("instance", &self.instance.id())
            .finish_non_exhaustive()
    }
}

/// The claims of a document for `set` signed at `now`.
fn claims_for(
    identity: &SpiffeId,
    instance: &str,
    seq: u64,
    set: &KeySet,
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
        keys: set.published().cloned().collect(),
        revoked: set.revoked_kids().map(str::to_owned).collect(),
        key_expires: set.expiry_hints(),
    }
}

// === impl DocumentPublisher ===

impl DocumentPublisher {
    /// A publisher for `identity`, signing with `key`, sequencing with
    /// `instance`, documents valid for `lifetime` and naming `address` (the
    /// peer API, `https://host:port`) for a direct fetch. Signs the first
    /// document at once.
    pub fn new(
        identity: SpiffeId,
        key: DocumentKey,
        mut instance: InstanceState,
        keys: KeyView,
        clock: SharedClock,
        lifetime: Duration,
        address: Option<String>,
    ) -> Result<Self, PublishError> {
        let first = sign(
            &identity,
            &key,
            &mut instance,
            &keys.current(),
            clock.now(),
            lifetime,
            address.as_deref(),
        )?;
        let (tx, _) = watch::channel(Arc::new(first));
        Ok(Self {
            identity,
            key: Signer::Fixed(key),
            instance,
            keys,
            clock,
            lifetime,
            address,
            tx,
        })
    }

    /// The same publisher, signing every later document with the peer
    /// certificate `tls` holds at that moment, and re-signing as soon as it
    /// is reloaded.
    pub(crate) fn signing_with_current(mut self, tls: PeerTls) -> Self {
        self.key = Signer::Current(tls);
        self
    }

    /// Every document this publisher signs, the current one first.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SignedDocument>> {
        self.tx.subscribe()
    }

    /// The current document.
    pub fn current(&self) -> Arc<SignedDocument> {
        self.tx.borrow().clone()
    }

    fn publish(&mut self) -> Result<(), PublishError> {
        let fresh;
        let key = match &self.key {
            Signer::Fixed(k) => k,
            Signer::Current(tls) => {
                fresh = tls
                    .document_key()
                    .map_err(|e| PublishError::Key(e.to_string()))?;
                &fresh
            }
        };
        let doc = sign(
            &self.identity,
            key,
            &mut self.instance,
            &self.keys.current(),
            self.clock.now(),
            self.lifetime,
            self.address.as_deref(),
        )?;
        tracing::debug!(seq = doc.seq, exp = %doc.expires_at, "signed key-set document");
        metrics::counter!("tokend_documents_signed_total").increment(1);
        self.tx.send_replace(Arc::new(doc));
        Ok(())
    }

    /// Re-signs on every key-set change, every certificate reload and at
    /// half life, until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut changes = self.keys.subscribe();
        changes.mark_unchanged();
        let mut reloads = match &self.key {
            Signer::Current(tls) => Some(tls.reloads()),
            Signer::Fixed(_) => None,
        };
        if let Some(r) = &mut reloads {
            r.mark_unchanged();
        }
        let mut retry_at: Option<UnixTime> = None;
        loop {
            let cur = self.current();
            let half = cur.issued_at + (cur.expires_at.since(cur.issued_at) / 2);
            let wake = retry_at.map_or(half, |r| r.min(half));
            let clock = self.clock.clone();
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some(()) = reloaded(&mut reloads) => {
                    tracing::info!("peer certificate reloaded; re-signing the key-set document with it");
                }
                _ = clock.sleep_until(wake) => {}
            }
            match self.publish() {
                Ok(()) => retry_at = None,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sign the key-set document; the previous one stays until it expires");
                    retry_at = Some(self.clock.now() + RETRY);
                }
            }
        }
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
    key: &DocumentKey,
    instance: &mut InstanceState,
    set: &KeySet,
    now: UnixTime,
    lifetime: Duration,
    address: Option<&str>,
) -> Result<SignedDocument, PublishError> {
    let seq = instance.next_seq()?;
    let claims = claims_for(identity, instance.id(), seq, set, now, lifetime, address);
    let jws = sign_document(&claims, key)?;
    Ok(SignedDocument {
        jws: Arc::from(jws),
        identity: identity.clone(),
        instance: instance.id().to_owned(),
        seq,
        issued_at: now,
        expires_at: claims.expires_at,
    })
}
