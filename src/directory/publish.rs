//! The publisher: keeps this instance's current signed document under its
//! own key (`prefix + keys/<trust-domain>/<service>/<instance>`), bound to a
//! lease kept alive while the process lives. Every new document is put at
//! once; a lost lease (etcd restarted without it, a long partition) is
//! granted again and the document put again; on a clean shutdown the lease
//! is revoked, so the entry leaves at once. A process that dies leaves its
//! entry until the lease runs out (`lease_ttl`).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::watch::backoff;
use crate::engine::SignedDocument;
use crate::peers::LogLimit;

/// What the publisher publishes: this instance's current signed document.
pub(crate) type Documents = watch::Receiver<Arc<SignedDocument>>;

/// Puts one instance's documents into etcd.
pub(crate) struct Publisher {
    client: Client,
    key: String,
    lease_ttl: Duration,
    docs: Documents,
    log: LogLimit,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Why a lease session ended.
enum Ended {
    Stop,
    Error(String),
}

// === impl Publisher ===

impl Publisher {
    /// Publishes `docs` under `key` on leases of `lease_ttl`.
    pub(crate) fn new(client: Client, key: String, lease_ttl: Duration, docs: Documents) -> Self {
        Self {
            client,
            key,
            lease_ttl,
            docs,
            log: LogLimit::default(),
        }
    }

    /// The etcd key of this instance.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// Publishes until cancelled, then revokes the lease.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            match self.session(&cancel).await {
                Ended::Stop => return,
                Ended::Error(e) => {
                    failures = failures.saturating_add(1);
                    metrics::gauge!("tokend_directory_published").set(0.0);
                    let delay = backoff(failures.min(16), &mut rand::thread_rng());
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(key = %self.key, error = %e, retry_in = ?delay, suppressed, "cannot publish this instance's key-set document");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn put(&mut self, lease: i64) -> Result<(), String> {
        let doc = self.docs.borrow_and_update().clone();
        self.client
            .put(
                self.key.as_str(),
                doc.jws.as_bytes(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| format!("put: {e}"))?;
        metrics::counter!("tokend_directory_puts_total").increment(1);
        metrics::gauge!("tokend_directory_published").set(1.0);
        Ok(())
    }

    /// One lease: grant, put, keep alive and re-put on every new document.
    async fn session(&mut self, cancel: &CancellationToken) -> Ended {
        let ttl = self.lease_ttl.as_secs().max(1) as i64;
        let lease = match self.client.lease_grant(ttl, None).await {
            Ok(l) => l.id(),
            Err(e) => return Ended::Error(format!("lease grant: {e}")),
        };
        let ended = self.with_lease(lease, cancel).await;
        if matches!(ended, Ended::Stop) {
            // Leave at once on a clean shutdown (best effort: a lease
            // not revoked runs out by itself).
            let revoke = self.client.lease_revoke(lease);
            if tokio::time::timeout(Duration::from_secs(2), revoke)
                .await
                .is_err()
            {
                tracing::warn!(key = %self.key, "could not revoke the directory lease; the entry leaves when it runs out");
            }
        }
        ended
    }

    async fn with_lease(&mut self, lease: i64, cancel: &CancellationToken) -> Ended {
        if let Err(e) = self.put(lease).await {
            return Ended::Error(e);
        }
        let (mut keeper, mut acks) = match self.client.lease_keep_alive(lease).await {
            Ok(k) => k,
            Err(e) => return Ended::Error(format!("keep-alive: {e}")),
        };
        let every = (self.lease_ttl / 3).max(Duration::from_millis(300));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ended::Stop,
                changed = self.docs.changed() => {
                    if changed.is_err() {
                        // The signer stopped: shutting down.
                        cancel.cancelled().await;
                        return Ended::Stop;
                    }
                    if let Err(e) = self.put(lease).await {
                        return Ended::Error(e);
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        return Ended::Error(format!("keep-alive: {e}"));
                    }
                }
                ack = acks.message() => match ack {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    Ok(Some(_)) => return Ended::Error("the lease expired; granting a new one".into()),
                    Ok(None) => return Ended::Error("etcd ended the keep-alive stream".into()),
                    Err(e) => return Ended::Error(format!("keep-alive: {e}")),
                },
            }
        }
    }
}
