//! The only code that touches `keys_dir`. Every write is atomic: a temp file
//! (mode 0600) is written, fsynced and renamed over the target, then the
//! directory is fsynced. The manifest `keys.json` is the commit point: a key
//! file is written before the manifest names it, and removed only after the
//! manifest stops naming it, so a crash at any instant leaves a directory
//! that loads (at worst with an unnamed key file, which was never published).
//! Nothing is trusted from a directory, manifest or key file another user
//! could have written (`safe_path`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::key::{KeyRecord, SigningKey};
use super::safe_path;

/// The manifest file name inside the keys directory.
pub(super) const MANIFEST: &str = "keys.json";
const KEY_SUFFIX: &str = ".pk8.pem";
const TMP_PREFIX: &str = ".tmp-";

/// A key-store problem, always naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A private key file readable or writable by group or others.
    #[error(
        "key file {path} has mode {mode:04o}: private keys must not be accessible to group or others (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not PEM at all, or truncated.
    #[error("key file {path} is not a PEM document (corrupt or truncated): {detail}")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        detail: String,
    },
    /// PEM of another kind (PKCS#1, certificate, EC...).
    #[error(
        "key file {path} holds a {label:?} PEM block; expected an unencrypted PKCS#8 \"PRIVATE KEY\""
    )]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The PEM label found.
        label: String,
    },
    /// PKCS#8 that ring refuses.
    #[error("key file {path}: {detail}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The key in the file is not the one the manifest names.
    #[error("key file {path} holds key {found} but {MANIFEST} says {expected}")]
    KidMismatch {
        /// The file.
        path: PathBuf,
        /// The kid in the manifest.
        expected: String,
        /// The kid of the file's key.
        found: String,
    },
    /// The manifest is unreadable.
    #[error("key manifest {path} is corrupt: {detail}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Key files but no manifest: refuse to guess, and never generate over them.
    #[error(
        "{dir} holds key files ({files}) but no {MANIFEST}; refusing to start rather than guess their states"
    )]
    NoManifest {
        /// The directory.
        dir: PathBuf,
        /// The files found.
        files: String,
    },
    /// The file was renamed into place but the directory fsync failed: the
    /// change is visible and may or may not survive a power loss.
    #[error("{path} was written but the directory fsync failed: {source}")]
    Unsynced {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A directory or file tokend would trust is writable by group or others
    /// (see `safe_path`): anyone it lets in could plant or swap a key.
    #[error(
        "{path} ({what}) has mode {mode:04o}: {problem}, so another user could plant or swap keys; refusing to trust it (chmod go-w {path})"
    )]
    Writable {
        /// What the path is to tokend ("keys directory", "a directory above ...").
        what: String,
        /// The offending directory or file, symlinks resolved.
        path: PathBuf,
        /// Its mode bits, sticky bit included.
        mode: u32,
        /// Which rule it breaks.
        problem: &'static str,
    },
    /// A directory or file tokend would trust belongs to another user.
    #[error(
        "{path} ({what}) is owned by uid {uid}, neither root nor the daemon's uid {own}; refusing to trust it (chown it)"
    )]
    Owner {
        /// What the path is to tokend.
        what: String,
        /// The offending directory or file, symlinks resolved.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// The daemon's uid ("unknown" if /proc/self cannot be read).
        own: String,
    },
    /// A trusted file that is a symlink or a special file.
    #[error(
        "{path} ({what}) is not a regular file; refusing to follow a symlink or read a special file"
    )]
    NotRegular {
        /// What the path is to tokend.
        what: String,
        /// The file.
        path: PathBuf,
    },
    /// A manifest entry names a file that is not there.
    #[error("key file {path} named in {MANIFEST} is missing")]
    Missing {
        /// The file.
        path: PathBuf,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    keys: Vec<KeyRecord>,
}

/// A loaded key: its record and validated material (absent once revoked).
pub(super) struct LoadedKey {
    /// The manifest entry.
    pub record: KeyRecord,
    /// The key, if its file is still held.
    pub key: Option<SigningKey>,
}

/// Handle on the keys directory.
#[derive(Clone, Debug)]
pub(super) struct KeyDir {
    dir: PathBuf,
}

impl KeyDir {
    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.dir
    }
}

/// Maps an I/O error of `op` on `path` to a `DiskError` naming both.
pub(super) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

// === impl KeyDir ===

