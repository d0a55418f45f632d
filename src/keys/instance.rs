//! This instance's identity among the replicas of its service, kept in the
//! keys directory (`instance.json`): a stable random instance id, and the
//! sequence numbers of its signed key-set documents, which only grow, across
//! restarts and SIGKILL. A sequence is never written per document: a block
//! is reserved ahead (the file records the highest reserved number, written
//! atomically), and a start resumes above the last reservation, so a crash
//! skips at most one block and never reuses a number.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::disk::{DiskError, atomic_write};
use super::safe_path;

/// The file in the keys directory.
pub(crate) const INSTANCE_FILE: &str = "instance.json";
/// Sequence numbers reserved per write.
const SEQ_BLOCK: u64 = 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceFile {
    format: u32,
    instance: String,
    reserved_seq: u64,
}

/// The instance id and the document sequence of this sidecar.
#[derive(Debug)]
pub struct InstanceState {
    dir: PathBuf,
    id: String,
    next: u64,
    reserved: u64,
}

fn bad(path: &Path, detail: impl Into<String>) -> DiskError {
    DiskError::Manifest {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

// === impl InstanceState ===

impl InstanceState {
    /// Reads (or, the first time, creates) `keys_dir/instance.json` and
    /// reserves the next block of sequence numbers before any is used.
    pub fn open(keys_dir: &Path) -> Result<Self, DiskError> {
        let path = keys_dir.join(INSTANCE_FILE);
        let (id, used) = match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                safe_path::check_entry(&path, "instance file", false)?;
                let text = std::fs::read(&path).map_err(|source| DiskError::Io {
                    op: "read",
                    path: path.clone(),
                    source,
                })?;
                let f: InstanceFile =
                    serde_json::from_slice(&text).map_err(|e| bad(&path, e.to_string()))?;
                if f.format != 1 {
                    return Err(bad(&path, format!("unknown format {}", f.format)));
                }
                if f.instance.len() != 32 || !f.instance.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(&path, "instance is not 32 hex digits"));
                }
                (f.instance, f.reserved_seq)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (new_id()?, 0),
            Err(source) => {
                return Err(DiskError::Io {
                    op: "stat",
                    path,
                    source,
                });
            }
        };
        let mut state = Self {
            dir: keys_dir.to_owned(),
            id,
            next: used.saturating_add(1),
            reserved: used,
        };
        state.reserve()?;
        Ok(state)
    }

    /// The stable instance id (32 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next sequence number; writes a new reservation when the block is
    /// used up (one atomic write per `SEQ_BLOCK` documents).
    pub fn next_seq(&mut self) -> Result<u64, DiskError> {
        if self.next > self.reserved {
            self.reserve()?;
        }
        let seq = self.next;
        self.next += 1;
        Ok(seq)
    }

    fn reserve(&mut self) -> Result<(), DiskError> {
        let reserved = self.next.saturating_add(SEQ_BLOCK - 1);
        let f = InstanceFile {
            format: 1,
            instance: self.id.clone(),
            reserved_seq: reserved,
        };
        let text = serde_json::to_vec_pretty(&f).map_err(|e| bad(&self.dir, e.to_string()))?;
        atomic_write(&self.dir, INSTANCE_FILE, &text)?;
        self.reserved = reserved;
        Ok(())
    }
}

fn new_id() -> Result<String, DiskError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(|_| {
        DiskError::Io {
            op: "generate instance id",
            path: PathBuf::from(INSTANCE_FILE),
            source: std::io::Error::other("no randomness"),
        }
    })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id is stable across opens; sequences only grow, also when a
    /// process dies mid-block (simulated by dropping the state unsaved);
    /// a block boundary writes a new reservation.
    #[test]
    fn id_is_stable_and_sequences_only_grow() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = InstanceState::open(dir.path()).expect("open");
        let id = a.id().to_owned();
        let first = a.next_seq().expect("seq");
        let mut last = first;
        for _ in 0..(SEQ_BLOCK + 5) {
            let s = a.next_seq().expect("seq");
            assert!(s > last);
            last = s;
        }
        drop(a); // as SIGKILL: nothing written at exit
        let mut b = InstanceState::open(dir.path()).expect("reopen");
        assert_eq!(b.id(), id);
        assert!(
            b.next_seq().expect("seq") > last,
            "never reused after a crash"
        );
        std::fs::write(dir.path().join(INSTANCE_FILE), b"{garbage").expect("write");
        let e = InstanceState::open(dir.path()).expect_err("corrupt");
        assert!(e.to_string().contains(INSTANCE_FILE), "{e}");
    }
}
