//! Bad key files stop the start with an error naming the file and the problem,
//! exit 64, and are never overwritten.

use std::path::PathBuf;

use crate::support::*;

/// Starts once to create keys, stops, and returns the sidecar and its key file.
fn prepared(root: &std::path::Path) -> (Sidecar, PathBuf) {
    let mut a = Sidecar::start(root, "payments", "");
    a.stop();
    let key = std::fs::read_dir(&a.keys_dir)
        .expect("keys dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".pk8.pem"))
        .expect("a key file");
    (a, key)
}

fn start_fails(root: &std::path::Path, a: &Sidecar, key: &std::path::Path, expect: &str) {
    let before = std::fs::read(key).expect("read");
    let err = Sidecar::start_with(root, "payments", &a.config)
        .err()
        .expect("start must fail");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&key.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(stderr.contains(expect), "says {expect:?}: {stderr}");
    assert_eq!(
        std::fs::read(key).expect("read"),
        before,
        "file left untouched"
    );
    assert!(!a.socket.exists(), "no socket left behind");
}

/// Random bytes in place of the PEM.
#[test]
fn corrupt_key_file() {
    let root = tmp();
    let (a, key) = prepared(root.path());
    std::fs::write(&key, b"\x00\x01garbage that is not PEM at all\n").expect("write");
    start_fails(root.path(), &a, &key, "not a PEM document");
}

/// The PEM cut in half, as a crash of a non-atomic writer would leave it.
#[test]
fn truncated_key_file() {
    let root = tmp();
    let (a, key) = prepared(root.path());
    let text = std::fs::read(&key).expect("read");
    std::fs::write(&key, &text[..text.len() / 2]).expect("write");
    start_fails(root.path(), &a, &key, "corrupt or truncated");
}

/// PEM of another type: a certificate-labelled block, and PKCS#8 of a non-RSA key.
#[test]
fn wrong_type_key_file() {
    let root = tmp();
    let (a, key) = prepared(root.path());
    std::fs::write(
        &key,
        pem::encode(&pem::Pem::new("RSA PRIVATE KEY", vec![1, 2, 3])),
    )
    .expect("write");
    start_fails(root.path(), &a, &key, "\"RSA PRIVATE KEY\" PEM block");

    // A valid PKCS#8 EC P-256 key (ring-generated) under the right label.
    let rng = ring::rand::SystemRandom::new();
    let ec = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .expect("ec");
    std::fs::write(
        &key,
        pem::encode(&pem::Pem::new("PRIVATE KEY", ec.as_ref().to_vec())),
    )
    .expect("write");
    start_fails(root.path(), &a, &key, "not a usable RSA private key");
}

/// A private key readable by others.
#[test]
fn world_readable_key_file() {
    let root = tmp();
    let (a, key) = prepared(root.path());
    chmod(&key, 0o644);
    start_fails(root.path(), &a, &key, "mode 0644");
}

/// A corrupt manifest is named too, and nothing is regenerated over the keys.
#[test]
fn corrupt_manifest() {
    let root = tmp();
    let (a, key) = prepared(root.path());
    let manifest = a.keys_dir.join("keys.json");
    std::fs::write(&manifest, b"{\"format\": 1, \"keys\": [").expect("write");
    let err = Sidecar::start_with(root.path(), "payments", &a.config)
        .err()
        .expect("fails");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(64));
    assert!(
        stderr.contains("keys.json") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(key.exists(), "key kept");
    // Without any manifest, existing key files are not silently replaced either.
    std::fs::remove_file(&manifest).expect("rm");
    let err = Sidecar::start_with(root.path(), "payments", &a.config)
        .err()
        .expect("fails");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("no keys.json"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    assert!(key.exists());
}

/// Leftovers of an interrupted write (a temp file, an unlisted key) do not stop the start.
#[test]
fn interrupted_write_leftovers_are_cleaned() {
    let root = tmp();
    let (a, key) = prepared(root.path());
    let tmpfile = a.keys_dir.join(".tmp-keys.json-0123456789abcdef");
    std::fs::write(&tmpfile, b"{\"format\":1,\"ke").expect("write");
    let orphan = a.keys_dir.join("orphan.pk8.pem");
    std::fs::copy(&key, &orphan).expect("copy");
    let mut a = Sidecar::start_with(root.path(), "payments", &a.config)
        .unwrap_or_else(|o| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    assert!(!tmpfile.exists() && !orphan.exists(), "leftovers removed");
    assert!(key.exists(), "real key kept");
    a.stop();
}

/// A start that must fail with exit 64 and a message naming `path` and `expect`.
fn refused(root: &std::path::Path, cfg: &std::path::Path, path: &std::path::Path, expect: &str) {
    let err = Sidecar::start_with(root, "payments", cfg)
        .err()
        .expect("start must fail");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(64), "{stderr}");
    let named = format!("{} (", path.display());
    assert!(stderr.contains(&named), "names {named:?}: {stderr}");
    assert!(stderr.contains(expect), "says {expect:?}: {stderr}");
}

/// A keys directory (or manifest) others could write to is refused, whatever
/// the key files' own modes; a sticky world-writable parent (like /tmp) is
/// accepted, a plain world-writable one is not.
#[test]
fn writable_keys_dir_or_parent_refused() {
    let root = tmp();
    let (a, key) = prepared(root.path());
    chmod(&a.keys_dir, 0o770);
    refused(
        root.path(),
        &a.config,
        &a.keys_dir,
        "(keys directory) has mode 0770: writable by group or others, so another user could plant or swap keys",
    );
    chmod(&a.keys_dir, 0o700);
    let manifest = a.keys_dir.join("keys.json");
    chmod(&manifest, 0o666);
    refused(
        root.path(),
        &a.config,
        &manifest,
        "(key manifest) has mode 0666: writable by group or others",
    );
    chmod(&manifest, 0o600);
    chmod(&a.dir, 0o777);
    refused(
        root.path(),
        &a.config,
        &a.dir,
        &format!(
            "(a directory above keys directory {}) has mode 0777: writable by group or others and not sticky",
            a.keys_dir.display()
        ),
    );
    chmod(&a.dir, 0o1777);
    let mut a = Sidecar::start_with(root.path(), "payments", &a.config)
        .unwrap_or_else(|o| panic!("sticky parent: {}", String::from_utf8_lossy(&o.stderr)));
    assert!(key.exists());
    a.stop();
    chmod(&a.dir, 0o755);
}

/// A key file (or the keys directory) owned by a uid that is neither root nor
/// the daemon's is refused: someone else planted it. Needs root to chown (CI
/// runs as root); skipped with a note otherwise.
#[test]
fn key_file_owned_by_another_uid_refused() {
    if !is_root() {
        eprintln!("key_file_owned_by_another_uid_refused: skipped, needs root to chown");
        return;
    }
    let root = tmp();
    let (a, key) = prepared(root.path());
    std::os::unix::fs::chown(&key, Some(1234), None).expect("chown");
    refused(
        root.path(),
        &a.config,
        &key,
        "(key file) is owned by uid 1234, neither root nor the daemon's uid 0; refusing to trust it",
    );
    std::os::unix::fs::chown(&key, Some(0), None).expect("chown");
    std::os::unix::fs::chown(&a.keys_dir, Some(1234), None).expect("chown");
    refused(
        root.path(),
        &a.config,
        &a.keys_dir,
        "(keys directory) is owned by uid 1234",
    );
}

/// `[peer_api]` files: a group-readable private key and a group-writable
/// certificate directory are refused; the Kubernetes secret-volume layout
/// (files behind `..data` symlinks in a sticky volume root) is accepted.
#[test]
fn peer_api_files_checked() {
    let root = tmp();
    ca_init(root.path());
    let peer = ca_issue(&root.path().join("ca"), root.path(), "payments");
    let cfg = write_config(root.path(), "payments", &peer_config(0, &[], ""));
    let key = peer.join("key.pem");
    chmod(&key, 0o640);
    let err = Sidecar::start_with(root.path(), "payments", &cfg)
        .err()
        .expect("group-readable key");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "peer_api.key: key file {} has mode 0640: private keys must not be accessible",
            key.display()
        )),
        "{stderr}"
    );
    chmod(&key, 0o600);
    chmod(&peer, 0o775);
    refused(
        root.path(),
        &cfg,
        &peer,
        "(the directory of peer_api.cert) has mode 0775: writable by group or others",
    );
    chmod(&peer, 0o700);

    // Kubernetes: vol/{key,cert}.pem -> ..data/… -> ..2024_01_01/…, vol sticky 1777.
    let vol = root.path().join("payments/secret");
    let ts = vol.join("..2024_01_01_00_00_00.1");
    std::fs::create_dir_all(&ts).expect("mkdir");
    for f in ["key.pem", "cert.pem"] {
        std::fs::copy(peer.join(f), ts.join(f)).expect("copy");
        std::os::unix::fs::symlink(format!("..data/{f}"), vol.join(f)).expect("link");
    }
    chmod(&ts.join("key.pem"), 0o400);
    chmod(&ts.join("cert.pem"), 0o644);
    chmod(&ts, 0o755);
    std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", vol.join("..data")).expect("link");
    chmod(&vol, 0o1777);
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace("peer/cert.pem", "secret/cert.pem")
        .replace("peer/key.pem", "secret/key.pem");
    std::fs::write(&cfg, text).expect("config");
    let mut a = Sidecar::start_with(root.path(), "payments", &cfg)
        .unwrap_or_else(|o| panic!("k8s layout: {}", String::from_utf8_lossy(&o.stderr)));
    a.stop();
}

/// Whether the tests run as root (CI does): only root can chown a file to another uid.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
