//! The operator's bans at this verifier, kept in `keys_dir/bans.json` so a
//! restart keeps them. `BanStore` is the one writer: each change is written
//! atomically (temp, fsync, rename, directory fsync) BEFORE it is published
//! to the verifier and the peer clients through a `BanView`, so a ban an
//! operator was told is in force survives a crash. A file that cannot be
//! read stops the start (naming it): silently forgetting a ban would let a
//! compromised service back in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
}

/// The single writer of the bans.
#[derive(Debug)]
pub(crate) struct BanStore {
    dir: PathBuf,
    tx: watch::Sender<Arc<BanList>>,
    /// Serialises changes so two admin calls never lose one another's ban.
    write: Mutex<()>,
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
                file.bans
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(BanError::File {
                    path,
                    detail: e.to_string(),
                });
            }
        };
        let list = BanList::new(bans);
        if !list.is_empty() {
            tracing::info!(bans = list.bans().len(), file = %path.display(), "bans in force");
        }
        metrics::gauge!("tokend_bans").set(list.bans().len() as f64);
        let (tx, rx) = watch::channel(Arc::new(list));
        let store = Arc::new(BanStore {
            dir: dir.to_owned(),
            tx,
            write: Mutex::new(()),
        });
        Ok((store, BanView::new(rx)))
    }

    /// The bans in force.
    pub(crate) fn current(&self) -> Arc<BanList> {
        self.tx.borrow().clone()
    }

    async fn change(&self, f: impl FnOnce(&mut Vec<Ban>) -> bool) -> Result<bool, BanError> {
        let _one_at_a_time = self.write.lock().await;
        let mut bans = self.current().bans().to_vec();
        if !f(&mut bans) {
            return Ok(false);
        }
        let file = BansFile {
            version: 1,
            bans: bans.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| BanError::File {
            path: self.dir.join(BANS_FILE),
            detail: e.to_string(),
        })?;
        crate::keys::atomic_write(&self.dir, BANS_FILE, &bytes)?;
        metrics::gauge!("tokend_bans").set(bans.len() as f64);
        self.tx.send_replace(Arc::new(BanList::new(bans)));
        Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::UnixTime;

    /// Bans survive a reopen; removing one persists too; a damaged file is
    /// an error naming it.
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
        std::fs::write(dir.path().join(BANS_FILE), b"{").expect("damage");
        let err = BanStore::open(dir.path()).expect_err("damaged");
        assert!(err.to_string().contains(BANS_FILE), "{err}");
    }
}
