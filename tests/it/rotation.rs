//! Rotation and revocation across real sidecars: no failed call across
//! rotations, propagation over the watch stream, revocation at once, admin
//! permissions, and SIGKILL at random moments never losing a live key.

use std::time::Instant;

use tokend::pb::tokend as pb;

use crate::support::*;

/// Short timings: a new key every 2 s, published 1 s ahead, tokens live 3 s.
const FAST: &str = "[tokens]\ndefault_ttl = \"3s\"\nmax_ttl = \"3s\"\nclock_skew = \"1s\"\n\
                    [rotation]\ninterval = \"2s\"\npublish_ahead = \"1s\"\n";

/// Rotation on demand only (every hour), new keys sign 1 s after publication.
const MANUAL: &str = "[rotation]\ninterval = \"1h\"\npublish_ahead = \"1s\"\n";

fn pair(root: &std::path::Path, config: &str) -> (Sidecar, Sidecar) {
    ca_init(root);
    let a = Sidecar::start_peer(root, "payments", &[], config);
    let b = Sidecar::start_peer(root, "ledger", &[("payments", a.peer_addr())], config);
    (a, b)
}

fn kids_listed(s: &Sidecar) -> Vec<(String, String)> {
    let out = s.cli(&["keys", "list"]);
    assert!(
        out.status.success(),
        "keys list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

/// A loop mints at A and verifies at B across at least five rotations: every
/// verification succeeds, the kids change, and retired keys leave `keys list`
/// once their last token has expired.
#[tokio::test]
async fn no_failed_call_across_five_rotations() {
    let root = tmp();
    let (a, b) = pair(root.path(), FAST);
    let mut mint = a.tokens().await;
    let mut verify = b.tokens().await;
    let mut kids: Vec<String> = Vec::new();
    let (mut calls, deadline) = (0u32, Instant::now() + std::time::Duration::from_secs(60));
    while kids.len() < 6 {
        assert!(Instant::now() < deadline, "only {} kids in 60s", kids.len());
        let req = pb::MintRequest {
            audience: "ledger".into(),
            claims_json: format!("{{\"n\":{calls}}}"),
            ..Default::default()
        };
        let m = mint.mint(req).await.expect("mint").into_inner();
        let v = verify
            .verify(pb::VerifyRequest {
                token: m.token,
                audience: String::new(),
            })
            .await;
        let v = v
            .unwrap_or_else(|s| panic!("call {calls} with kid {} failed: {s:?}", m.kid))
            .into_inner();
        assert_eq!(v.kid, m.kid);
        if kids.last() != Some(&m.kid) {
            assert!(!kids.contains(&m.kid), "a retired key never signs again");
            kids.push(m.kid);
        }
        calls += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eprintln!("{calls} calls, {} signing keys, no failure", kids.len());
    assert!(calls > 100);
    // grace = max_ttl 3 s + skew 1 s after retirement: the first key must be gone by now.
    let listed = kids_listed(&a);
    assert!(
        !listed.iter().any(|(k, _)| k == &kids[0]),
        "first key deleted: {listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|(k, s)| k == kids.last().expect("kid") && s == "active"),
        "{listed:?}"
    );
    assert!(
        listed.len() <= 5,
        "only keys inside their window are kept: {listed:?}"
    );
    let on_disk = std::fs::read_dir(&a.keys_dir).expect("dir").filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".pk8.pem"))
    });
    assert_eq!(
        on_disk.count(),
        listed.len(),
        "deleted keys are gone from disk too"
    );
}

/// `keys rotate` publishes a new key that reaches B over the watch stream
/// (B sees no token naming it, so no refresh can be involved). Prints the latency.
#[tokio::test]
async fn rotation_reaches_peers_over_the_watch_stream() {
    let root = tmp();
    let (a, b) = pair(root.path(), MANUAL);
    let mut admin = a.admin().await;
    let mut b_admin = b.admin().await;
    assert!(eventually(10, || async { !b.kids_of("payments").is_empty() }).await);
    let mut samples = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let kid = admin
            .rotate_key(pb::RotateKeyRequest {})
            .await
            .expect("rotate")
            .into_inner()
            .key
            .expect("key")
            .kid;
        let generated = started.elapsed();
        let seen = loop {
            let all = b_admin
                .get_jwks(pb::GetJwksRequest { all: true })
                .await
                .expect("jwks")
                .into_inner();
            if all
                .issuers
                .iter()
                .any(|i| i.issuer == id("payments") && i.jwks_json.contains(&kid))
            {
                break started.elapsed();
            }
            assert!(started.elapsed().as_secs() < 10, "new kid never reached B");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        };
        samples.push((generated, seen - generated));
        // Next rotation only once this one is active (rotate returns the pending key otherwise).
        assert!(
            eventually(15, || async {
                kids_listed(&a)
                    .iter()
                    .any(|(k, s)| k == &kid && s == "active")
            })
            .await
        );
    }
    for (g, p) in &samples {
        eprintln!("rotation: key generated in {g:?}; at B {p:?} after publication");
    }
}

