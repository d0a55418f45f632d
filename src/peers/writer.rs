//! The one writer of the trust snapshots. Sources (peer clients, JWKS
//! files, later the directory) send `TrustUpdate`s through a `TrustFeed`;
//! the writer applies each to the current `TrustSet`, publishing a new
//! immutable snapshot that every verifier reads through a `TrustView`.
//! Nothing else mutates trust, so no reader ever sees a half-applied update.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::PeerError;
use crate::engine::{SetError, TrustSet, TrustUpdate, TrustView};

/// Updates queued for the writer at most; a source waits past that.
const FEED_DEPTH: usize = 256;

struct Request {
    update: TrustUpdate,
    ack: Option<oneshot::Sender<Result<(), SetError>>>,
}

/// The writer, before and while it runs.
pub(crate) struct TrustWriter {
    current: Arc<TrustSet>,
    tx: watch::Sender<Arc<TrustSet>>,
    rx: mpsc::Receiver<Request>,
}

impl std::fmt::Debug for TrustWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustWriter").finish_non_exhaustive()
    }
}

/// Where sources send their updates. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct TrustFeed(mpsc::Sender<Request>);

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

// === impl TrustWriter ===

impl TrustWriter {
    /// A writer over an empty trust set, the feed its sources send to, and
    /// the view verifiers read.
    pub(crate) fn new() -> (Self, TrustFeed, TrustView) {
        let current = Arc::new(TrustSet::default());
        let (tx, view) = watch::channel(current.clone());
        let (feed, rx) = mpsc::channel(FEED_DEPTH);
        (
            Self { current, tx, rx },
            TrustFeed(feed),
            TrustView::new(view),
        )
    }

    /// Applies `update` at once (while building, before `run`), and
    /// updates the issuer's gauges: keys in its union, live instances.
    pub(crate) fn apply(&mut self, update: TrustUpdate) -> Result<(), SetError> {
        let issuer = update.issuer().to_owned();
        let (next, result) = self.current.apply(update);
        self.current = Arc::new(next);
        self.tx.send_replace(self.current.clone());
        if let Some(keys) = self.current.issuer(&issuer) {
            let instances = keys
                .instances()
                .iter()
                .filter(|(_, i)| !i.is_gone())
                .count();
            metrics::gauge!("tokend_peer_keys", "issuer" => issuer.clone())
                .set(keys.keys().len() as f64);
            metrics::gauge!("tokend_peer_instances", "issuer" => issuer).set(instances as f64);
        }
        result
    }

    /// Applies every update sent through the feed until cancelled.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        loop {
            let req = tokio::select! {
                _ = cancel.cancelled() => return,
                req = self.rx.recv() => match req {
                    Some(r) => r,
                    None => return,
                },
            };
            let result = self.apply(req.update);
            if let Some(ack) = req.ack {
                let _ = ack.send(result);
            }
        }
    }
}

// === impl TrustFeed ===

impl TrustFeed {
    /// Sends `update` and waits until it is published (or refused).
    pub(crate) async fn apply(&self, update: TrustUpdate) -> Result<(), PeerError> {
        let (ack, done) = oneshot::channel();
        self.0
            .send(Request {
                update,
                ack: Some(ack),
            })
            .await
            .map_err(|_| PeerError::WriterGone)?;
        done.await.map_err(|_| PeerError::WriterGone)??;
        Ok(())
    }

    /// Sends `update` without waiting (state notes: errors, contact). A
    /// full queue drops the note: the next delivery supersedes it anyway.
    pub(crate) fn note(&self, update: TrustUpdate) {
        let _ = self.0.try_send(Request { update, ack: None });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::UnixTime;

    /// Updates sent through the feed are published in order, an
    /// acknowledged update is visible to readers at once, and a refused
    /// one reports why while the previous snapshot stays.
    #[tokio::test]
    async fn feed_publishes_through_one_writer() {
        let (writer, feed, view) = TrustWriter::new();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(writer.run(cancel.clone()));
        feed.apply(TrustUpdate::Register {
            issuer: "spiffe://td/a".into(),
            source: "test".into(),
        })
        .await
        .expect("register");
        assert!(view.current().knows("spiffe://td/a"));
        let refused = feed
            .apply(TrustUpdate::Stale {
                issuer: "spiffe://td/b".into(),
                stale: true,
            })
            .await;
        assert!(matches!(
            refused,
            Err(PeerError::Set(SetError::UnknownIssuer(_)))
        ));
        assert!(!view.current().knows("spiffe://td/b"));
        assert_eq!(view.current().issuers()[0].1.updated_at, UnixTime::EPOCH);
        cancel.cancel();
        task.await.expect("writer stops");
        assert!(matches!(
            feed.apply(TrustUpdate::Register {
                issuer: "x".into(),
                source: "t".into()
            })
            .await,
            Err(PeerError::WriterGone)
        ));
    }
}
