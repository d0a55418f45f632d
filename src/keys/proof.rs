//! `ProofKeyStore`: this sidecar instance's ES256 proof keys, the keys bound
//! tokens name in `cnf.jkt` and DPoP proofs are signed with. They never
//! leave the instance. Kept in `keys_dir/proof/` (0700), one PKCS#8 PEM file
//! per key named `<created>-<jkt>.es256.pem` (0600), written atomically
//! (temp, fsync, rename, directory fsync) BEFORE the key is handed out, so a
//! crash or SIGKILL at any instant never leaves a token bound to a key the
//! sidecar cannot load again. A key is current for one rotation interval;
//! its successor is made on the first bound mint after that, and the old
//! key stays until no token bound to it can still be valid (`keep`: the
//! longest token lifetime plus skew after its successor took over). A store
//! opened without a directory keeps its keys in memory only (tests).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::disk::{DiskError, atomic_write, io};
use super::safe_path;
use crate::jose::ProofKey;
use crate::time::UnixTime;

/// The subdirectory of `keys_dir` proof keys live in.
const PROOF_DIR: &str = "proof";
const SUFFIX: &str = ".es256.pem";

/// One held proof key.
#[derive(Debug)]
struct Held {
    created_at: UnixTime,
    key: Arc<ProofKey>,
    /// The file it is kept in (none for a memory-only store).
    file: Option<PathBuf>,
}

/// The proof keys of this instance: the current one, and older ones while
/// tokens bound to them may live.
#[derive(Debug)]
pub(crate) struct ProofKeyStore {
    dir: Option<PathBuf>,
    interval: Duration,
    keep: Duration,
    held: Mutex<Vec<Held>>,
}

// === impl ProofKeyStore ===

impl ProofKeyStore {
    /// Opens `keys_dir/proof` (creating it 0700), loading every proof key
    /// kept there; a file that is not a P-256 PKCS#8 key of the thumbprint
    /// its name says is an error naming it. Keys rotate every `interval`
    /// and stay `keep` after their successor took over.
    pub(crate) fn open(
        keys_dir: &Path,
        interval: Duration,
        keep: Duration,
    ) -> Result<Self, DiskError> {
        let dir = keys_dir.join(PROOF_DIR);
        if !dir.exists() {
            safe_path::check_before_create(&dir, "proof keys directory")?;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(io("create directory", &dir))?;
        }
        let dir = safe_path::check_dir(&dir, "proof keys directory")?;
        let mut held = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io("read directory", &dir))? {
            let entry = entry.map_err(io("read directory", &dir))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(".tmp-") {
                // An interrupted write: that key was never handed out.
                tracing::warn!(file = %path.display(), "removing leftover temp file from an interrupted write");
                fs::remove_file(&path).map_err(io("remove", &path))?;
                continue;
            }
            let Some(stem) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            held.push(load(&path, stem)?);
        }
        held.sort_by_key(|h| h.created_at);
        Ok(Self {
            dir: Some(dir),
            interval,
            keep,
            held: Mutex::new(held),
        })
    }

    /// A store keeping its keys in memory only: lost on restart, so tokens
    /// bound to them cannot be proved after one. For tests and benches.
    pub(crate) fn in_memory(interval: Duration, keep: Duration) -> Self {
        Self {
            dir: None,
            interval,
            keep,
            held: Mutex::default(),
        }
    }

    /// The key new tokens are bound to at `now`: the newest, unless it has
    /// served its interval, and then a new one, durable on disk before it
    /// is returned. Keys no bound token can need any more are removed.
    pub(crate) fn current(&self, now: UnixTime) -> Result<Arc<ProofKey>, DiskError> {
        if let Some(k) = self.current_if_fresh(now) {
            return Ok(k);
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // Another caller may have rotated while we waited for the lock.
        if let Some(h) = held.last().filter(|h| self.fresh(h, now)) {
            return Ok(h.key.clone());
        }
        let (der, key) = ProofKey::generate().map_err(|e| DiskError::BadKey {
            path: self.dir.clone().unwrap_or_default(),
            detail: e.to_string(),
        })?;
        let key = Arc::new(key);
        let file = match &self.dir {
            Some(dir) => {
                let name = format!("{}-{}{SUFFIX}", now.as_secs(), key.jkt());
                let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
                atomic_write(dir, &name, pem.as_bytes())?;
                Some(dir.join(name))
            }
            None => None,
        };
        tracing::info!(jkt = key.jkt(), "new proof key");
        held.push(Held {
            created_at: now,
            key: key.clone(),
            file,
        });
        self.prune(&mut held, now);
        Ok(key)
    }

    /// The current key if it needs no rotation at `now` (never writes).
    pub(crate) fn current_if_fresh(&self, now: UnixTime) -> Option<Arc<ProofKey>> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.last()
            .filter(|h| self.fresh(h, now))
            .map(|h| h.key.clone())
    }

    /// The held key whose thumbprint is `jkt`, to prove with.
    pub(crate) fn by_jkt(&self, jkt: &str) -> Option<Arc<ProofKey>> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter()
            .rev()
            .find(|h| h.key.jkt() == jkt)
            .map(|h| h.key.clone())
    }

    /// Thumbprints of the held keys, oldest first.
    #[cfg(test)]
    pub(crate) fn thumbprints(&self) -> Vec<String> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().map(|h| h.key.jkt().to_owned()).collect()
    }

    fn fresh(&self, h: &Held, now: UnixTime) -> bool {
        h.created_at <= now && now < h.created_at + self.interval
    }

    /// Drops keys whose successor took over more than `keep` ago: every
    /// token bound to them has expired.
    fn prune(&self, held: &mut Vec<Held>, now: UnixTime) {
        let mut i = 0;
        while i + 1 < held.len() {
            let successor_at = held[i + 1].created_at;
            if successor_at + self.keep < now {
                let gone = held.remove(i);
                if let Some(file) = gone.file
                    && let Err(e) = fs::remove_file(&file)
                {
                    tracing::warn!(file = %file.display(), error = %e, "cannot remove an old proof key");
                }
            } else {
                i += 1;
            }
        }
    }
}

