//! Hardening: what an attacker with a token, a socket or a crash can no
//! longer do. Tokens are verified exactly as sent; one-time holds through
//! delegation and across a SIGKILL.

use tokend::pb::spiffe as spb;
use tokend::pb::tokend as pb;

use crate::inproc::{Bank, Node};
use crate::support::*;

fn reason(st: &tonic::Status) -> String {
    tokend::reason_of(st)
        .map(|r| r.to_string())
        .unwrap_or_else(|| format!("no reason: {st}"))
}

/// Mints a one-time token for `audience` through `tokens`.
async fn mint_one_time(
    mut tokens: pb::token_service_client::TokenServiceClient<tonic::transport::Channel>,
    audience: &str,
) -> String {
    tokens
        .mint(pb::MintRequest {
            audience: audience.into(),
            one_time: true,
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner()
        .token
}

fn spiffe_request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    r
}

/// payments → ledger → archive: archive trusts both, ledger trusts payments.
async fn chain(bank: &Bank) -> (Node, Node, Node) {
    let a = bank.start(bank.peer("payments")).await;
    let b = bank
        .start(bank.peer("ledger").peer("payments", a.peer_addr()))
        .await;
    let c = bank
        .start(
            bank.peer("archive")
                .peer("payments", a.peer_addr())
                .peer("ledger", b.peer_addr()),
        )
        .await;
    let (b_ref, c_ref) = (&b, &c);
    assert!(
        eventually(10, || async move {
            !b_ref.kids_of("payments").await.is_empty()
                && !c_ref.kids_of("payments").await.is_empty()
                && !c_ref.kids_of("ledger").await.is_empty()
        })
        .await,
        "peers learnt each other's keys"
    );
    (a, b, c)
}

/// Verify, Exchange and ValidateJWTSVID take the token exactly as sent: a
/// leading or trailing space, a trailing newline or a leading tab makes a
/// byte string that was never signed, refused as `malformed` by all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_taken_exactly_as_sent() {
    let bank = Bank::new();
    let (a, b, _c) = chain(&bank).await;
    let token = a.mint("ledger").await.token;
    assert!(b.verify(&token).await.is_ok(), "control: the token as sent");
    let mut spiffe = spb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        tokend::connect(&b.socket()).await.expect("connect"),
    );
    for variant in [
        format!(" {token}"),
        format!("{token} "),
        format!("{token}\n"),
        format!("\t{token}"),
    ] {
        assert_eq!(
            b.verify(&variant).await.err().as_deref(),
            Some("malformed"),
            "Verify {variant:?}"
        );
        assert_eq!(
            b.exchange(&variant, "archive").await.err().as_deref(),
            Some("malformed"),
            "Exchange {variant:?}"
        );
        let v = spiffe
            .validate_jwtsvid(spiffe_request(spb::ValidateJwtsvidRequest {
                audience: id("ledger"),
                svid: variant.clone(),
            }))
            .await
            .expect_err("validate of a variant");
        assert_eq!(reason(&v), "malformed", "ValidateJWTSVID {variant:?}");
    }
}

/// Exchanging a one-time token gives a one-time delegated token, accepted
/// once downstream; and a one-time token embedded as the link of several
/// chains (forged by a compromised middle service) is accepted only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_holds_through_delegation() {
    let bank = Bank::new();
    let (a, b, c) = chain(&bank).await;
    let once = mint_one_time(a.tokens().await, "ledger").await;
    let delegated = b.exchange(&once, "archive").await.expect("exchange").token;
    assert_eq!(payload(&delegated)["one_time"], true, "one-time propagates");
    let first = c
        .tokens()
        .await
        .verify(pb::VerifyRequest {
            token: delegated.clone(),
            audience: String::new(),
            ..Default::default()
        })
        .await;
    assert!(first.is_ok(), "first use: {first:?}");
    assert_eq!(
        c.verify(&delegated).await.err().as_deref(),
        Some("replayed")
    );
    // Exchanging the same one-time token again at ledger is a replay there.
    assert_eq!(
        b.exchange(&once, "archive").await.err().as_deref(),
        Some("replayed"),
        "second exchange"
    );
    // A compromised ledger forges a second chain around the same link,
    // without one_time on the outer token: the link itself is consumed.
    let key = b.signing_key();
    let now = bank.now();
    let forged = serde_json::json!({
        "iss": id("ledger"), "sub": id("payments"), "aud": id("archive"),
        "iat": now, "nbf": now, "exp": payload(&once)["exp"], "jti": "forged-chain-2",
        "act": {"sub": id("ledger"), "prev_token": once},
    });
    let forged = forge(&key, key.kid(), &forged);
    assert_eq!(
        c.verify(&forged).await.err().as_deref(),
        Some("replayed"),
        "the link was already used in the first chain"
    );
}

