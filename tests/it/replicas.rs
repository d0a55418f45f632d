//! Replicas in the mesh: several instances of one service, each its own
//! in-process sidecar with its own keys, instance id and peer port, behind
//! one `[[peers]]` entry with `addresses = [...]`. The verifier keeps a set
//! per instance (from each instance's signed key-set document) and accepts
//! the union. Also: interop with a peer of an older release (no documents),
//! the direct fetch when a relay stops delivering, and a keys directory
//! written before documents existed.

use std::net::SocketAddr;
use std::path::Path;

use tokend::pb::tokend as pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::inproc::{Bank, Node};
use crate::peers::{FakePeer, identity_of, issue, new_key, serve_fake, set_of};
use crate::support::{eventually, forge, id};

/// Mints a token for `audience` living `ttl` seconds.
async fn mint_ttl(node: &Node, audience: &str, ttl: u64) -> pb::MintResponse {
    node.tokens()
        .await
        .mint(pb::MintRequest {
            audience: audience.into(),
            ttl_seconds: ttl,
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner()
}

/// Waits until `verifier` holds a signed document from `n` instances of `issuer`.
async fn knows_instances(verifier: &Node, issuer: &str, n: usize) {
    assert!(
        eventually(10, || async {
            verifier
                .issuer(issuer)
                .await
                .instances
                .iter()
                .filter(|i| i.seq > 0 && !i.gone)
                .count()
                == n
        })
        .await,
        "{} never held {n} documented instances of {issuer}: {:?}",
        verifier.name(),
        verifier.issuer(issuer).await.instances
    );
}

/// `n` replicas of payments (rotating every `publish_ahead` of 60 s), and
/// ledger trusting all of them through one `[[peers]]` entry.
async fn replicas(bank: &Bank, n: u32, standby: bool) -> (Vec<Node>, Node) {
    let mut reps = Vec::new();
    for i in 1..=n {
        let b = bank
            .peer("payments")
            .replica(i)
            .standby_key(standby)
            .config("[rotation]\npublish_ahead = \"60s\"");
        reps.push(bank.start(b).await);
    }
    let addrs: Vec<SocketAddr> = reps.iter().map(Node::peer_addr).collect();
    let ledger = bank
        .start(bank.lean_peer("ledger").peer_replicas("payments", &addrs))
        .await;
    knows_instances(&ledger, "payments", n as usize).await;
    (reps, ledger)
}

/// Tokens from every replica verify at the verifier, before and after each
/// replica rotates (twice), old tokens included: zero failed verifications.
async fn every_replica_verifies_across_rotations(n: u32) {
    let bank = Bank::new();
    let (reps, ledger) = replicas(&bank, n, false).await;
    let mut tokens = Vec::new();
    let mut failures = Vec::new();
    for round in 0..3 {
        for r in &reps {
            tokens.push(r.mint("ledger").await);
        }
        for t in &tokens {
            if let Err(e) = ledger.verify(&t.token).await {
                failures.push(format!("round {round}, kid {}: {e}", t.kid));
            }
        }
        if round < 2 {
            for r in &reps {
                r.rotate().await;
            }
            bank.advance(61);
        }
    }
    let kids: std::collections::HashSet<_> = tokens.iter().map(|t| t.kid.clone()).collect();
    assert_eq!(
        kids.len(),
        3 * n as usize,
        "each replica signed with 3 keys of its own"
    );
    assert!(failures.is_empty(), "failed verifications: {failures:?}");
    knows_instances(&ledger, "payments", n as usize).await;
}

/// Two replicas of payments: every token from either verifies, across rotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_verify_across_rotations() {
    every_replica_verifies_across_rotations(2).await;
}

/// Three replicas of payments: every token from any verifies, across rotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_verify_across_rotations() {
    every_replica_verifies_across_rotations(3).await;
}

