//! Server nonces (RFC 9449 §8–9, `[tokens] proof_nonce = "required"`)
//! between two verifier replicas of one service: each replica issues its own
//! nonces and accepts only those, so a proof is usable once in the whole
//! service (a replay at its replica is `bad_proof`, at the other
//! `use_dpop_nonce`). Both with `[[peers]]` and with the directory (etcd).
//! Every refusal carries the next nonce (`dpop-nonce` metadata; `DPoP-Nonce`
//! through ext_authz); with nonces off (the default) nothing changes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use tokend::pb::tokend as pb;

use crate::dpop::mint_bound;
use crate::etcd::Etcd;
use crate::inproc::{Bank, Node};
use crate::support::eventually;

/// The URI a caller of ledger's `Pay` method proves for.
const PAY: &str = "https://ledger.bank.internal/bank.v1.Ledger/Pay";
/// The config line that turns nonces on.
const REQUIRED: &str = "[tokens]\nproof_nonce = \"required\"\n";

/// A proof from `node` for POST `PAY` with `token`, carrying `nonce`.
async fn prove(node: &Node, token: &str, nonce: Option<&str>) -> String {
    node.tokens()
        .await
        .prove(pb::ProveRequest {
            token: token.into(),
            method: "POST".into(),
            uri: PAY.into(),
            nonce: nonce.unwrap_or_default().into(),
        })
        .await
        .expect("prove")
        .into_inner()
        .proof
}

