//! The CLI contract: help everywhere, stdin tokens, decode marked UNVERIFIED,
//! `rejected: <reason>: <detail>` with exit 1, usage errors exit 64.

use crate::support::*;

/// Every subcommand prints --help and exits 0.
#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["mint", "--help"],
        vec!["verify", "--help"],
        vec!["exchange", "--help"],
        vec!["keys", "--help"],
        vec!["keys", "list", "--help"],
        vec!["keys", "rotate", "--help"],
        vec!["keys", "revoke", "--help"],
        vec!["jwks", "--help"],
        vec!["decode", "--help"],
        vec!["health", "--help"],
        vec!["audit", "verify", "--help"],
    ] {
        let out = std::process::Command::new(bin())
            .args(&args)
            .output()
            .expect("run");
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
    let out = std::process::Command::new(bin())
        .args(["mint", "--ttl", "soon"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "usage error exits 64");
}

/// `verify -` reads stdin; a rejection prints `rejected: <reason>: <detail>` and exits 1.
#[tokio::test]
async fn verify_stdin_and_rejection_line() {
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    let token = a.mint("payments").await.token;
    let out = a.cli_stdin(&["verify", "-"], Some(&format!("{token}\n")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(claims["sub"], id("payments"));

    let out = a.cli_stdin(&["verify", "--audience", "ledger", "-"], Some(&token));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("rejected: wrong_audience: "), "{stderr}");
    assert!(out.stdout.is_empty());

    let out = a.cli(&["verify", "not.a.token"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("rejected: malformed: "));
}

/// decode shows header and claims and says UNVERIFIED; it needs no daemon.
#[tokio::test]
async fn decode_is_marked_unverified() {
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    let m = a.mint("ledger").await;
    let out = std::process::Command::new(bin())
        .args(["decode", &m.token])
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNVERIFIED"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["unverified"], true);
    assert_eq!(v["header"]["kid"], m.kid.as_str());
    assert_eq!(v["claims"]["aud"], id("ledger"));
}

/// A client pointed at a dead socket gets a clear error naming it, exit 1.
#[test]
fn dead_socket_is_named() {
    let root = tmp();
    let sock = root.path().join("nobody.sock");
    let out = std::process::Command::new(bin())
        .args(["mint", "--audience", "x", "--socket"])
        .arg(&sock)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody.sock"));
}

/// `tokend demo` runs a bank in one process: a token accepted, two forgeries
/// refused with their reasons, a rotation with every call accepted; exit 0.
#[test]
fn demo_shows_acceptance_refusal_and_rotation() {
    let out = run_to_exit(
        std::process::Command::new(bin())
            .arg("demo")
            .env("TOKEND_LOG", "warn"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ledger ACCEPTS: iss spiffe://bank.internal/payments"),
        "{stdout}"
    );
    assert!(
        stdout.contains("with archive's kid: ledger REFUSES (unknown_kid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("with payments' kid: ledger REFUSES (bad_signature"),
        "{stdout}"
    );
    assert!(
        stdout.contains("all accepted; now signing with"),
        "{stdout}"
    );
}

/// A reader that goes away (`tokend verify T | head -1`) ends the output,
/// not the process with a panic: stdout is a pipe whose read end is closed
/// before the command writes; it exits 0 and says nothing of a panic.
#[tokio::test]
async fn a_closed_stdout_is_no_panic() {
    use std::process::{Command, Stdio};
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    let token = a.mint("payments").await.token;
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(bin())
        .args(["verify", &token])
        .env("TOKEND_SOCKET", &a.socket)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}