/// Replay memory survives a SIGKILL: a one-time token used once is still
/// `replayed` after the verifier restarts.
#[tokio::test]
async fn one_time_survives_sigkill() {
    let root = tmp();
    let mut s = Sidecar::start(root.path(), "ledger", "");
    let token = mint_one_time(s.tokens().await, "ledger").await;
    assert!(s.verify(&token).await.is_ok(), "first use");
    s.kill9();
    s.restart();
    assert_eq!(s.verify(&token).await.err().as_deref(), Some("replayed"));
    let fresh = s.mint("ledger").await.token;
    assert!(
        s.verify(&fresh).await.is_ok(),
        "ordinary tokens still verify"
    );
}

/// A token naming an unknown kid of a peer that accepts connections but
/// never answers is refused as `unknown_kid` within the caller's deadline:
/// the refresh waits at most half of it (and at most 1 s), so the caller
/// gets a reason, not DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_does_not_outlast_the_callers_deadline() {
    let bank = Bank::new();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s); // accepted, never answered
        }
    });
    let ledger = bank.start(bank.peer("ledger").peer("payments", addr)).await;
    let stranger = tokend::SigningKey::from_pkcs8(&tokend::generate_pkcs8(2048).expect("keygen"))
        .expect("key");
    let now = bank.now();
    let token = forge(
        &stranger,
        stranger.kid(),
        &serde_json::json!({
            "iss": id("payments"), "sub": id("payments"), "aud": id("ledger"),
            "iat": now, "nbf": now, "exp": now + 60, "jti": "silent-1",
        }),
    );
    let mut req = tonic::Request::new(pb::VerifyRequest {
        token,
        audience: String::new(),
        ..Default::default()
    });
    req.set_timeout(std::time::Duration::from_millis(600));
    let st = ledger
        .tokens()
        .await
        .verify(req)
        .await
        .expect_err("refused");
    assert_eq!(reason(&st), "unknown_kid", "{st:?}");
    held.abort();
}

/// A peer that answers with whatever the test scripts: a key-set stream
/// (then an error status), or an error at once.
#[derive(Clone)]
struct HostilePeer {
    sets: usize,
    set: pb::PeerKeySet,
    /// How the stream ends after its sets (`None`: it stays open).
    end: Option<tonic::Status>,
    /// How long the watch waits before its first set.
    after: std::time::Duration,
}

type SetStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::PeerKeySet, tonic::Status>> + Send>,
>;

type DocStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::KeySetDocument, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for HostilePeer {
    // An older release: no signed documents, so clients fall back to GetKeys.
    async fn get_document(
        &self,
        _: tonic::Request<pb::GetDocumentRequest>,
    ) -> Result<tonic::Response<pb::KeySetDocument>, tonic::Status> {
        Err(tonic::Status::unimplemented("no documents"))
    }
    type WatchDocumentsStream = DocStream;
    async fn watch_documents(
        &self,
        _: tonic::Request<pb::GetDocumentRequest>,
    ) -> Result<tonic::Response<DocStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no documents"))
    }
    async fn get_keys(
        &self,
        _: tonic::Request<pb::GetKeysRequest>,
    ) -> Result<tonic::Response<pb::PeerKeySet>, tonic::Status> {
        match &self.end {
            Some(e) => Err(e.clone()),
            None => Ok(tonic::Response::new(self.set.clone())),
        }
    }
    type WatchKeysStream = SetStream;
    async fn watch_keys(
        &self,
        _: tonic::Request<pb::GetKeysRequest>,
    ) -> Result<tonic::Response<SetStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (set, n, after) = (self.set.clone(), self.sets, self.after);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            for _ in 0..n {
                if tx.send(Ok(set.clone())).await.is_err() {
                    return;
                }
            }
        });
        let s = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(tonic::Response::new(match &self.end {
            Some(e) => Box::pin(s.chain(tokio_stream::once(Err(e.clone())))),
            None => Box::pin(s.chain(tokio_stream::pending())),
        }))
    }
}