/// Verifies `token` with `proof` for POST `PAY` at `node`.
async fn verify(node: &Node, token: &str, proof: &str) -> Result<pb::VerifyResponse, Refused> {
    node.tokens()
        .await
        .verify(pb::VerifyRequest {
            token: token.into(),
            proof: proof.into(),
            method: "POST".into(),
            uri: PAY.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| Refused::of(&s))
}

/// A refusal as the client sees it: the reason, its detail, and the nonce
/// the verifier handed out with it.
#[derive(Debug)]
struct Refused {
    reason: String,
    detail: String,
    nonce: Option<String>,
}

impl Refused {
    fn of(s: &tonic::Status) -> Refused {
        Refused {
            reason: tokend::reason_of(s)
                .map(|r| r.to_string())
                .unwrap_or_default(),
            detail: tokend::detail_of(s).to_owned(),
            nonce: s
                .metadata()
                .get(tokend::DPOP_NONCE_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }

    /// Asserts the reason and a part of the detail; the nonce it carried.
    #[track_caller]
    fn expect(self, reason: &str, says: &str) -> Option<String> {
        assert!(
            self.reason == reason && self.detail.contains(says),
            "expected {reason} saying {says:?}, got {self:?}"
        );
        self.nonce
    }
}

/// A bank with `payments` (the caller) and one `ledger` that requires
/// nonces and knows payments' keys.
async fn caller_and_nonce_verifier() -> (Bank, Node, Node) {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .config(REQUIRED)
                .peer("payments", payments.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    (bank, payments, ledger)
}

/// The scenario, on `payments` (the caller) and two replicas of ledger
/// requiring nonces, all on `bank`'s clock.
async fn proof_is_usable_once_across_replicas(bank: &Bank, payments: &Node, ledger: [&Node; 2]) {
    let [l0, l1] = ledger;
    let token = mint_bound(payments.tokens().await, "ledger", "")
        .await
        .token;

    // No nonce: refused, with one to use.
    let plain = prove(payments, &token, None).await;
    let n0 = verify(l0, &token, &plain)
        .await
        .expect_err("no nonce")
        .expect("use_dpop_nonce", "requires a server nonce")
        .expect("a refusal carries the next nonce");
    // With it: accepted at the replica that issued it, once; the answer
    // carries the nonce for the next proof.
    let proof = prove(payments, &token, Some(&n0)).await;
    let ok = verify(l0, &token, &proof).await.expect("with l0's nonce");
    assert!(
        !ok.dpop_nonce.is_empty(),
        "a proven success carries the next nonce"
    );
    let again = verify(l0, &token, &proof)
        .await
        .expect_err("replayed at l0");
    let fresh = again.expect("bad_proof", "already used");
    assert!(fresh.is_some(), "a bad_proof refusal carries a nonce too");
    // The same proof at the other replica: l0's nonce means nothing there.
    let m0 = verify(l1, &token, &proof)
        .await
        .expect_err("replayed at l1")
        .expect("use_dpop_nonce", "not issued by this verifier replica")
        .expect("l1 hands out its own nonce");
    assert_ne!(m0, n0);
    // l1's own nonce works at l1, and not at l0.
    let at_l1 = prove(payments, &token, Some(&m0)).await;
    verify(l1, &token, &at_l1).await.expect("with l1's nonce");
    let cross = prove(payments, &token, Some(&m0)).await;
    verify(l0, &token, &cross)
        .await
        .expect_err("l1's nonce at l0")
        .expect("use_dpop_nonce", "not issued by this verifier replica");
    // The next nonce of the success works for the next call.
    let next = prove(payments, &token, Some(&ok.dpop_nonce)).await;
    verify(l0, &token, &next)
        .await
        .expect("with the next nonce");

    // The SPIFFE Workload API has no field for a proof: a bound token is
    // missing_proof there, and the refusal carries a nonce all the same.
    let mut spiffe = tokend::pb::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        tokend::connect(&l0.socket()).await.expect("connect"),
    );
    let mut req = tonic::Request::new(tokend::pb::spiffe::ValidateJwtsvidRequest {
        audience: crate::support::id("ledger"),
        svid: token.clone(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    let e = spiffe.validate_jwtsvid(req).await.expect_err("bound");
    let n = Refused::of(&e).expect("missing_proof", "bound to proof key");
    assert!(
        n.is_some(),
        "a ValidateJWTSVID proof refusal carries a nonce"
    );

    // Forged: garbage, and a well-formed nonce no replica issued.
    let garbage = prove(payments, &token, Some("not-a-nonce")).await;
    verify(l0, &token, &garbage)
        .await
        .expect_err("garbage")
        .expect("use_dpop_nonce", "not a nonce of this verifier");
    let mut raw = B64.decode(&n0).expect("b64");
    raw[12] ^= 0x40;
    let forged = prove(payments, &token, Some(&B64.encode(&raw))).await;
    verify(l0, &token, &forged)
        .await
        .expect_err("forged")
        .expect("use_dpop_nonce", "not issued by this verifier replica");

    // Expired: a nonce of l0 older than the proof window (30 s).
    let stale = verify(l0, &token, &plain)
        .await
        .expect_err("no nonce")
        .expect("use_dpop_nonce", "requires")
        .expect("nonce");
    bank.advance(31);
    let late = prove(payments, &token, Some(&stale)).await;
    let renewed = verify(l0, &token, &late)
        .await
        .expect_err("expired nonce")
        .expect("use_dpop_nonce", "older than the 30s window")
        .expect("a fresh nonce");
    let renewed_proof = prove(payments, &token, Some(&renewed)).await;
    verify(l0, &token, &renewed_proof)
        .await
        .expect("with the renewed nonce");

    // Exchange: the same rule, and the refusal carries a nonce.
    let exchanged = l0
        .tokens()
        .await
        .exchange(pb::ExchangeRequest {
            token: token.clone(),
            audience: "archive".into(),
            proof: prove(payments, &token, None).await,
            method: "POST".into(),
            uri: PAY.into(),
            ..Default::default()
        })
        .await
        .expect_err("exchange without a nonce");
    let n = Refused::of(&exchanged).expect("use_dpop_nonce", "requires a server nonce");
    let n = n.expect("an Exchange refusal carries the next nonce");
    let delegated = l0
        .tokens()
        .await
        .exchange(pb::ExchangeRequest {
            token: token.clone(),
            audience: "archive".into(),
            proof: prove(payments, &token, Some(&n)).await,
            method: "POST".into(),
            uri: PAY.into(),
            ..Default::default()
        })
        .await
        .expect("exchange with the nonce")
        .into_inner();
    assert!(!delegated.jkt.is_empty(), "the delegated token is bound");
    assert!(
        !delegated.dpop_nonce.is_empty(),
        "and the next nonce comes back"
    );
}

/// Two ledger replicas with `[[peers]]` (payments at its peer address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_make_a_proof_usable_once_across_peer_replicas() {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let mut ledger = Vec::new();
    for n in 0..2 {
        let b = bank
            .replica("ledger", n)
            .standby_key(false)
            .config(REQUIRED)
            .peer("payments", payments.peer_addr());
        let node = bank.start(b).await;
        node.learns(&["payments"]).await;
        ledger.push(node);
    }
    proof_is_usable_once_across_replicas(&bank, &payments, [&ledger[0], &ledger[1]]).await;
}

/// Two ledger replicas in directory mode (etcd): they discover payments
/// there, with no peer connection; nonces stay pinned to each replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_make_a_proof_usable_once_across_directory_replicas() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let directory = format!(
        "{}lease_ttl = \"2s\"\nrequest_timeout = \"2s\"\n",
        etcd.directory_toml("/nonce/")
    );
    let payments = bank
        .start(
            bank.replica("payments", 0)
                .standby_key(false)
                .config(&directory),
        )
        .await;
    let mut ledger = Vec::new();
    for n in 0..2 {
        let b = bank
            .replica("ledger", n)
            .standby_key(false)
            .config(REQUIRED)
            .config(&directory);
        ledger.push(bank.start(b).await);
    }
    for l in &ledger {
        assert!(
            eventually(20, || async {
                l.issuer("payments").await.instances.iter().any(|i| !i.gone)
            })
            .await,
            "{} discovers payments in the directory",
            l.name()
        );
    }
    proof_is_usable_once_across_replicas(&bank, &payments, [&ledger[0], &ledger[1]]).await;
}

/// Nonces off (the default): a proof needs no nonce, one that carries a
/// nonce claim is accepted as usual, no nonce is handed out, and a proof is
/// refused as replayed only at the replica that saw it: the same proof
/// passes at another replica within its window (the replay nonces close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nonces_each_replica_sees_a_proof_once() {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let mut ledger = Vec::new();
    for n in 0..2 {
        let b = bank
            .replica("ledger", n)
            .standby_key(false)
            .peer("payments", payments.peer_addr());
        let node = bank.start(b).await;
        node.learns(&["payments"]).await;
        ledger.push(node);
    }
    let token = mint_bound(payments.tokens().await, "ledger", "")
        .await
        .token;
    let proof = prove(&payments, &token, None).await;
    let ok = verify(&ledger[0], &token, &proof)
        .await
        .expect("no nonce needed");
    assert!(ok.dpop_nonce.is_empty(), "no nonce handed out when off");
    let replay = verify(&ledger[0], &token, &proof)
        .await
        .expect_err("replay");
    assert!(replay.nonce.is_none(), "no nonce on a refusal when off");
    replay.expect("bad_proof", "already used");
    verify(&ledger[1], &token, &proof)
        .await
        .expect("the old behaviour: another replica has not seen it");
    let with_claim = prove(&payments, &token, Some("any-nonce")).await;
    verify(&ledger[0], &token, &with_claim)
        .await
        .expect("a nonce claim is accepted as usual when nonces are off");
}

/// ext_authz with nonces required: a DPoP request whose proof lacks the
/// nonce answers 401 with `WWW-Authenticate: DPoP error="use_dpop_nonce"`
/// and a `DPoP-Nonce` header (RFC 9449 §9, Figure 24); the client's retry
/// with that nonce passes once; its replay is `bad_proof`, with a nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_answers_use_dpop_nonce() {
    use envoy_types::ext_authz::v3::pb::HttpResponse;

    use crate::ext_authz::{allowed, check, denied};
    const LEDGER: &str = "https://ledger.bank.internal";
    let (_bank, payments, ledger) = caller_and_nonce_verifier().await;
    let token = mint_bound(payments.tokens().await, "ledger", "")
        .await
        .token;
    // `check` sends GET /accounts?secret=1: the proof is for the
    // configured authority and the path.
    let proof_for = |nonce: Option<String>| {
        let (payments, token) = (&payments, token.clone());
        async move {
            payments
                .tokens()
                .await
                .prove(pb::ProveRequest {
                    token,
                    method: "GET".into(),
                    uri: format!("{LEDGER}/accounts"),
                    nonce: nonce.unwrap_or_default(),
                })
                .await
                .expect("prove")
                .into_inner()
                .proof
        }
    };
    let authorization = format!("DPoP {token}");
    let inbound = [("authority", LEDGER)];
    // DPoP without any DPoP header: missing_proof, with a nonce for the
    // client's first proof (no extra round trip).
    let (code, h) = denied(
        &check(
            &ledger,
            &[("authorization", authorization.as_str())],
            &inbound,
        )
        .await,
    );
    assert_eq!(code, 401);
    assert_eq!(
        h.get("tokend-reason").map(String::as_str),
        Some("missing_proof")
    );
    assert!(
        h.contains_key("dpop-nonce"),
        "missing_proof carries a nonce: {h:?}"
    );
    let proof = proof_for(None).await;
    let sent = [
        ("authorization", authorization.as_str()),
        ("dpop", proof.as_str()),
    ];
    let (code, h) = denied(&check(&ledger, &sent, &inbound).await);
    assert_eq!(code, 401);
    let challenge = h.get("www-authenticate").cloned().unwrap_or_default();
    assert!(
        challenge.starts_with("DPoP ")
            && challenge.contains("error=\"use_dpop_nonce\"")
            && challenge.contains("error_description=\""),
        "{challenge}"
    );
    assert_eq!(
        h.get("tokend-reason").map(String::as_str),
        Some("use_dpop_nonce")
    );
    let nonce = h.get("dpop-nonce").cloned().expect("DPoP-Nonce header");

    let proof = proof_for(Some(nonce)).await;
    let sent = [
        ("authorization", authorization.as_str()),
        ("dpop", proof.as_str()),
    ];
    let ok = check(&ledger, &sent, &inbound).await;
    allowed(&ok);
    // The next nonce goes to the client on the success (RFC 9449 §8.2).
    let next = match &ok.http_response {
        Some(HttpResponse::OkResponse(r)) => r
            .response_headers_to_add
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "dpop-nonce")
            .map(|h| h.value.clone()),
        _ => None,
    };
    let next = next.expect("a DPoP-Nonce on the allowed response");
    let (code, h) = denied(&check(&ledger, &sent, &inbound).await);
    assert_eq!(code, 401);
    assert_eq!(
        h.get("tokend-reason").map(String::as_str),
        Some("bad_proof")
    );
    assert!(
        h.get("www-authenticate")
            .is_some_and(|w| w.contains("error=\"invalid_token\"")),
        "{h:?}"
    );
    assert!(
        h.contains_key("dpop-nonce"),
        "a bad_proof denial carries a nonce too"
    );
    // The nonce of the success makes the next proof pass at once.
    let proof = proof_for(Some(next)).await;
    let sent = [
        ("authorization", authorization.as_str()),
        ("dpop", proof.as_str()),
    ];
    allowed(&check(&ledger, &sent, &inbound).await);
}