/// Revocation: B refuses the revoked kid's tokens as `revoked_key` at once
/// (pushed), A signs with a fresh key, and the CLI names mistakes.
#[tokio::test]
async fn revocation_is_pushed_and_a_fresh_key_signs() {
    let root = tmp();
    let (a, b) = pair(root.path(), MANUAL);
    let m = a.mint("ledger").await;
    assert!(b.verify(&m.token).await.is_ok());

    let started = Instant::now();
    let r = a
        .admin()
        .await
        .revoke_key(pb::RevokeKeyRequest { kid: m.kid.clone() })
        .await
        .expect("revoke")
        .into_inner();
    let committed = started.elapsed();
    assert_ne!(r.active_kid, m.kid);
    let mut verify = b.tokens().await;
    let revoked_in = loop {
        let req = pb::VerifyRequest {
            token: m.token.clone(),
            audience: String::new(),
        };
        let refused = verify.verify(req).await.err();
        if refused.as_ref().and_then(tokend::reason_of) == Some(tokend::Reason::RevokedKey) {
            break started.elapsed() - committed;
        }
        assert!(
            started.elapsed().as_secs() < 10,
            "B never learnt the revocation"
        );
    };
    eprintln!(
        "revocation: committed at A in {committed:?} (successor from the standby key); refused at B {revoked_in:?} later"
    );
    assert_eq!(
        a.verify(&a.mint("payments").await.token)
            .await
            .map(|v| v.kid == m.kid)
            .ok(),
        Some(false)
    );
    let fresh = a.mint("ledger").await;
    assert_ne!(fresh.kid, m.kid);
    assert!(b.verify(&fresh.token).await.is_ok(), "fresh key accepted");
    assert!(kids_listed(&a).contains(&(m.kid.clone(), "revoked".into())));
    assert!(!a.jwks().contains(&m.kid), "revoked key unpublished");

    let out = a.cli(&["keys", "revoke", &m.kid]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already revoked"));
    let out = a.cli(&["keys", "revoke", &fresh.kid]);
    assert!(
        out.status.success(),
        "the CLI revokes too: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("revoked {}", fresh.kid)));
    let out = a.cli(&["keys", "revoke", "no-such-kid"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key"));

    // Revoked state survives a restart of both sides.
    let mut a = a;
    a.restart();
    assert!(kids_listed(&a).contains(&(m.kid.clone(), "revoked".into())));
}

/// Only the uids in admin_uids may rotate, revoke or list keys.
#[tokio::test]
async fn admin_calls_need_an_allowed_uid() {
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "admin_uids = [4242424]");
    for args in [
        vec!["keys", "rotate"],
        vec!["keys", "list"],
        vec!["keys", "revoke", "x"],
    ] {
        let out = a.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("refused: permission_denied"),
            "{args:?}"
        );
    }
    assert!(
        a.cli(&["jwks"]).status.success(),
        "public keys stay readable"
    );
}

/// SIGKILL at random moments of rotations, 20 times: A always restarts, and
/// every token minted before each kill verifies at B until it expires.
#[tokio::test]
async fn sigkill_during_rotation_never_loses_a_live_key() {
    const CRASH: &str = "[tokens]\ndefault_ttl = \"10s\"\nmax_ttl = \"10s\"\nclock_skew = \"1s\"\n\
                         [rotation]\ninterval = \"2s\"\npublish_ahead = \"1s\"\n";
    let root = tmp();
    let (mut a, b) = pair(root.path(), CRASH);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("t")
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut tokens: Vec<(String, String, i64)> = Vec::new();
    let (mut verified, mut kids) = (0, std::collections::HashSet::new());
    for round in 0..20 {
        let mut mint = a.tokens().await;
        let mut admin = a.admin().await;
        let until = Instant::now() + std::time::Duration::from_millis(200 + rnd(1300));
        let mut n = 0;
        while Instant::now() < until {
            if rnd(6) == 0 {
                // An on-demand rotation in flight when the kill lands, some of the time.
                let mut adm = admin.clone();
                tokio::spawn(async move { adm.rotate_key(pb::RotateKeyRequest {}).await });
            }
            let req = pb::MintRequest {
                audience: "ledger".into(),
                claims_json: format!("{{\"r\":{round},\"n\":{n}}}"),
                ..Default::default()
            };
            let m = mint.mint(req).await.expect("mint").into_inner();
            kids.insert(m.kid.clone());
            tokens.push((m.token, m.kid, m.expires_at));
            n += 1;
            tokio::time::sleep(std::time::Duration::from_millis(rnd(60))).await;
        }
        let _ = admin.list_keys(pb::ListKeysRequest {}).await;
        a.kill9();
        a.restart();
        let now = now();
        for (token, kid, exp) in &tokens {
            if *exp > now + 1 {
                let r = b.verify(token).await;
                assert!(
                    r.is_ok(),
                    "round {round}: token of kid {kid} (exp {exp}, now {now}) refused: {r:?}\n{}",
                    a.stderr()
                );
                verified += 1;
            }
        }
        tokens.retain(|(_, _, exp)| *exp > now);
    }
    eprintln!(
        "20 kills: {verified} verifications of pre-kill tokens, {} signing keys",
        kids.len()
    );
    assert!(kids.len() >= 3, "rotations happened between kills");
    // The directory is consistent after the last kill: no temp files, every key file named.
    let listed = kids_listed(&a);
    for e in std::fs::read_dir(&a.keys_dir)
        .expect("dir")
        .filter_map(Result::ok)
    {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".tmp-"), "leftover {name}");
        if let Some(kid) = name.strip_suffix(".pk8.pem") {
            assert!(
                listed.iter().any(|(k, _)| k == kid),
                "unlisted key file {name}"
            );
        }
    }
}
