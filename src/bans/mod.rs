//! The bans in force at this verifier: the operator's own (admin API),
//! kept in `keys_dir/bans.json` so a restart keeps them, and those of the
//! fleet-wide signed ban document (`document`, polled by `watch`), whose
//! highest sequence number seen is kept in the same file so an older
//! document is never taken back. `BanStore` is the one writer: each change
//! is written atomically (temp, fsync, rename, directory fsync) BEFORE it
//! is published to the verifier and the peer clients through a `BanView`,
//! so a ban an operator was told is in force survives a crash. A file that
//! cannot be read stops the start (naming it): silently forgetting a ban
//! would let a compromised service back in.

mod document;
mod watch_document;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) use self::document::{Entry, sign, signer_key};
pub(crate) use self::watch_document::{DocumentSource, watch as watch_document};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use crate::engine::{Ban, BanKind, BanList, BanView};

/// The file, in the keys directory.
pub(crate) const BANS_FILE: &str = "bans.json";

/// Why the bans cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// The file exists but cannot be used.
    #[error("bans file {path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Writing failed; the ban is not in force.
    #[error(transparent)]
    Write(#[from] crate::keys::DiskError),
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BansFile {
    version: u32,
    bans: Vec<Ban>,
    /// The highest ban document sequence number taken (0: none).
    #[serde(default)]
    document_seq: u64,
    /// That document's bans, so they hold even if its file goes missing.
    #[serde(default)]
    document: Vec<Ban>,
}

/// What is in force: the operator's bans and the document's.
#[derive(Debug, Default, Clone)]
struct State {
    local: Vec<Ban>,
    document_seq: u64,
    document: Vec<Ban>,
}

/// What became of a ban document offered to the store.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offered {
    /// Newer than any seen: its bans are in force now.
    Taken,
    /// Not newer than the one in force (or one seen before): ignored.
    Stale {
        /// The sequence number in force.
        current: u64,
    },
}

/// The single writer of the bans.
#[derive(Debug)]
pub(crate) struct BanStore {
    dir: PathBuf,
    tx: watch::Sender<Arc<BanList>>,
    /// Serialises changes so two admin calls never lose one another's ban.
    write: Mutex<State>,
}

// === impl BanStore ===

impl BanStore {
    /// Loads `dir/bans.json` (none if absent) and publishes it.
    pub(crate) fn open(dir: &Path) -> Result<(Arc<BanStore>, BanView), BanError> {
        let path = dir.join(BANS_FILE);
        let bans = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: BansFile =
                    serde_json::from_slice(&bytes).map_err(|e| BanError::File {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                if file.version != 1 {
                    return Err(BanError::File {
                        path,
                        detail: format!("version {} is not 1", file.version),
                    });
                }
                (file.bans, file.document_seq, file.document)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0, Vec::new()),
            Err(e) => {
                return Err(BanError::File {
                    path,
                    detail: e.to_string(),
                });
            }
        };
        let state = State {
            local: bans.0,
            document_seq: bans.1,
            document: bans.2,
        };
        let list = union(&state);
        if !list.is_empty() {
            tracing::info!(bans = list.bans().len(), file = %path.display(), "bans in force");
        }
        metrics::gauge!("tokend_bans").set(list.bans().len() as f64);
        let (tx, rx) = watch::channel(Arc::new(list));
        let store = Arc::new(BanStore {
            dir: dir.to_owned(),
            tx,
            write: Mutex::new(state),
        });
        Ok((store, BanView::new(rx)))
    }

    /// The bans in force (the operator's first, then the document's).
    pub(crate) fn current(&self) -> Arc<BanList> {
        self.tx.borrow().clone()
    }

