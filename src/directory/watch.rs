//! The watcher: reads every document under the watched prefixes (the whole
//! `keys/` prefix, or one per accepted service) and then follows changes
//! from the next revision. A broken stream reconnects with exponential
//! backoff and full jitter and resumes from the last revision seen; a
//! resume point etcd has compacted away means a full read again, after
//! which keys no longer present are reported deleted. Each value goes to a
//! `DirectorySink` (which verifies it; etcd is never trusted), each delete
//! too. The watcher only moves bytes and reports its state.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::state::DirectoryState;

/// First reconnect delay bound; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest reconnect delay bound.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Keys per page of a full read: a whole prefix in one response would pass
/// gRPC's message limit at a few thousand documents.
const PAGE: i64 = 256;
/// Largest etcd response accepted: a page of documents at their size limit
/// (256 × 128 KiB), or a watch catching up after a reconnect.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The end of the key range `prefix` covers (etcd's prefix semantics).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Future returned by a sink.
pub(crate) type SinkFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where the watcher delivers what it reads.
pub(crate) trait DirectorySink: Send + Sync + 'static {
    /// The value at `key` (from the first read, a re-read or an event).
    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> SinkFuture<'a>;
    /// `key` was deleted (its lease ended, or it vanished across a re-read).
    fn delete<'a>(&'a self, key: &'a str) -> SinkFuture<'a>;
}

/// Exponential backoff with full jitter: a random delay in
/// `[0, min(max, base·2^attempt)]`.
pub(crate) fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    Duration::from_millis(rng.gen_range(0..=cap.as_millis() as u64))
}

/// Follows `prefixes` in etcd and feeds a sink.
pub(crate) struct Watcher {
    client: Client,
    prefixes: Vec<String>,
    sink: Arc<dyn DirectorySink>,
    state: DirectoryState,
    /// Keys currently present (as last read or watched).
    known: HashSet<String>,
    /// Next revision to watch from (0: read everything first).
    resume: i64,
}

/// Why one session ended.
#[derive(Debug)]
enum Ended {
    /// Cancelled: stop.
    Stop,
    /// etcd compacted past our resume point: read everything again.
    Compacted,
    /// A connection or stream error.
    Error(String),
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("prefixes", &self.prefixes)
            .finish_non_exhaustive()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// === impl Watcher ===

impl Watcher {
    /// A watcher of `prefixes` feeding `sink`, reporting into `state`.
    pub(crate) fn new(
        client: Client,
        prefixes: Vec<String>,
        sink: Arc<dyn DirectorySink>,
        state: DirectoryState,
    ) -> Self {
        Self {
            client,
            prefixes,
            sink,
            state,
            known: HashSet::new(),
            resume: 0,
        }
    }

    /// Reads and follows until cancelled.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let ended = tokio::select! {
                _ = cancel.cancelled() => Ended::Stop,
                e = self.session() => e,
            };
            match ended {
                Ended::Stop => return,
                Ended::Compacted => {
                    tracing::info!(
                        "directory history compacted past our revision; reading it all again"
                    );
                    self.resume = 0;
                    continue;
                }
                Ended::Error(e) => {
                    self.state.set_connected(false);
                    failures = failures.saturating_add(1);
                    let delay = backoff(failures.min(16), &mut rand::thread_rng());
                    if self.state.log_limit().allow().is_some() {
                        tracing::warn!(error = %e, retry_in = ?delay, "directory unreachable; keys already verified stay in use until their documents expire");
                    }
                    metrics::counter!("tokend_directory_reconnects_total").increment(1);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection: a full read if needed, then the watch.
    async fn session(&mut self) -> Ended {
        if self.resume == 0 {
            match self.read_all().await {
                Ok(rev) => self.resume = rev + 1,
                Err(e) => return Ended::Error(e),
            }
        }
        self.follow().await
    }

    /// Reads every prefix at one revision, a page at a time; reports keys
    /// that vanished.
    async fn read_all(&mut self) -> Result<i64, String> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut present = HashSet::new();
        let mut rev = 0;
        for prefix in self.prefixes.clone() {
            let end = prefix_end(&prefix);
            let mut from = prefix.as_bytes().to_vec();
            loop {
                let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                if rev > 0 {
                    opts = opts.with_revision(rev);
                }
                let mut got = kv
                    .get(from.clone(), Some(opts))
                    .await
                    .map_err(|e| e.to_string())?;
                if rev == 0 {
                    rev = got.header().map_or(0, |h| h.revision());
                }
                let more = got.more();
                let kvs = got.take_kvs();
                let Some(last) = kvs.last().map(|kv| kv.key().to_vec()) else {
                    break;
                };
                for kv in kvs {
                    let key = text(kv.key());
                    self.sink.put(&key, kv.value()).await;
                    present.insert(key);
                }
                if !more {
                    break;
                }
                from = last;
                from.push(0);
            }
        }
        let gone: Vec<String> = self.known.difference(&present).cloned().collect();
        for key in gone {
            self.sink.delete(&key).await;
        }
        self.known = present;
        self.state.synced(self.known.len());
        metrics::counter!("tokend_directory_full_reads_total").increment(1);
        Ok(rev)
    }

    /// Watches every prefix from `resume` on one stream.
    async fn follow(&mut self) -> Ended {
        let mut watch = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut stream = None;
        for prefix in &self.prefixes {
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(self.resume)
                .with_progress_notify();
            match &mut stream {
                None => match watch.watch(prefix.as_str(), Some(opts)).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => return Ended::Error(e.to_string()),
                },
                Some(s) => {
                    if let Err(e) = s.watch(prefix.as_str(), Some(opts)).await {
                        return Ended::Error(e.to_string());
                    }
                }
            }
        }
        let Some(mut stream) = stream else {
            return Ended::Error("nothing to watch".into());
        };
        self.state.set_connected(true);
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ended::Error("etcd ended the watch stream".into()),
                Err(e) => return Ended::Error(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                return Ended::Compacted;
            }
            if resp.canceled() {
                return Ended::Error(format!("watch cancelled: {}", resp.cancel_reason()));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = text(kv.key());
                match ev.event_type() {
                    EventType::Put => {
                        self.sink.put(&key, kv.value()).await;
                        self.known.insert(key);
                    }
                    EventType::Delete => {
                        self.sink.delete(&key).await;
                        self.known.remove(&key);
                    }
                }
                self.resume = self.resume.max(kv.mod_revision() + 1);
            }
            if let Some(h) = resp.header() {
                // Progress notifications carry the revision the stream has
                // reached: resume after it even if nothing of ours changed.
                if resp.events().is_empty() && !resp.created() {
                    self.resume = self.resume.max(h.revision() + 1);
                }
            }
            self.state.synced(self.known.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prefix's range ends just past every key that starts with it.
    #[test]
    fn prefix_range_end() {
        assert_eq!(prefix_end("/t/keys/"), b"/t/keys0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    /// Backoff grows exponentially, is capped, and is jittered below the cap.
    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut rng = rand::thread_rng();
        for attempt in 0..40 {
            let d = backoff(attempt, &mut rng);
            assert!(d <= BACKOFF_MAX);
            assert!(d <= BACKOFF_BASE.saturating_mul(1 << attempt.min(16)));
        }
        let draws: HashSet<u128> = (0..50).map(|_| backoff(10, &mut rng).as_millis()).collect();
        assert!(draws.len() > 10, "jittered");
    }
}