/// A revocation at one replica is refused as `revoked_key` for the whole
/// identity, while the other replicas (and the revoking one's new key) keep
/// working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_at_one_replica() {
    let bank = Bank::new();
    let (reps, ledger) = replicas(&bank, 3, true).await;
    let before: Vec<_> = {
        let mut v = Vec::new();
        for r in &reps {
            v.push(r.mint("ledger").await);
        }
        v
    };
    for t in &before {
        ledger.verify(&t.token).await.expect("verifies before");
    }
    let new_kid = reps[0].revoke(&before[0].kid).await;
    assert!(
        eventually(5, || async {
            ledger.verify(&before[0].token).await.err().as_deref() == Some("revoked_key")
        })
        .await,
        "the revoked key is refused: {:?}",
        ledger.verify(&before[0].token).await
    );
    for t in &before[1..] {
        ledger
            .verify(&t.token)
            .await
            .expect("other replicas keep working");
    }
    let after = reps[0].mint("ledger").await;
    assert_eq!(after.kid, new_kid);
    ledger
        .verify(&after.token)
        .await
        .expect("its new key works");
    let held = ledger.issuer("payments").await;
    assert!(held.revoked_kids.contains(&before[0].kid), "{held:?}");
}

/// A replica stopped: its tokens verify while its last document is valid;
/// once that has expired (the direct fetch fails too: it is down), its keys
/// are gone, `unknown_kid`; the other replica is unaffected throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_replica_keys_go_with_its_document() {
    let bank = Bank::new();
    let (mut reps, ledger) = replicas(&bank, 2, false).await;
    let short = reps[1].mint("ledger").await;
    let long = mint_ttl(&reps[1], "ledger", 1800).await;
    ledger.verify(&long.token).await.expect("verifies");
    reps[1].stop().await;
    assert!(
        eventually(5, || async {
            ledger
                .issuer("payments")
                .await
                .instances
                .iter()
                .any(|i| i.stale)
        })
        .await,
        "the lost instance is marked stale"
    );
    ledger
        .verify(&short.token)
        .await
        .expect("verifies while stopped");
    bank.advance(200);
    ledger
        .verify(&long.token)
        .await
        .expect("document still valid");
    let other = reps[0].mint("ledger").await;
    bank.advance(140); // past the stopped replica's document exp (300 s) + skew (30 s)
    assert_eq!(
        ledger.verify(&long.token).await.err().as_deref(),
        Some("unknown_kid"),
        "its keys are gone"
    );
    ledger
        .verify(&other.token)
        .await
        .expect("the running replica re-signed and keeps working");
    ledger
        .verify(&reps[0].mint("ledger").await.token)
        .await
        .expect("the running replica's new token works");
}

/// Mesh interop with a peer of an older release: it answers UNIMPLEMENTED
/// for documents, so the verifier falls back to its plain key set; that
/// instance and a current replica of the same service both verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_release_peer_interoperates() {
    let bank = Bank::new();
    let current = bank.start(bank.lean_peer("payments").replica(1)).await;
    let x = new_key();
    let old = serve_fake(
        &bank,
        "payments",
        FakePeer {
            watch: vec![set_of("payments", &[&x])],
            unary: set_of("payments", &[&x]),
            documents: None,
        },
    )
    .await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer_replicas("payments", &[current.peer_addr(), old]),
        )
        .await;
    knows_instances(&ledger, "payments", 1).await;
    assert!(
        eventually(5, || async {
            ledger
                .kids_of("payments")
                .await
                .contains(&x.kid().to_owned())
        })
        .await,
        "the old peer's plain set is installed"
    );
    let instances = ledger.issuer("payments").await.instances;
    assert!(
        instances
            .iter()
            .any(|i| i.seq == 0 && i.instance == format!("peer:https://{old}")),
        "{instances:?}"
    );
    let forged_by_old = forge(&x, x.kid(), &bank.claims("payments", "ledger", 60));
    ledger
        .verify(&forged_by_old)
        .await
        .expect("old instance's token");
    ledger
        .verify(&current.mint("ledger").await.token)
        .await
        .expect("current instance's token");
}

/// A document straight from a replica's peer API (as an auditor would fetch it).
/// A fake payments peer that only relays `document` (and whatever is sent
/// on the returned sender later), and a ledger that knows payments through
/// that relay alone.
async fn ledger_behind_relay(
    bank: &Bank,
    document: String,
) -> (tokio::sync::watch::Sender<Option<String>>, SocketAddr, Node) {
    let (tx, rx) = tokio::sync::watch::channel(Some(document));
    let relay = serve_fake(
        bank,
        "payments",
        FakePeer {
            watch: vec![],
            unary: pb::PeerKeySet::default(),
            documents: Some(rx),
        },
    )
    .await;
    let ledger = bank
        .start(bank.lean_peer("ledger").peer("payments", relay))
        .await;
    (tx, relay, ledger)
}

