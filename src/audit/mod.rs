//! The audit trail: every mint, exchange, refusal and admin action as one
//! JSON line (who: the caller's uid and pid from the socket's peer
//! credentials; what: iss, sub, aud, jti, kid, reason; when), never a token
//! or a secret. Records are chained by SHA-256 (`chain.rs`) so an edit
//! shows, and go to the log (target `audit`) or a rotated file (`sink.rs`).
//!
//! Cost per call: the event's few strings and one `try_send` into a bounded
//! channel (`QUEUE` records). One writer thread encodes, hashes and writes
//! through a buffer, flushing whenever the queue runs empty; no fsync. When
//! the queue is full the record is dropped, counted in
//! `tokend_audit_dropped_total`, and at the end of its batch (when the
//! queue runs empty, or after a queue's worth of records) the writer puts
//! a `gap` record with the number dropped into the chain, so a reader sees
//! that records are missing since the previous batch.

mod chain;
mod sink;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use serde::Serialize;

use self::chain::Head;
pub(crate) use self::chain::{Broken, Intact, check};
use self::sink::{FileSink, Rotating, Sink};
use crate::config::AuditConfig;
use crate::time::SharedClock;

/// Records that may wait for the writer; more are dropped (and counted).
const QUEUE: usize = 4096;

/// Longest detail kept in a record (a refusal's detail is bounded text
/// already; this bounds what a flood of odd tokens can make us write).
const MAX_DETAIL: usize = 256;

/// Who called: the process at the other end of the socket.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub(crate) struct Caller {
    /// Its uid, if the kernel gave credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) uid: Option<u32>,
    /// Its pid, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pid: Option<i32>,
}

/// One audited action: what was asked, by whom, and how it ended.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Event {
    /// The action: mint, exchange, verify, validate, fetch_jwt_svid,
    /// rotate_key, revoke_key, list_keys, ban, unban, list_bans, gap.
    pub(crate) event: &'static str,
    /// `ok` or `refused` (`dropped` for a gap).
    pub(crate) outcome: &'static str,
    /// The refusal's code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// The refusal's detail, as the caller saw it (bounded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) detail: Option<String>,
    /// Who asked.
    pub(crate) caller: Caller,
    /// Issuer (for a refused token: as the token claims it, unverified).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) iss: Option<String>,
    /// Subject, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sub: Option<String>,
    /// Audience asked for or expected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) aud: Option<String>,
    /// Token id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) jti: Option<String>,
    /// Key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kid: Option<String>,
    /// For ban and unban: `KIND VALUE` (as the store keeps it once
    /// accepted; as asked, bounded, when refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ban: Option<String>,
    /// For a gap: how many records were dropped before this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dropped: Option<u64>,
    /// The header and payload (never the signature) `claimed` was given,
    /// read into iss, sub, jti and kid only if the event is recorded: most
    /// events (successful verifications) are not, and reading costs a
    /// base64 decode and a JSON parse per call. Never written.
    #[serde(skip)]
    unread_claims: Option<String>,
}

impl Event {
    /// An event `event` by `caller`, outcome `ok` until `refused`.
    pub(crate) fn new(event: &'static str, caller: Caller) -> Self {
        Self {
            event,
            outcome: "ok",
            caller,
            ..Self::default()
        }
    }

    /// Marks the event refused with `reason` and `detail`.
    pub(crate) fn refused(&mut self, reason: &str, detail: &str) {
        self.outcome = "refused";
        self.reason = Some(reason.to_owned());
        self.detail = Some(bounded(detail));
    }

    /// Notes the token whose header and payload fill iss, sub, jti and kid
    /// (unverified: for a refusal, what the token claimed) once the event
    /// is recorded (`read_claims`). Keeps at most 24 KiB of the header and
    /// payload, never the signature; tolerates anything.
    pub(crate) fn claimed(&mut self, token: &str) {
        let signed = token.rsplit_once('.').map_or(token, |(hp, _)| hp);
        let mut end = signed.len().min(2 * CLAIMS_READ);
        while !signed.is_char_boundary(end) {
            end -= 1;
        }
        self.unread_claims = Some(signed[..end].to_owned());
    }

