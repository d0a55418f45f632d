//! `DocumentSink`: how any trust source installs a signed key-set document,
//! whoever relayed it (a mesh peer, the etcd directory, a direct fetch):
//! verify it (`engine::verify_document`: chain to the CA, the certificate's
//! identity, signature, limits, times), refuse it if the operator banned
//! its signing certificate (x5c leaf serial), its identity, its instance id
//! or the address it advertises (so a relayed document meets the same bans
//! as one from a mesh connection), optionally require the identity a TLS
//! connection proved to be the document's, then hand it to the trust
//! writer, where the rollback check runs against the high-water mark of its
//! (identity, instance), and record where its keys came from (`KeyOrigins`)
//! so a later ban reaches them. A refusal keeps what was installed before.

use std::sync::Arc;

use super::{PeerError, TrustFeed};
use crate::engine::{
    BanView, DocumentAnchors, DocumentLimits, KeyOrigin, KeyOrigins, TrustUpdate, TrustView,
    VerifiedDocument, verify_document,
};
use crate::identity::SpiffeId;
use crate::time::SharedClock;

/// Where the CA anchors come from: read on every verification, so a
/// reloaded CA bundle is followed (the daemon reads them from `PeerTls`).
pub(crate) type AnchorSource = Arc<dyn Fn() -> DocumentAnchors + Send + Sync>;

/// Verifies documents and installs them through the trust writer. Cheap to clone.
#[derive(Clone)]
pub struct DocumentSink {
    anchors: AnchorSource,
    limits: DocumentLimits,
    feed: TrustFeed,
    view: TrustView,
    clock: SharedClock,
    bans: BanView,
    origins: KeyOrigins,
    discover: bool,
}

impl std::fmt::Debug for DocumentSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentSink")
            .field("trust_domain", &(self.anchors)().trust_domain().to_string())
            .field("discover", &self.discover)
            .finish_non_exhaustive()
    }
}

/// Where the keys of `doc` come from: its signing certificate, its
/// instance, and the peer address it advertises.
pub(crate) fn origin_of(doc: &VerifiedDocument) -> KeyOrigin {
    KeyOrigin {
        serial: doc.serial.clone(),
        instance: doc.claims.instance.clone(),
        address: doc
            .claims
            .address
            .as_deref()
            .and_then(|a| super::connect::authority_of(a).ok()),
    }
}

// === impl DocumentSink ===

impl DocumentSink {
    /// A sink checking against `anchors` within `limits` and the
    /// operator's `bans`, feeding `feed` and recording into `origins`.
    /// Only issuers the trust view already knows are installed (see
    /// `discovering`).
    pub(crate) fn new(
        anchors: AnchorSource,
        limits: DocumentLimits,
        (feed, view): (TrustFeed, TrustView),
        clock: SharedClock,
        (bans, origins): (BanView, KeyOrigins),
    ) -> Self {
        Self {
            anchors,
            limits,
            feed,
            view,
            clock,
            bans,
            origins,
            discover: false,
        }
    }

    /// The same sink, but an identity of the trust domain it does not know
    /// yet is registered (with the document's source as its source) instead
    /// of refused: issuers discovered through a directory.
    pub fn discovering(mut self) -> Self {
        self.discover = true;
        self
    }

    /// The trust snapshots documents are installed into.
    pub(crate) fn view(&self) -> &TrustView {
        &self.view
    }

    /// The clock documents are checked at.
    pub(crate) fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The operator's bans documents are checked against.
    pub(crate) fn bans(&self) -> &BanView {
        &self.bans
    }

    /// The anchors documents are checked against now.
    pub fn anchors(&self) -> DocumentAnchors {
        (self.anchors)()
    }

    /// The limits documents are checked within.
    pub fn limits(&self) -> &DocumentLimits {
        &self.limits
    }

