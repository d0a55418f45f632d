//! Interoperability with PyJWT and the PyPI `spiffe` client: a PyJWT verifier accepts tokend's tokens with
//! the JWKS tokend publishes, and tokend accepts PyJWT-signed tokens from a
//! JWKS file. The sidecars run in-process (real Unix sockets); the Python
//! clients run as processes. Python comes from TOKEND_PYTHON (set by
//! .ci/run) or a venv this test makes under target/ from
//! tests/interop/requirements.txt.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::inproc::Bank;
use crate::support::*;

/// The interop Python (TOKEND_PYTHON, or a venv made from requirements.txt).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TOKEND_PYTHON") {
        return PathBuf::from(p);
    }
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let venv = root.join("target/interop-venv");
        let req = root.join("tests/interop/requirements.txt");
        let marker = venv.join("requirements.installed");
        let wanted = std::fs::read(&req).expect("requirements");
        if std::fs::read(&marker).ok().as_deref() != Some(&wanted[..]) {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .expect("python3 -m venv");
            assert!(ok.success(), "cannot create venv (install python3-venv)");
            let ok = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&req)
                .status()
                .expect("pip");
            assert!(ok.success(), "pip install -r {} failed", req.display());
            std::fs::write(&marker, &wanted).expect("marker");
        }
        venv.join("bin/python")
    })
    .clone()
}

/// Runs `tests/interop/SCRIPT ARGS` with the interop Python; its stdout,
/// trimmed. Off the runtime's threads, so in-process sidecars keep serving.
pub async fn run_script(script: &str, args: &[&str]) -> String {
    let path = format!("{}/tests/interop/{script}", env!("CARGO_MANIFEST_DIR"));
    let (script, args): (String, Vec<String>) = (
        script.to_owned(),
        args.iter().map(|a| (*a).to_owned()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let out = Command::new(python())
            .arg(path)
            .args(&args)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{script} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_owned()
    })
    .await
    .expect("python task")
}

async fn py(args: &[&str]) -> String {
    run_script("pyjwt_interop.py", args).await
}

/// PyJWT verifies a tokend token (RS256, kid, registered claims) with the published JWKS.
#[tokio::test]
async fn pyjwt_verifies_tokend_tokens() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let jwks = bank.root().join("payments.jwks.json");
    std::fs::write(&jwks, a.jwks().await).expect("jwks");
    let token = a.mint("ledger").await.token;
    let claims: serde_json::Value = serde_json::from_str(
        &py(&[
            "verify",
            jwks.to_str().expect("utf8"),
            &token,
            &id("ledger"),
            &id("payments"),
        ])
        .await,
    )
    .expect("claims");
    assert_eq!(claims["sub"], id("payments"));
    assert_eq!(claims["aud"], id("ledger"));
}

/// tokend accepts a PyJWT-signed token whose key it has from a JWKS file, and
/// refuses it once tampered.
#[tokio::test]
async fn tokend_verifies_pyjwt_tokens() {
    let bank = Bank::new();
    let jwks = bank.root().join("archive.jwks.json");
    let token = py(&[
        "sign",
        jwks.to_str().expect("utf8"),
        &id("archive"),
        &id("ledger"),
    ])
    .await;
    // The sidecar's clock reads the wall time after PyJWT signed (with time.time()).
    bank.clock().set(tokend::Clock::now(&tokend::SystemClock));
    let b = bank
        .start(
            bank.lean("ledger")
                .config("[[peers]]\nname = \"archive\"\njwks_file = \"../archive.jwks.json\""),
        )
        .await;
    let v = b.verify(&token).await.expect("accepted");
    assert_eq!(v.issuer, id("archive"));
    assert!(v.claims_json.contains("read:ledger"));
    let mut c = payload(&token);
    c["scope"] = "write:ledger".into();
    assert_eq!(
        b.verify(&with_payload(&token, &c)).await.err().as_deref(),
        Some("bad_signature")
    );
}

async fn run_json(script: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run_script(script, args).await).expect("json")
}

/// The stock PyPI `spiffe` client, unchanged, fetches a JWT-SVID, validates it
/// through tokend, validates it offline with the bundle tokend serves, and
/// sees tampered and wrong-audience tokens refused.
#[tokio::test]
async fn pyspiffe_client_works_unchanged() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let socket = a.socket();
    let out = run_json(
        "spiffe_interop.py",
        &[socket.to_str().expect("utf8"), "ledger-api", TD],
    )
    .await;
    assert_eq!(out["spiffe_id"], id("payments"));
    assert_eq!(
        out["audience"],
        serde_json::json!(["ledger-api"]),
        "audiences are kept verbatim"
    );
    assert_eq!(out["validated_spiffe_id"], id("payments"));
    assert_eq!(out["offline_spiffe_id"], id("payments"));
    let kid = a.signing_key().kid().to_owned();
    assert_eq!(out["bundle_kids"], serde_json::json!([kid]));
    assert!(
        out["tampered"]
            .as_str()
            .is_some_and(|s| s.contains("bad_signature")),
        "{}",
        out["tampered"]
    );
    assert!(
        out["wrong_audience"]
            .as_str()
            .is_some_and(|s| s.contains("wrong_audience")),
        "{}",
        out["wrong_audience"]
    );
    // The token is an ordinary tokend token: tokend's own API verifies it for that audience.
    let token = out["token"].as_str().expect("token");
    let req = tokend::pb::tokend::VerifyRequest {
        token: token.into(),
        audience: "spiffe://bank.internal/x".into(),
        ..Default::default()
    };
    assert!(
        a.tokens().await.verify(req).await.is_err(),
        "not for another audience"
    );
}

