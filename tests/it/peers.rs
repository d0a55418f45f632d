//! Peers over mTLS: real sidecars of one trust domain on 127.0.0.1, plus
//! in-process impostor and malicious peers holding real CA-issued certificates.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;

use tokend::SigningKey;
use tokend::pb::tokend as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::support::*;

/// A peer that serves whatever the test scripts.
#[derive(Clone)]
struct FakePeer {
    watch: Vec<pb::PeerKeySet>,
    unary: pb::PeerKeySet,
}

type SetStream = Pin<Box<dyn Stream<Item = Result<pb::PeerKeySet, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for FakePeer {
    async fn get_keys(
        &self,
        _: tonic::Request<pb::GetKeysRequest>,
    ) -> Result<tonic::Response<pb::PeerKeySet>, tonic::Status> {
        Ok(tonic::Response::new(self.unary.clone()))
    }
    type WatchKeysStream = SetStream;
    async fn watch_keys(
        &self,
        _: tonic::Request<pb::GetKeysRequest>,
    ) -> Result<tonic::Response<SetStream>, tonic::Status> {
        let s = tokio_stream::iter(self.watch.clone().into_iter().map(Ok))
            .chain(tokio_stream::pending());
        Ok(tonic::Response::new(Box::pin(s)))
    }
}

