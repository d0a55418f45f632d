//! Peers over mTLS: in-process sidecars of one trust domain on 127.0.0.1
//! (real sockets, TLS and gRPC), plus impostor and malicious peers holding
//! real CA-issued certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokend::SigningKey;
use tokend::pb::tokend as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::inproc::{Bank, logs};
use crate::support::{eventually, forge, id};

/// A peer that serves whatever the test scripts: plain key sets, and signed
/// documents only if `documents` is given (else it answers UNIMPLEMENTED
/// for them, as a release before signed documents does).
#[derive(Clone)]
pub(crate) struct FakePeer {
    pub(crate) watch: Vec<pb::PeerKeySet>,
    pub(crate) unary: pb::PeerKeySet,
    pub(crate) documents: Option<tokio::sync::watch::Receiver<Option<String>>>,
}

type SetStream = Pin<Box<dyn Stream<Item = Result<pb::PeerKeySet, tonic::Status>> + Send>>;
type DocStream = Pin<Box<dyn Stream<Item = Result<pb::KeySetDocument, tonic::Status>> + Send>>;

impl FakePeer {
    fn documents(&self) -> Result<&tokio::sync::watch::Receiver<Option<String>>, tonic::Status> {
        self.documents
            .as_ref()
            .ok_or_else(|| tonic::Status::unimplemented("an older release: no documents"))
    }
}

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for FakePeer {
    async fn get_document(
        &self,
        _: tonic::Request<pb::GetDocumentRequest>,
    ) -> Result<tonic::Response<pb::KeySetDocument>, tonic::Status> {
        match self.documents()?.borrow().clone() {
            Some(jws) => Ok(tonic::Response::new(pb::KeySetDocument { jws })),
            None => Err(tonic::Status::unavailable("nothing to relay")),
        }
    }
    type WatchDocumentsStream = DocStream;
    async fn watch_documents(
        &self,
        _: tonic::Request<pb::GetDocumentRequest>,
    ) -> Result<tonic::Response<DocStream>, tonic::Status> {
        let rx = self.documents()?.clone();
        let s = tokio_stream::wrappers::WatchStream::new(rx)
            .filter_map(|d| d.map(|jws| Ok(pb::KeySetDocument { jws })));
        Ok(tonic::Response::new(Box::pin(s)))
    }
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

/// Issues `<bank>/<name>/peer/{cert,key}.pem` from the bank's CA.
pub(crate) fn issue(bank: &Bank, name: &str) -> PathBuf {
    let dir = bank.root().join(name).join("peer");
    tokend::ca_issue(&bank.ca(), name, &dir, &[], 1).expect("ca issue");
    dir
}

/// Serves `fake` with mTLS as `name`, with a certificate from `bank`'s CA.
pub(crate) async fn serve_fake(bank: &Bank, name: &str, fake: FakePeer) -> SocketAddr {
    let peer_dir = issue(bank, name);
    let read = |p: &Path| std::fs::read(p).expect("read pem");
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&peer_dir.join("cert.pem")),
            read(&peer_dir.join("key.pem")),
        ))
        .client_ca_root(Certificate::from_pem(read(&bank.ca().join("ca.pem"))));
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

pub(crate) fn new_key() -> SigningKey {
    SigningKey::from_pkcs8(&tokend::generate_pkcs8(2048).expect("keygen")).expect("key")
}

fn jwks_of(keys: &[&SigningKey]) -> String {
    let keys: Vec<_> = keys.iter().map(|k| k.public().to_jwk()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

pub(crate) fn set_of(claimed: &str, keys: &[&SigningKey]) -> pb::PeerKeySet {
    pb::PeerKeySet {
        issuer: id(claimed),
        jwks_json: jwks_of(keys),
        version: 1,
        ..Default::default()
    }
}

/// The core guarantee: A's token is accepted by B as A; C's private key cannot
/// produce a token B accepts as A (with C's kid or A's); C's own token is C's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stolen_peer_key_cannot_impersonate_another() {
    let bank = Bank::new();
    let a = bank.start(bank.peer("payments")).await;
    let c = bank.start(bank.peer("archive")).await;
    let b = bank
        .start(
            bank.peer("ledger")
                .peer("payments", a.peer_addr())
                .peer("archive", c.peer_addr()),
        )
        .await;

    let m = a.mint("ledger").await;
    let v = b.verify(&m.token).await.expect("B accepts A's token");
    assert_eq!(
        (v.issuer.as_str(), v.subject.as_str()),
        (id("payments").as_str(), id("payments").as_str())
    );

    let stolen = c.signing_key();
    let claims = bank.claims("payments", "ledger", 60);
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
    let mut c_as_a = bank.claims("archive", "ledger", 60);
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
        b.issuer("payments").await.source,
        format!("peer:https://{}", a.peer_addr())
    );
}