    /// Verifies `jws` now (`engine::verify_document` with this sink's
    /// current anchors and limits) and refuses it if it falls under a ban,
    /// installing nothing: for a relay that checks more (say, that the
    /// identity is the one its key path names) before `install_verified`.
    pub fn verify(&self, jws: &[u8]) -> Result<Arc<VerifiedDocument>, PeerError> {
        let now = self.clock.now();
        let doc = verify_document(jws, &(self.anchors)(), now, &self.limits)?;
        self.check_bans(&doc)?;
        Ok(Arc::new(doc))
    }

    /// The ban `doc` falls under (its signing certificate's serial, its
    /// identity, its instance id or advertised address), as a refusal.
    fn check_bans(&self, doc: &VerifiedDocument) -> Result<(), PeerError> {
        let bans = self.bans.current();
        match bans.of_origin(doc.claims.identity.as_str(), &origin_of(doc)) {
            Some(ban) => Err(PeerError::Banned {
                serial: doc.serial.clone(),
                ban: format!("{} {}", ban.kind.as_str(), ban.value),
            }),
            None => Ok(()),
        }
    }

    /// Verifies `jws` now and installs it, filed under its certificate's
    /// identity. With `proven` (the identity a TLS connection proved), that
    /// identity must also be the document's. `source` labels where it came
    /// from (`peer:<address>`, `directory:<…>`, `direct:<address>`).
    /// Returns the installed document; a re-delivery of the installed one is
    /// accepted and changes nothing.
    pub async fn install(
        &self,
        jws: &[u8],
        proven: Option<&SpiffeId>,
        source: &str,
    ) -> Result<Arc<VerifiedDocument>, PeerError> {
        let doc = self.verify(jws)?;
        let identity = &doc.claims.identity;
        if let Some(proven) = proven
            && proven != identity
        {
            return Err(PeerError::ProvenMismatch {
                proven: proven.clone(),
                document: identity.clone(),
            });
        }
        self.install_verified(doc.clone(), source).await?;
        Ok(doc)
    }

    /// Installs a document `verify` accepted, through the trust writer
    /// (where the rollback check runs). The bans are checked again (one
    /// may have been set since `verify`). An identity the trust view does
    /// not know is refused as `NotConfigured`, or registered if the sink is
    /// `discovering`.
    pub async fn install_verified(
        &self,
        doc: Arc<VerifiedDocument>,
        source: &str,
    ) -> Result<(), PeerError> {
        self.check_bans(&doc)?;
        let identity = &doc.claims.identity;
        if !self.view.current().knows(identity.as_str()) {
            if !self.discover {
                return Err(PeerError::NotConfigured(identity.clone()));
            }
            self.feed
                .apply(TrustUpdate::Register {
                    issuer: identity.to_string(),
                    source: source.to_owned(),
                })
                .await?;
        }
        let origin = origin_of(&doc);
        let kids = || {
            (doc.claims.keys.iter())
                .chain(&doc.claims.bound_keys)
                .map(|k| k.kid().to_owned())
        };
        // New kids get their origin before they can be found; known ones
        // keep theirs until the writer accepted this document (a replayed
        // older document, refused as a rollback, must not rewrite them).
        self.origins.record_new(identity.as_str(), &origin, kids());
        self.feed
            .apply(TrustUpdate::Document {
                document: doc.clone(),
                source: source.to_owned(),
                at: self.clock.now(),
            })
            .await?;
        self.origins.record(identity.as_str(), &origin, kids());
        metrics::counter!("tokend_documents_installed_total").increment(1);
        Ok(())
    }

    /// Marks (`issuer`, `instance`) gone (a lease deleted, a connection
    /// dropped for good): its keys stay until min(document exp, expiry
    /// hint), and its high-water mark is kept.
    pub async fn gone(&self, issuer: &str, instance: &str) -> Result<(), PeerError> {
        self.feed
            .apply(TrustUpdate::InstanceGone {
                issuer: issuer.to_owned(),
                instance: instance.to_owned(),
                at: self.clock.now(),
            })
            .await
    }
}
