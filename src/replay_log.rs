//! The embedded default replay store: one-time ids survive a restart (and
//! a SIGKILL). Each claim is checked and recorded in a `MemoryReplay`, then
//! appended to a journal in the keys directory and fsynced before the token
//! is accepted; a claim whose record cannot be made durable is taken back
//! and refused as `unavailable`. At start the journal is read back (a torn
//! last line from a crash is ignored: its claim was never answered) and
//! rewritten atomically with only the live ids, so it stays bounded by what
//! the memory store bounds.
//!
//! A line: `<forget_at> <issuer> <hex sha-256 of the jti>`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::engine::{ClaimFuture, MemoryReplay, OneTimeId, ReplayStore, replay_digest};
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// The journal's file name inside the keys directory.
pub(crate) const JOURNAL: &str = "replay.log";

/// Rewrite the journal once it holds this many more lines than at the last
/// rewrite (and the live set is much smaller).
const COMPACT_AFTER: usize = 100_000;

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("replay journal {path}: {source}")]
pub struct JournalError {
    path: PathBuf,
    source: std::io::Error,
}

/// A replay store whose claims survive restarts.
pub(crate) struct JournalReplay {
    memory: MemoryReplay,
    file: Arc<Mutex<Journal>>,
}

struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl std::fmt::Debug for JournalReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalReplay").finish_non_exhaustive()
    }
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn line(issuer: &str, d: &[u8; 32], forget_at: UnixTime) -> String {
    format!("{} {issuer} {}\n", forget_at.as_secs(), hex(d))
}

fn parse_line(l: &str) -> Option<(String, [u8; 32], UnixTime)> {
    let mut it = l.split(' ');
    let (t, issuer, d) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || issuer.is_empty() {
        return None;
    }
    Some((
        issuer.to_owned(),
        unhex(d)?,
        UnixTime::from_secs(t.parse().ok()?),
    ))
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

// === impl JournalReplay ===

impl JournalReplay {
    /// Opens (or creates) the journal in `dir`, restores the ids still live
    /// at `now`, and rewrites it with only those.
    pub(crate) fn open(
        dir: &Path,
        memory: MemoryReplay,
        now: UnixTime,
    ) -> Result<Self, JournalError> {
        let path = dir.join(JOURNAL);
        let err = |source| JournalError {
            path: path.clone(),
            source,
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(e)),
        };
        let text = String::from_utf8_lossy(&text);
        let mut torn = 0;
        for l in text.split_inclusive('\n') {
            match l.strip_suffix('\n').and_then(parse_line) {
                Some((issuer, d, until)) if until >= now => memory.restore(&issuer, d, until),
                Some(_) => {}
                None => torn += 1,
            }
        }
        if torn > 0 {
            tracing::warn!(file = %path.display(), lines = torn, "ignored unreadable replay journal lines (an interrupted write)");
        }
        let live = memory.live(now);
        let body: String = live.iter().map(|(i, d, t)| line(i, d, *t)).collect();
        crate::keys::atomic_write(dir, JOURNAL, body.as_bytes())
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        let file = open_append(&path).map_err(err)?;
        tracing::info!(file = %path.display(), live = live.len(), "replay journal loaded");
        Ok(Self {
            memory,
            file: Arc::new(Mutex::new(Journal {
                path,
                file,
                lines: live.len(),
            })),
        })
    }

    async fn claim_durably(&self, ids: &[OneTimeId], now: UnixTime) -> Result<(), Refusal> {
        self.memory.claim_now(ids, now)?;
        let record: String = ids
            .iter()
            .map(|id| line(&id.issuer, &replay_digest(&id.jti), id.forget_at))
            .collect();
        let journal = self.file.clone();
        let n = ids.len();
        let written = tokio::task::spawn_blocking(move || {
            let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
            j.file.write_all(record.as_bytes())?;
            j.file.sync_data()?;
            j.lines += n;
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = written {
            self.memory.forget(ids);
            tracing::error!(error = %e, "cannot record a one-time claim durably");
            return Err(Refusal::new(
                Reason::Unavailable,
                format!("cannot record the one-time claim durably: {e}"),
            ));
        }
        self.compact_if_large(now);
        Ok(())
    }

    /// Rewrites the journal with the live ids once it has grown large.
    fn compact_if_large(&self, now: UnixTime) {
        let mut j = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if j.lines < COMPACT_AFTER {
            return;
        }
        let live = self.memory.live(now);
        if live.len() * 2 > j.lines {
            return;
        }
        let body: String = live.iter().map(|(i, d, t)| line(i, d, *t)).collect();
        let Some(dir) = j.path.parent().map(Path::to_owned) else {
            return;
        };
        match crate::keys::atomic_write(&dir, JOURNAL, body.as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|()| open_append(&j.path))
        {
            Ok(f) => {
                j.file = f;
                j.lines = live.len();
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not compact the replay journal; it keeps growing")
            }
        }
    }
}

impl ReplayStore for JournalReplay {
    fn claim<'a>(&'a self, ids: &'a [OneTimeId], now: UnixTime) -> ClaimFuture<'a> {
        Box::pin(self.claim_durably(ids, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(jti: &str, forget_at: i64) -> OneTimeId {
        OneTimeId {
            issuer: "spiffe://td/a".into(),
            jti: jti.into(),
            forget_at: UnixTime::from_secs(forget_at),
        }
    }

    fn open(dir: &Path, now: i64) -> JournalReplay {
        JournalReplay::open(dir, MemoryReplay::new(100), UnixTime::from_secs(now)).expect("open")
    }

    /// A claim survives reopening; a torn last line is ignored; expired ids
    /// are dropped when the journal is rewritten at open.
    #[tokio::test]
    async fn claims_survive_reopen_and_stay_bounded() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = UnixTime::from_secs;
        let j = open(dir.path(), 0);
        j.claim(&[id("a", 100)], t(1)).await.expect("first");
        j.claim(&[id("old", 10)], t(1)).await.expect("first");
        drop(j);
        // A crash in the middle of an append leaves a partial line.
        let mut f = open_append(&dir.path().join(JOURNAL)).expect("append");
        f.write_all(b"200 spiffe://td/a 12ab").expect("torn");
        drop(f);
        let j = open(dir.path(), 50);
        let e = j.claim(&[id("a", 100)], t(51)).await.expect_err("replayed");
        assert_eq!(e.reason, Reason::Replayed);
        j.claim(&[id("old", 60)], t(51))
            .await
            .expect("expired id forgotten");
        let text = std::fs::read_to_string(dir.path().join(JOURNAL)).expect("read");
        assert_eq!(text.lines().count(), 2, "a and the new old: {text}");
        assert!(text.ends_with('\n'));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(JOURNAL))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "journal is private");
    }

    /// Lines are parsed strictly: anything but three fields of the right
    /// form is ignored.
    #[test]
    fn lines_parse_strictly() {
        let d = replay_digest("x");
        let l = line("spiffe://td/a", &d, UnixTime::from_secs(5));
        assert_eq!(
            parse_line(l.trim_end()),
            Some(("spiffe://td/a".into(), d, UnixTime::from_secs(5)))
        );
        for bad in [
            "",
            "5",
            "5 i",
            "x i 00",
            &format!("5 i {} extra", hex(&d)),
            &format!("5  {}", hex(&d)),
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }
}
