//! The directory on a real etcd: replicas of a service publish signed
//! key-set documents, verifiers discover issuers and follow rotations and
//! revocations through etcd with no peer connection; a dead replica's entry
//! leaves with its lease; relay attacks written straight into etcd are
//! refused with their reasons; a withheld revocation is caught by the
//! direct fetch within the document lifetime.

use std::time::Duration;

use tokend::pb::tokend as pb;

use crate::etcd::Etcd;
use crate::inproc::{Bank, Node, at, logs};
use crate::support::*;

/// Lines of `[directory]` for `etcd` under `prefix`, with a short lease.
fn directory(etcd: &Etcd, prefix: &str) -> String {
    format!(
        "{}lease_ttl = \"2s\"\nrequest_timeout = \"2s\"\n",
        etcd.directory_toml(prefix)
    )
}

/// Rotation that publishes a new key 5 s (bank clock) before it signs.
const ROTATION: &str = "[rotation]\ninterval = \"1h\"\npublish_ahead = \"5s\"\n";

/// Replica `n` of `name` in directory mode under `prefix`.
async fn replica(bank: &Bank, etcd: &Etcd, name: &str, n: usize, prefix: &str) -> Node {
    let b = bank
        .replica(name, n)
        .config(ROTATION)
        .config(&directory(etcd, prefix));
    bank.start(b).await
}

/// A verifier `name` in directory mode under `prefix` (no [[peers]]).
async fn verifier(bank: &Bank, etcd: &Etcd, name: &str, prefix: &str) -> Node {
    let b = bank
        .peer(name)
        .standby_key(false)
        .config(&directory(etcd, prefix));
    bank.start(b).await
}

/// The instances `node` holds for `issuer` (a service name).
async fn instances(node: &Node, issuer: &str) -> Vec<pb::InstanceKeys> {
    node.issuer(issuer).await.instances
}

/// Waits until `node` holds `n` live (not gone) instances of `issuer`.
async fn wait_live(node: &Node, issuer: &str, n: usize) {
    assert!(
        eventually(20, || async {
            instances(node, issuer)
                .await
                .iter()
                .filter(|i| !i.gone)
                .count()
                == n
        })
        .await,
        "{} sees {n} live instances of {issuer}: {:?}",
        node.name(),
        instances(node, issuer).await
    );
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let h = token.split('.').next().expect("header");
    let h: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .expect("b64"),
    )
    .expect("json");
    h["kid"].as_str().expect("kid").to_owned()
}