    /// Fills iss, sub, jti and kid from the token `claimed` noted.
    pub(crate) fn read_claims(&mut self) {
        use base64::Engine;
        let Some(token) = self.unread_claims.take() else {
            return;
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let part = |i: usize| -> Option<serde_json::Value> {
            let p = token.split('.').nth(i)?;
            serde_json::from_slice(&b64.decode(p.get(..p.len().min(CLAIMS_READ))?).ok()?).ok()
        };
        let field =
            |v: &Option<serde_json::Value>, k: &str| v.as_ref()?.get(k)?.as_str().map(bounded);
        let (header, payload) = (part(0), part(1));
        self.kid = field(&header, "kid");
        self.iss = field(&payload, "iss");
        self.sub = field(&payload, "sub");
        self.jti = field(&payload, "jti");
    }
}

/// How much of a token's header, and of its payload, `read_claims` reads.
const CLAIMS_READ: usize = 12 * 1024;

fn bounded(s: &str) -> String {
    match s.char_indices().nth(MAX_DETAIL) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// The handle services record through; cloning is cheap.
#[derive(Clone)]
pub(crate) struct Audit {
    /// `None` when nobody would see the records (no file, and the log
    /// filters out target `audit`): then recording costs nothing.
    tx: Option<SyncSender<(i64, Event)>>,
    dropped: Arc<AtomicU64>,
    clock: SharedClock,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    /// Records `event` now, without waiting: if the writer is `QUEUE`
    /// records behind, the event is dropped and counted (a gap follows).
    pub(crate) fn record(&self, mut event: Event) {
        let Some(tx) = &self.tx else {
            return;
        };
        event.read_claims();
        match tx.try_send((self.clock.now().as_secs(), event)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("tokend_audit_dropped_total").increment(1);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The writer thread; `finish` waits for it once every handle is gone.
#[derive(Debug)]
pub(crate) struct AuditWriter {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditWriter {
    /// Blocks until the writer has written and flushed everything (every
    /// `Audit` handle must have been dropped first).
    pub(crate) fn finish(self) {
        if self.thread.is_some_and(|t| t.join().is_err()) {
            tracing::error!("the audit writer panicked");
        }
    }
}

/// Why the trail could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot open audit file {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

/// Opens the sink and starts the writer thread.
pub(crate) fn start(
    config: &AuditConfig,
    clock: SharedClock,
) -> Result<(Audit, AuditWriter), AuditError> {
    let (sink, head) = match &config.file {
        None if !tracing::enabled!(target: "audit", tracing::Level::INFO) => {
            let off = Audit {
                tx: None,
                dropped: Arc::default(),
                clock,
            };
            return Ok((off, AuditWriter { thread: None }));
        }
        None => (Sink::Log, Head::default()),
        Some(path) => {
            let f = FileSink {
                path: path.clone(),
                max_bytes: config.max_bytes,
                keep: config.keep,
            };
            let (file, head) = Rotating::open(f).map_err(|source| AuditError {
                path: path.clone(),
                source,
            })?;
            (Sink::File(file), head)
        }
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer = Writer {
        sink,
        head,
        dropped: dropped.clone(),
        clock: clock.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("tokend-audit".into())
        .spawn(move || writer.run(rx))
        .map_err(|source| AuditError {
            path: config.file.clone().unwrap_or_default(),
            source,
        })?;
    Ok((
        Audit {
            tx: Some(tx),
            dropped,
            clock,
        },
        AuditWriter {
            thread: Some(thread),
        },
    ))
}

struct Writer {
    sink: Sink,
    head: Head,
    dropped: Arc<AtomicU64>,
    clock: SharedClock,
}

impl Writer {
    fn run(mut self, rx: Receiver<(i64, Event)>) {
        while let Ok(first) = rx.recv() {
            self.write(first);
            // A batch ends when the queue is empty, or after a queue's worth
            // under a flood: then any drops since the last batch are marked.
            for _ in 1..QUEUE {
                match rx.try_recv() {
                    Ok(next) => self.write(next),
                    Err(_) => break,
                }
            }
            self.gap();
            if let Err(e) = self.sink.flush() {
                tracing::error!(error = %e, "cannot flush the audit trail");
            }
        }
        self.gap();
        let _ = self.sink.flush();
        tracing::info!(seq = self.head.seq, head = %self.head.hash, "audit trail closed");
    }

    /// Puts a gap record into the chain if records were dropped.
    fn gap(&mut self) {
        let n = self.dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            let mut gap = Event::new("gap", Caller::default());
            gap.outcome = "dropped";
            gap.dropped = Some(n);
            self.put(self.clock.now().as_secs(), &gap);
        }
    }

    fn write(&mut self, (time, event): (i64, Event)) {
        self.put(time, &event);
    }

    fn put(&mut self, time: i64, event: &Event) {
        let line = self.head.append(time, event);
        match self.sink.write(&line) {
            Ok(()) => metrics::counter!("tokend_audit_records_total").increment(1),
            Err(e) => {
                tracing::error!(error = %e, seq = self.head.seq, "cannot write an audit record");
                metrics::counter!("tokend_audit_dropped_total").increment(1);
            }
        }
    }
}

/// `tokend audit verify FILE...`: reads the files (oldest first) and checks
/// them as one chain.
pub(crate) fn verify_files(files: &[PathBuf]) -> Result<Intact, Broken> {
    let mut texts = Vec::with_capacity(files.len());
    for f in files {
        let text = std::fs::read(f).map_err(|e| Broken {
            file: f.clone(),
            line: 0,
            why: format!("cannot read: {e}"),
        })?;
        texts.push((f.clone(), String::from_utf8_lossy(&text).into_owned()));
    }
    check(&texts)
}

#[cfg(test)]
mod tests;
