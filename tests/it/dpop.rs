//! Bound tokens (RFC 9449 DPoP) between in-process sidecars: a stolen bound
//! token is refused without a good proof for every reason the RFC names,
//! each hop of an exchange is bound to its own sidecar's key, the proof key
//! rotates without a failed call, and (a real process) a SIGKILL right after
//! a bound mint never strands the token.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tokend::pb::tokend as pb;

use crate::inproc::{Bank, Node};
use crate::support::{Sidecar, id, payload, tmp};

/// The URI a caller of ledger's `Pay` method proves for.
const PAY: &str = "https://ledger.bank.internal/bank.v1.Ledger/Pay";

/// Mints a bound token at `node` for `audience`.
pub async fn mint_bound(
    mut tokens: pb::token_service_client::TokenServiceClient<tonic::transport::Channel>,
    audience: &str,
    claims: &str,
) -> pb::MintResponse {
    tokens
        .mint(pb::MintRequest {
            audience: audience.into(),
            claims_json: claims.into(),
            bind: true,
            ..Default::default()
        })
        .await
        .expect("mint bound")
        .into_inner()
}

/// A proof from `tokens`' sidecar for one request with `token`.
pub async fn prove(
    mut tokens: pb::token_service_client::TokenServiceClient<tonic::transport::Channel>,
    token: &str,
    method: &str,
    uri: &str,
) -> Result<String, String> {
    tokens
        .prove(pb::ProveRequest {
            token: token.into(),
            method: method.into(),
            uri: uri.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().proof)
        .map_err(|s| reason(&s))
}

/// Verifies `token` with `proof` for `method uri`: the verified claims, or
/// the refusal as `reason: detail`.
pub async fn verify_proven(
    mut tokens: pb::token_service_client::TokenServiceClient<tonic::transport::Channel>,
    token: &str,
    proof: &str,
    method: &str,
    uri: &str,
) -> Result<pb::VerifyResponse, String> {
    tokens
        .verify(pb::VerifyRequest {
            token: token.into(),
            proof: proof.into(),
            method: method.into(),
            uri: uri.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| reason(&s))
}

fn reason(s: &tonic::Status) -> String {
    match tokend::reason_of(s) {
        Some(r) => format!("{r}: {}", tokend::detail_of(s)),
        None => format!("no reason: {s}"),
    }
}

/// Asserts a refusal with `code`, whose detail says `says`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(r: Result<T, String>, code: &str, says: &str) {
    let e = r.expect_err("refused");
    assert!(
        e.starts_with(&format!("{code}: ")) && e.contains(says),
        "expected {code} saying {says:?}, got {e}"
    );
}

/// A P-256 key of the attacker's own, to sign proofs tokend never made.
fn attacker_key() -> EcdsaKeyPair {
    let rng = ring::rand::SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("gen");
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng).expect("key")
}

