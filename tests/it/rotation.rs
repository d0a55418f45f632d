//! Rotation and revocation across sidecars: no failed call across
//! rotations, propagation over the watch stream, revocation at once, admin
//! permissions (in-process, on the bank's clock: tests step through hours of
//! rotations in moments), and SIGKILL at random moments never losing a live
//! key (a real process: only a process can be killed).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokend::pb::tokend as pb;
use tonic::transport::Channel;

use crate::inproc::{Bank, Node};
use crate::support::*;

/// A new key every hour, published ten minutes ahead; tokens live five
/// minutes, with 30 s of skew: a retired key is kept 330 s.
const HOURLY: &str = "[tokens]\ndefault_ttl = \"5m\"\nmax_ttl = \"5m\"\nclock_skew = \"30s\"\n\
                      [rotation]\ninterval = \"1h\"\npublish_ahead = \"10m\"\n";
const INTERVAL: i64 = 3600;
const AHEAD: i64 = 600;
const GRACE: i64 = 300 + 30;

/// Lifetime of A's key-set documents here: the walk steps the clock by up
/// to `STEP` at a time, faster than a re-signed document crosses the
/// stream under load; an hour (the longest allowed) keeps a stepped clock
/// from outrunning A's document, which this test is not about (the
/// replicas and directory tests cover document expiry).
const DOCUMENT_LIFETIME: &str = "1h";

/// A (payments) and B (ledger, trusting A), in-process on the bank's clock;
/// returns once B holds A's first key set.
async fn pair(bank: &Bank) -> (Node, Node) {
    let a = bank
        .start(
            bank.peer("payments")
                .config(HOURLY)
                .document_lifetime(DOCUMENT_LIFETIME),
        )
        .await;
    let b = bank
        .start(
            bank.peer("ledger")
                .peer("payments", a.peer_addr())
                .config(HOURLY),
        )
        .await;
    assert!(
        eventually(5, || async { !b.kids_of("payments").await.is_empty() }).await,
        "B never got A's keys over the watch stream"
    );
    (a, b)
}

fn state<'k>(keys: &'k [pb::KeyInfo], kid: &str) -> Option<&'k str> {
    keys.iter().find(|k| k.kid == kid).map(|k| k.state.as_str())
}

/// The pending ("next") key, once A lists one (within 10 s: a keygen).
async fn pending_key(a: &Node) -> Option<pb::KeyInfo> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(k) = a.keys().await.into_iter().find(|k| k.state == "next") {
            return Some(k);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

fn key_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".pk8.pem"))
        })
        .count()
}

/// Mints at A and verifies at B while the test walks the bank's clock; the
/// clock never moves between a concurrent caller's mint and its verify
/// (`steady`), so every refusal is a failure.
struct Walk<'a> {
    bank: &'a Bank,
    mint: pb::token_service_client::TokenServiceClient<Channel>,
    verify: pb::token_service_client::TokenServiceClient<Channel>,
    steady: Arc<tokio::sync::RwLock<()>>,
    calls: u32,
    kids: Vec<String>,
}

/// Longest single clock step: shorter than a token's life, so a token
/// minted before a step still verifies after it.
const STEP: i64 = 240;