async fn fetch_document(bank: &Bank, addr: SocketAddr) -> String {
    let auditor = issue(bank, "auditor");
    let ca = std::fs::read(bank.ca().join("ca.pem")).expect("ca");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("payments")
        .identity(identity_of(&auditor));
    let channel = Endpoint::try_from(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    pb::peer_service_client::PeerServiceClient::new(channel)
        .get_document(pb::GetDocumentRequest {})
        .await
        .expect("GetDocument")
        .into_inner()
        .jws
}

/// The direct fetch: ledger hears of payments only through a relay (a peer
/// holding a payments certificate that relays payments' documents), and
/// the relay stops delivering. Before the document expires, ledger fetches
/// the current one from the instance itself (the address in its document)
/// over mTLS, and payments' tokens keep verifying past the relayed
/// document's expiry. With the instance down too, its key is refused once
/// the last document expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_fetch_outlives_a_silent_relay() {
    let bank = Bank::new();
    let mut x = bank
        .start(
            bank.lean_peer("payments")
                .replica(1)
                .document_lifetime("60s"),
        )
        .await;
    let (tx, relay, ledger) =
        ledger_behind_relay(&bank, fetch_document(&bank, x.peer_addr()).await).await;
    knows_instances(&ledger, "payments", 1).await;
    let token = x.mint("ledger").await;
    ledger.verify(&token.token).await.expect("via the relay");
    let relayed = ledger.issuer("payments").await.instances;
    assert_eq!(relayed[0].source, format!("peer:https://{relay}"));
    // The relay goes silent (it keeps serving its first document only).
    drop(tx);
    bank.advance(50); // past 4/5 of the 60 s life
    let direct = format!("direct:https://{}", x.peer_addr());
    assert!(
        eventually(10, || async {
            ledger
                .issuer("payments")
                .await
                .instances
                .iter()
                .any(|i| i.source == direct && i.seq > relayed[0].seq)
        })
        .await,
        "fetched directly: {:?}",
        ledger.issuer("payments").await.instances
    );
    bank.advance(45); // past the relayed document's exp (60 s) + skew (30 s)
    ledger
        .verify(&token.token)
        .await
        .expect("still usable through the directly fetched document");
    x.stop().await;
    bank.advance(120); // past any document it could have signed before it stopped
    assert_eq!(
        ledger.verify(&token.token).await.err().as_deref(),
        Some("unknown_kid"),
        "instance and relay both silent: the key stops at the document's exp"
    );
}

/// A keys directory written by tokend 0.1.0 (before instance ids and
/// documents) still loads; the sidecar adds its instance file and publishes
/// documents listing the old keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_dir_from_before_documents_loads() {
    let bank = Bank::new();
    let builder = bank.lean_peer("payments").replica(1);
    let keys = builder.dir().join("keys");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys-v0.1.0"),
        &keys,
    );
    let old_kids: Vec<String> = std::fs::read_dir(&keys)
        .expect("dir")
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            n.strip_suffix(".pk8.pem").map(str::to_owned)
        })
        .collect();
    let payments = bank.start(builder).await;
    assert!(keys.join("instance.json").exists(), "instance file added");
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", payments.peer_addr()),
        )
        .await;
    knows_instances(&ledger, "payments", 1).await;
    let held = ledger.issuer("payments").await.instances[0].kids.clone();
    assert!(
        old_kids.iter().any(|k| held.contains(k)),
        "the old keys are in the document: {held:?} vs {old_kids:?}"
    );
    ledger
        .verify(&payments.mint("ledger").await.token)
        .await
        .expect("verifies");
    assert_eq!(id("payments"), ledger.issuer("payments").await.issuer);
}

fn copy_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).expect("mkdir");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        std::fs::copy(e.path(), &dst).expect("copy");
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}

