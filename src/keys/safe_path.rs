//! Whether a path may be trusted with private keys, in the spirit of ssh's
//! `safe_path`: after resolving symlinks, every directory from `/` down and
//! the file itself must be owned by root or by the daemon's uid and not be
//! writable by group or others; a private key must not be readable by them
//! either. Anyone else who could write there could plant a key tokend would
//! sign with, or a manifest naming one.
//!
//! Rules (see the README, "Keys on disk"):
//! - a directory above the trusted one may be group/other-writable only if
//!   it is sticky (`/tmp`, Kubernetes volume roots): there others may add
//!   entries but not rename or remove ours, and what we trust below is
//!   checked in turn;
//! - the trusted directory itself (`keys_dir`, or the directory holding a
//!   `[peer_api]` file) must not be group/other-writable, sticky or not;
//!   group/other read of a directory is allowed (it exposes names only);
//! - when the configured path is itself a symlink, the directory holding
//!   that symlink is checked like a directory above, so nobody else can
//!   re-point it;
//! - files are checked by `lstat` inside a checked directory: once nobody
//!   else can write the directory, the file cannot be swapped between the
//!   check and the read.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::disk::DiskError;

const GROUP_OTHER_WRITE: u32 = 0o022;
const GROUP_OTHER_ANY: u32 = 0o077;
const STICKY: u32 = 0o1000;

/// The uid this process runs as (the owner of `/proc/self`), if known.
/// Files owned by it, or by root, are the only ones tokend trusts.
pub(crate) fn daemon_uid() -> Option<u32> {
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Root, or the daemon's uid: the owners tokend trusts.
pub(super) fn check_owner(
    path: &Path,
    meta: &fs::Metadata,
    what: &dyn Fn() -> String,
) -> Result<(), DiskError> {
    let uid = meta.uid();
    let own = daemon_uid();
    if uid == 0 || Some(uid) == own {
        return Ok(());
    }
    Err(DiskError::Owner {
        what: what(),
        path: path.to_owned(),
        uid,
        own: own.map_or_else(|| "unknown".to_owned(), |u| u.to_string()),
    })
}

/// A directory above a trusted one: trusted owner, and not writable by
/// group or others unless sticky.
fn check_above(dir: &Path, what: &dyn Fn() -> String) -> Result<(), DiskError> {
    let meta = fs::metadata(dir).map_err(io_err("stat", dir))?;
    check_owner(dir, &meta, what)?;
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_WRITE != 0 && mode & STICKY == 0 {
        return Err(DiskError::Writable {
            what: what(),
            path: dir.to_owned(),
            mode,
            problem: "writable by group or others and not sticky",
        });
    }
    Ok(())
}

/// Checks every directory from `/` down to `canonical` (excluded), which
/// must already be free of symlinks.
fn check_ancestors(canonical: &Path, below: &str) -> Result<(), DiskError> {
    let mut ancestors: Vec<&Path> = canonical.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        check_above(dir, &|| format!("a directory above {below}"))?;
    }
    Ok(())
}

/// If `path` is a symlink, checks the directory holding it like a
/// directory above: whoever can write there could re-point it.
fn check_link_dir(path: &Path, what: &str) -> Result<(), DiskError> {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return Ok(());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = fs::canonicalize(parent).map_err(io_err("resolve", parent))?;
    let what = format!(
        "the directory holding the symlink {what} {}",
        path.display()
    );
    check_ancestors(&parent, &what)?;
    check_above(&parent, &|| what.clone())
}

/// How an error names the path it is about: with the configured spelling
/// when it differs from the resolved path the error shows.
fn describe(what: &str, given: &Path, canonical: &Path) -> String {
    if given == canonical {
        what.to_owned()
    } else {
        format!("{what} {}", given.display())
    }
}

/// Before `dir` is created: the nearest existing directory above it must
/// pass the rule for directories above, so nothing is created where it
/// would then be refused.
pub(super) fn check_before_create(dir: &Path, what: &str) -> Result<(), DiskError> {
    let existing = dir
        .ancestors()
        .skip(1)
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.is_dir());
    let Some(existing) = existing else {
        return Ok(());
    };
    let canonical = fs::canonicalize(existing).map_err(io_err("resolve", existing))?;
    let above = format!("{what} {}", dir.display());
    check_ancestors(&canonical, &above)?;
    check_above(&canonical, &|| format!("a directory above {above}"))
}

/// Checks the directory `dir` tokend keeps or reads private keys in, and
/// every directory above it after resolving symlinks. Returns its resolved
/// path, the one to use from then on. `what` names it in errors
/// ("keys directory").
pub(super) fn check_dir(dir: &Path, what: &str) -> Result<PathBuf, DiskError> {
    check_link_dir(dir, what)?;
    let canonical = fs::canonicalize(dir).map_err(io_err("resolve", dir))?;
    let own = describe(what, dir, &canonical);
    let above = format!("{what} {}", canonical.display());
    check_resolved_dir(&canonical, &own, &above)?;
    Ok(canonical)
}