async fn mint_verify(
    mint: &mut pb::token_service_client::TokenServiceClient<Channel>,
    verify: &mut pb::token_service_client::TokenServiceClient<Channel>,
    n: u32,
) -> pb::MintResponse {
    let m = mint
        .mint(pb::MintRequest {
            audience: "ledger".into(),
            claims_json: format!("{{\"n\":{n}}}"),
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner();
    check(verify, &m, n).await;
    m
}

async fn check(
    verify: &mut pb::token_service_client::TokenServiceClient<Channel>,
    m: &pb::MintResponse,
    n: u32,
) {
    let v = verify
        .verify(pb::VerifyRequest {
            token: m.token.clone(),
            audience: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("call {n} with kid {} failed: {s:?}", m.kid))
        .into_inner();
    assert_eq!(v.kid, m.kid);
}

fn track(kids: &mut Vec<String>, kid: &str) {
    if kids.last().map(String::as_str) != Some(kid) {
        assert!(
            !kids.iter().any(|k| k == kid),
            "a retired key never signs again"
        );
        kids.push(kid.to_owned());
    }
}

impl Walk<'_> {
    /// One call: mint at A, verify at B.
    async fn call(&mut self) -> pb::MintResponse {
        let m = mint_verify(&mut self.mint, &mut self.verify, self.calls).await;
        track(&mut self.kids, &m.kid);
        self.calls += 1;
        m
    }

    /// Walks the clock to `target` in steps of at most `STEP`; at each, a
    /// token minted before the step verifies after it, and a fresh call succeeds.
    async fn to(&mut self, target: i64) {
        while self.bank.now() < target {
            let before = self.call().await;
            let step = (target - self.bank.now()).min(STEP);
            {
                let _moving = self.steady.write().await;
                self.bank.advance(step as u64);
            }
            check(&mut self.verify, &before, self.calls).await;
            self.call().await;
        }
    }
}

/// A loop mints at A and verifies at B across five rotations (while another
/// caller hammers both): every verification succeeds, each successor is
/// generated when due, planned one interval after its predecessor, and held
/// by B before it signs; a token minted by the old key the second before the
/// switch verifies after it; and a retired key leaves `keys list` (and disk)
/// exactly when its last token can no longer verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failed_call_across_five_rotations() {
    let bank = Bank::new();
    let (a, b) = pair(&bank).await;
    let steady = Arc::new(tokio::sync::RwLock::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (mut mint, mut verify) = (a.tokens().await, b.tokens().await);
        let (steady, stop) = (steady.clone(), stop.clone());
        tokio::spawn(async move {
            // Numbered apart from the walk's calls: the same claims would
            // share the mint cache, and the walk would then get (and check
            // after a clock step) a token the hammer minted earlier.
            let (mut calls, mut kids) = (1_000_000u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                {
                    let _steady = steady.read().await;
                    let m = mint_verify(&mut mint, &mut verify, calls).await;
                    track(&mut kids, &m.kid);
                }
                calls += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (calls, kids)
        })
    };
    let mut walk = Walk {
        bank: &bank,
        mint: a.tokens().await,
        verify: b.tokens().await,
        steady,
        calls: 0,
        kids: Vec::new(),
    };
    let mut last_old = None;
    for rotation in 1..=5 {
        let keys = a.keys().await;
        let active = keys
            .iter()
            .find(|k| k.state == "active")
            .expect("an active key")
            .clone();
        let due = active.activates_at + INTERVAL - AHEAD - 1;
        walk.to(due - 1).await;
        assert!(
            a.keys().await.iter().all(|k| k.state != "next"),
            "rotation {rotation}: no successor before it is due"
        );
        walk.to(due).await;
        let next = pending_key(&a)
            .await
            .unwrap_or_else(|| panic!("rotation {rotation}: no successor generated when due"));
        assert_eq!(
            next.activates_at,
            active.activates_at + INTERVAL,
            "rotation {rotation}: planned one interval after its predecessor"
        );
        assert!(next.activates_at - next.created_at >= AHEAD, "{next:?}");
        let started = Instant::now();
        assert!(
            eventually(5, || async {
                b.kids_of("payments").await.contains(&next.kid)
            })
            .await,
            "rotation {rotation}: B never got the successor over the watch stream"
        );
        eprintln!(
            "rotation {rotation}: successor at B {:?} after it was listed",
            started.elapsed()
        );
        walk.to(next.activates_at - 1).await;
        let old = walk.call().await;
        assert_eq!(old.kid, active.kid, "the old key signs to the last second");
        walk.to(next.activates_at).await;
        let new = walk.call().await;
        assert_eq!(new.kid, next.kid, "the successor signs from its activation");
        assert!(
            b.verify(&old.token).await.is_ok(),
            "a retired key's token still verifies"
        );
        last_old = Some(old);
    }
    assert_eq!(walk.kids.len(), 6, "{:?}", walk.kids);

    // The last retired key is kept exactly as long as its last token can verify.
    let old = last_old.expect("a retired key");
    let keys = a.keys().await;
    let current = walk.kids.last().expect("kid").clone();
    assert_eq!(state(&keys, &current), Some("active"), "{keys:?}");
    assert_eq!(state(&keys, &old.kid), Some("retired"), "{keys:?}");
    assert_eq!(keys.len(), 2, "older keys deleted: {keys:?}");
    assert_eq!(
        key_files(&a.keys_dir()),
        2,
        "deleted keys are gone from disk too"
    );
    let retired = keys.iter().find(|k| k.kid == old.kid).expect("retired");
    assert_eq!(retired.deleted_after, retired.retires_at + GRACE);
    walk.to(retired.deleted_after - 1).await;
    assert!(
        b.verify(&old.token).await.is_ok(),
        "a second before deletion its last token (exp + skew) still verifies"
    );
    assert_eq!(state(&a.keys().await, &old.kid), Some("retired"));
    walk.to(retired.deleted_after).await;
    assert!(
        eventually(5, || async {
            state(&a.keys().await, &old.kid).is_none() && key_files(&a.keys_dir()) == 1
        })
        .await,
        "retired key deleted once its last token expired: {:?}",
        a.keys().await
    );
    assert!(
        eventually(5, || async {
            !b.kids_of("payments").await.contains(&old.kid)
        })
        .await,
        "the deletion reaches B"
    );
    assert_eq!(
        b.verify(&old.token).await.err().as_deref(),
        Some("unknown_kid")
    );

    stop.store(true, Ordering::Relaxed);
    let (hammered, seen) = hammer.await.expect("no call of the hammer failed");
    eprintln!(
        "{} walked calls, {hammered} concurrent calls, {} signing keys, no failure",
        walk.calls,
        walk.kids.len()
    );
    assert!(walk.calls + hammered > 100);
    assert!(seen.len() >= 2, "the hammer saw rotations: {seen:?}");
}

/// `keys rotate` publishes a new key that reaches B over the watch stream
/// before it signs (B sees no token naming it, so no refresh can be
/// involved), and it signs publish_ahead later. Prints the latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reaches_peers_over_the_watch_stream() {
    let bank = Bank::new();
    let (a, b) = pair(&bank).await;
    let mut samples = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let asked_at = bank.now();
        let kid = a.rotate().await;
        let generated = started.elapsed();
        let seen = loop {
            if b.kids_of("payments").await.contains(&kid) {
                break started.elapsed();
            }
            assert!(started.elapsed().as_secs() < 5, "new kid never reached B");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        samples.push((generated, seen - generated));
        let keys = a.keys().await;
        let info = keys.iter().find(|k| k.kid == kid).expect("listed");
        assert_eq!(info.state, "next", "B got it before it signs");
        assert_eq!(info.activates_at, asked_at + AHEAD + 1, "published ahead");
        assert_ne!(a.mint("ledger").await.kid, kid, "not signing yet");
        // Next rotation only once this one is active (rotate returns the pending key otherwise).
        bank.advance_to(info.activates_at);
        assert_eq!(state(&a.keys().await, &kid), Some("active"));
        let m = a.mint("ledger").await;
        assert_eq!(m.kid, kid);
        assert_eq!(b.verify(&m.token).await.map(|v| v.kid), Ok(kid));
    }
    for (g, p) in &samples {
        eprintln!("rotation: key generated in {g:?}; at B {p:?} after publication");
    }
}

/// Revocation: B refuses the revoked kid's tokens as `revoked_key` at once
/// (pushed), A signs with a fresh key, the CLI names mistakes, and the
/// revocations survive a restart of both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_is_pushed_and_a_fresh_key_signs() {
    let bank = Bank::new();
    let (mut a, mut b) = pair(&bank).await;
    let m = a.mint("ledger").await;
    assert!(b.verify(&m.token).await.is_ok());

    let started = Instant::now();
    let active = a.revoke(&m.kid).await;
    let committed = started.elapsed();
    assert_ne!(active, m.kid);
    let revoked_in = loop {
        match b.verify(&m.token).await {
            Err(r) if r == "revoked_key" => break started.elapsed() - committed,
            Ok(_) => {}
            Err(other) => panic!("B refused the revoked kid as {other}, not revoked_key"),
        }
        assert!(
            started.elapsed().as_secs() < 5,
            "B never learnt the revocation"
        );
    };
    eprintln!(
        "revocation: committed at A in {committed:?} (successor from the standby key); refused at B {revoked_in:?} later"
    );
    assert_eq!(
        a.verify(&m.token).await.err().as_deref(),
        Some("revoked_key"),
        "A refuses it too"
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
    assert_eq!(
        fresh.kid, active,
        "the successor named by the revocation signs"
    );
    assert!(b.verify(&fresh.token).await.is_ok(), "fresh key accepted");
    assert_eq!(state(&a.keys().await, &m.kid), Some("revoked"));
    assert!(
        !a.kids_of("payments").await.contains(&m.kid),
        "revoked key unpublished"
    );

    let out = a.cli(&["keys", "revoke", &m.kid]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already revoked"));
    let out = a.cli(&["keys", "revoke", &fresh.kid]).await;
    assert!(
        out.status.success(),
        "the CLI revokes too: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("revoked {}", fresh.kid)));
    // A kid is base64url: one starting with `-` is a kid, not a flag.
    for kid in ["no-such-kid", "-no-such-kid"] {
        let out = a.cli(&["keys", "revoke", kid]).await;
        assert_eq!(out.status.code(), Some(1), "{kid}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no key"),
            "{kid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Revoked state survives a restart of both sides.
    a.restart().await;
    b.restart().await;
    let keys = a.keys().await;
    assert_eq!(state(&keys, &m.kid), Some("revoked"), "{keys:?}");
    assert_eq!(state(&keys, &fresh.kid), Some("revoked"), "{keys:?}");
    assert!(
        eventually(5, || async { !b.kids_of("payments").await.is_empty() }).await,
        "restarted B gets A's set"
    );
    for t in [&m.token, &fresh.token] {
        assert_eq!(b.verify(t).await.err().as_deref(), Some("revoked_key"));
    }
}

/// Only the uids in admin_uids may rotate, revoke or list keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_an_allowed_uid() {
    let bank = Bank::new();
    let a = bank
        .start(bank.sidecar("payments").config("admin_uids = [4242424]"))
        .await;
    for args in [
        vec!["keys", "rotate"],
        vec!["keys", "list"],
        vec!["keys", "revoke", "x"],
    ] {
        let out = a.cli(&args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("refused: permission_denied"),
            "{args:?}"
        );
    }
    let mut admin = a.admin().await;
    let refusals = [
        admin
            .rotate_key(pb::RotateKeyRequest::default())
            .await
            .map(drop)
            .err(),
        admin
            .list_keys(pb::ListKeysRequest::default())
            .await
            .map(drop)
            .err(),
        admin
            .revoke_key(pb::RevokeKeyRequest { kid: "x".into() })
            .await
            .map(drop)
            .err(),
    ];
    for r in refusals {
        assert_eq!(
            r.as_ref().and_then(tokend::reason_of),
            Some(tokend::Reason::PermissionDenied),
            "{r:?}"
        );
    }
    assert!(
        a.cli(&["jwks"]).await.status.success(),
        "public keys stay readable"
    );
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

/// SIGKILL at random moments of rotations, 20 times: A (a real `tokend
/// serve` process) always restarts, and every token minted before each kill
/// verifies at B until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rotation_never_loses_a_live_key() {
    // Tokens live 5 s: retired keys are deleted 6 s after retirement, so
    // kills also land around deletions.
    const CRASH: &str = "[tokens]\ndefault_ttl = \"5s\"\nmax_ttl = \"5s\"\nclock_skew = \"1s\"\n\
                         [rotation]\ninterval = \"2s\"\npublish_ahead = \"1s\"\n";
    let bank = Bank::new();
    let mut a = Sidecar::start_peer(bank.root(), "payments", &[], CRASH);
    // B only witnesses: in-process, on the wall clock A mints by.
    let b = bank
        .start(
            tokend::Sidecar::new(bank.root(), "ledger")
                .peer_api(&bank.ca())
                .peer("payments", a.peer_addr())
                .config(CRASH),
        )
        .await;
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
    let mut verify = b.tokens().await;
    for round in 0..20 {
        let mut mint = a.tokens().await;
        let mut admin = a.admin().await;
        // Rotations run on A's own wall-clock cadence (a key every 2 s, and
        // on-demand ones), so short rounds still kill at random moments of them.
        let until = Instant::now() + Duration::from_millis(100 + rnd(500));
        let mut n = 0;
        while Instant::now() < until {
            if rnd(6) == 0 {
                // An on-demand rotation in flight when the kill lands, some of the time.
                let mut adm = admin.clone();
                tokio::spawn(async move { adm.rotate_key(pb::RotateKeyRequest::default()).await });
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
            tokio::time::sleep(Duration::from_millis(rnd(60))).await;
        }
        let _ = admin.list_keys(pb::ListKeysRequest::default()).await;
        a.kill9();
        a.restart();
        let now = now();
        for (token, kid, exp) in &tokens {
            if *exp > now + 1 {
                let r = verify
                    .verify(pb::VerifyRequest {
                        token: token.clone(),
                        audience: String::new(),
                        ..Default::default()
                    })
                    .await;
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