/// The document sequence survives SIGKILL: real `tokend` processes,
/// payments is killed with -9 and started again; ledger (which remembers
/// payments' high-water mark) installs its next document without a
/// rollback refusal, under the same instance id, with a higher sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_sequence_survives_sigkill() {
    use crate::support::{Sidecar as Process, ca_init, tmp};
    let root = tmp();
    ca_init(root.path());
    let mut payments = Process::start_peer(root.path(), "payments", &[], "");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let ledger = Process::start_peer(
        root.path(),
        "ledger",
        &[("payments", payments.peer_addr())],
        &format!("[metrics]\nlisten = \"{metrics}\""),
    );
    let instance = |p: &Process| -> Option<(String, u64)> {
        let e = p.issuer_entry("payments");
        let i = e["instances"]
            .as_array()?
            .iter()
            .find(|i| i["seq"].as_u64() > Some(0))?
            .clone();
        Some((i["instance"].as_str()?.to_owned(), i["seq"].as_u64()?))
    };
    assert!(
        eventually(10, || async { instance(&ledger).is_some() }).await,
        "ledger holds payments' document: {}",
        ledger.issuer_entry("payments")
    );
    let (id_before, seq_before) = instance(&ledger).expect("instance");
    payments.kill9();
    payments.restart();
    assert!(
        eventually(15, || async {
            instance(&ledger).is_some_and(|(i, s)| i == id_before && s > seq_before)
        })
        .await,
        "a higher sequence of the same instance after SIGKILL: before {seq_before}, now {}",
        ledger.issuer_entry("payments")
    );
    let entry = ledger.issuer_entry("payments");
    assert!(
        !entry["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("rollback"),
        "no rollback refusal: {entry}"
    );
    let token = payments.mint("ledger").await;
    ledger
        .verify(&token.token)
        .await
        .expect("verifies after the restart");
    // Metrics show the instances: one live instance of payments.
    let text = scrape(metrics);
    for needle in [
        "tokend_peer_instances{issuer=\"spiffe://bank.internal/payments\"} 1",
        "tokend_documents_installed_total",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

/// A peer address given as a host name is resolved, and each address it
/// resolves to is an instance (here `localhost`, which must resolve to
/// 127.0.0.1 only: tests dial nothing else; where it also resolves to
/// another address the test says so and stops, as the unit test
/// `peers::group::tests::targets_follow_resolution` covers the logic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_is_resolved_to_its_instances() {
    let answer: Vec<SocketAddr> = tokio::net::lookup_host("localhost:7443")
        .await
        .map(|a| a.collect())
        .unwrap_or_default();
    if answer.is_empty() || answer.iter().any(|a| a.ip().to_string() != "127.0.0.1") {
        eprintln!("SKIPPED: localhost resolves to {answer:?}, not 127.0.0.1 only");
        return;
    }
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments").replica(1)).await;
    let port = payments.peer_addr().port();
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer_named("payments", &format!("https://localhost:{port}")),
        )
        .await;
    knows_instances(&ledger, "payments", 1).await;
    let instances = ledger.issuer("payments").await.instances;
    assert_eq!(
        instances[0].source,
        format!("peer:https://localhost:{port} (127.0.0.1:{port})")
    );
    ledger
        .verify(&payments.mint("ledger").await.token)
        .await
        .expect("verifies");
}

/// Over the mesh a document must also be of the identity the connection
/// proved: an address configured as payments whose certificate proves
/// archive, serving payments' genuine document, is refused (nothing is
/// filed, and payments' entry says why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_document_must_match_the_connection() {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments").replica(1)).await;
    let genuine = fetch_document(&bank, payments.peer_addr()).await;
    let (_tx, rx) = tokio::sync::watch::channel(Some(genuine));
    let archive = serve_fake(
        &bank,
        "archive",
        FakePeer {
            watch: vec![],
            unary: pb::PeerKeySet::default(),
            documents: Some(rx),
        },
    )
    .await;
    let ledger = bank
        .start(bank.lean_peer("ledger").peer("payments", archive))
        .await;
    assert!(
        eventually(5, || async {
            ledger
                .issuer("payments")
                .await
                .last_error
                .contains("the connection proved")
        })
        .await,
        "refused, naming why, under the identity configured for the address: {:?}",
        ledger.issuer("payments").await
    );
    assert!(ledger.issuer("payments").await.instances.is_empty());
    assert!(ledger.holds("archive").await.is_none());
    assert_eq!(
        ledger
            .verify(&payments.mint("ledger").await.token)
            .await
            .err()
            .as_deref(),
        Some("unknown_kid")
    );
}

