//! Bad configuration: each kind stops the start with exit 64 and names the problem.

use crate::support::*;

fn start_fails(extra: &str, expect: &[&str]) {
    let root = tmp();
    let cfg = write_config(root.path(), "payments", extra);
    let err = Sidecar::start_with(root.path(), "payments", &cfg)
        .err()
        .expect("must fail");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(64), "{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
    }
}

/// A misspelt key is named.
#[test]
fn unknown_key() {
    start_fails("[tokens]\nmax_tll = \"1h\"", &["max_tll", "tokend.toml"]);
}

/// A bad duration is named with its text.
#[test]
fn bad_duration() {
    start_fails(
        "[tokens]\ndefault_ttl = \"five minutes\"",
        &["five minutes", "default_ttl"],
    );
}

/// A JWKS file that does not exist is named.
#[test]
fn missing_jwks_file() {
    start_fails(
        "[[peers]]\nname = \"archive\"\njwks_file = \"nowhere.json\"",
        &["nowhere.json", "archive"],
    );
}

/// A JWKS file holding a short key is refused with the reason.
#[test]
fn jwks_file_with_short_key() {
    let root = tmp();
    let jwks = serde_json::json!({"keys": [{"kty": "RSA", "n": "AQAB".repeat(40), "e": "AQAB"}]});
    std::fs::write(root.path().join("short.json"), jwks.to_string()).expect("write");
    let cfg = write_config(
        root.path(),
        "payments",
        "[[peers]]\nname = \"archive\"\njwks_file = \"../short.json\"",
    );
    let err = Sidecar::start_with(root.path(), "payments", &cfg)
        .err()
        .expect("must fail");
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("short.json") && stderr.contains("bits"),
        "{stderr}"
    );
}

/// An unreadable (absent) config file is named.
#[test]
fn missing_config_file() {
    let out = std::process::Command::new(bin())
        .args(["serve", "--config", "/nonexistent/tokend.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tokend.toml"));
}

/// TOML syntax errors point at the line.
#[test]
fn syntax_error() {
    start_fails("[tokens\nmax_ttl = 1", &["tokend.toml", "line"]);
}

/// Values that parse but make no sense are refused by key.
#[test]
fn inconsistent_values() {
    start_fails(
        "[tokens]\ndefault_ttl = \"2h\"\nmax_ttl = \"1h\"",
        &["tokens.default_ttl"],
    );
    start_fails(
        "[rotation]\ninterval = \"1m\"\npublish_ahead = \"5m\"",
        &["rotation.publish_ahead"],
    );
}

/// A `[limits]` value out of range stops the start, naming the key and range.
#[test]
fn limits_out_of_range() {
    start_fails(
        "[limits]\nmax_request_bytes = 100",
        &["limits.max_request_bytes", "between"],
    );
    start_fails(
        "[limits]\nidle_timeout = \"forever\"",
        &["forever", "idle_timeout"],
    );
}
