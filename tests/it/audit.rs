//! The audit trail end to end: a refused Verify leaves exactly one record
//! naming its reason and the caller's uid and pid; mints and admin actions
//! are recorded; the token never is; `tokend audit verify` passes the
//! chain, names an edited record's line, and reports a truncated last line.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use tokend::pb::tokend as pb;

use crate::inproc::Bank;
use crate::support::*;

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

fn audit_verify(files: &[&std::path::Path]) -> std::process::Output {
    run_to_exit(Command::new(bin()).args(["audit", "verify"]).args(files))
}

/// A refused Verify produces exactly one record with its reason, the
/// caller's uid and pid and what the token claimed, never the token; the
/// chain verifies, an edit is named by line, a cut last line is reported.
#[tokio::test]
async fn refused_verify_is_audited_once_and_the_chain_shows_edits() {
    let bank = Bank::new();
    let path = bank.root().join("trail").join("audit.log");
    let a = bank
        .start(bank.lean("payments").config(&format!(
            "[audit]\nfile = {:?}",
            path.to_str().expect("utf8")
        )))
        .await;
    let m = a.mint("payments").await;
    assert!(a.verify(&m.token).await.is_ok(), "accepted: not audited");
    let mut c = payload(&m.token);
    c["role"] = "admin".into();
    let tampered = with_payload(&m.token, &c);
    assert_eq!(
        a.verify(&tampered).await.err().as_deref(),
        Some("bad_signature")
    );
    a.rotate().await;
    assert!(
        eventually(10, || async { records(&path).len() >= 3 }).await,
        "records: {:?}",
        records(&path)
    );
    let all = records(&path);
    let my_uid = std::fs::metadata(bank.root()).expect("meta").uid();
    let refused: Vec<&serde_json::Value> = all.iter().filter(|r| r["event"] == "verify").collect();
    assert_eq!(refused.len(), 1, "{all:?}");
    let r = refused[0];
    assert_eq!(r["outcome"], "refused");
    assert_eq!(r["reason"], "bad_signature");
    assert_eq!(r["caller"]["uid"], my_uid);
    assert_eq!(r["caller"]["pid"], std::process::id());
    assert_eq!(r["iss"], id("payments"));
    assert_eq!(r["aud"], id("payments"), "the audience it was verified for");
    assert_eq!(r["kid"], m.kid.as_str());
    assert_eq!(r["jti"], m.jti.as_str());
    assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let mint = all
        .iter()
        .find(|r| r["event"] == "mint")
        .expect("mint record");
    assert_eq!(
        (
            mint["outcome"].as_str(),
            mint["jti"].as_str(),
            mint["aud"].as_str()
        ),
        (
            Some("ok"),
            Some(m.jti.as_str()),
            Some(id("payments").as_str())
        )
    );
    let rotate = all
        .iter()
        .find(|r| r["event"] == "rotate_key")
        .expect("rotate record");
    assert_eq!(rotate["outcome"], "ok");
    assert!(rotate["kid"].is_string());
    let text = std::fs::read_to_string(&path).expect("read");
    let signature = m.token.rsplit('.').next().expect("sig");
    assert!(!text.contains(signature) && !text.contains(&tampered));
    let mode = std::fs::metadata(&path).expect("meta").mode() & 0o777;
    assert_eq!(mode, 0o600);

    let out = audit_verify(&[&path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("ok: {} records", all.len()))
    );

    // An edited record breaks the chain at its own line.
    let line = text
        .lines()
        .position(|l| l.contains(r#""event":"verify""#))
        .expect("verify line")
        + 1;
    let edited = bank.root().join("edited.log");
    std::fs::write(&edited, text.replacen("bad_signature", "expired", 1)).expect("write");
    let out = audit_verify(&[&edited]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("edited.log:{line}: record seq")) && err.contains("changed"),
        "{err}"
    );

    // A truncated last line is reported as such, naming it.
    let cut = bank.root().join("cut.log");
    std::fs::write(&cut, &text[..text.len() - 20]).expect("write");
    let out = audit_verify(&[&cut]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = text.lines().count();
    assert!(
        err.contains(&format!("cut.log:{last}: truncated record")),
        "{err}"
    );
}

/// The operator's bans are admin actions like the others: Ban, Unban and
/// ListBans each leave one record naming the ban (as the store keeps it),
/// a refused Ban leaves one with its reason, and the chain verifies.
#[tokio::test]
async fn bans_are_audited() {
    let bank = Bank::new();
    let path = bank.root().join("trail").join("audit.log");
    let a = bank
        .start(bank.lean("payments").config(&format!(
            "[audit]\nfile = {:?}",
            path.to_str().expect("utf8")
        )))
        .await;
    let mut admin = a.admin().await;
    let ban = admin
        .ban(pb::BanRequest {
            kind: "spiffe_id".into(),
            value: "ledger".into(),
            reason: "incident 42".into(),
        })
        .await
        .expect("ban")
        .into_inner();
    assert_eq!(ban.ban.expect("ban").value, id("ledger"));
    let bad = admin
        .ban(pb::BanRequest {
            kind: "color".into(),
            value: "red".into(),
            reason: String::new(),
        })
        .await
        .expect_err("unknown kind");
    assert_eq!(tokend::reason_of(&bad), Some(tokend::Reason::Malformed));
    admin.list_bans(pb::ListBansRequest {}).await.expect("list");
    let lifted = admin
        .unban(pb::UnbanRequest {
            kind: "spiffe_id".into(),
            value: "ledger".into(),
        })
        .await
        .expect("unban")
        .into_inner();
    assert!(lifted.removed);
    assert!(
        eventually(10, || async { records(&path).len() >= 4 }).await,
        "records: {:?}",
        records(&path)
    );
    let all = records(&path);
    let of = |event: &str| -> Vec<&serde_json::Value> {
        all.iter().filter(|r| r["event"] == event).collect()
    };
    let bans = of("ban");
    assert_eq!(bans.len(), 2, "{all:?}");
    assert_eq!(bans[0]["outcome"], "ok");
    assert_eq!(bans[0]["ban"], format!("spiffe_id {}", id("ledger")));
    assert_eq!(bans[1]["outcome"], "refused");
    assert_eq!(bans[1]["reason"], "malformed");
    assert_eq!(bans[1]["ban"], "color red");
    let unbans = of("unban");
    assert_eq!(unbans.len(), 1, "{all:?}");
    assert_eq!(unbans[0]["outcome"], "ok");
    assert_eq!(unbans[0]["ban"], "spiffe_id ledger");
    assert_eq!(of("list_bans").len(), 1, "{all:?}");
    let out = audit_verify(&[&path]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Without `[audit] file`, records go to the log on target `audit`, one
/// JSON line each (a real process, so its stderr shows them).
#[tokio::test]
async fn without_a_file_records_go_to_the_log() {
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    assert_eq!(a.verify("abc").await.err().as_deref(), Some("malformed"));
    assert!(
        eventually(10, || async {
            a.stderr()
                .lines()
                .any(|l| l.contains("audit") && l.contains(r#""reason":"malformed""#))
        })
        .await,
        "{}",
        a.stderr()
    );
}