/// An address configured as A serves a certificate saying C and a message
/// claiming to be A's keys: B files those keys under C, never under A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_bound_to_the_certificate_not_the_message() {
    let bank = Bank::new();
    logs();
    let x = new_key();
    let fake = FakePeer {
        watch: vec![set_of("payments", &[&x])],
        unary: set_of("payments", &[&x]),
        documents: None,
    };
    let impostor = serve_fake(&bank, "archive", fake).await;
    let dead: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let b = bank
        .start(
            bank.peer("ledger")
                .peer("payments", impostor)
                .peer("archive", dead),
        )
        .await;

    assert!(
        eventually(5, || async {
            b.kids_of("archive").await.contains(&x.kid().to_owned())
        })
        .await,
        "keys filed under the certificate's identity: {:?}",
        b.trusted().await
    );
    assert!(
        b.kids_of("payments").await.is_empty(),
        "nothing filed under the claimed identity"
    );
    let as_payments = forge(&x, x.kid(), &bank.claims("payments", "ledger", 60));
    assert_eq!(
        b.verify(&as_payments).await.err().as_deref(),
        Some("unknown_kid")
    );
    let as_archive = forge(&x, x.kid(), &bank.claims("archive", "ledger", 60));
    assert_eq!(
        b.verify(&as_archive)
            .await
            .expect("accepted as archive")
            .issuer,
        id("archive")
    );
    // B's line for this peer (its span names the address it dialled).
    let logged = logs();
    let mismatch = logged
        .lines()
        .filter(|l| l.contains("peer address serves another identity"))
        .find(|l| l.contains(&format!("authority: \"{impostor}\"")));
    let mismatch = mismatch.unwrap_or_else(|| panic!("the mismatch is logged"));
    assert!(
        mismatch.contains(&format!("configured={}", id("payments")))
            && mismatch.contains(&format!("presented={}", id("archive"))),
        "{mismatch}"
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

pub(crate) fn identity_of(dir: &Path) -> Identity {
    Identity::from_pem(
        std::fs::read(dir.join("cert.pem")).expect("cert"),
        std::fs::read(dir.join("key.pem")).expect("key"),
    )
}

/// A client certificate from another CA, or none, is refused at the handshake;
/// one from the trust domain's CA is served. B, as a client, refuses a server
/// whose certificate comes from another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_missing_certificates_are_refused() {
    let bank = Bank::new();
    let other = Bank::new();
    let ca_pem = std::fs::read(bank.ca().join("ca.pem")).expect("ca");

    let foreign_fake = serve_fake(
        &other,
        "payments",
        FakePeer {
            watch: vec![],
            unary: set_of("payments", &[&new_key()]),
            documents: None,
        },
    )
    .await;
    let b = bank
        .start(bank.peer("ledger").peer("payments", foreign_fake))
        .await;
    let addr = b.peer_addr();

    let foreign = issue(&other, "auditor");
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
    let ours = issue(&bank, "auditor");
    let set = get_keys(addr, &ca_pem, Some(identity_of(&ours)))
        .await
        .expect("own CA served");
    assert_eq!(set.issuer, id("ledger"));
    assert!(set.jwks_json.contains(&b.signing_key().kid().to_owned()));

    assert!(
        eventually(5, || async {
            !b.issuer("payments").await.last_error.is_empty()
        })
        .await,
        "B records the refused server"
    );
    let err = b.issuer("payments").await.last_error;
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(
        b.kids_of("payments").await.is_empty(),
        "no keys from a foreign-CA server"
    );
}

