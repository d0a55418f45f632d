//! What the directory connection is doing, for health and metrics: whether
//! the watch is connected (not stale), when it last caught up, how many
//! documents are present. Shared by the watcher (writer) and the daemon's
//! health reporter (reader, through `subscribe`).

use std::sync::Arc;

use tokio::sync::watch;

use crate::peers::LogLimit;

/// The directory's health as the watcher last saw it.
#[derive(Clone, Debug)]
pub(crate) struct DirectoryState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connected: watch::Sender<bool>,
    log: LogLimit,
}

impl Default for DirectoryState {
    fn default() -> Self {
        Self::new()
    }
}

// === impl DirectoryState ===

impl DirectoryState {
    /// Not connected yet (stale until the first full read).
    pub(crate) fn new() -> Self {
        let (connected, _) = watch::channel(false);
        metrics::gauge!("tokend_directory_connected").set(0.0);
        Self {
            inner: Arc::new(Inner {
                connected,
                log: LogLimit::default(),
            }),
        }
    }

    /// Connected (watching) or not (stale: changes are not arriving).
    pub(crate) fn set_connected(&self, on: bool) {
        self.inner.connected.send_if_modified(|c| {
            let changed = *c != on;
            *c = on;
            changed
        });
        metrics::gauge!("tokend_directory_connected").set(if on { 1.0 } else { 0.0 });
    }

    /// Caught up with etcd, `documents` keys present.
    pub(crate) fn synced(&self, documents: usize) {
        metrics::gauge!("tokend_directory_documents").set(documents as f64);
        let now = crate::time::Clock::now(&crate::time::SystemClock);
        metrics::gauge!("tokend_directory_last_sync_timestamp_seconds").set(now.as_secs() as f64);
    }

    /// A receiver of the connected flag, for the health service.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// Rate limit for the directory's warnings.
    pub(crate) fn log_limit(&self) -> &LogLimit {
        &self.inner.log
    }
}