/// [`check_dir`] on a resolved path: `own` names it, `above` what the
/// directories above it lead to.
fn check_resolved_dir(canonical: &Path, own: &str, above: &str) -> Result<(), DiskError> {
    check_ancestors(canonical, above)?;
    let meta = fs::metadata(canonical).map_err(io_err("stat", canonical))?;
    if !meta.is_dir() {
        return Err(DiskError::Io {
            op: "open",
            path: canonical.to_owned(),
            source: std::io::Error::other("not a directory"),
        });
    }
    check_owner(canonical, &meta, &|| own.to_owned())?;
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_WRITE != 0 {
        return Err(DiskError::Writable {
            what: own.to_owned(),
            path: canonical.to_owned(),
            mode,
            problem: "writable by group or others",
        });
    }
    Ok(())
}

/// Checks an entry of a directory that passed [`check_dir`], without
/// following a symlink: a regular file, owned by root or the daemon, not
/// writable by group or others, and if `secret` not readable by them either.
pub(super) fn check_entry(path: &Path, what: &str, secret: bool) -> Result<(), DiskError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    if !meta.file_type().is_file() {
        return Err(DiskError::NotRegular {
            what: what.to_owned(),
            path: path.to_owned(),
        });
    }
    check_owner(path, &meta, &|| what.to_owned())?;
    let mode = meta.mode() & 0o7777;
    if secret && mode & GROUP_OTHER_ANY != 0 {
        return Err(DiskError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if mode & GROUP_OTHER_WRITE != 0 {
        return Err(DiskError::Writable {
            what: what.to_owned(),
            path: path.to_owned(),
            mode,
            problem: "writable by group or others",
        });
    }
    Ok(())
}

/// Checks a file named in configuration (`peer_api.key`...): resolves
/// symlinks (Kubernetes secret volumes are `..data` links to root-owned
/// files), checks its directory as [`check_dir`] does and the file as
/// [`check_entry`] does. Returns the resolved path, the one to read.
pub(crate) fn check_file(path: &Path, what: &str, secret: bool) -> Result<PathBuf, DiskError> {
    check_link_dir(path, what)?;
    let canonical = fs::canonicalize(path).map_err(io_err("resolve", path))?;
    let described = describe(what, path, &canonical);
    if let Some(parent) = canonical.parent() {
        check_resolved_dir(
            parent,
            &format!("the directory of {described}"),
            &format!("{what} {}", canonical.display()),
        )?;
    }
    check_entry(&canonical, &described, secret)?;
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn write(p: &Path, mode: u32) {
        fs::write(p, b"x").expect("write");
        chmod(p, mode);
    }

    /// A fresh private directory under a sticky world-writable one (like
    /// /tmp) passes; the resolved path comes back.
    #[test]
    fn private_dir_under_sticky_tmp_passes() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("keys");
        fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o700);
        assert_eq!(
            check_dir(&dir, "keys directory").expect("ok"),
            fs::canonicalize(&dir).expect("canon")
        );
        // Group/other read on the directory itself is allowed (names only).
        chmod(&dir, 0o755);
        check_dir(&dir, "keys directory").expect("readable dir ok");
        // A sticky world-writable directory above it is fine too.
        chmod(root.path(), 0o1777);
        check_dir(&dir, "keys directory").expect("sticky above ok");
    }

    /// Group- or world-writable: refused for the directory itself even when
    /// sticky, and for a directory above unless sticky.
    #[test]
    fn writable_dirs_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("keys");
        fs::create_dir(&dir).expect("mkdir");
        for mode in [0o770, 0o702, 0o1777] {
            chmod(&dir, mode);
            let e = check_dir(&dir, "keys directory").expect_err("writable");
            assert_eq!(
                e.to_string(),
                format!(
                    "{} (keys directory) has mode {mode:04o}: writable by group or others, \
                     so another user could plant or swap keys; refusing to trust it (chmod go-w {0})",
                    dir.display()
                )
            );
        }
        chmod(&dir, 0o700);
        chmod(root.path(), 0o777);
        let e = check_dir(&dir, "keys directory").expect_err("parent writable");
        assert_eq!(
            e.to_string(),
            format!(
                "{} (a directory above keys directory {}) has mode 0777: writable by group or \
                 others and not sticky, so another user could plant or swap keys; refusing to \
                 trust it (chmod go-w {0})",
                root.path().display(),
                dir.display()
            )
        );
        chmod(root.path(), 0o700);
    }

    /// A keys directory to be created under a world-writable, non-sticky
    /// directory is refused before anything is created.
    #[test]
    fn unsafe_parent_refused_before_create() {
        let root = tempfile::tempdir().expect("tmp");
        let open = root.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        chmod(&open, 0o777);
        let dir = open.join("a/keys");
        let e = check_before_create(&dir, "keys directory").expect_err("unsafe");
        assert!(
            e.to_string().starts_with(&format!(
                "{} (a directory above keys directory {}) has mode 0777",
                open.display(),
                dir.display()
            )),
            "{e}"
        );
        let e = crate::keys::disk::KeyDir::open(&dir).expect_err("refused");
        assert!(e.to_string().contains("not sticky"), "{e}");
        assert!(!open.join("a").exists(), "nothing created");
        chmod(&open, 0o1777);
        crate::keys::disk::KeyDir::open(&dir).expect("sticky parent");
        assert!(dir.is_dir());
    }

    /// Files: private keys must be private; no trusted file may be writable
    /// by group or others; a symlink is not a regular file.
    #[test]
    fn entries() {
        let root = tempfile::tempdir().expect("tmp");
        let f = root.path().join("k.pem");
        write(&f, 0o600);
        check_entry(&f, "key file", true).expect("0600 key");
        chmod(&f, 0o644);
        check_entry(&f, "manifest", false).expect("0644 public file");
        let e = check_entry(&f, "key file", true).expect_err("readable key");
        assert!(e.to_string().contains("has mode 0644"), "{e}");
        chmod(&f, 0o664);
        let e = check_entry(&f, "manifest", false).expect_err("group-writable");
        assert_eq!(
            e.to_string(),
            format!(
                "{} (manifest) has mode 0664: writable by group or others, so another user \
                 could plant or swap keys; refusing to trust it (chmod go-w {0})",
                f.display()
            )
        );
        let link = root.path().join("link.pem");
        symlink(&f, &link).expect("symlink");
        let e = check_entry(&link, "key file", true).expect_err("symlink");
        assert!(e.to_string().contains("is not a regular file"), "{e}");
    }

    /// The Kubernetes secret volume layout: `key.pem -> ..data/key.pem`,
    /// `..data -> ..2024_01_01_00_00_00.1/`, in a sticky volume root; the
    /// resolved file is checked and returned.
    #[test]
    fn kubernetes_secret_layout_passes() {
        let root = tempfile::tempdir().expect("tmp");
        let vol = root.path().join("secret");
        let ts = vol.join("..2024_01_01_00_00_00.1");
        fs::create_dir_all(&ts).expect("mkdir");
        chmod(&vol, 0o1777);
        chmod(&ts, 0o755);
        write(&ts.join("key.pem"), 0o400);
        write(&ts.join("cert.pem"), 0o644);
        symlink("..2024_01_01_00_00_00.1", vol.join("..data")).expect("link");
        symlink("..data/key.pem", vol.join("key.pem")).expect("link");
        symlink("..data/cert.pem", vol.join("cert.pem")).expect("link");
        let resolved = check_file(&vol.join("key.pem"), "peer_api.key", true).expect("key");
        assert_eq!(resolved, fs::canonicalize(ts.join("key.pem")).expect("c"));
        check_file(&vol.join("cert.pem"), "peer_api.cert", false).expect("cert");
        // A secret readable by others is refused, naming the resolved file.
        chmod(&ts.join("key.pem"), 0o444);
        let e = check_file(&vol.join("key.pem"), "peer_api.key", true).expect_err("0444");
        assert!(
            e.to_string()
                .contains("..2024_01_01_00_00_00.1/key.pem has mode 0444"),
            "{e}"
        );
        // The symlink's own directory may not be writable by others (non-sticky).
        chmod(&ts.join("key.pem"), 0o400);
        chmod(&vol, 0o777);
        let e = check_file(&vol.join("key.pem"), "peer_api.key", true).expect_err("0777");
        assert!(
            e.to_string().starts_with(&format!(
                "{} (the directory holding the symlink peer_api.key",
                fs::canonicalize(&vol).expect("c").display()
            )),
            "{e}"
        );
        chmod(&vol, 0o700);
    }

    /// Owned by a uid that is neither root nor the daemon's: refused (only
    /// testable as root, which CI runs as).
    #[test]
    fn foreign_owner_refused() {
        if daemon_uid() != Some(0) {
            eprintln!("foreign_owner_refused: skipped, needs root to chown");
            return;
        }
        let root = tempfile::tempdir().expect("tmp");
        let f = root.path().join("k.pem");
        write(&f, 0o600);
        std::os::unix::fs::chown(&f, Some(1234), None).expect("chown");
        let e = check_entry(&f, "key file", true).expect_err("foreign");
        assert_eq!(
            e.to_string(),
            format!(
                "{} (key file) is owned by uid 1234, neither root nor the daemon's uid 0; \
                 refusing to trust it (chown it)",
                f.display()
            )
        );
        let dir = root.path().join("keys");
        fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o700);
        std::os::unix::fs::chown(&dir, Some(1234), None).expect("chown");
        let e = check_dir(&dir, "keys directory").expect_err("foreign dir");
        assert!(e.to_string().contains("owned by uid 1234"), "{e}");
    }
}