/// The CLI (a real process): `tokend verify` of a proof without a nonce
/// prints `rejected: use_dpop_nonce: …` and `dpop-nonce: N` on stderr and
/// exits 1; `tokend prove --nonce N` makes a proof that verifies (exit 0);
/// a nonce that is not RFC 9449 syntax is refused by `prove`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prove_with_the_nonce_a_refusal_printed() {
    let root = crate::support::tmp();
    let s = crate::support::Sidecar::start(root.path(), "ledger", REQUIRED);
    let token = mint_bound(s.tokens().await, "ledger", "").await.token;
    let run = |args: &[&str]| {
        let out = s.cli(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, proof, err) = run(&["prove", "--method", "POST", "--uri", PAY, &token]);
    assert_eq!(code, Some(0), "{err}");
    let verify = ["verify", "--method", "POST", "--uri", PAY, "--proof"];
    let (code, _, err) = run(&[&verify[..], &[proof.as_str(), token.as_str()]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("rejected: use_dpop_nonce: "), "{err}");
    let nonce = err
        .lines()
        .find_map(|l| l.strip_prefix("dpop-nonce: "))
        .expect("the refusal prints the nonce")
        .to_owned();
    let (code, proof, err) = run(&[
        "prove", "--method", "POST", "--uri", PAY, "--nonce", &nonce, &token,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, claims, err) = run(&[&verify[..], &[proof.as_str(), token.as_str()]].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(claims.contains("\"cnf\""), "{claims}");
    let (code, _, err) = run(&[
        "prove", "--method", "POST", "--uri", PAY, "--nonce", "a b", &token,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("malformed") && err.contains("nonce"), "{err}");
}

/// A proof refused for its nonce records nothing: neither its `jti` (the
/// same proof passes once its nonce is good) nor the one-time id of the
/// token it came with (the token is still usable once). A nonce from the
/// verifier's future (its clock stepped back) is refused, and the same proof
/// passes when the clock has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_refusal_uses_up_neither_the_proof_nor_the_one_time_token() {
    let (bank, payments, ledger) = caller_and_nonce_verifier().await;
    let token = payments
        .tokens()
        .await
        .mint(pb::MintRequest {
            audience: "ledger".into(),
            bind: true,
            one_time: true,
            ..Default::default()
        })
        .await
        .expect("mint a one-time bound token")
        .into_inner()
        .token;
    let t = bank.now();
    let nonce = verify(&ledger, &token, &prove(&payments, &token, None).await)
        .await
        .expect_err("no nonce")
        .expect("use_dpop_nonce", "requires a server nonce")
        .expect("a nonce to use");
    // A garbage nonce: refused, and the one-time token is not used up.
    let garbage = prove(&payments, &token, Some("AAAA")).await;
    verify(&ledger, &token, &garbage)
        .await
        .expect_err("garbage nonce")
        .expect("use_dpop_nonce", "");
    // The verifier's clock steps back 10 s: the nonce it issued is now from
    // the future, so a proof made now with it is refused...
    bank.clock().set(crate::inproc::at(t - 10));
    let early = prove(&payments, &token, Some(&nonce)).await;
    verify(&ledger, &token, &early)
        .await
        .expect_err("a nonce from the future")
        .expect("use_dpop_nonce", "");
    // ...and the very same proof (same jti) passes once the clock is back,
    // which it could not had the refusal recorded its jti; the one-time
    // token passes too, which it could not had a refusal claimed it.
    bank.clock().set(crate::inproc::at(t));
    verify(&ledger, &token, &early)
        .await
        .expect("the same proof, its nonce good now");
    // Used once now: a fresh proof with a good nonce finds it replayed.
    let next = prove(&payments, &token, Some(&nonce)).await;
    let again = verify(&ledger, &token, &next).await.expect_err("used");
    assert_eq!(again.reason, "replayed", "{again:?}");
}
