//! Peer certificates that change while sidecars run (issue 13): renewal by
//! atomic rename and by symlink swap with zero failed verifications,
//! replacements that must be refused, a CA rollover in three steps, CAs
//! tokend did not make (openssl, with an intermediate), and expiry at start
//! and while running.

use std::path::Path;
use std::time::Duration;

use tokend::Reason;

use crate::inproc::{Bank, Node};
use crate::pki::*;
use crate::support::{self, eventually, id};

/// Proves that `verifier` can open a NEW mTLS connection to `issuer`'s peer
/// API with the material both hold now: a token of an unknown kid makes the
/// verifier fetch `issuer`'s keys on a fresh connection, and the set's
/// `updated_at` (the bank's clock, stepped first) shows the fetch landed.
async fn fresh_fetch(bank: &Bank, verifier: &Node, issuer: &str) {
    let key = verifier.signing_key();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        bank.advance(1);
        let want = bank.now();
        let token = support::forge(
            &key,
            &format!("probe-{want}"),
            &bank.claims(issuer, &verifier.name(), 60),
        );
        let (reason, _) = verifier.refusal(&token).await;
        let entry = verifier.issuer(issuer).await;
        if reason == Some(Reason::UnknownKid) && entry.updated_at >= want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} could not fetch {issuer} on a new connection: {reason:?} {entry:?}",
            verifier.name()
        );
        // The refresh of one issuer runs at most once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}

fn ca_pem(bank: &Bank) -> std::path::PathBuf {
    bank.ca().join("ca.pem")
}