/// Workload API calls without the `workload.spiffe.io` header are refused, as the spec requires.
#[tokio::test]
async fn spiffe_security_header_required() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let channel = tokend::connect(&a.socket()).await.expect("connect");
    let mut client =
        tokend::pb::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let req = tokend::pb::spiffe::JwtsvidRequest {
        audience: vec!["x".into()],
        spiffe_id: String::new(),
    };
    let st = client
        .fetch_jwtsvid(req.clone())
        .await
        .expect_err("no header");
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("security header"));
    let mut with_header = tonic::Request::new(req);
    with_header
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    let ok = client
        .fetch_jwtsvid(with_header)
        .await
        .expect("with header")
        .into_inner();
    assert_eq!(ok.svids[0].spiffe_id, id("payments"));
    let mut other = tonic::Request::new(tokend::pb::spiffe::JwtsvidRequest {
        audience: vec!["x".into()],
        spiffe_id: id("ledger"),
    });
    other
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    let st = client
        .fetch_jwtsvid(other)
        .await
        .expect_err("another identity");
    assert_eq!(
        tokend::reason_of(&st),
        Some(tokend::Reason::PermissionDenied)
    );
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    r
}

/// An open FetchJWTBundles stream (SPIFFE JWT sources hold one forever) does
/// not stop a shutdown (the path SIGTERM takes) from finishing cleanly and at
/// once, without waiting out the 10 s drain grace: the stream ends.
#[tokio::test]
async fn open_bundle_stream_does_not_block_shutdown() {
    use tokio_stream::StreamExt;
    let bank = Bank::new();
    let mut a = bank.start(bank.lean("payments")).await;
    let socket = a.socket();
    let channel = tokend::connect(&socket).await.expect("connect");
    let mut client =
        tokend::pb::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut stream = client
        .fetch_jwt_bundles(with_header(tokend::pb::spiffe::JwtBundlesRequest {}))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.next().await.expect("a message").expect("ok");
    assert!(first.bundles.contains_key(TD));
    // Under the daemon's 10 s drain grace, which a stream holding the drain
    // would run out (stop also waits for the standby key being generated).
    a.stop_within(Duration::from_secs(9)).await;
    assert!(!socket.exists(), "socket removed");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends, not hangs");
    assert!(end.is_none_or(|r| r.is_err()), "stream ended");
}

/// FetchJWTSVID bounds audiences and refuses control characters in them;
/// ValidateJWTSVID refuses delegated tokens
/// (SPIFFE clients would take the original subject for the presenter).
#[tokio::test]
async fn spiffe_bounds_and_delegated_tokens() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let channel = tokend::connect(&a.socket()).await.expect("connect");
    let mut client =
        tokend::pb::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    for audience in [
        vec!["x".to_string(); 17],
        vec!["y".repeat(300)],
        vec![String::new()],
    ] {
        let st = client
            .fetch_jwtsvid(with_header(tokend::pb::spiffe::JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(tokend::reason_of(&st), Some(tokend::Reason::Malformed));
    }
    // Audiences are verbatim strings: control characters are refused, so
    // ["cards\0ledger"] can never stand for ["cards", "ledger"].
    for (audience, expect) in [
        (
            vec!["cards\0ledger".to_string()],
            "malformed: audience 0 contains control character U+0000",
        ),
        (
            vec!["ok".to_string(), "del\u{7f}".to_string()],
            "malformed: audience 1 contains control character U+007F",
        ),
        (
            vec!["tab\there".to_string()],
            "malformed: audience 0 contains control character U+0009",
        ),
    ] {
        let st = client
            .fetch_jwtsvid(with_header(tokend::pb::spiffe::JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(tokend::reason_of(&st), Some(tokend::Reason::Malformed));
        assert_eq!(st.message(), expect);
    }
    let inbound = a.mint("payments").await.token;
    let req = tokend::pb::tokend::ExchangeRequest {
        token: inbound,
        audience: "spiffe://bank.internal/payments".into(),
        ttl_seconds: 0,
        ..Default::default()
    };
    let delegated = a
        .tokens()
        .await
        .exchange(req)
        .await
        .expect("exchange")
        .into_inner()
        .token;
    let st = client
        .validate_jwtsvid(with_header(tokend::pb::spiffe::ValidateJwtsvidRequest {
            audience: id("payments"),
            svid: delegated,
        }))
        .await
        .expect_err("delegated refused");
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("delegated"), "{}", st.message());
}