/// A stops and restarts: B verifies A's tokens throughout. A's keys wiped and
/// regenerated: B learns the new key when a token names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_restart_and_brand_new_key() {
    let bank = Bank::new();
    let mut a = bank.start(bank.peer("payments")).await;
    let b = bank
        .start(bank.peer("ledger").peer("payments", a.peer_addr()))
        .await;
    assert!(
        eventually(5, || async { !b.kids_of("payments").await.is_empty() }).await,
        "initial set over the watch"
    );
    let first = a.mint("ledger").await;
    assert!(b.verify(&first.token).await.is_ok());

    a.stop().await;
    for _ in 0..3 {
        assert!(
            b.verify(&first.token).await.is_ok(),
            "A down: its last keys stay in use"
        );
    }
    a.start().await;
    let again = a.mint("ledger").await;
    assert_eq!(again.kid, first.kid);
    assert!(b.verify(&again.token).await.is_ok());

    a.stop().await;
    std::fs::remove_dir_all(a.keys_dir()).expect("wipe keys");
    a.start().await;
    let fresh = a.mint("ledger").await;
    assert_ne!(fresh.kid, first.kid, "a brand-new key");
    let v = b
        .verify(&fresh.token)
        .await
        .unwrap_or_else(|e| panic!("new kid learnt on demand: {e}"));
    assert_eq!(v.kid, fresh.kid);
    // A wiped keys directory is a new instance of payments: the address now
    // answers as it, so the instance before is marked gone (its keys stay
    // only until its last document expires).
    assert!(b.kids_of("payments").await.contains(&fresh.kid));
    let instances = b.issuer("payments").await.instances;
    assert!(
        instances
            .iter()
            .any(|i| i.gone && i.kids.contains(&first.kid)),
        "{instances:?}"
    );
    assert!(
        instances
            .iter()
            .any(|i| !i.gone && i.kids == vec![fresh.kid.clone()] && i.seq > 0),
        "{instances:?}"
    );
}

/// Malicious peers: one sends a 10 MB key set, one sends 10,000 keys. Both are
/// refused with a recorded reason, their previous (valid) sets stay in use,
/// and B keeps verifying everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_key_sets_are_refused() {
    let bank = Bank::new();
    let a = bank.start(bank.peer("payments")).await;

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
        &bank,
        "mallory",
        FakePeer {
            watch: vec![set_of("mallory", &[&m_key]), many.clone()],
            unary: many,
            documents: None,
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
        &bank,
        "bulk",
        FakePeer {
            watch: vec![set_of("bulk", &[&k_key]), huge.clone()],
            unary: huge,
            documents: None,
        },
    )
    .await;

    let b = bank
        .start(
            bank.peer("ledger")
                .peer("payments", a.peer_addr())
                .peer("mallory", mallory)
                .peer("bulk", bulk),
        )
        .await;
    assert!(
        eventually(5, || async {
            b.issuer("mallory").await.last_error.contains("10000 keys")
        })
        .await,
        "10,000 keys refused: {:?}",
        b.issuer("mallory").await
    );
    assert!(
        eventually(5, || async {
            b.issuer("bulk").await.last_error.contains("too large")
        })
        .await,
        "10 MB refused: {:?}",
        b.issuer("bulk").await.last_error
    );
    assert_eq!(
        b.kids_of("mallory").await,
        vec![m_key.kid().to_owned()],
        "previous set stays"
    );
    assert_eq!(
        b.kids_of("bulk").await,
        vec![k_key.kid().to_owned()],
        "previous set stays"
    );
    assert!(
        b.verify(&a.mint("ledger").await.token).await.is_ok(),
        "other issuers unaffected"
    );
    let t = forge(&m_key, m_key.kid(), &bank.claims("mallory", "ledger", 60));
    assert_eq!(
        b.verify(&t)
            .await
            .expect("mallory's earlier key still works")
            .issuer,
        id("mallory")
    );
}