/// Serves `fake` with mTLS as `name`, using the CA under `ca_root/ca` and a certificate it issues.
async fn serve_fake(ca_root: &Path, name: &str, fake: FakePeer) -> SocketAddr {
    let peer_dir = ca_issue(&ca_root.join("ca"), ca_root, name);
    let read = |p: &Path| std::fs::read(p).expect("read pem");
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&peer_dir.join("cert.pem")),
            read(&peer_dir.join("key.pem")),
        ))
        .client_ca_root(Certificate::from_pem(read(&ca_root.join("ca/ca.pem"))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("tls config")
        .add_service(pb::peer_service_server::PeerServiceServer::new(fake));
    tokio::spawn(
        server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

fn new_key() -> SigningKey {
    SigningKey::from_pkcs8(&tokend::generate_pkcs8(2048).expect("keygen")).expect("key")
}

fn jwks_of(keys: &[&SigningKey]) -> String {
    let keys: Vec<_> = keys.iter().map(|k| k.public().to_jwk()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

fn set_of(claimed: &str, keys: &[&SigningKey]) -> pb::PeerKeySet {
    pb::PeerKeySet {
        issuer: id(claimed),
        jwks_json: jwks_of(keys),
        version: 1,
        ..Default::default()
    }
}

/// The core guarantee: A's token is accepted by B as A; C's private key cannot
/// produce a token B accepts as A (with C's kid or A's); C's own token is C's.
#[tokio::test]
async fn stolen_peer_key_cannot_impersonate_another() {
    let root = tmp();
    ca_init(root.path());
    let a = Sidecar::start_peer(root.path(), "payments", &[], "");
    let c = Sidecar::start_peer(root.path(), "archive", &[], "");
    let b = Sidecar::start_peer(
        root.path(),
        "ledger",
        &[("payments", a.peer_addr()), ("archive", c.peer_addr())],
        "",
    );

    let m = a.mint("ledger").await;
    let v = b.verify(&m.token).await.expect("B accepts A's token");
    assert_eq!(
        (v.issuer.as_str(), v.subject.as_str()),
        (id("payments").as_str(), id("payments").as_str())
    );

    let stolen = c.signing_key();
    let claims = claims("payments", "ledger", 60);
    assert_eq!(
        b.verify(&forge(&stolen, stolen.kid(), &claims))
            .await
            .err()
            .as_deref(),
        Some("unknown_kid")
    );
    assert_eq!(
        b.verify(&forge(&stolen, &m.kid, &claims))
            .await
            .err()
            .as_deref(),
        Some("bad_signature")
    );
    // C may not claim to act for A either: sub must equal iss without delegation.
    let mut c_as_a = claims_from("archive", "ledger");
    c_as_a["sub"] = id("payments").into();
    assert_eq!(
        b.verify(&forge(&stolen, stolen.kid(), &c_as_a))
            .await
            .err()
            .as_deref(),
        Some("malformed")
    );

    let own = c.mint("ledger").await;
    let v = b.verify(&own.token).await.expect("C's own token");
    assert_eq!(v.issuer, id("archive"));
    assert_eq!(
        b.issuer_entry("payments")["source"],
        format!("peer:https://{}", a.peer_addr())
    );
}

fn claims_from(iss: &str, aud: &str) -> serde_json::Value {
    claims(iss, aud, 60)
}

/// An address configured as A serves a certificate saying C and a message
/// claiming to be A's keys: B files those keys under C, never under A.
#[tokio::test]
async fn keys_are_bound_to_the_certificate_not_the_message() {
    let root = tmp();
    ca_init(root.path());
    let x = new_key();
    let fake = FakePeer {
        watch: vec![set_of("payments", &[&x])],
        unary: set_of("payments", &[&x]),
    };
    let impostor = serve_fake(root.path(), "archive", fake).await;
    let dead: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let b = Sidecar::start_peer(
        root.path(),
        "ledger",
        &[("payments", impostor), ("archive", dead)],
        "",
    );

    assert!(
        eventually(15, || async {
            b.kids_of("archive").contains(&x.kid().to_owned())
        })
        .await,
        "keys filed under the certificate's identity: {}",
        b.jwks_all()
    );
    assert!(
        b.kids_of("payments").is_empty(),
        "nothing filed under the claimed identity"
    );
    let as_payments = forge(&x, x.kid(), &claims("payments", "ledger", 60));
    assert_eq!(
        b.verify(&as_payments).await.err().as_deref(),
        Some("unknown_kid")
    );
    let as_archive = forge(&x, x.kid(), &claims("archive", "ledger", 60));
    assert_eq!(
        b.verify(&as_archive)
            .await
            .expect("accepted as archive")
            .issuer,
        id("archive")
    );
    assert!(
        b.stderr().contains("peer address serves another identity"),
        "the mismatch is logged"
    );
}

async fn get_keys(
    addr: SocketAddr,
    ca_pem: &[u8],
    identity: Option<Identity>,
) -> Result<pb::PeerKeySet, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("ledger");
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    let channel = Endpoint::try_from(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    pb::peer_service_client::PeerServiceClient::new(channel)
        .get_keys(pb::GetKeysRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("GetKeys: {s}"))
}

fn identity_of(dir: &Path) -> Identity {
    Identity::from_pem(
        std::fs::read(dir.join("cert.pem")).expect("cert"),
        std::fs::read(dir.join("key.pem")).expect("key"),
    )
}

/// A client certificate from another CA, or none, is refused at the handshake;
/// one from the trust domain's CA is served. B, as a client, refuses a server
/// whose certificate comes from another CA.
#[tokio::test]
async fn foreign_ca_and_missing_certificates_are_refused() {
    let root = tmp();
    ca_init(root.path());
    let other = tmp();
    ca_init(other.path());
    let ca_pem = std::fs::read(root.path().join("ca/ca.pem")).expect("ca");

    let foreign_fake = serve_fake(
        other.path(),
        "payments",
        FakePeer {
            watch: vec![],
            unary: set_of("payments", &[&new_key()]),
        },
    )
    .await;
    let b = Sidecar::start_peer(root.path(), "ledger", &[("payments", foreign_fake)], "");
    let addr = b.peer_addr();

    let foreign = ca_issue(&other.path().join("ca"), other.path(), "auditor");
    assert!(
        get_keys(addr, &ca_pem, Some(identity_of(&foreign)))
            .await
            .is_err(),
        "foreign CA refused"
    );
    assert!(
        get_keys(addr, &ca_pem, None).await.is_err(),
        "no client certificate refused"
    );
    let ours = ca_issue(&root.path().join("ca"), root.path(), "auditor");
    let set = get_keys(addr, &ca_pem, Some(identity_of(&ours)))
        .await
        .expect("own CA served");
    assert_eq!(set.issuer, id("ledger"));
    assert!(set.jwks_json.contains(&b.signing_key().kid().to_owned()));

    assert!(
        eventually(15, || async {
            !b.issuer_entry("payments")["last_error"].is_null()
        })
        .await,
        "B records the refused server"
    );
    let err = b.issuer_entry("payments")["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(
        b.kids_of("payments").is_empty(),
        "no keys from a foreign-CA server"
    );
}

/// A stops and restarts: B verifies A's tokens throughout. A's keys wiped and
/// regenerated: B learns the new key when a token names it.
#[tokio::test]
async fn peer_restart_and_brand_new_key() {
    let root = tmp();
    ca_init(root.path());
    let mut a = Sidecar::start_peer(root.path(), "payments", &[], "");
    let b = Sidecar::start_peer(root.path(), "ledger", &[("payments", a.peer_addr())], "");
    assert!(
        eventually(10, || async { !b.kids_of("payments").is_empty() }).await,
        "initial set over the watch"
    );
    let first = a.mint("ledger").await;
    assert!(b.verify(&first.token).await.is_ok());

    a.stop();
    for _ in 0..3 {
        assert!(
            b.verify(&first.token).await.is_ok(),
            "A down: its last keys stay in use"
        );
    }
    a.restart();
    let again = a.mint("ledger").await;
    assert_eq!(again.kid, first.kid);
    assert!(b.verify(&again.token).await.is_ok());

    a.stop();
    std::fs::remove_dir_all(&a.keys_dir).expect("wipe keys");
    a.restart();
    let fresh = a.mint("ledger").await;
    assert_ne!(fresh.kid, first.kid, "a brand-new key");
    let v = b
        .verify(&fresh.token)
        .await
        .unwrap_or_else(|e| panic!("new kid learnt on demand: {e}\n{}", b.stderr()));
    assert_eq!(v.kid, fresh.kid);
}

/// Malicious peers: one sends a 10 MB key set, one sends 10,000 keys. Both are
/// refused with a recorded reason, their previous (valid) sets stay in use,
/// and B keeps verifying everyone else.
#[tokio::test]
async fn oversized_key_sets_are_refused() {
    let root = tmp();
    ca_init(root.path());
    let a = Sidecar::start_peer(root.path(), "payments", &[], "");

    let m_key = new_key();
    let many = pb::PeerKeySet {
        issuer: id("mallory"),
        jwks_json: format!(
            "{{\"keys\":[{}]}}",
            vec!["{\"kty\":\"RSA\"}"; 10_000].join(",")
        ),
        version: 2,
        ..Default::default()
    };
    let mallory = serve_fake(
        root.path(),
        "mallory",
        FakePeer {
            watch: vec![set_of("mallory", &[&m_key]), many.clone()],
            unary: many,
        },
    )
    .await;

    let k_key = new_key();
    let huge = pb::PeerKeySet {
        issuer: id("bulk"),
        jwks_json: "x".repeat(10 * 1024 * 1024),
        version: 2,
        ..Default::default()
    };
    let bulk = serve_fake(
        root.path(),
        "bulk",
        FakePeer {
            watch: vec![set_of("bulk", &[&k_key]), huge.clone()],
            unary: huge,
        },
    )
    .await;

    let b = Sidecar::start_peer(
        root.path(),
        "ledger",
        &[
            ("payments", a.peer_addr()),
            ("mallory", mallory),
            ("bulk", bulk),
        ],
        "",
    );
    assert!(
        eventually(20, || async {
            let e = b.issuer_entry("mallory");
            e["last_error"]
                .as_str()
                .is_some_and(|s| s.contains("10000 keys"))
        })
        .await,
        "10,000 keys refused: {}",
        b.issuer_entry("mallory")
    );
    assert!(
        eventually(20, || async {
            b.issuer_entry("bulk")["last_error"]
                .as_str()
                .is_some_and(|s| s.contains("too large"))
        })
        .await,
        "10 MB refused: {}",
        b.issuer_entry("bulk")
    );
    assert_eq!(
        b.kids_of("mallory"),
        vec![m_key.kid().to_owned()],
        "previous set stays"
    );
    assert_eq!(
        b.kids_of("bulk"),
        vec![k_key.kid().to_owned()],
        "previous set stays"
    );
    assert!(
        b.verify(&a.mint("ledger").await.token).await.is_ok(),
        "other issuers unaffected"
    );
    let t = forge(&m_key, m_key.kid(), &claims("mallory", "ledger", 60));
    assert_eq!(
        b.verify(&t)
            .await
            .expect("mallory's earlier key still works")
            .issuer,
        id("mallory")
    );
}