/// Two peers keep exchanging keys while payments's certificate is renewed
/// by a Kubernetes-style symlink swap and ledger's by atomic renames: no
/// verification fails, fresh connections present the new serials, and new
/// connections in both directions succeed with the new material.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_by_symlink_swap_and_rename_fails_no_verification() {
    let bank = Bank::new();
    let stage = bank.root().join("stage");
    let v1 = issue(&bank.ca(), "payments", &stage.join("p1"));
    k8s_publish(&bank.root().join("payments/peer"), "..v1", &v1);
    let a = bank.start(bank.lean_peer("payments")).await;
    let b = bank
        .start(bank.lean_peer("ledger").peer("payments", a.peer_addr()))
        .await;
    b.learns(&["payments"]).await;
    let probe = issue(&bank.ca(), "probe", &stage.join("probe"));
    assert_eq!(
        served_serial(a.peer_addr(), &ca_pem(&bank), &probe).await,
        Ok(serial_of(&v1.join("cert.pem")))
    );
    let traffic = Traffic::start(vec![(a.socket(), "ledger".into(), b.socket())]);

    let v2 = issue(&bank.ca(), "payments", &stage.join("p2"));
    k8s_publish(&bank.root().join("payments/peer"), "..v2", &v2);
    wait_served(
        a.peer_addr(),
        &ca_pem(&bank),
        &probe,
        &serial_of(&v2.join("cert.pem")),
    )
    .await;

    let l2 = issue(&bank.ca(), "ledger", &stage.join("l2"));
    renew_by_rename(&l2, &bank.root().join("ledger/peer"));
    wait_served(
        b.peer_addr(),
        &ca_pem(&bank),
        &probe,
        &serial_of(&l2.join("cert.pem")),
    )
    .await;

    // ledger (client, new certificate) to payments (server, new certificate).
    fresh_fetch(&bank, &b, "payments").await;
    let (ok, failures) = traffic.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 0, "the loop verified nothing");
    // The old watch stream was not dropped: a rotation still reaches ledger.
    let kid = a.rotate().await;
    assert!(
        eventually(10, || async { b.kids_of("payments").await.contains(&kid) }).await,
        "ledger never saw payments's new key"
    );
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// A replacement with a mismatched key, with another service's certificate,
/// or with an expired certificate is refused with its reason logged
/// (naming the file) and counted in `tokend_peer_tls_reload_total`; fresh
/// connections keep seeing the old serial. A good one then goes through,
/// and a peer's watch stream opened before all of it is still the one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replacements_are_refused_and_the_old_certificate_serves_on() {
    let root = support::tmp();
    let r = root.path();
    support::ca_init(r);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let a = support::Sidecar::start_peer(
        r,
        "payments",
        &[],
        &format!("[metrics]\nlisten = \"{metrics}\""),
    );
    // ledger watches payments's keys through all of it, on one stream.
    let ledger = support::Sidecar::start_peer(r, "ledger", &[("payments", a.peer_addr())], "");
    assert!(
        eventually(15, || async { !ledger.kids_of("payments").is_empty() }).await,
        "ledger never learnt payments's keys"
    );
    let peer = r.join("payments/peer");
    let ca = r.join("ca");
    let probe = issue(&ca, "probe", &r.join("probe"));
    let old = serial_of(&peer.join("cert.pem"));
    assert_eq!(
        served_serial(a.peer_addr(), &ca.join("ca.pem"), &probe).await,
        Ok(old.clone())
    );
    let now = support::now();
    let mismatched = issue(&ca, "payments", &r.join("m"));
    let other_key = issue(&ca, "payments", &r.join("m2"));
    let wrong_id = issue(&ca, "ledger", &r.join("w"));
    let expired = issue_window(&ca, "payments", &r.join("e"), now - 7200, now - 3600);
    let cases: [(&str, &Path, &Path, &str); 3] = [
        (
            "mismatched key",
            &mismatched,
            &other_key,
            "does not match peer_api.cert",
        ),
        (
            "another identity",
            &wrong_id,
            &wrong_id,
            "proves spiffe://bank.internal/ledger",
        ),
        ("expired", &expired, &expired, "not now"),
    ];
    for (n, (what, cert_dir, key_dir, reason)) in cases.iter().enumerate() {
        rename_into(
            &peer,
            "cert.pem",
            &std::fs::read(cert_dir.join("cert.pem")).expect("cert"),
        );
        rename_into(
            &peer,
            "key.pem",
            &std::fs::read(key_dir.join("key.pem")).expect("key"),
        );
        let want = format!(
            "tokend_peer_tls_reload_total{{result=\"refused\"}} {}",
            n + 1
        );
        assert!(
            eventually(15, || async { scrape(metrics).contains(&want) }).await,
            "{what}: no refusal counted:\n{}",
            scrape(metrics)
        );
        let log = a.stderr();
        assert!(
            log.lines()
                .any(|l| l.contains("new peer TLS material refused")
                    && l.contains(reason)
                    && l.contains("cert.pem")),
            "{what}: no refusal naming the file and {reason:?} in:\n{log}"
        );
        assert_eq!(
            served_serial(a.peer_addr(), &ca.join("ca.pem"), &probe).await,
            Ok(old.clone()),
            "{what}: the old certificate must keep serving"
        );
    }
    let good = issue(&ca, "payments", &r.join("g"));
    renew_by_rename(&good, &peer);
    wait_served(
        a.peer_addr(),
        &ca.join("ca.pem"),
        &probe,
        &serial_of(&good.join("cert.pem")),
    )
    .await;
    assert!(scrape(metrics).contains("tokend_peer_tls_reload_total{result=\"ok\"} 1"));
    // The established watch stream outlived every reload, refused or not
    // (a peer of this release watches signed documents; an older one, keys).
    let log = a.stderr();
    let watches =
        log.matches("peer watching documents").count() + log.matches("peer watching keys").count();
    assert_eq!(watches, 1, "{log}");
    let token = a.mint("ledger").await.token;
    assert!(ledger.verify(&token).await.is_ok());
    assert!(scrape(metrics).contains("tokend_peer_cert_expires_in_seconds"));
    assert!(scrape(metrics).contains("tokend_peer_ca_expires_in_seconds{serial="));
}

/// `serve` with an expired or a not yet valid certificate exits 64 and
/// names the file and its dates.
#[test]
fn a_certificate_outside_its_validity_stops_the_start() {
    let root = support::tmp();
    let r = root.path();
    support::ca_init(r);
    let now = support::now();
    for (name, from, to) in [
        ("expired", now - 7200, now - 3600),
        ("early", now + 3600, now + 7200),
    ] {
        let peer = issue_window(&r.join("ca"), name, &r.join(name).join("peer"), from, to);
        let cfg = support::write_config(r, name, &support::peer_config(0, &[], ""));
        let out = support::run_to_exit(
            std::process::Command::new(support::bin())
                .args(["serve", "--config"])
                .arg(&cfg),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {err}");
        let file = peer.join("cert.pem");
        assert!(
            err.contains(&file.display().to_string()) && err.contains("is valid from"),
            "{name}: {err}"
        );
        let from_date = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_secs(from as u64),
        )
        .to_string();
        assert!(
            err.contains(&from_date),
            "{name}: {from_date} missing: {err}"
        );
    }
}