/// A relay replaying an older document of an instance (from before its
/// rotation) after the newer one is refused as a rollback: the newer set
/// stays, and the refusal is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_relay_cannot_roll_back() {
    let bank = Bank::new();
    let payments = bank
        .start(
            bank.lean_peer("payments")
                .replica(1)
                .config("[rotation]\npublish_ahead = \"60s\""),
        )
        .await;
    let older = fetch_document(&bank, payments.peer_addr()).await;
    let next_kid = payments.rotate().await;
    let newer = fetch_document(&bank, payments.peer_addr()).await;
    assert_ne!(older, newer);
    let (tx, _, ledger) = ledger_behind_relay(&bank, newer).await;
    assert!(
        eventually(5, || async {
            ledger.kids_of("payments").await.contains(&next_kid)
        })
        .await,
        "the newer document is installed"
    );
    tx.send_replace(Some(older));
    assert!(
        eventually(5, || async {
            ledger
                .issuer("payments")
                .await
                .last_error
                .contains("rollback")
        })
        .await,
        "the replay is refused as a rollback: {:?}",
        ledger.issuer("payments").await
    );
    assert!(
        ledger.kids_of("payments").await.contains(&next_kid),
        "the newer set stays"
    );
}

/// A peer key that cannot sign documents (here ECDSA P-384, which served
/// peers before documents existed) still serves: the sidecar starts, serves
/// plain key sets only, and its tokens verify at a verifier that falls back
/// to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_key_that_cannot_sign_documents_still_serves() {
    use std::os::unix::fs::PermissionsExt;
    let bank = Bank::new();
    let builder = bank.lean_peer("payments").replica(1);
    let peer_dir = builder.dir().join("peer");
    std::fs::create_dir_all(&peer_dir).expect("mkdir");
    let ca_pem = std::fs::read_to_string(bank.ca().join("ca.pem")).expect("ca");
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(bank.ca().join("ca.key")).expect("ca key"),
    )
    .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::new(vec!["payments".to_owned()]).expect("params");
    params.subject_alt_names.push(rcgen::SanType::URI(
        id("payments").as_str().try_into().expect("uri"),
    ));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("p384");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    std::fs::write(peer_dir.join("cert.pem"), cert.pem()).expect("cert");
    let key_path = peer_dir.join("key.pem");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let payments = bank.start(builder).await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", payments.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    let instances = ledger.issuer("payments").await.instances;
    assert!(
        instances.iter().all(|i| i.seq == 0),
        "plain sets only: {instances:?}"
    );
    ledger
        .verify(&payments.mint("ledger").await.token)
        .await
        .expect("verifies");
}

/// A withheld revocation does not last: payments revokes a key while the
/// only relay ledger hears it through keeps serving the document from
/// before. The relay can delay the revocation, but once that document is in
/// the last fifth of its life ledger fetches the current one from payments
/// itself, and the revoked key is refused (`revoked_key`) before the
/// withheld document would even have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_revocation_ends_within_the_document_lifetime() {
    let bank = Bank::new();
    let x = bank
        .start(bank.peer("payments").replica(1).document_lifetime("60s"))
        .await;
    let (_tx, _, ledger) =
        ledger_behind_relay(&bank, fetch_document(&bank, x.peer_addr()).await).await;
    knows_instances(&ledger, "payments", 1).await;
    let token = x.mint("ledger").await;
    ledger.verify(&token.token).await.expect("verifies");
    x.revoke(&token.kid).await;
    ledger
        .verify(&token.token)
        .await
        .expect("withheld by the relay: still accepted, within the bound");
    bank.advance(49); // into the last fifth of the withheld document's 60 s
    assert!(
        eventually(10, || async {
            ledger.verify(&token.token).await.err().as_deref() == Some("revoked_key")
        })
        .await,
        "the revocation arrives through the direct fetch: {:?}",
        ledger.issuer("payments").await
    );
}
