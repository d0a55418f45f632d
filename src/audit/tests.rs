//! The writer end to end on a temp dir: records chain across rotation and
//! restarts, a torn tail is left as evidence, drops leave a gap record.

use std::sync::Arc;

use super::*;
use crate::time::{ManualClock, UnixTime};

fn clock() -> SharedClock {
    Arc::new(ManualClock::at(UnixTime::from_secs(1_700_000_000)))
}

fn config(dir: &std::path::Path, max_bytes: u64, keep: usize) -> AuditConfig {
    AuditConfig {
        file: Some(dir.join("audit.log")),
        max_bytes,
        keep,
    }
}

fn write(config: &AuditConfig, n: usize) {
    let (audit, writer) = start(config, clock()).expect("start");
    for i in 0..n {
        let mut e = Event::new(
            "verify",
            Caller {
                uid: Some(1000),
                pid: Some(7),
            },
        );
        e.refused("bad_signature", &format!("try {i}"));
        audit.record(e);
    }
    drop(audit);
    writer.finish();
}

fn files(dir: &std::path::Path, keep: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..=keep)
        .rev()
        .map(|n| dir.join(format!("audit.log.{n}")))
        .filter(|p| p.exists())
        .collect();
    v.push(dir.join("audit.log"));
    v
}

/// Records chain across rotations and a restart; at most `keep` rotated
/// files stay; the file is 0600.
#[test]
fn chains_across_rotation_and_restart() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path(), 1024, 2);
    write(&cfg, 5);
    write(&cfg, 5);
    let all = files(dir.path(), 5);
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(!dir.path().join("audit.log.3").exists());
    let ok = verify_files(&all).expect("one chain");
    assert_eq!(ok.seqs.1, 10, "{ok:?}");
    let mode = std::fs::metadata(dir.path().join("audit.log"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(dir.path().join("audit.log")).expect("read");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("line")).expect("json");
    assert_eq!(last["event"], "verify");
    assert_eq!(last["reason"], "bad_signature");
    assert_eq!(last["caller"]["uid"], 1000);
    assert_eq!(last["time"], "2023-11-14T22:13:20Z");
}

/// A torn last line (a crash mid-write) stays, the chain resumes after it,
/// and verify names it.
#[test]
fn torn_tail_is_kept_and_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path(), 1 << 20, 2);
    write(&cfg, 2);
    let path = dir.path().join("audit.log");
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str(r#"{"seq":3,"time":"#);
    std::fs::write(&path, &text).expect("tear");
    write(&cfg, 1);
    let e = verify_files(std::slice::from_ref(&path)).expect_err("torn");
    assert_eq!(e.line, 3, "{e}");
    let text = std::fs::read_to_string(&path).expect("read");
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("line")).expect("json");
    assert_eq!(
        last["seq"], 3,
        "the chain resumed from the last whole record"
    );
}

/// When the queue is full, records are dropped and a gap record with the
/// count takes their place in the chain.
#[test]
fn drops_leave_a_gap_record() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path(), 1 << 30, 1);
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let dropped = Arc::new(AtomicU64::new(0));
    let audit = Audit {
        tx: Some(tx),
        dropped: dropped.clone(),
        clock: clock(),
    };
    for _ in 0..5 {
        audit.record(Event::new("mint", Caller::default()));
    }
    assert_eq!(dropped.load(Ordering::Relaxed), 3);
    drop(audit);
    let sink = FileSink {
        path: cfg.file.clone().expect("file"),
        max_bytes: cfg.max_bytes,
        keep: cfg.keep,
    };
    let (file, head) = Rotating::open(sink).expect("open");
    let writer = Writer {
        sink: Sink::File(file),
        head,
        dropped,
        clock: clock(),
    };
    writer.run(rx);
    let path = dir.path().join("audit.log");
    let text = std::fs::read_to_string(&path).expect("read");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["event"], "gap");
    assert_eq!(events[2]["outcome"], "dropped");
    assert_eq!(events[2]["dropped"], 3);
    assert!(verify_files(&[path]).is_ok());
}

/// What a refused token claimed is kept, bounded; the token itself never is.
#[test]
fn claimed_fields_without_the_token() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let token = format!(
        "{}.{}.c2ln",
        b64.encode(r#"{"alg":"RS256","kid":"k1"}"#),
        b64.encode(format!(
            r#"{{"iss":"spiffe://td/a","sub":"{}","jti":"j"}}"#,
            "x".repeat(1000)
        ))
    );
    let mut e = Event::new("verify", Caller::default());
    e.claimed(&token);
    e.refused("bad_signature", "signature does not verify");
    assert!(e.kid.is_none(), "read only when recorded");
    e.read_claims();
    assert_eq!(e.kid.as_deref(), Some("k1"));
    assert_eq!(e.iss.as_deref(), Some("spiffe://td/a"));
    assert!(
        e.sub
            .as_deref()
            .is_some_and(|s| s.chars().count() == MAX_DETAIL + 1)
    );
    let line = serde_json::to_string(&e).expect("json");
    assert!(!line.contains(&token) && !line.contains("c2ln"), "{line}");
    let mut garbage = Event::new("verify", Caller::default());
    garbage.claimed("%%%.###");
    garbage.read_claims();
    assert!(garbage.iss.is_none() && garbage.kid.is_none());
}

/// With no file and no log subscriber listening on target `audit`, the
/// trail is off: no writer thread, and recording is a no-op.
#[test]
fn off_when_nobody_listens() {
    let (audit, writer) = start(&AuditConfig::default(), clock()).expect("start");
    assert!(audit.tx.is_none() && writer.thread.is_none());
    audit.record(Event::new("mint", Caller::default()));
    writer.finish();
}