    /// Writes `next` to the file (on tokio's blocking pool: the write
    /// fsyncs, and must not stall the async workers), then publishes it.
    async fn commit(&self, state: &mut State, next: State) -> Result<(), BanError> {
        let file = BansFile {
            version: 1,
            bans: next.local.clone(),
            document_seq: next.document_seq,
            document: next.document.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| BanError::File {
            path: self.dir.join(BANS_FILE),
            detail: e.to_string(),
        })?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || crate::keys::atomic_write(&dir, BANS_FILE, &bytes))
            .await
            .map_err(|e| BanError::File {
                path: self.dir.join(BANS_FILE),
                detail: format!("the write task failed: {e}"),
            })??;
        let list = union(&next);
        metrics::gauge!("tokend_bans").set(list.bans().len() as f64);
        *state = next;
        self.tx.send_replace(Arc::new(list));
        Ok(())
    }

    async fn change(&self, f: impl FnOnce(&mut Vec<Ban>) -> bool) -> Result<bool, BanError> {
        let mut state = self.write.lock().await;
        let mut next = state.clone();
        if !f(&mut next.local) {
            return Ok(false);
        }
        self.commit(&mut state, next).await?;
        Ok(true)
    }

    /// Takes a checked ban document if it is newer than any seen: its
    /// sequence number is written first, then its bans replace the
    /// previous document's. The operator's own bans stay as they are.
    pub(crate) async fn offer(&self, seq: u64, bans: Vec<Ban>) -> Result<Offered, BanError> {
        let mut state = self.write.lock().await;
        if seq <= state.document_seq {
            return Ok(Offered::Stale {
                current: state.document_seq,
            });
        }
        let mut next = state.clone();
        next.document_seq = seq;
        next.document = bans;
        self.commit(&mut state, next).await?;
        Ok(Offered::Taken)
    }

    /// Puts `ban` in force (persisted first); false if it already was.
    pub(crate) async fn add(&self, ban: Ban) -> Result<bool, BanError> {
        self.change(|bans| {
            if bans
                .iter()
                .any(|b| b.kind == ban.kind && b.value == ban.value)
            {
                return false;
            }
            bans.push(ban);
            true
        })
        .await
    }

    /// Lifts the ban of `kind` on `value`; false if there was none.
    pub(crate) async fn remove(&self, kind: BanKind, value: &str) -> Result<bool, BanError> {
        self.change(|bans| {
            let before = bans.len();
            bans.retain(|b| !(b.kind == kind && b.value == value));
            bans.len() != before
        })
        .await
    }
}

/// The operator's bans, then the document's (a ban in both is kept once,
/// with the operator's reason).
fn union(state: &State) -> BanList {
    BanList::new(
        state
            .local
            .iter()
            .chain(state.document.iter())
            .cloned()
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::UnixTime;

    /// Bans survive a reopen; removing one persists too; a ban document is
    /// taken only when newer and its bans survive a reopen; a damaged file
    /// is an error naming it.
    #[tokio::test]
    async fn bans_persist() {
        let dir = tempfile::tempdir().expect("tmp");
        let (store, view) = BanStore::open(dir.path()).expect("open");
        let ban = |kind, value: &str| Ban {
            kind,
            value: value.into(),
            reason: "compromised".into(),
            at: UnixTime::from_secs(5),
        };
        assert!(store.add(ban(BanKind::Serial, "0a")).await.expect("add"));
        assert!(!store.add(ban(BanKind::Serial, "0a")).await.expect("again"));
        assert!(store.add(ban(BanKind::Kid, "k")).await.expect("add"));
        assert_eq!(view.current().bans().len(), 2);
        drop(store);
        let (store, view) = BanStore::open(dir.path()).expect("reopen");
        assert_eq!(view.current().bans().len(), 2);
        assert!(store.remove(BanKind::Kid, "k").await.expect("remove"));
        let (_, view) = BanStore::open(dir.path()).expect("reopen");
        assert_eq!(view.current().bans(), &[ban(BanKind::Serial, "0a")]);
        // A document: taken when newer, refused when not, kept across a reopen.
        let doc = vec![ban(BanKind::SpiffeId, "spiffe://td/x")];
        assert_eq!(
            store.offer(2, doc.clone()).await.expect("offer"),
            Offered::Taken
        );
        assert_eq!(
            store.offer(1, Vec::new()).await.expect("offer"),
            Offered::Stale { current: 2 }
        );
        let (store, view) = BanStore::open(dir.path()).expect("reopen");
        assert_eq!(view.current().bans().len(), 2, "own ban and the document's");
        assert_eq!(
            store.offer(2, Vec::new()).await.expect("offer"),
            Offered::Stale { current: 2 }
        );
        std::fs::write(dir.path().join(BANS_FILE), b"{").expect("damage");
        let err = BanStore::open(dir.path()).expect_err("damaged");
        assert!(err.to_string().contains(BANS_FILE), "{err}");
    }
}