/// Past `warn_at` (0.8) of its lifetime the certificate is warned about,
/// once; once it has expired (the bank's clock passes its end),
/// grpc.health.v1 reports `tokend.v1.PeerService` NOT_SERVING; a renewal
/// makes it SERVING again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_the_certificate_expires() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let _ = crate::inproc::logs();
    let bank = Bank::new();
    let a = bank.start(bank.lean_peer("payments")).await;
    let serial = serial_of(&bank.root().join("payments/peer/cert.pem"));
    let status = || async {
        let mut c = tonic_health::pb::health_client::HealthClient::new(
            tokend::connect(&a.socket()).await.expect("connect"),
        );
        c.check(HealthCheckRequest {
            service: "tokend.v1.PeerService".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
    };
    assert!(
        eventually(10, || async {
            status().await == ServingStatus::Serving as i32
        })
        .await
    );
    // The certificate lives 25 hours (an hour back, a day ahead): past 80%
    // of it, one warning naming its serial; the peer API still serves.
    bank.advance(21 * 3600);
    let warned = |l: &str| l.contains("past peer_api.warn_at") && l.contains(&serial);
    assert!(
        eventually(10, || async { crate::inproc::logs().lines().any(warned) }).await,
        "no expiry warning for {serial}"
    );
    assert_eq!(status().await, ServingStatus::Serving as i32);
    bank.advance(2 * 86_400);
    assert!(
        eventually(10, || async {
            status().await == ServingStatus::NotServing as i32
        })
        .await,
        "still serving with an expired certificate"
    );
    let t = bank.now();
    let fresh = issue_window(
        &bank.ca(),
        "payments",
        &bank.root().join("renew"),
        t - 60,
        t + 86_400,
    );
    renew_by_rename(&fresh, &bank.root().join("payments/peer"));
    assert!(
        eventually(10, || async {
            status().await == ServingStatus::Serving as i32
        })
        .await,
        "a renewal did not restore SERVING"
    );
}

/// A CA rollover in three steps (add the new CA to every bundle, reissue
/// every leaf from it, drop the old CA) across three sidecars with a
/// continuous mint/verify loop: no verification fails, and after each step
/// new connections succeed in every direction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rollover_in_three_steps_fails_no_call() {
    let bank = Bank::new();
    let a = bank.start(bank.lean_peer("payments")).await;
    let b = bank
        .start(bank.lean_peer("ledger").peer("payments", a.peer_addr()))
        .await;
    let c = bank
        .start(
            bank.lean_peer("archive")
                .peer("payments", a.peer_addr())
                .peer("ledger", b.peer_addr()),
        )
        .await;
    b.learns(&["payments"]).await;
    c.learns(&["payments", "ledger"]).await;
    let traffic = Traffic::start(vec![
        (a.socket(), "ledger".into(), b.socket()),
        (a.socket(), "archive".into(), c.socket()),
        (b.socket(), "archive".into(), c.socket()),
    ]);
    let fresh_everywhere = || async {
        fresh_fetch(&bank, &b, "payments").await;
        fresh_fetch(&bank, &c, "payments").await;
        fresh_fetch(&bank, &c, "ledger").await;
    };
    let old_ca = std::fs::read(ca_pem(&bank)).expect("old CA");
    let new_dir = bank.root().join("ca2");
    tokend::ca_init(
        &new_dir,
        &tokend::TrustDomain::new(support::TD).expect("td"),
    )
    .expect("ca2");
    let new_ca = std::fs::read(new_dir.join("ca.pem")).expect("new CA");
    let stage = bank.root().join("stage");
    let old_probe = issue(&bank.ca(), "probe", &stage.join("old-probe"));
    let new_probe = issue(&new_dir, "probe", &stage.join("new-probe"));
    let nodes = [&a, &b, &c];

    // 1. Every bundle holds both CAs (the sidecars share one bundle file).
    rename_into(
        &bank.ca(),
        "ca.pem",
        &[old_ca.clone(), new_ca.clone()].concat(),
    );
    for n in nodes {
        let want = serial_of(&bank.root().join(n.name()).join("peer/cert.pem"));
        wait_served(n.peer_addr(), &ca_pem(&bank), &new_probe, &want).await;
    }
    fresh_everywhere().await;

    // 2. Every leaf is reissued from the new CA.
    for n in nodes {
        let fresh = issue(&new_dir, &n.name(), &stage.join(n.name()));
        renew_by_rename(&fresh, &bank.root().join(n.name()).join("peer"));
        wait_served(
            n.peer_addr(),
            &ca_pem(&bank),
            &new_probe,
            &serial_of(&fresh.join("cert.pem")),
        )
        .await;
    }
    fresh_everywhere().await;

    // 3. The old CA leaves every bundle: a certificate it issued is refused.
    rename_into(&bank.ca(), "ca.pem", &new_ca);
    for n in nodes {
        assert!(
            eventually(15, || async {
                served_serial(n.peer_addr(), &new_dir.join("ca.pem"), &old_probe)
                    .await
                    .is_err()
            })
            .await,
            "{} still trusts the old CA",
            n.name()
        );
    }
    fresh_everywhere().await;
    let (ok, failures) = traffic.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 0, "the loop verified nothing");
}