/// Serves `peer` over mTLS as `name` with a certificate from `root/ca`.
async fn serve_hostile(
    root: &std::path::Path,
    name: &str,
    peer: HostilePeer,
) -> std::net::SocketAddr {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let dir = ca_issue(&root.join("ca"), &root.join("hostile"), name);
    let read = |p: std::path::PathBuf| std::fs::read(p).expect("pem");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(dir.join("cert.pem")),
            read(dir.join("key.pem")),
        ))
        .client_ca_root(Certificate::from_pem(read(root.join("ca/ca.pem"))));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("tls")
        .add_service(pb::peer_service_server::PeerServiceServer::new(peer));
    tokio::spawn(
        server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// A peer's text never forges a line in the victim's log: a newline in its
/// status message is escaped; and a peer flooding invalid key sets gets at
/// most about one warning a second, the rest counted as suppressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peer_cannot_forge_or_flood_the_log() {
    let root = tmp();
    ca_init(root.path());
    const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO tokend: FORGED LINE";
    let forger = serve_hostile(
        root.path(),
        "payments",
        HostilePeer {
            sets: 0,
            set: pb::PeerKeySet::default(),
            end: Some(tonic::Status::internal(format!("nope\n{FORGED}"))),
            after: std::time::Duration::ZERO,
        },
    )
    .await;
    let flooder = serve_hostile(
        root.path(),
        "cards",
        HostilePeer {
            sets: 20_000,
            set: pb::PeerKeySet {
                issuer: id("cards"),
                jwks_json: "not a key set".into(),
                ..Default::default()
            },
            end: Some(tonic::Status::unavailable("done")),
            after: std::time::Duration::ZERO,
        },
    )
    .await;
    ca_issue(&root.path().join("ca"), root.path(), "ledger");
    let mut ledger = Sidecar::start(
        root.path(),
        "ledger",
        &peer_config(0, &[("payments", forger), ("cards", flooder)], ""),
    );
    let log_has = |needle: &'static str| {
        let ledger = &ledger;
        async move { ledger.stderr().contains(needle) }
    };
    assert!(
        eventually(20, || log_has("FORGED")).await,
        "the message reached the log"
    );
    // Warnings carry the count suppressed since the previous one; wait
    // (under a loaded machine the flood is slower) until they add up.
    let suppressed_so_far = |log: &str| -> u64 {
        log.lines()
            .filter_map(|l| l.split("suppressed=").nth(1))
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        eventually(30, || async { suppressed_so_far(&ledger.stderr()) > 1_000 }).await,
        "the flood was never counted as suppressed: {}",
        suppressed_so_far(&ledger.stderr())
    );
    ledger.stop();
    let log = ledger.stderr();
    assert!(
        !log.lines().any(|l| l.starts_with(FORGED)),
        "a peer forged a log line:\n{log}"
    );
    assert!(
        log.contains("\\n2026-01-01"),
        "the newline is shown escaped"
    );
    let refusals = log
        .lines()
        .filter(|l| l.contains("refused peer key set"))
        .count();
    let suppressed = suppressed_so_far(&log);
    eprintln!("refusal warnings: {refusals}, suppressed: {suppressed}");
    assert!(
        suppressed > 1_000,
        "the flood was counted, not logged: {suppressed}"
    );
    assert!(refusals < 60, "{refusals} warnings for a 20,000-set flood");
}

