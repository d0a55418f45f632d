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
        let ex = b
            .tokens()
            .await
            .exchange(pb::ExchangeRequest {
                token: variant.clone(),
                audience: "archive".into(),
                ttl_seconds: 0,
            })
            .await
            .expect_err("exchange of a variant");
        assert_eq!(reason(&ex), "malformed", "Exchange {variant:?}");
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
    let once = a
        .tokens()
        .await
        .mint(pb::MintRequest {
            audience: "ledger".into(),
            one_time: true,
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner()
        .token;
    let delegated = b
        .tokens()
        .await
        .exchange(pb::ExchangeRequest {
            token: once.clone(),
            audience: "archive".into(),
            ttl_seconds: 0,
        })
        .await
        .expect("exchange")
        .into_inner()
        .token;
    assert_eq!(payload(&delegated)["one_time"], true, "one-time propagates");
    let first = c
        .tokens()
        .await
        .verify(pb::VerifyRequest {
            token: delegated.clone(),
            audience: String::new(),
        })
        .await;
    assert!(first.is_ok(), "first use: {first:?}");
    assert_eq!(
        c.verify(&delegated).await.err().as_deref(),
        Some("replayed")
    );
    // Exchanging the same one-time token again at ledger is a replay there.
    let again = b
        .tokens()
        .await
        .exchange(pb::ExchangeRequest {
            token: once.clone(),
            audience: "archive".into(),
            ttl_seconds: 0,
        })
        .await
        .expect_err("second exchange");
    assert_eq!(reason(&again), "replayed");
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
    let token = s
        .tokens()
        .await
        .mint(pb::MintRequest {
            audience: "ledger".into(),
            one_time: true,
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner()
        .token;
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