impl KeyDir {
    /// Opens (creating with mode 0700 if absent) the keys directory, and
    /// refuses it unless it and every directory above it are safe (see
    /// `safe_path`). From then on the resolved path is used.
    pub(super) fn open(dir: &Path) -> Result<Self, DiskError> {
        if !dir.exists() {
            safe_path::check_before_create(dir, "keys directory")?;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io("create directory", dir))?;
        } else if !dir.is_dir() {
            return Err(DiskError::Io {
                op: "open keys directory",
                path: dir.to_owned(),
                source: std::io::Error::other("not a directory"),
            });
        }
        let dir = safe_path::check_dir(dir, "keys directory")?;
        Ok(Self { dir })
    }

    /// Loads the manifest and every key it names, checking each file. `None`
    /// means a fresh directory. Leftover temp files are removed, and key files
    /// no manifest entry names (a crash between the two writes) are removed:
    /// they were never published, so no token can depend on them.
    pub(super) fn load(&self) -> Result<Option<Vec<LoadedKey>>, DiskError> {
        let entries = self.list()?;
        for name in entries.iter().filter(|n| n.starts_with(TMP_PREFIX)) {
            let p = self.dir.join(name);
            tracing::warn!(file = %p.display(), "removing leftover temp file from an interrupted write");
            fs::remove_file(&p).map_err(io("remove", &p))?;
        }
        let key_files: Vec<&String> = entries.iter().filter(|n| n.ends_with(KEY_SUFFIX)).collect();
        let mpath = self.dir.join(MANIFEST);
        match fs::symlink_metadata(&mpath) {
            Ok(_) => safe_path::check_entry(&mpath, "key manifest", false)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("stat", &mpath)(e)),
        }
        let text = match fs::read(&mpath) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if key_files.is_empty() {
                    return Ok(None);
                }
                let files = key_files
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(DiskError::NoManifest {
                    dir: self.dir.clone(),
                    files,
                });
            }
            Err(e) => return Err(io("read", &mpath)(e)),
        };
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| DiskError::Manifest {
                path: mpath.clone(),
                detail: e.to_string(),
            })?;
        if manifest.format != 1 {
            return Err(DiskError::Manifest {
                path: mpath,
                detail: format!("unknown format {}", manifest.format),
            });
        }
        let mut out = Vec::with_capacity(manifest.keys.len());
        for record in manifest.keys {
            let key = if record.file.is_empty() {
                None
            } else {
                Some(self.load_key_file(&record)?)
            };
            out.push(LoadedKey { record, key });
        }
        for name in key_files {
            if !out.iter().any(|k| &k.record.file == name) {
                let p = self.dir.join(name);
                tracing::warn!(file = %p.display(), "removing key file not named in {MANIFEST} (never published)");
                fs::remove_file(&p).map_err(io("remove", &p))?;
            }
        }
        self.sync_dir()?;
        Ok(Some(out))
    }

    fn list(&self) -> Result<Vec<String>, DiskError> {
        let mut names = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io("read directory", &self.dir))? {
            let e = e.map_err(io("read directory", &self.dir))?;
            if let Some(n) = e.file_name().to_str() {
                names.push(n.to_owned());
            }
        }
        Ok(names)
    }

    fn load_key_file(&self, record: &KeyRecord) -> Result<SigningKey, DiskError> {
        if record.file.contains('/') || record.file.starts_with('.') {
            return Err(DiskError::Manifest {
                path: self.dir.join(MANIFEST),
                detail: format!("file name {:?} is not a plain name", record.file),
            });
        }
        let path = self.dir.join(&record.file);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DiskError::Missing { path });
            }
            Err(e) => return Err(io("stat", &path)(e)),
        };
        if !meta.file_type().is_file() {
            return Err(DiskError::BadKey {
                path,
                detail: "not a regular file".into(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(DiskError::Permissions { path, mode });
        }
        safe_path::check_owner(&path, &meta, &|| "key file".to_owned())?;
        let bytes = fs::read(&path).map_err(io("read", &path))?;
        let key = parse_pkcs8_pem(&path, &bytes)?;
        if key.kid() != record.kid {
            return Err(DiskError::KidMismatch {
                path,
                expected: record.kid.clone(),
                found: key.kid().to_owned(),
            });
        }
        Ok(key)
    }

    /// Writes a key's PKCS#8 PEM atomically (0600) and returns its file name.
    pub(super) fn write_key(&self, kid: &str, der: &[u8]) -> Result<String, DiskError> {
        let name = format!("{kid}{KEY_SUFFIX}");
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.to_vec()));
        self.atomic_write(&name, pem.as_bytes())?;
        Ok(name)
    }

    /// Replaces the manifest atomically: the commit point of every change.
    pub(super) fn write_manifest(&self, records: &[KeyRecord]) -> Result<(), DiskError> {
        let m = Manifest {
            format: 1,
            keys: records.to_vec(),
        };
        let mut text = serde_json::to_vec_pretty(&m).map_err(|e| DiskError::Manifest {
            path: self.dir.join(MANIFEST),
            detail: e.to_string(),
        })?;
        text.push(b'\n');
        self.atomic_write(MANIFEST, &text)
    }

    /// Removes a key file the manifest no longer names.
    pub(super) fn remove_key_file(&self, name: &str) -> Result<(), DiskError> {
        let p = self.dir.join(name);
        match fs::remove_file(&p) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &p)(e)),
        }
    }

    fn atomic_write(&self, name: &str, bytes: &[u8]) -> Result<(), DiskError> {
        atomic_write(&self.dir, name, bytes)
    }

    fn sync_dir(&self) -> Result<(), DiskError> {
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory", &self.dir))
    }
}

/// Writes `dir/name` atomically with mode 0600: temp file, fsync, rename,
/// fsync of the directory. Also used for CA and certificate files.
pub(crate) fn atomic_write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DiskError> {
    let mut rnd = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd).map_err(|_| {
        DiskError::Io {
            op: "random",
            path: dir.to_owned(),
            source: std::io::Error::other("no randomness"),
        }
    })?;
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{name}-{:016x}",
        u64::from_le_bytes(rnd)
    ));
    let target = dir.join(name);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &target).map_err(io("rename into place", &target))?;
        // From here the new content is in place: a failure is "committed but
        // not yet durable", which callers must not roll back.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| DiskError::Unsynced {
                path: target.clone(),
                source,
            })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Parses a PKCS#8 PEM private key, naming `path` in every error.
pub fn parse_pkcs8_pem(path: &Path, bytes: &[u8]) -> Result<SigningKey, DiskError> {
    let block = pem::parse(bytes).map_err(|e| DiskError::NotPem {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    if block.tag() != "PRIVATE KEY" {
        return Err(DiskError::WrongType {
            path: path.to_owned(),
            label: block.tag().to_owned(),
        });
    }
    SigningKey::from_pkcs8(block.contents()).map_err(|e| DiskError::BadKey {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}
