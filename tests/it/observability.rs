//! Observability: Prometheus metrics over HTTP, grpc.health.v1 on the socket,
//! JSON logs by flag.

use std::io::{Read, Write};

use crate::support::*;

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

/// Mints, verifications by result, key states and the signing key's age are
/// exported in Prometheus text format.
#[tokio::test]
async fn metrics_are_served() {
    let root = tmp();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let a = Sidecar::start(
        root.path(),
        "payments",
        &format!("[metrics]\nlisten = \"{port}\""),
    );
    let m = a.mint("payments").await;
    assert!(a.verify(&m.token).await.is_ok());
    let mut c = payload(&m.token);
    c["exp"] = 1.into();
    assert_eq!(
        a.verify(&with_payload(&m.token, &c)).await.err().as_deref(),
        Some("bad_signature")
    );
    let ok = eventually(10, || async {
        scrape(port).contains("tokend_keys{state=\"active\"} 1")
    })
    .await;
    let text = scrape(port);
    assert!(ok, "{text}");
    for needle in [
        "tokend_mint_total",
        "tokend_verify_total{result=\"ok\"} 1",
        "tokend_verify_total{result=\"bad_signature\"} 1",
        "tokend_verify_seconds",
        "tokend_signing_key_age_seconds",
        "tokend_keys_generated_total 1",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

/// grpc.health.v1 reports the sidecar and each service as SERVING.
#[tokio::test]
async fn health_is_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    let root = tmp();
    let a = Sidecar::start(root.path(), "payments", "");
    let mut client = tonic_health::pb::health_client::HealthClient::new(
        tokend::connect(&a.socket).await.expect("connect"),
    );
    for service in [
        "",
        "tokend.v1.TokenService",
        "tokend.v1.AdminService",
        "SpiffeWorkloadAPI",
    ] {
        let r = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = client
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await;
    assert_eq!(
        unknown.expect_err("unknown service").code(),
        tonic::Code::NotFound
    );
}

/// `--log-format json` writes one JSON object per line.
#[test]
fn json_logs() {
    let root = tmp();
    let cfg = write_config(root.path(), "payments", "");
    let mut child = std::process::Command::new(bin())
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stderr = child.stderr.take().expect("stderr");
    let sock = root.path().join("payments/tokend.sock");
    wait_for_socket(&sock);
    sigterm(&child);
    assert!(child.wait().expect("wait").success());
    let mut text = String::new();
    stderr.read_to_string(&mut text).expect("read");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "tokend serving"
                && l["fields"]["id"] == id("payments")),
        "{text}"
    );
}