/// A peer pushing valid key sets as fast as it can does not make every
/// FetchJWTBundles watcher spin: updates reach a watcher at most about four
/// times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_sets_are_coalesced_for_bundle_watchers() {
    use tokio_stream::StreamExt;
    let bank = Bank::new();
    let key = tokend::SigningKey::from_pkcs8(&tokend::generate_pkcs8(2048).expect("keygen"))
        .expect("key");
    let jwks = serde_json::json!({ "keys": [key.public().to_jwk()] }).to_string();
    let flooder = serve_hostile(
        bank.root(),
        "cards",
        HostilePeer {
            sets: 200_000,
            set: pb::PeerKeySet {
                issuer: id("cards"),
                jwks_json: jwks,
                ..Default::default()
            },
            end: Some(tonic::Status::unavailable("done")),
            after: std::time::Duration::ZERO,
        },
    )
    .await;
    let ledger = bank.start(bank.peer("ledger").peer("cards", flooder)).await;
    let mut spiffe = spb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        tokend::connect(&ledger.socket()).await.expect("connect"),
    );
    let mut stream = spiffe
        .fetch_jwt_bundles(spiffe_request(spb::JwtBundlesRequest {}))
        .await
        .expect("bundles")
        .into_inner();
    let window = std::time::Duration::from_secs(2);
    let started = std::time::Instant::now();
    let mut updates = 0;
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(window.saturating_sub(started.elapsed()), stream.next()).await
    {
        updates += 1;
    }
    let applied = ledger
        .trusted()
        .await
        .into_iter()
        .find(|i| i.issuer == id("cards"))
        .map(|i| i.updated_at)
        .unwrap_or_default();
    eprintln!("bundle updates seen in {window:?}: {updates}");
    assert!(applied > 0, "the flood's sets were applied");
    assert!(updates >= 1, "the watcher gets the current bundle");
    assert!(
        updates <= 12,
        "{updates} updates in {window:?}: not coalesced"
    );
}

/// A relay that proves identity payments (it holds a payments certificate)
/// but serves no documents poisons payments' set with payments' real kid
/// and its own modulus. Its set is filed under payments (the identity its
/// certificate proves) as an instance of its own, but it cannot shadow the
/// key payments signed for in its own document: honest payments tokens
/// keep verifying and the bogus modulus is never in payments' usable set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_key_set_is_replaced_by_the_issuers_own() {
    let bank = Bank::new();
    let payments = bank.start(bank.peer("payments")).await;
    let real_kid = payments.mint("ledger").await.kid;
    let stranger = tokend::SigningKey::from_pkcs8(&tokend::generate_pkcs8(2048).expect("keygen"))
        .expect("key");
    let mut poisoned = stranger.public().to_jwk();
    poisoned.kid = Some(real_kid.clone());
    let relay = serve_hostile(
        bank.root(),
        "payments",
        HostilePeer {
            sets: 1,
            set: pb::PeerKeySet {
                issuer: id("payments"),
                jwks_json: serde_json::json!({ "keys": [poisoned] }).to_string(),
                ..Default::default()
            },
            end: None,
            // After ledger has payments' own set, so the poison is what it holds last.
            after: std::time::Duration::from_secs(1),
        },
    )
    .await;
    // ledger trusts payments at its address, and "cards" at the relay's.
    let ledger = bank
        .start(
            bank.peer("ledger")
                .peer("payments", payments.peer_addr())
                .peer("cards", relay),
        )
        .await;
    let token = payments.mint("ledger").await.token;
    ledger.learns(&["payments"]).await;
    let relay_instance = format!("peer:https://{relay}");
    let l = &ledger;
    assert!(
        eventually(10, || async {
            l.issuer("payments")
                .await
                .instances
                .iter()
                .any(|i| i.instance == relay_instance && i.kids == vec![real_kid.clone()])
        })
        .await,
        "the relay's set was filed under payments (the identity its certificate proves): {:?}",
        ledger.issuer("payments").await.instances
    );
    let v = ledger.verify(&token).await;
    assert!(v.is_ok(), "honest payments token: {v:?}");
    assert!(
        !payments_jwks(&ledger)
            .await
            .contains(&poisoned_n(&stranger))
    );
}

async fn payments_jwks(l: &Node) -> String {
    l.trusted()
        .await
        .into_iter()
        .find(|i| i.issuer == id("payments"))
        .map(|i| i.jwks_json)
        .unwrap_or_default()
}

fn poisoned_n(key: &tokend::SigningKey) -> String {
    key.public().to_jwk().n
}