/// Loads one proof key file, checking owner, mode and that the key is the
/// one its name says.
fn load(path: &Path, stem: &str) -> Result<Held, DiskError> {
    let bad = |detail: String| DiskError::BadKey {
        path: path.to_owned(),
        detail,
    };
    let Some((created, jkt)) = stem.split_once('-') else {
        return Err(bad(
            "proof key file name is not <created>-<jkt>.es256.pem".into()
        ));
    };
    let created_at = created
        .parse::<i64>()
        .map(UnixTime::from_secs)
        .map_err(|_| bad(format!("creation time {created:?} is not a number")))?;
    safe_path::check_entry(path, "proof key file", true)?;
    let bytes = fs::read(path).map_err(io("read", path))?;
    let block = pem::parse(&bytes).map_err(|e| DiskError::NotPem {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    if block.tag() != "PRIVATE KEY" {
        return Err(DiskError::WrongType {
            path: path.to_owned(),
            label: block.tag().to_owned(),
        });
    }
    let key = ProofKey::from_pkcs8(block.contents()).map_err(|e| bad(e.to_string()))?;
    if key.jkt() != jkt {
        return Err(bad(format!(
            "holds proof key {} but its name says {jkt}",
            key.jkt()
        )));
    }
    Ok(Held {
        created_at,
        key: Arc::new(key),
        file: Some(path.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const DAY: Duration = Duration::from_secs(86_400);
    const KEEP: Duration = Duration::from_secs(3_630);

    fn t(s: i64) -> UnixTime {
        UnixTime::from_secs(s)
    }

    /// A key handed out is on disk (0600) at once and loads again after a
    /// restart, under the same thumbprint.
    #[test]
    fn handed_out_key_survives_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ProofKeyStore::open(dir.path(), DAY, KEEP).expect("open");
        let k = store.current(t(1_000)).expect("key");
        let files: Vec<_> = fs::read_dir(dir.path().join("proof"))
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(files.len(), 1);
        let mode = fs::metadata(&files[0]).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(store);
        let again = ProofKeyStore::open(dir.path(), DAY, KEEP).expect("reopen");
        assert_eq!(
            again.current(t(1_001)).expect("key").jkt(),
            k.jkt(),
            "the same key is current after a restart"
        );
        assert!(again.by_jkt(k.jkt()).is_some());
    }

    /// After an interval a new key is current; the old one still proves
    /// until `keep` after its successor took over, then is removed from
    /// memory and disk.
    #[test]
    fn rotation_keeps_the_previous_key_until_its_tokens_expired() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ProofKeyStore::open(dir.path(), DAY, KEEP).expect("open");
        let a = store.current(t(0)).expect("a");
        let b = store.current(t(86_400)).expect("b");
        assert_ne!(a.jkt(), b.jkt());
        store.current(t(86_400 + 3_630)).expect("b still");
        assert!(store.by_jkt(a.jkt()).is_some(), "a proves until keep ends");
        let c = store.current(t(2 * 86_400)).expect("c");
        assert!(store.by_jkt(a.jkt()).is_none(), "a is gone");
        assert_eq!(store.thumbprints(), vec![b.jkt(), c.jkt()]);
        let on_disk = fs::read_dir(dir.path().join("proof")).expect("dir").count();
        assert_eq!(on_disk, 2);
    }

    /// A proof key file whose content is not the key its name says, or is
    /// readable by others, stops the store from opening, naming the file.
    #[test]
    fn bad_files_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ProofKeyStore::open(dir.path(), DAY, KEEP).expect("open");
        store.current(t(5)).expect("key");
        let proof = dir.path().join("proof");
        let file = fs::read_dir(&proof)
            .expect("dir")
            .next()
            .expect("one")
            .expect("entry")
            .path();
        let renamed = proof.join(format!("5-{}{SUFFIX}", "x".repeat(43)));
        fs::rename(&file, &renamed).expect("rename");
        let e = ProofKeyStore::open(dir.path(), DAY, KEEP).expect_err("mismatch");
        assert!(e.to_string().contains("but its name says"), "{e}");
        fs::set_permissions(&renamed, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(ProofKeyStore::open(dir.path(), DAY, KEEP).is_err());
    }
}