fn public_jwk(key: &EcdsaKeyPair) -> Value {
    let p = key.public_key().as_ref();
    json!({"kty": "EC", "crv": "P-256", "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..])})
}

/// A proof with `header` and `claims`, ES256-signed by `key`.
fn forge_proof(key: &EcdsaKeyPair, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = key
        .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
        .expect("sign");
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

fn ath(token: &str) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// payments and cards, and ledger trusting both.
async fn bank() -> (Bank, Node, Node, Node) {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let cards = bank.start(bank.lean_peer("cards")).await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", payments.peer_addr())
                .peer("cards", cards.peer_addr()),
        )
        .await;
    ledger.learns(&["payments", "cards"]).await;
    (bank, payments, cards, ledger)
}

/// A stolen bound token is refused, with the reason: without a proof (as a
/// bearer token), with a proof from another key, for another method or
/// URI, expired, replayed, whose `ath` is for another token, `alg`
/// none/HS256/RS256, and with a private key in its `jwk`. With its own
/// fresh proof it verifies, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stolen_bound_token_is_refused() {
    let (bank, payments, cards, ledger) = bank().await;
    let minted = mint_bound(payments.tokens().await, "ledger", "").await;
    let token = minted.token.as_str();
    assert_eq!(payload(token)["cnf"]["jkt"], minted.jkt.as_str());
    assert_eq!(minted.jkt.len(), 43, "a SHA-256 thumbprint");

    // Without a proof: a bound token is not a bearer token (RFC 9449 §7.2).
    let (r, detail) = ledger.refusal(token).await;
    assert_eq!(r, Some(tokend::Reason::MissingProof), "{detail}");

    // Nor through the SPIFFE Workload API, which has no field for a proof.
    let mut spiffe = tokend::pb::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        tokend::connect(&ledger.socket()).await.expect("connect"),
    );
    let mut req = tonic::Request::new(tokend::pb::spiffe::ValidateJwtsvidRequest {
        audience: id("ledger"),
        svid: token.into(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    let e = spiffe.validate_jwtsvid(req).await.expect_err("bound");
    assert_eq!(tokend::reason_of(&e), Some(tokend::Reason::MissingProof));

    // Its own proof: accepted once, then a replay.
    let proof = prove(payments.tokens().await, token, "POST", PAY)
        .await
        .expect("prove");
    let v = verify_proven(ledger.tokens().await, token, &proof, "POST", PAY)
        .await
        .expect("verified with its proof");
    assert_eq!(v.issuer, id("payments"));
    assert_refused(
        verify_proven(ledger.tokens().await, token, &proof, "POST", PAY).await,
        "bad_proof",
        "replayed",
    );

    // Another method, another URI.
    let proof = prove(payments.tokens().await, token, "POST", PAY)
        .await
        .expect("prove");
    assert_refused(
        verify_proven(ledger.tokens().await, token, &proof, "GET", PAY).await,
        "bad_proof",
        "method",
    );
    let other = "https://ledger.bank.internal/bank.v1.Ledger/Refund";
    assert_refused(
        verify_proven(ledger.tokens().await, token, &proof, "POST", other).await,
        "bad_proof",
        "is for",
    );

    // A proof from another sidecar's key (cards proving its own bound token).
    let theirs = mint_bound(cards.tokens().await, "ledger", "").await.token;
    let foreign = prove(cards.tokens().await, &theirs, "POST", PAY)
        .await
        .expect("cards proves its own token");
    assert_refused(
        verify_proven(ledger.tokens().await, token, &foreign, "POST", PAY).await,
        "bad_proof",
        "is not the key",
    );
    // And cards cannot prove payments' token: it does not hold that key.
    assert_refused(
        prove(cards.tokens().await, token, "POST", PAY).await,
        "permission_denied",
        "does not hold",
    );

    // `ath` for another token of the same key.
    let sibling = mint_bound(payments.tokens().await, "ledger", r#"{"n":2}"#)
        .await
        .token;
    let for_sibling = prove(payments.tokens().await, &sibling, "POST", PAY)
        .await
        .expect("prove");
    assert_refused(
        verify_proven(ledger.tokens().await, token, &for_sibling, "POST", PAY).await,
        "bad_proof",
        "hash of another token",
    );

    // Expired: the proof's window (30 s) has passed; the token still lives.
    let stale = prove(payments.tokens().await, token, "POST", PAY)
        .await
        .expect("prove");
    bank.advance(31);
    assert_refused(
        verify_proven(ledger.tokens().await, token, &stale, "POST", PAY).await,
        "bad_proof",
        "older than",
    );

    // Forged proofs: other algorithms, and a private key in the jwk.
    let attacker = attacker_key();
    let claims = json!({"jti": "forged-1", "htm": "POST", "htu": PAY,
        "iat": bank.now(), "ath": ath(token)});
    for alg in ["none", "HS256", "RS256"] {
        let header = json!({"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(&attacker)});
        let forged = forge_proof(&attacker, &header, &claims);
        assert_refused(
            verify_proven(ledger.tokens().await, token, &forged, "POST", PAY).await,
            "bad_proof",
            "only ES256",
        );
    }
    let mut jwk = public_jwk(&attacker);
    jwk["d"] = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into();
    let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
    assert_refused(
        verify_proven(
            ledger.tokens().await,
            token,
            &forge_proof(&attacker, &header, &claims),
            "POST",
            PAY,
        )
        .await,
        "bad_proof",
        "private member",
    );
    // The attacker's own well-formed proof: the key is not the token's.
    let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(&attacker)});
    assert_refused(
        verify_proven(
            ledger.tokens().await,
            token,
            &forge_proof(&attacker, &header, &claims),
            "POST",
            PAY,
        )
        .await,
        "bad_proof",
        "is not the key",
    );

    // A proof with a bearer token is refused too: the caller believed it bound.
    let bearer = payments.mint("ledger").await.token;
    assert_refused(
        verify_proven(ledger.tokens().await, &bearer, &foreign, "POST", PAY).await,
        "bad_proof",
        "bearer token",
    );
    // Proof fields go together.
    let mut t = ledger.tokens().await;
    let half = t
        .verify(pb::VerifyRequest {
            token: token.into(),
            proof: "x".into(),
            ..Default::default()
        })
        .await
        .expect_err("half a proof");
    assert_eq!(tokend::reason_of(&half), Some(tokend::Reason::Malformed));
}

/// Exchange of a bound token needs the proof it came with, and binds the
/// delegated token to the exchanging sidecar's own key: each hop is
/// sender-constrained, and the received proof is exchanged only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_binds_each_hop() {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let archive_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", payments.peer_addr())
                .peer("archive", archive_addr),
        )
        .await;
    let archive = bank
        .start(
            bank.lean_peer("archive")
                .peer_listen(archive_addr)
                .peer("payments", payments.peer_addr())
                .peer("ledger", ledger.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    archive.learns(&["payments", "ledger"]).await;

    let t1 = mint_bound(payments.tokens().await, "ledger", "").await;
    let p1 = prove(payments.tokens().await, &t1.token, "POST", PAY)
        .await
        .expect("prove");
    let exchange = |proof: &str| pb::ExchangeRequest {
        token: t1.token.clone(),
        audience: "archive".into(),
        proof: proof.into(),
        method: if proof.is_empty() { "" } else { "POST" }.into(),
        uri: if proof.is_empty() { "" } else { PAY }.into(),
        ..Default::default()
    };
    let no_proof = ledger
        .tokens()
        .await
        .exchange(exchange(""))
        .await
        .expect_err("no proof");
    assert_eq!(
        tokend::reason_of(&no_proof),
        Some(tokend::Reason::MissingProof)
    );
    let t2 = ledger
        .tokens()
        .await
        .exchange(exchange(&p1))
        .await
        .expect("exchange with the received proof")
        .into_inner();
    assert!(!t2.jkt.is_empty(), "the delegated token is bound");
    assert_ne!(t2.jkt, t1.jkt, "to ledger's own key, not payments'");
    assert_eq!(payload(&t2.token)["cnf"]["jkt"], t2.jkt.as_str());
    let again = ledger
        .tokens()
        .await
        .exchange(exchange(&p1))
        .await
        .expect_err("same proof twice");
    assert_eq!(tokend::reason_of(&again), Some(tokend::Reason::BadProof));

    const ARCHIVE: &str = "https://archive.bank.internal/bank.v1.Archive/Store";
    let (r, _) = archive.refusal(&t2.token).await;
    assert_eq!(r, Some(tokend::Reason::MissingProof));
    let p2 = prove(ledger.tokens().await, &t2.token, "POST", ARCHIVE)
        .await
        .expect("ledger proves its hop");
    let v = verify_proven(archive.tokens().await, &t2.token, &p2, "POST", ARCHIVE)
        .await
        .expect("archive accepts the bound hop");
    assert_eq!(v.subject, id("payments"));
    assert_eq!(v.issuer, id("ledger"));
    // payments cannot prove ledger's hop.
    assert_refused(
        prove(payments.tokens().await, &t2.token, "POST", ARCHIVE).await,
        "permission_denied",
        "does not hold",
    );
}

/// Over two and a half rotation intervals (24 h), in steps of half an
/// hour, every call mints (or reuses) a bound token, proves and verifies
/// it: none fails, the proof key changes, and the token minted just before
/// each change (still alive) is still proved after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_key_rotates_without_a_failed_call() {
    let bank = Bank::new();
    let node = bank.start(bank.lean("payments")).await;
    const SELF: &str = "https://payments.bank.internal/bank.v1.Payments/Pay";
    let mut jkts: Vec<String> = Vec::new();
    let mut last: Option<String> = None;
    for step in 0..120 {
        let m = node
            .tokens()
            .await
            .mint(pb::MintRequest {
                audience: "payments".into(),
                ttl_seconds: 3_600,
                bind: true,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("step {step}: mint: {s}"))
            .into_inner();
        if jkts.last() != Some(&m.jkt) {
            if let Some(prev) = &last {
                let p = prove(node.tokens().await, prev, "POST", SELF)
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: previous token: {e}"));
                verify_proven(node.tokens().await, prev, &p, "POST", SELF)
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: previous token: {e}"));
            }
            jkts.push(m.jkt.clone());
        }
        let p = prove(node.tokens().await, &m.token, "POST", SELF)
            .await
            .unwrap_or_else(|e| panic!("step {step}: prove: {e}"));
        verify_proven(node.tokens().await, &m.token, &p, "POST", SELF)
            .await
            .unwrap_or_else(|e| panic!("step {step}: verify: {e}"));
        last = Some(m.token);
        bank.advance(1_800);
    }
    assert!(
        jkts.len() >= 3,
        "the proof key rotated with the interval: {jkts:?}"
    );
    let files = std::fs::read_dir(node.keys_dir().join("proof"))
        .expect("proof dir")
        .count();
    assert!(files <= 2, "old proof keys are removed: {files} files");
}

/// A real process killed with SIGKILL right after minting a bound token:
/// after a restart, the token and a new proof from the restarted sidecar
/// still verify (the proof key was on disk before the token existed).
#[tokio::test]
async fn bound_token_survives_sigkill() {
    let root = tmp();
    let mut s = Sidecar::start(root.path(), "ledger", "");
    let minted = mint_bound(s.tokens().await, "ledger", "").await;
    s.kill9();
    s.restart();
    let proof = prove(s.tokens().await, &minted.token, "POST", PAY)
        .await
        .expect("the restarted sidecar still holds the proof key");
    let v = verify_proven(s.tokens().await, &minted.token, &proof, "POST", PAY)
        .await
        .expect("token and new proof verify after SIGKILL");
    assert_eq!(v.issuer, id("ledger"));
    // The CLI: `tokend prove` then `tokend verify --proof`.
    let out = s.cli_stdin(
        &["prove", "--method", "POST", "--uri", PAY, "-"],
        Some(&minted.token),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proof = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let out = s.cli(&[
        "verify",
        "--proof",
        &proof,
        "--method",
        "POST",
        "--uri",
        PAY,
        &minted.token,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = s.cli(&["verify", &minted.token]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("rejected: missing_proof: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Envoy's ext_authz: an outbound route with `bind = "true"` puts
/// `Authorization: DPoP <token>` and a `DPoP` proof for the upstream's
/// configured authority and the request path on the request; the inbound
/// route accepts them once (URI from its configured authority, never the
/// Host header) and refuses a replay, a bound token sent as Bearer, a
/// missing DPoP header, and a proof for another authority, each with its
/// reason; without an authority a DPoP request is a misconfiguration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_dpop_both_ways() {
    use crate::ext_authz::{allowed, check, denied};
    let (_bank, payments, _cards, ledger) = bank().await;
    const LEDGER: &str = "https://ledger.bank.internal";
    let out = [
        ("mode", "outbound"),
        ("audience", "ledger"),
        ("bind", "true"),
        ("authority", LEDGER),
    ];
    let (set, _) = allowed(&check(&payments, &[], &out).await);
    let header = |name: &str| {
        set.iter()
            .find(|(k, _, _)| k == name)
            .map(|(_, v, _)| v.clone())
            .unwrap_or_else(|| panic!("{name} set: {set:?}"))
    };
    let authorization = header("authorization");
    let proof = header("dpop");
    let token = authorization.strip_prefix("DPoP ").expect("DPoP scheme");
    assert!(payload(token)["cnf"]["jkt"].is_string());
    assert_eq!(
        payload(&proof)["htu"],
        format!("{LEDGER}/accounts"),
        "authority + path, query dropped"
    );
    assert_eq!(payload(&proof)["htm"], "GET");

    let inbound = [("authority", LEDGER)];
    let sent = [
        ("authorization", authorization.as_str()),
        ("dpop", proof.as_str()),
        ("host", "evil.example"),
    ];
    let (set, _) = allowed(&check(&ledger, &sent, &inbound).await);
    assert!(
        set.iter()
            .any(|(k, v, _)| k == "x-tokend-iss" && *v == id("payments")),
        "{set:?}"
    );
    let reason = |r: &envoy_types::ext_authz::v3::pb::CheckResponse| {
        let (code, h) = denied(r);
        (
            code,
            h.get("tokend-reason").cloned().unwrap_or_default(),
            h.get("www-authenticate").cloned().unwrap_or_default(),
        )
    };
    let (code, why, challenge) = reason(&check(&ledger, &sent, &inbound).await);
    assert_eq!((code, why.as_str()), (401, "bad_proof"), "replayed proof");
    assert!(challenge.starts_with("DPoP "), "{challenge}");

    let as_bearer = format!("Bearer {token}");
    let r = check(&ledger, &[("authorization", as_bearer.as_str())], &inbound).await;
    assert_eq!(reason(&r).1, "missing_proof");
    let r = check(
        &ledger,
        &[("authorization", authorization.as_str())],
        &inbound,
    )
    .await;
    assert_eq!(reason(&r).1, "missing_proof");

    let (set, _) = allowed(&check(&payments, &[], &out).await);
    let fresh = set
        .iter()
        .find(|(k, _, _)| k == "dpop")
        .map(|(_, v, _)| v.clone())
        .expect("dpop");
    let sent = [
        ("authorization", authorization.as_str()),
        ("dpop", fresh.as_str()),
    ];
    let other = [("authority", "https://cards.bank.internal")];
    assert_eq!(reason(&check(&ledger, &sent, &other).await).1, "bad_proof");
    let (code, _, _) = reason(&check(&ledger, &sent, &[]).await);
    assert_eq!(
        code, 500,
        "no authority configured: misconfigured, never the Host"
    );
}

/// Interop with an independent DPoP implementation (PyJWT + cryptography):
/// a proof tokend makes verifies there (signature, claims, and the RFC 7638
/// thumbprint computed in Python equals `cnf.jkt`); a proof PyJWT makes
/// with the same proof key verifies here, and one with the URI of another
/// request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_interoperate_with_pyjwt() {
    let root = tmp();
    let s = Sidecar::start(root.path(), "ledger", "");
    let minted = mint_bound(s.tokens().await, "ledger", "").await;
    let proof = prove(s.tokens().await, &minted.token, "POST", PAY)
        .await
        .expect("prove");
    let jkt = crate::interop::run_script(
        "dpop_interop.py",
        &["check", &proof, &minted.token, "POST", PAY],
    )
    .await;
    assert_eq!(jkt, minted.jkt, "Python's thumbprint is tokend's cnf.jkt");

    let key = std::fs::read_dir(root.path().join("ledger/keys/proof"))
        .expect("proof dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().contains(&minted.jkt))
        .expect("the proof key file");
    let key = key.to_string_lossy().into_owned();
    let theirs = crate::interop::run_script(
        "dpop_interop.py",
        &["make", &key, &minted.token, "POST", PAY],
    )
    .await;
    verify_proven(s.tokens().await, &minted.token, &theirs, "POST", PAY)
        .await
        .expect("a PyJWT proof verifies at tokend");
    let other = crate::interop::run_script(
        "dpop_interop.py",
        &[
            "make",
            &key,
            &minted.token,
            "POST",
            "https://evil.example/x",
        ],
    )
    .await;
    assert_refused(
        verify_proven(s.tokens().await, &minted.token, &other, "POST", PAY).await,
        "bad_proof",
        "is for",
    );
}

/// A bound token is signed by a bound key, which no export to third-party
/// verifiers lists (`tokend jwks`, the SPIFFE bundles through the real
/// socket), and names it `<kid>.dpop`: a bearer verifier refuses a stolen
/// bound token whether it selects the key by kid (PyJWT's `PyJWKSet`) or
/// ignores the kid and tries every key of the JWKS, while a bearer token
/// passes both; tokend still demands the proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_token_is_no_bearer_token_for_any_bearer_verifier() {
    let root = tmp();
    let s = Sidecar::start(root.path(), "ledger", "");
    let minted = mint_bound(s.tokens().await, "ledger", "").await;
    let header: Value = serde_json::from_slice(
        &B64.decode(minted.token.split('.').next().expect("header"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(header["kid"], format!("{}.dpop", minted.kid));
    let bound = crate::support::signing_key_in(&root.path().join("ledger/keys/bound"));
    assert_eq!(minted.kid, bound.kid(), "signed by the bound key");
    let signing = s.signing_key();
    assert_ne!(bound.kid(), signing.kid());
    let jwks = s.jwks();
    assert!(
        jwks.contains(signing.kid()) && !jwks.contains(bound.kid()) && !jwks.contains(".dpop"),
        "{jwks}"
    );
    let bundles = crate::bound_keys::spiffe_bundles(&s.socket).await;
    assert!(
        bundles.contains(signing.kid()) && !bundles.contains(bound.kid()),
        "{bundles}"
    );
    let file = root.path().join("ledger.jwks.json");
    std::fs::write(&file, &jwks).expect("write jwks");
    let file = file.to_string_lossy().into_owned();
    let bearer = s.mint("ledger").await.token;
    for mode in ["bearer", "every"] {
        let out = crate::interop::run_script(
            "dpop_interop.py",
            &[mode, &file, &minted.token, &id("ledger"), &id("ledger")],
        )
        .await;
        assert!(out.starts_with("refused: "), "PyJWT {mode}: {out}");
        let out = crate::interop::run_script(
            "dpop_interop.py",
            &[mode, &file, &bearer, &id("ledger"), &id("ledger")],
        )
        .await;
        assert!(
            out == "accepted" || out == format!("accepted by {}", signing.kid()),
            "PyJWT {mode} accepts the bearer token: {out}"
        );
    }
    assert_eq!(
        s.verify(&minted.token).await.err().as_deref(),
        Some("missing_proof")
    );
    // The bound kid on a token bound to nothing (only a key holder could
    // sign one) is refused: the kid and cnf go together.
    let forged = crate::support::forge(
        &signing,
        &format!("{}.dpop", signing.kid()),
        &crate::support::claims("ledger", "ledger", 60),
    );
    assert_eq!(s.verify(&forged).await.err().as_deref(), Some("malformed"));
}