/// Mints at `replica` until its token is signed by `kid`.
async fn mint_with(replica: &Node, aud: &str, kid: &str) -> String {
    for _ in 0..200 {
        let t = replica.mint(aud).await.token;
        if kid_of(&t) == kid {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never signed with {kid}", replica.name());
}

/// Two and then three replicas of `payments` in directory mode; two
/// verifiers that never configured `payments` discover it. Tokens from
/// every replica verify at every verifier, across a rotation at each
/// replica, with zero failed verifications (each new key is seen by every
/// verifier before it signs: the publish-ahead covers the propagation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_replicas_verify_across_rotations() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let verifiers = [
        verifier(&bank, &etcd, "ledger", "/t/").await,
        verifier(&bank, &etcd, "fx", "/t/").await,
    ];
    let mut replicas = vec![
        replica(&bank, &etcd, "payments", 0, "/t/").await,
        replica(&bank, &etcd, "payments", 1, "/t/").await,
    ];
    let mut failures = Vec::new();
    for round in 0..2 {
        if round == 1 {
            replicas.push(replica(&bank, &etcd, "payments", 2, "/t/").await);
        }
        for v in &verifiers {
            wait_live(v, "payments", replicas.len()).await;
        }
        for (i, r) in replicas.iter().enumerate() {
            let before = r.mint("ledger").await.token;
            let kid = r.rotate().await;
            for v in &verifiers {
                assert!(
                    eventually(10, || async { v.kids_of("payments").await.contains(&kid) }).await,
                    "{} sees the pending key of replica {i}",
                    v.name()
                );
            }
            bank.advance(6);
            let after = mint_with(r, "ledger", &kid).await;
            for token in [&before, &after] {
                for (v, aud) in verifiers.iter().zip(["ledger", "fx"]) {
                    let t = if aud == "ledger" {
                        token.clone()
                    } else {
                        r.mint("fx").await.token
                    };
                    if let Err(e) = v.verify(&t).await {
                        failures.push(format!("round {round} replica {i} at {}: {e}", v.name()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed verifications: {failures:?}");
}

/// A revocation at one replica reaches every verifier through etcd within
/// one second, and the replica's other keys and the other replicas' keys
/// keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_revocation_reaches_every_verifier_within_a_second() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let verifiers = [
        verifier(&bank, &etcd, "ledger", "/t/").await,
        verifier(&bank, &etcd, "fx", "/t/").await,
    ];
    let replicas = [
        replica(&bank, &etcd, "payments", 0, "/t/").await,
        replica(&bank, &etcd, "payments", 1, "/t/").await,
    ];
    for v in &verifiers {
        wait_live(v, "payments", 2).await;
    }
    let doomed_ledger = replicas[0].mint("ledger").await.token;
    let doomed_fx = replicas[0].mint("fx").await.token;
    assert!(verifiers[0].verify(&doomed_ledger).await.is_ok());
    assert!(verifiers[1].verify(&doomed_fx).await.is_ok());
    let kid = kid_of(&doomed_ledger);
    let new_kid = replicas[0].revoke(&kid).await;
    assert_ne!(new_kid, kid);
    for (v, t) in verifiers.iter().zip([&doomed_ledger, &doomed_fx]) {
        assert!(
            eventually(1, || async {
                v.verify(t).await.err().as_deref() == Some("revoked_key")
            })
            .await,
            "{} refuses the revoked key within one second: {:?}, {:?}",
            v.name(),
            v.verify(t).await,
            instances(v, "payments").await
        );
    }
    for r in &replicas {
        let t = r.mint("ledger").await.token;
        assert!(
            verifiers[0].verify(&t).await.is_ok(),
            "honest keys keep working"
        );
    }
}

/// The value at `key` in etcd.
async fn etcd_get(etcd: &Etcd, key: &str) -> Option<Vec<u8>> {
    let mut c = etcd.client().await;
    let got = c.get(key, None).await.expect("get");
    got.kvs().first().map(|kv| kv.value().to_vec())
}

/// Every key (and value) under `prefix`.
async fn etcd_list(etcd: &Etcd, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut c = etcd.client().await;
    let got = c
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get");
    got.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

async fn etcd_put(etcd: &Etcd, key: &str, value: impl Into<Vec<u8>>) {
    let mut c = etcd.client().await;
    c.put(key, value.into(), None).await.expect("put");
}

/// The single directory key of `service` under `prefix` (once published).
async fn key_of(etcd: &Etcd, prefix: &str, service: &str) -> String {
    let dir = format!("{prefix}keys/{TD}/{service}/");
    assert!(
        eventually(10, || async { !etcd_list(etcd, &dir).await.is_empty() }).await,
        "{service} publishes under {dir}"
    );
    let list = etcd_list(etcd, &dir).await;
    assert_eq!(list.len(), 1, "one instance of {service}: {list:?}");
    list[0].0.clone()
}

/// Refusals are logged at most once a second per reason: a test showing
/// two refusals of one reason waits that out between them.
async fn past_log_limit() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

/// Signs a document for `claims` with the certificate and key in `peer_dir`.
fn sign_with(peer_dir: &std::path::Path, claims: &tokend::DocumentClaims) -> String {
    let cert = pem::parse(std::fs::read(peer_dir.join("cert.pem")).expect("cert")).expect("pem");
    let key = pem::parse(std::fs::read(peer_dir.join("key.pem")).expect("key")).expect("pem");
    let key = tokend::DocumentKey::from_pkcs8(key.contents(), &[cert.contents().to_vec()])
        .expect("document key");
    tokend::sign_document(claims, &key).expect("sign")
}

/// Claims of a document of `service`/`instance` listing `key`, valid `iat..exp`.
fn doc_claims(
    service: &str,
    instance: &str,
    seq: u64,
    key: &tokend::SigningKey,
    iat: i64,
    exp: i64,
) -> tokend::DocumentClaims {
    tokend::DocumentClaims {
        identity: tokend::SpiffeId::parse(&id(service)).expect("id"),
        instance: instance.into(),
        seq,
        issued_at: at(iat),
        expires_at: at(exp),
        address: None,
        keys: vec![key.public().clone()],
        bound_keys: Vec::new(),
        revoked: Vec::new(),
        key_expires: Default::default(),
    }
}

/// Waits until the log holds a refusal of `key` with `reason`.
async fn refused_with(key: &str, reason: &str) {
    let needle = format!("reason=\"{reason}\"");
    let quoted = format!("{key:?}");
    assert!(
        eventually(10, || async {
            logs().lines().any(|l| {
                l.contains("directory entry refused") && l.contains(&quoted) && l.contains(&needle)
            })
        })
        .await,
        "no refusal of {key} with reason {reason}: {}",
        logs()
            .lines()
            .filter(|l| l.contains("directory entry refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Attacks written straight into etcd by whoever has write access to it,
/// each refused with its reason while honest keys keep working: a
/// document signed by a certificate of a foreign CA (`bad_chain`), a real
/// document of another identity under this one's key (`path_mismatch`),
/// an instance's own older document put back after a rotation and after
/// a revocation (`rollback`), a document signed with the instance's real
/// certificate but expired (`expired`), garbage and a truncated document
/// (`malformed`), and one over the size limit (`too_large`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_relay_attacks_are_refused() {
    let _ = logs();
    let etcd = Etcd::start();
    let bank = Bank::new();
    let ledger = verifier(&bank, &etcd, "ledger", "/a/").await;
    let payments = replica(&bank, &etcd, "payments", 0, "/a/").await;
    let fx = replica(&bank, &etcd, "fx", 0, "/a/").await;
    wait_live(&ledger, "payments", 1).await;
    wait_live(&ledger, "fx", 1).await;
    let pay_key = key_of(&etcd, "/a/", "payments").await;
    let fx_key = key_of(&etcd, "/a/", "fx").await;
    let honest = || async {
        for r in [&payments, &fx] {
            let t = r.mint("ledger").await.token;
            assert_eq!(
                ledger.verify(&t).await.err(),
                None,
                "honest {} keys work",
                r.name()
            );
        }
    };
    honest().await;
    let pay_dir = format!("/a/keys/{TD}/payments/");
    let fx_signing = fx.signing_key();
    let forged_as_payments = || {
        let mut c = bank.claims("payments", "ledger", 60);
        c["jti"] = serde_json::json!(format!("forged-{}", rand_suffix()));
        forge(&fx_signing, fx_signing.kid(), &c)
    };

    // 1. A foreign CA's certificate for payments.
    let evil_ca = bank.root().join("evil-ca");
    tokend::ca_init(&evil_ca, &tokend::TrustDomain::new(TD).expect("td")).expect("evil ca");
    let evil_peer = bank.root().join("evil-peer");
    tokend::ca_issue(&evil_ca, "payments", &evil_peer, &[], 1).expect("evil cert");
    let now = bank.now();
    let doc = sign_with(
        &evil_peer,
        &doc_claims("payments", "evil0", 1, &fx_signing, now, now + 60),
    );
    let k = format!("{pay_dir}evil0");
    etcd_put(&etcd, &k, doc).await;
    refused_with(&k, "bad_chain").await;
    assert_eq!(
        ledger.verify(&forged_as_payments()).await.err().as_deref(),
        Some("unknown_kid")
    );
    honest().await;

    // 2. fx's real document under a payments key.
    let fx_doc = etcd_get(&etcd, &fx_key).await.expect("fx doc");
    let fx_instance = fx_key.rsplit('/').next().expect("instance").to_owned();
    let k = format!("{pay_dir}{fx_instance}");
    etcd_put(&etcd, &k, fx_doc).await;
    refused_with(&k, "path_mismatch").await;
    //    and payments' own document under another instance's key.
    past_log_limit().await;
    let pay_doc = etcd_get(&etcd, &pay_key).await.expect("payments doc");
    let k = format!("{pay_dir}someone-else");
    etcd_put(&etcd, &k, pay_doc.clone()).await;
    refused_with(&k, "path_mismatch").await;
    assert_eq!(
        ledger.verify(&forged_as_payments()).await.err().as_deref(),
        Some("unknown_kid")
    );
    honest().await;

    // 3. payments' older document put back after a rotation, and after a revocation.
    let pending = payments.rotate().await;
    assert!(
        eventually(10, || async {
            ledger.kids_of("payments").await.contains(&pending)
        })
        .await,
        "the rotation arrives"
    );
    etcd_put(&etcd, &pay_key, pay_doc.clone()).await;
    refused_with(&pay_key, "rollback").await;
    assert!(
        ledger.kids_of("payments").await.contains(&pending),
        "not rolled back"
    );
    let doomed = payments.mint("ledger").await.token;
    let before_revoke = etcd_get(&etcd, &pay_key).await.expect("doc");
    payments.revoke(&kid_of(&doomed)).await;
    assert!(
        eventually(10, || async {
            ledger.verify(&doomed).await.err().as_deref() == Some("revoked_key")
        })
        .await,
        "the revocation arrives"
    );
    past_log_limit().await;
    let marker = logs().len();
    etcd_put(&etcd, &pay_key, before_revoke).await;
    assert!(
        eventually(10, || async { logs()[marker..].contains("rollback") }).await,
        "the pre-revocation document is refused as a rollback"
    );
    assert_eq!(
        ledger.verify(&doomed).await.err().as_deref(),
        Some("revoked_key"),
        "still revoked"
    );

    // 4. An expired document signed with payments' real certificate.
    let pay_peer = bank.root().join("replicas/0/payments/peer");
    let now = bank.now();
    let doc = sign_with(
        &pay_peer,
        &doc_claims("payments", "stale0", 99, &fx_signing, now - 400, now - 100),
    );
    let k = format!("{pay_dir}stale0");
    etcd_put(&etcd, &k, doc).await;
    refused_with(&k, "expired").await;
    assert_eq!(
        ledger.verify(&forged_as_payments()).await.err().as_deref(),
        Some("unknown_kid")
    );

    // 5. Garbage, and a truncated document.
    let k = format!("{pay_dir}garbage0");
    etcd_put(&etcd, &k, b"\x00\xffnot a document".to_vec()).await;
    refused_with(&k, "malformed").await;
    let current = etcd_get(&etcd, &pay_key).await.expect("doc");
    past_log_limit().await;
    let k = format!("{pay_dir}trunc0");
    etcd_put(&etcd, &k, current[..current.len() / 3].to_vec()).await;
    refused_with(&k, "malformed").await;

    // 6. Over the size limit.
    let k = format!("{pay_dir}huge0");
    etcd_put(&etcd, &k, vec![b'a'; tokend::MAX_DOCUMENT_BYTES + 1]).await;
    refused_with(&k, "too_large").await;
    honest().await;
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A replica killed with SIGKILL (a process: nothing revokes its lease):
/// its entry leaves etcd when the lease runs out and verifiers mark it
/// gone; its outstanding tokens still verify; once its document has
/// expired its keys are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_killed_replica_leaves_with_its_lease() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let ledger = verifier(&bank, &etcd, "ledger", "/k/").await;
    let alive = replica(&bank, &etcd, "payments", 0, "/k/").await;
    // The replica to kill is a process with its own CA copy.
    let procs = bank.root().join("procs");
    std::fs::create_dir_all(procs.join("ca")).expect("mkdir");
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(bank.ca().join(f), procs.join("ca").join(f)).expect("copy ca");
    }
    let mut doomed = Sidecar::start_peer(&procs, "payments", &[], &directory(&etcd, "/k/"));
    wait_live(&ledger, "payments", 2).await;
    let outstanding = doomed.mint("ledger").await.token;
    assert_eq!(ledger.verify(&outstanding).await.err(), None);
    let doomed_key = crate::support::signing_key_in(&doomed.keys_dir);
    let entries = etcd_list(&etcd, &format!("/k/keys/{TD}/payments/")).await;
    assert_eq!(entries.len(), 2);

    doomed.kill9();
    assert!(
        eventually(20, || async {
            etcd_list(&etcd, &format!("/k/keys/{TD}/payments/"))
                .await
                .len()
                == 1
        })
        .await,
        "the killed replica's entry leaves etcd with its lease"
    );
    assert!(
        eventually(10, || async {
            instances(&ledger, "payments")
                .await
                .iter()
                .filter(|i| i.gone)
                .count()
                == 1
        })
        .await,
        "the verifier marks it gone"
    );
    assert_eq!(
        ledger.verify(&outstanding).await.err(),
        None,
        "its outstanding tokens still verify"
    );
    let t = alive.mint("ledger").await.token;
    assert_eq!(
        ledger.verify(&t).await.err(),
        None,
        "the live replica is unaffected"
    );

    // Past the dead replica's document (5 min + skew): its keys are gone.
    let exp = instances(&ledger, "payments")
        .await
        .iter()
        .find(|i| i.gone)
        .map(|i| i.document_expires_at)
        .expect("gone instance");
    bank.advance_to(exp + 31);
    let mut c = bank.claims("payments", "ledger", 60);
    c["jti"] = serde_json::json!("after-death");
    let late = forge(&doomed_key, doomed_key.kid(), &c);
    assert!(
        eventually(10, || async {
            ledger.verify(&late).await.err().as_deref() == Some("unknown_kid")
        })
        .await,
        "a dead replica's key is refused once its document expired: {:?}",
        ledger.verify(&late).await
    );
    let t = alive.mint("ledger").await.token;
    assert_eq!(
        ledger.verify(&t).await.err(),
        None,
        "the live replica is unaffected"
    );
}

/// A withheld revocation: the relay (here: the test, copying entries from
/// the publisher's prefix to the verifier's) stops passing an instance's
/// documents after it revokes a key. The verifier keeps the old document
/// until it nears its `exp` (10 s here), then fetches the instance's
/// current document directly over mTLS and refuses the revoked key, before
/// the old document's lifetime is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_withheld_revocation_is_caught_by_the_direct_fetch() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let ledger = verifier(&bank, &etcd, "ledger", "/relay/").await;
    let payments = bank
        .start(
            bank.replica("payments", 0)
                .config(&directory(&etcd, "/pub/"))
                .document_lifetime("10s"),
        )
        .await;
    let src = key_of(&etcd, "/pub/", "payments").await;
    let dst = src.replacen("/pub/", "/relay/", 1);
    etcd_put(&etcd, &dst, etcd_get(&etcd, &src).await.expect("doc")).await;
    wait_live(&ledger, "payments", 1).await;
    let token = payments.mint("ledger").await.token;
    assert_eq!(ledger.verify(&token).await.err(), None);
    let issued = bank.now();

    // The relay stops here. The revocation reaches /pub/ only.
    payments.revoke(&kid_of(&token)).await;
    assert!(
        eventually(10, || async {
            etcd_get(&etcd, &src).await != etcd_get(&etcd, &dst).await
        })
        .await,
        "the revocation is published (and withheld from the verifier)"
    );
    assert_eq!(
        ledger.verify(&token).await.err(),
        None,
        "withheld: the verifier cannot know yet"
    );
    // Into the last fifth of the withheld document's life: the direct fetch.
    bank.advance_to(issued + 9);
    assert!(
        eventually(10, || async {
            ledger.verify(&token).await.err().as_deref() == Some("revoked_key")
        })
        .await,
        "the direct fetch brings the revocation: {:?}",
        ledger.verify(&token).await
    );
    assert!(bank.now() < issued + 10, "before the old document expired");
}

/// The health of service `tokend.directory` at `node`: true if SERVING.
async fn directory_serving(node: &Node) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    node.health_status("tokend.directory").await == ServingStatus::Serving as i32
}

/// etcd going down makes the directory stale (health NOT_SERVING) while
/// the keys already verified keep working; when etcd is back the watch
/// reconnects (health SERVING) and a rotation made after the outage
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_outage_is_reported_and_survived() {
    let mut etcd = Etcd::start();
    let bank = Bank::new();
    let ledger = verifier(&bank, &etcd, "ledger", "/o/").await;
    let payments = replica(&bank, &etcd, "payments", 0, "/o/").await;
    wait_live(&ledger, "payments", 1).await;
    assert!(
        eventually(10, || directory_serving(&ledger)).await,
        "SERVING while etcd answers"
    );
    etcd.kill_all();
    assert!(
        eventually(20, || async { !directory_serving(&ledger).await }).await,
        "NOT_SERVING once etcd is gone"
    );
    let t = payments.mint("ledger").await.token;
    assert_eq!(
        ledger.verify(&t).await.err(),
        None,
        "verified keys stay in use during the outage"
    );
    etcd.restart_single();
    assert!(
        eventually(30, || directory_serving(&ledger)).await,
        "SERVING again once etcd is back"
    );
    let pending = payments.rotate().await;
    assert!(
        eventually(20, || async {
            ledger.kids_of("payments").await.contains(&pending)
        })
        .await,
        "a rotation after the outage arrives"
    );
}

/// `[directory] accept` narrows discovery: a verifier accepting only `fx`
/// refuses `payments`' tokens as `unknown_issuer` while another verifier
/// without the list accepts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_accept_narrows_discovery() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let open = verifier(&bank, &etcd, "ledger", "/n/").await;
    let narrow = bank
        .start(
            bank.peer("audit")
                .standby_key(false)
                .config(&format!("{}accept = [\"fx\"]\n", directory(&etcd, "/n/"))),
        )
        .await;
    let payments = replica(&bank, &etcd, "payments", 0, "/n/").await;
    let fx = replica(&bank, &etcd, "fx", 0, "/n/").await;
    wait_live(&open, "payments", 1).await;
    wait_live(&narrow, "fx", 1).await;
    let t = payments.mint("audit").await.token;
    assert_eq!(
        narrow.verify(&t).await.err().as_deref(),
        Some("unknown_issuer")
    );
    let t = fx.mint("audit").await.token;
    assert_eq!(narrow.verify(&t).await.err(), None);
    let t = payments.mint("ledger").await.token;
    assert_eq!(open.verify(&t).await.err(), None);
    assert!(narrow.issuer("payments").await.instances.is_empty());
}

/// `tokend demo --directory` (etcd on PATH) shows two replicas discovered
/// through etcd and accepted at both ledger replicas, a one-time token
/// accepted once across them, and a revocation refused; exit 0.
#[test]
fn demo_directory_shows_replicas_and_the_shared_claim() {
    assert!(
        std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "`etcd` is not on PATH: install the Debian package etcd-server"
    );
    let out = run_to_exit(
        std::process::Command::new(bin())
            .args(["demo", "--directory"])
            .env("TOKEND_LOG", "warn"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("hold 2 payments instances from etcd"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(": ACCEPTED").count(), 4, "{stdout}");
    assert!(
        stdout.contains("refused replayed and accepted")
            || stdout.contains("accepted and refused replayed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ledger refuses it (revoked_key)"),
        "{stdout}"
    );
}

/// A full read larger than one page (and than gRPC's 4 MiB default
/// message limit as a single response): 600 refused entries sorted before
/// the one real document, then a fresh verifier still finds the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_full_read_is_paged() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let payments = replica(&bank, &etcd, "payments", 0, "/p/").await;
    key_of(&etcd, "/p/", "payments").await;
    let mut c = etcd.client().await;
    let filler = vec![b'x'; 8 * 1024];
    for i in 0..600 {
        c.put(
            format!("/p/keys/{TD}/payments/!{i:04}"),
            filler.clone(),
            None,
        )
        .await
        .expect("put");
    }
    let ledger = verifier(&bank, &etcd, "ledger", "/p/").await;
    wait_live(&ledger, "payments", 1).await;
    let t = payments.mint("ledger").await.token;
    assert_eq!(ledger.verify(&t).await.err(), None);
}
