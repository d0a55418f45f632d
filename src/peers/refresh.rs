//! On-demand refresh of a peer issuer's keys: the engine's `Refresh`. An
//! unknown kid of a known issuer (or a signature that fails under it) makes
//! the verifier ask for that issuer once; concurrent asks wait for the one
//! fetch in progress (single flight), and an issuer is fetched at most once
//! per `min_interval` (sooner after a failure, when the peer may be back),
//! so a flood of tokens with random kids costs each peer one fetch a second.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::PeerError;
use crate::engine::Refresh;

/// How soon a failed refresh may be retried.
const FAILED_REFRESH_INTERVAL: Duration = Duration::from_millis(250);

/// A source that can fetch its issuer's keys again and publish them.
pub(crate) trait KeySource: Send + Sync + 'static {
    /// Fetches the set and waits until the writer has published it.
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<(), PeerError>> + Send + '_>>;
}

/// When the last refresh ran (monotonic) and whether it failed.
#[derive(Debug, Default)]
struct Gate {
    last: Option<tokio::time::Instant>,
    failed: bool,
}

struct Gated {
    source: Arc<dyn KeySource>,
    gate: tokio::sync::Mutex<Gate>,
    /// Completed refreshes: the single-flight ticket.
    done: AtomicU64,
}

/// Every refreshable issuer with its source.
pub(crate) struct Refresher {
    issuers: HashMap<String, Gated>,
    min_interval: Duration,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("issuers", &self.issuers.len())
            .finish()
    }
}

// === impl Refresher ===

impl Refresher {
    /// No issuers yet; each is fetched at most once per `min_interval`.
    pub(crate) fn new(min_interval: Duration) -> Self {
        Self {
            issuers: HashMap::new(),
            min_interval,
        }
    }

    /// Adds `issuer`, refreshed through `source`.
    pub(crate) fn add(&mut self, issuer: &str, source: Arc<dyn KeySource>) {
        self.issuers.insert(
            issuer.to_owned(),
            Gated {
                source,
                gate: tokio::sync::Mutex::default(),
                done: AtomicU64::new(0),
            },
        );
    }

    async fn refresh_issuer(&self, issuer: &str) {
        let Some(g) = self.issuers.get(issuer) else {
            return;
        };
        // Taken before waiting: tells whether another caller refreshed meanwhile.
        let ticket = g.done.load(Ordering::Acquire);
        let mut gate = g.gate.lock().await;
        if g.done.load(Ordering::Acquire) != ticket {
            return;
        }
        let window = if gate.failed {
            FAILED_REFRESH_INTERVAL
        } else {
            self.min_interval
        };
        if gate.last.is_some_and(|l| l.elapsed() < window) {
            return;
        }
        gate.last = Some(tokio::time::Instant::now());
        metrics::counter!("tokend_key_refresh_total").increment(1);
        gate.failed = match g.source.fetch().await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(issuer, error = %e, "refresh of issuer keys failed");
                true
            }
        };
        g.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Refresh for Refresher {
    fn refresh<'a>(&'a self, issuer: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(self.refresh_issuer(issuer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Counting(AtomicUsize);

    impl KeySource for Counting {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<(), PeerError>> + Send + '_>> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(())
            })
        }
    }

    /// Concurrent misses for one issuer cause one fetch; a miss inside the
    /// rate-limit window causes none; after the window, one more; unknown
    /// issuers cause nothing.
    #[tokio::test(start_paused = true)]
    async fn refresh_is_single_flight_and_rate_limited() {
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        let mut r = Refresher::new(Duration::from_secs(5));
        r.add("spiffe://td/a", counter.clone());
        let r = Arc::new(r);
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move { r.refresh("spiffe://td/a").await })
            })
            .collect();
        for c in calls {
            c.await.expect("join");
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "single flight");
        tokio::time::advance(Duration::from_secs(2)).await;
        r.refresh("spiffe://td/a").await;
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "rate limited within 5s"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        r.refresh("spiffe://td/a").await;
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            2,
            "allowed after the window"
        );
        r.refresh("spiffe://td/unknown").await;
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    }
}
