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