/// A CA, an intermediate and leaves made by openssl, as a bank's own PKI or
/// cert-manager hands them over (cert.pem = leaf + intermediate): peers
/// connect and keys are filed under the SPIFFE ID of the certificate. A
/// leaf without a URI SAN, or with two, or usable only as a server, is
/// refused with a clear reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_ca_with_intermediate_works_and_bad_leaves_are_refused() {
    let bank = Bank::new();
    let ext = bank.root().join("extca");
    openssl_ca(&ext);
    std::fs::copy(ext.join("root.pem"), ext.join("ca.pem")).expect("bundle");
    let leaf = |name: &str, sans: &str, eku: &str| {
        openssl_leaf_eku(&ext, name, sans, eku, &bank.root().join(name).join("peer"));
    };
    let both = "serverAuth,clientAuth";
    for name in ["payments", "ledger"] {
        leaf(
            name,
            &format!("URI:spiffe://bank.internal/{name},DNS:localhost"),
            both,
        );
    }
    let bad = [
        ("nosan", "DNS:localhost", both, "carries 0 URI SANs"),
        (
            "twosans",
            "URI:spiffe://bank.internal/twosans,URI:spiffe://bank.internal/payments,DNS:localhost",
            both,
            "carries 2 URI SANs",
        ),
        // Presented as a client too, a server-only certificate is refused.
        (
            "serveronly",
            "URI:spiffe://bank.internal/serveronly,DNS:localhost",
            "serverAuth",
            "as a client certificate",
        ),
    ];
    for (name, sans, eku, _) in bad {
        leaf(name, sans, eku);
    }
    // openssl starts validity at the wall clock's now: the bank's clock,
    // set when the bank was made, must not be behind it.
    bank.advance_to(support::now() + 1);
    let ext_peer = |name: &str| bank.lean(name).peer_api(&ext);
    let a = bank.start(ext_peer("payments")).await;
    let b = bank
        .start(ext_peer("ledger").peer("payments", a.peer_addr()))
        .await;
    b.learns(&["payments"]).await;
    let token = a.mint("ledger").await.token;
    assert!(b.verify(&token).await.is_ok());
    assert_eq!(b.issuer("payments").await.issuer, id("payments"));

    for (name, _, _, reason) in bad {
        let err = bank
            .try_start(ext_peer(name))
            .await
            .err()
            .unwrap_or_else(|| panic!("{name} started"));
        assert!(err.to_string().contains(reason), "{name}: {err}");
    }
}

/// `tokend ca issue --intermediate` makes an intermediate CA; leaves issued
/// from its directory with `--ttl 12h` carry leaf + intermediate, live 12
/// hours, and work between peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokend_intermediate_and_short_ttl() {
    let bank = Bank::new();
    let int = bank.root().join("int");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(support::bin())
            .args(args)
            .output()
            .expect("tokend");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
    run(&[
        "ca",
        "issue",
        "--intermediate",
        "--name",
        "issuing",
        "--ca",
        &s(&bank.ca()),
        "--out",
        &s(&int),
    ]);
    for name in ["payments", "ledger"] {
        let out = bank.root().join(name).join("peer");
        run(&[
            "ca",
            "issue",
            "--ca",
            &s(&int),
            "--name",
            name,
            "--ttl",
            "12h",
            "--out",
            &s(&out),
        ]);
        let pem = std::fs::read(out.join("cert.pem")).expect("cert");
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .expect("pem");
        assert_eq!(certs.len(), 2, "leaf + intermediate");
        let (_, leaf) = x509_parser::parse_x509_certificate(&certs[0]).expect("leaf");
        let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(life, 12 * 3600 + 300, "12h plus 5 minutes of skew");
    }
    let a = bank.start(bank.lean_peer("payments")).await;
    let b = bank
        .start(bank.lean_peer("ledger").peer("payments", a.peer_addr()))
        .await;
    b.learns(&["payments"]).await;
    let token = a.mint("ledger").await.token;
    assert!(b.verify(&token).await.is_ok());
}

/// `[peer_api] warn_at` must be a fraction of a lifetime; anything else is
/// refused at start, naming the key.
#[test]
fn warn_at_is_a_fraction() {
    let section = |v: &str| {
        format!(
            "[peer_api]\nlisten = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nwarn_at = {v}\n"
        )
    };
    assert_eq!(tokend::check_config(&section("0.75")), Ok(()));
    for bad in ["0", "1", "1.5", "-0.2"] {
        let e = tokend::check_config(&section(bad)).expect_err(bad);
        assert!(e.contains("peer_api.warn_at"), "{bad}: {e}");
    }
}

/// A renewal whose certificate starts a little in the future (its CA's
/// clock runs ahead) is refused while it is not yet valid, logged once, and
/// swapped in by itself once the clock reaches its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_ahead_of_the_clock_is_taken_once_valid() {
    let _ = crate::inproc::logs();
    let bank = Bank::new();
    let _a = bank.start(bank.lean_peer("payments")).await;
    let t = bank.now();
    let ahead = issue_window(
        &bank.ca(),
        "payments",
        &bank.root().join("ahead"),
        t + 120,
        t + 86_400,
    );
    let serial = serial_of(&ahead.join("cert.pem"));
    renew_by_rename(&ahead, &bank.root().join("payments/peer"));
    let lines = |needle: &'static str| {
        crate::inproc::logs()
            .lines()
            .filter(|l| l.contains(needle) && l.contains(&serial))
            .count()
    };
    assert!(
        eventually(10, || async { lines("new peer TLS material refused") == 1 }).await,
        "the early certificate was not refused"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lines("new peer TLS material refused"), 1, "logged once");
    assert_eq!(lines("peer TLS material reloaded"), 0);
    bank.advance(180);
    assert!(
        eventually(10, || async { lines("peer TLS material reloaded") == 1 }).await,
        "never taken once valid"
    );
}

/// A renewal re-signs the instance's key-set document at once, with the new
/// certificate: without any key change, ledger receives a document of a
/// higher sequence, and the document payments serves carries the new
/// certificate as its `x5c` leaf (issue 13 item 1 on issue 10's documents).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_signs_the_next_document() {
    use base64::Engine as _;
    use tokend::pb::tokend as pb;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let bank = Bank::new();
    let a = bank.start(bank.lean_peer("payments")).await;
    let b = bank
        .start(bank.lean_peer("ledger").peer("payments", a.peer_addr()))
        .await;
    b.learns(&["payments"]).await;
    let seq = |i: pb::IssuerKeys| i.instances.iter().map(|i| i.seq).max().unwrap_or(0);
    let before = seq(b.issuer("payments").await);
    assert!(before > 0, "ledger holds a document of payments");

    let v2 = issue(
        &bank.ca(),
        "payments",
        &bank.root().join("stage").join("p2"),
    );
    renew_by_rename(&v2, &bank.root().join("payments/peer"));
    let renewed = serial_of(&v2.join("cert.pem"));
    assert!(
        eventually(15, || async { seq(b.issuer("payments").await) > before }).await,
        "no re-signed document reached ledger after the renewal"
    );

    let auditor = crate::peers::issue(&bank, "auditor");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(ca_pem(&bank)).expect("ca"),
        ))
        .domain_name("payments")
        .identity(crate::peers::identity_of(&auditor));
    let channel = Endpoint::try_from(format!("https://{}", a.peer_addr()))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect");
    let jws = pb::peer_service_client::PeerServiceClient::new(channel)
        .get_document(pb::GetDocumentRequest {})
        .await
        .expect("GetDocument")
        .into_inner()
        .jws;
    let header = jws.split('.').next().expect("header");
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .expect("base64url"),
    )
    .expect("json");
    let leaf = base64::engine::general_purpose::STANDARD
        .decode(header["x5c"][0].as_str().expect("x5c"))
        .expect("base64");
    assert_eq!(serial_of_der(&leaf), renewed);
    let token = a.mint("ledger").await.token;
    assert!(b.verify(&token).await.is_ok());
}
