//! Envoy external authorization over the real socket, called as Envoy calls
//! it (`envoy.service.auth.v3.Authorization/Check`, a tonic client from
//! envoy-types): inbound verification with verified-claim headers and the
//! client's copies stripped, every refusal with its HTTP status and reason,
//! per-route issuer and claim rules, one-time tokens, and outbound minting
//! for the operator-set audience only. `envoy.rs` runs the same through a
//! real Envoy.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tokend::pb::tokend as pb;

use crate::inproc::{Bank, Node};
use crate::support::{id, payload, with_payload};

/// A Check of a GET /accounts carrying `headers`, on a route with `ext`.
pub async fn check(node: &Node, headers: &[(&str, &str)], ext: &[(&str, &str)]) -> CheckResponse {
    check_on(&node.socket(), headers, ext).await
}

/// `check` against the sidecar listening on `socket`.
pub async fn check_on(
    socket: &std::path::Path,
    headers: &[(&str, &str)],
    ext: &[(&str, &str)],
) -> CheckResponse {
    let channel = tokend::connect(socket).await.expect("connect");
    let pairs = |p: &[(&str, &str)]| -> HashMap<String, String> {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/accounts?secret=1".into(),
                    host: "ledger.bank.internal".into(),
                    headers: pairs(headers),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: pairs(ext),
            ..Default::default()
        }),
    };
    AuthorizationClient::new(channel)
        .check(request)
        .await
        .expect("a Check is answered, allowed or denied")
        .into_inner()
}

/// An allowed Check: (header, value, overwrites) set upstream, and headers removed.
pub fn allowed(r: &CheckResponse) -> (Vec<(String, String, bool)>, Vec<String>) {
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "allowed: {r:?}");
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => (
            ok.headers
                .iter()
                .filter_map(|h| {
                    h.header
                        .as_ref()
                        .map(|v| (v.key.clone(), v.value.clone(), h.append_action == 2))
                })
                .collect(),
            ok.headers_to_remove.clone(),
        ),
        other => panic!("OK response expected: {other:?}"),
    }
}

/// A denied Check: the HTTP status and the response headers the client gets.
pub fn denied(r: &CheckResponse) -> (i32, HashMap<String, String>) {
    assert_ne!(r.status.as_ref().map(|s| s.code), Some(0), "denied: {r:?}");
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => (
            d.status.as_ref().map(|s| s.code).unwrap_or_default(),
            d.headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect(),
        ),
        other => panic!("denied response expected: {other:?}"),
    }
}

/// The status, `WWW-Authenticate` and `tokend-reason` of a denied Check.
fn refusal(r: &CheckResponse) -> (i32, String, String) {
    let (code, h) = denied(r);
    let get = |k: &str| h.get(k).cloned().unwrap_or_default();
    (code, get("www-authenticate"), get("tokend-reason"))
}

fn invalid_token(reason: &str) -> String {
    format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"")
}

/// payments and ledger, ledger trusting payments.
async fn pair() -> (Bank, Node, Node) {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", payments.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    (bank, payments, ledger)
}

async fn mint_with(node: &Node, audience: &str, claims: &str, one_time: bool) -> String {
    node.tokens()
        .await
        .mint(pb::MintRequest {
            audience: audience.into(),
            claims_json: claims.into(),
            one_time,
            ..Default::default()
        })
        .await
        .expect("mint")
        .into_inner()
        .token
}

/// A valid token is allowed: the verified subject and issuer go upstream,
/// overwriting what the client sent; the actor header, absent for a direct
/// token, is removed; the token itself is in no header tokend sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_valid_token_passes_verified_claims() {
    let (_bank, payments, ledger) = pair().await;
    let t = payments.mint("ledger").await.token;
    let bearer = format!("Bearer {t}");
    let r = check(
        &ledger,
        &[
            ("authorization", &bearer),
            ("x-tokend-sub", "spiffe://bank.internal/admin"),
            ("x-tokend-act", "spiffe://bank.internal/admin"),
        ],
        &[],
    )
    .await;
    let (set, removed) = allowed(&r);
    assert!(
        set.contains(&("x-tokend-sub".into(), id("payments"), true)),
        "{set:?}"
    );
    assert!(
        set.contains(&("x-tokend-iss".into(), id("payments"), true)),
        "{set:?}"
    );
    assert_eq!(removed, ["x-tokend-act"]);
    assert!(
        !format!("{r:?}").contains(&t),
        "the token is never passed on"
    );

    // The scheme is case-insensitive.
    let r = check(&ledger, &[("authorization", &format!("bearer {t}"))], &[]).await;
    allowed(&r);
}

/// Every token that does not verify is a 401 naming its reason (RFC 6750
/// invalid_token); no token is a bare `Bearer` challenge; a header that is
/// not one Bearer token is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refusals_carry_the_reason() {
    let (_bank, payments, ledger) = pair().await;
    let t = payments.mint("ledger").await.token;
    let mut claims = payload(&t);
    claims["role"] = "admin".into();
    let tampered = with_payload(&t, &claims);
    let elsewhere = payments.mint("archive").await.token;
    for (token, reason) in [
        (tampered.as_str(), "bad_signature"),
        (elsewhere.as_str(), "wrong_audience"),
        ("not-a-jwt", "malformed"),
    ] {
        let r = check(
            &ledger,
            &[("authorization", &format!("Bearer {token}"))],
            &[],
        )
        .await;
        assert_eq!(
            refusal(&r),
            (401, invalid_token(reason), reason.to_owned()),
            "{reason}"
        );
    }
    let r = check(&ledger, &[], &[]).await;
    assert_eq!(refusal(&r), (401, "Bearer".into(), String::new()));
    let r = check(&ledger, &[("authorization", "Basic dXNlcjpwYXNz")], &[]).await;
    assert_eq!(refusal(&r).0, 401, "another scheme is no bearer token");
    for bad in [
        format!("Bearer {t} "),
        format!("Bearer  {t}"),
        format!("Bearer {t} {t}"),
    ] {
        let r = check(&ledger, &[("authorization", &bad)], &[]).await;
        let (code, www, reason) = refusal(&r);
        assert_eq!((code, reason.as_str()), (400, "malformed"), "{bad:?}");
        assert!(www.contains("invalid_request"), "{www}");
    }
    // The route may name another audience of this sidecar's service.
    let api = payments.mint("ledger-api").await.token;
    let bearer = format!("Bearer {api}");
    allowed(
        &check(
            &ledger,
            &[("authorization", &bearer)],
            &[("audience", "ledger-api")],
        )
        .await,
    );
    let r = check(&ledger, &[("authorization", &bearer)], &[]).await;
    assert_eq!(refusal(&r).2, "wrong_audience");
}

/// A valid token an authorization rule refuses is a 403: an issuer the
/// route does not allow, or a required claim missing; the config's
/// defaults apply where the route sets none. Configured claim headers
/// replace the defaults, whose names are still stripped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_refuse_with_403() {
    let bank = Bank::new();
    let payments = bank.start(bank.lean_peer("payments")).await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .config("[ext_authz]\nrequired_claims = [\"role=teller\"]")
                .peer("payments", payments.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    let plain = format!("Bearer {}", payments.mint("ledger").await.token);
    let teller = format!(
        "Bearer {}",
        mint_with(&payments, "ledger", r#"{"role":"teller"}"#, false).await
    );
    let forbidden = |r: &CheckResponse| {
        let (code, www, reason) = refusal(r);
        assert_eq!((code, reason.as_str()), (403, "permission_denied"));
        assert!(www.contains("insufficient_scope"), "{www}");
    };
    // The config's default: role=teller.
    forbidden(&check(&ledger, &[("authorization", &plain)], &[]).await);
    allowed(&check(&ledger, &[("authorization", &teller)], &[]).await);
    // A route allowing only teller refuses payments' valid token.
    let only_teller = [("allowed_issuers", "teller")];
    forbidden(&check(&ledger, &[("authorization", &teller)], &only_teller).await);
    let both = [("allowed_issuers", "teller,spiffe://bank.internal/payments")];
    allowed(&check(&ledger, &[("authorization", &teller)], &both).await);
    // A route's own claim rule replaces the default.
    let level = [("required_claims", "level=3")];
    forbidden(&check(&ledger, &[("authorization", &teller)], &level).await);
    allowed(
        &check(
            &ledger,
            &[("authorization", &plain)],
            &[("required_claims", "")],
        )
        .await,
    );
    // A misspelt key denies (500), never allows every issuer.
    let (code, _) = denied(
        &check(
            &ledger,
            &[("authorization", &teller)],
            &[("allowed_issuer", "x")],
        )
        .await,
    );
    assert_eq!(code, 500);

    // With other claim headers configured, the default names are still
    // stripped from the client's request.
    let custom = bank
        .start(
            bank.lean("custom")
                .config("[ext_authz]\nheaders = { x-caller = \"sub\", x-role = \"role\" }"),
        )
        .await;
    let own = format!(
        "Bearer {}",
        mint_with(&custom, "custom", r#"{"role":"teller"}"#, false).await
    );
    let (set, mut removed) = allowed(
        &check(
            &custom,
            &[("authorization", &own), ("x-tokend-sub", "x")],
            &[],
        )
        .await,
    );
    removed.sort();
    assert_eq!(removed, ["x-tokend-act", "x-tokend-iss", "x-tokend-sub"]);
    assert!(
        set.contains(&("x-caller".into(), id("custom"), true)),
        "{set:?}"
    );
    assert!(
        set.contains(&("x-role".into(), "teller".into(), true)),
        "{set:?}"
    );
}

/// A delegated token passes its current actor upstream; a one-time token
/// is accepted once, then refused as `replayed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_and_one_time_tokens() {
    let (_bank, payments, ledger) = pair().await;
    let t1 = payments.mint("ledger").await.token;
    let t2 = ledger
        .exchange(&t1, "ledger")
        .await
        .expect("exchange")
        .token;
    let (set, removed) =
        allowed(&check(&ledger, &[("authorization", &format!("Bearer {t2}"))], &[]).await);
    assert!(
        set.contains(&("x-tokend-sub".into(), id("payments"), true)),
        "{set:?}"
    );
    assert!(
        set.contains(&("x-tokend-iss".into(), id("ledger"), true)),
        "{set:?}"
    );
    assert!(
        set.contains(&("x-tokend-act".into(), id("ledger"), true)),
        "{set:?}"
    );
    assert!(removed.is_empty(), "{removed:?}");

    let once = format!("Bearer {}", mint_with(&payments, "ledger", "", true).await);
    allowed(&check(&ledger, &[("authorization", &once)], &[]).await);
    let r = check(&ledger, &[("authorization", &once)], &[]).await;
    assert_eq!(
        refusal(&r),
        (401, invalid_token("replayed"), "replayed".into())
    );
}

/// Outbound mode mints for the route's audience and overwrites the
/// request's authorization; the token verifies at the target. Without an
/// audience the route is denied, whatever host the request names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_mints_for_the_route_audience_only() {
    let (_bank, payments, ledger) = pair().await;
    let out = [("mode", "outbound"), ("audience", "ledger")];
    let r = check(
        &payments,
        &[
            ("authorization", "Bearer stale"),
            (":authority", "archive"),
            ("host", "archive"),
        ],
        &out,
    )
    .await;
    let (set, removed) = allowed(&r);
    // tokend's nonce relay header never leaves (see envoy_dpop_nonce_round_trip).
    assert_eq!(removed, vec!["x-tokend-dpop-nonce".to_owned()]);
    let [(name, value, overwrite)] = &set[..] else {
        panic!("one header: {set:?}")
    };
    assert_eq!((name.as_str(), *overwrite), ("authorization", true));
    let token = value.strip_prefix("Bearer ").expect("Bearer token");
    let v = ledger.verify(token).await.expect("verifies at ledger");
    assert_eq!(v.issuer, id("payments"));
    assert_eq!(payload(token)["aud"], id("ledger"));
    // The mint cache answers the next call with the same token.
    let again = allowed(&check(&payments, &[], &out).await).0;
    assert_eq!(again[0].1, *value);

    for ext in [
        vec![("mode", "outbound")],
        vec![("mode", "outbound"), ("audience", "")],
    ] {
        let r = check(
            &payments,
            &[("host", "ledger"), (":authority", "ledger")],
            &ext,
        )
        .await;
        let (code, h) = denied(&r);
        assert_eq!(code, 500, "{ext:?}");
        assert!(!h.contains_key("authorization"));
    }
}

/// The uid allow-list applies to Check as to every local service: a caller
/// not listed gets PermissionDenied, which Envoy turns into a denial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_not_allowed_are_refused() {
    let bank = Bank::new();
    let node = bank
        .start(bank.lean("ledger").config("allowed_uids = [4294967294]"))
        .await;
    let channel = tokend::connect(&node.socket()).await.expect("connect");
    let e = AuthorizationClient::new(channel)
        .check(CheckRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        tokend::reason_of(&e),
        Some(tokend::Reason::PermissionDenied)
    );
}

/// A sidecar process counts Check decisions by mode and outcome, logs each
/// refusal at info with its reason (never the token, never the query), and a
/// misconfigured route at error, naming the key; grpc.health.v1 reports
/// the service (for Envoy's cluster health checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_counted_and_refusals_logged() {
    use std::io::{Read, Write};

    let root = crate::support::tmp();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe");
    let a = crate::support::Sidecar::start(
        root.path(),
        "ledger",
        &format!("[metrics]\nlisten = \"{port}\""),
    );
    let t = a.mint("ledger").await.token;
    let mut claims = payload(&t);
    claims["sub"] = id("admin").into();
    let tampered = with_payload(&t, &claims);
    let sock = a.socket.clone();
    allowed(&check_on(&sock, &[("authorization", &format!("Bearer {t}"))], &[]).await);
    let r = check_on(
        &sock,
        &[("authorization", &format!("Bearer {tampered}"))],
        &[],
    )
    .await;
    assert_eq!(refusal(&r).2, "bad_signature");
    denied(&check_on(&sock, &[], &[]).await);
    denied(&check_on(&sock, &[], &[("required_claim", "x")]).await);
    allowed(&check_on(&sock, &[], &[("mode", "outbound"), ("audience", "archive")]).await);

    let mut s = std::net::TcpStream::connect(port).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    for (mode, outcome) in [
        ("inbound", "ok"),
        ("inbound", "invalid_token"),
        ("inbound", "no_token"),
        ("invalid", "misconfigured"),
        ("outbound", "ok"),
    ] {
        let needle = format!("tokend_ext_authz_total{{mode=\"{mode}\",outcome=\"{outcome}\"}} 1");
        assert!(text.contains(&needle), "{needle} missing from:\n{text}");
    }

    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tokend::connect(&sock).await.expect("connect"),
    );
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(
        serving,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let log = a.stderr();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ext_authz refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(
        refused[0].contains("INFO") && refused[0].contains("bad_signature"),
        "{log}"
    );
    assert!(refused[1].contains("no bearer token"), "{log}");
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("misconfigured")
            && l.contains("required_claim")),
        "{log}"
    );
    for secret in [t.as_str(), tampered.as_str(), "secret=1"] {
        assert!(!log.contains(secret), "the log shows {secret:?}:\n{log}");
    }
    for part in t.split('.') {
        assert!(!log.contains(part), "the log shows part of a token:\n{log}");
    }
}

/// A flood of bad requests through Envoy is counted, not logged line by
/// line: a real sidecar refuses 300 garbage tokens, all counted
/// (`tokend_ext_authz_total` is not asserted here: see observability), and
/// its log holds at most one burst of refusal lines per second plus a line
/// that says how many were left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_flood_is_rate_limited_in_the_log() {
    let root = crate::support::tmp();
    let s = crate::support::Sidecar::start(root.path(), "ledger", "");
    let channel = tokend::connect(&s.socket).await.expect("connect");
    let request = |n: usize| CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: format!("/accounts/{n}?secret=1"),
                    host: "ledger.bank.internal".into(),
                    headers: HashMap::from([(
                        "authorization".to_owned(),
                        format!("Bearer garbage-{n}"),
                    )]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let mut client = AuthorizationClient::new(channel);
    let started = std::time::Instant::now();
    for n in 0..300 {
        let r = client
            .check(request(n))
            .await
            .expect("answered")
            .into_inner();
        assert_eq!(
            r.status.map(|s| s.code),
            Some(tonic::Code::Unauthenticated as i32),
            "garbage token {n} is refused"
        );
    }
    let seconds = started.elapsed().as_secs() + 1;
    // One more refusal after a full window, which reports the left-out lines.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    client.check(request(300)).await.expect("answered");
    let log = s.stderr();
    let lines = log
        .lines()
        .filter(|l| l.contains("ext_authz refused"))
        .count() as u64;
    assert!(
        lines <= 20 * (seconds + 1) + 1 && lines < 300,
        "{lines} refusal lines in {seconds}s:\n{log}"
    );
    let left_out: u64 = log
        .lines()
        .filter(|l| l.contains("ext_authz refused"))
        .filter_map(|l| l.split("suppressed=").nth(1))
        .filter_map(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(
        lines + left_out,
        301,
        "every refusal is logged or counted as left out:\n{log}"
    );
    assert!(!log.contains("secret=1"), "the query never reaches the log");
}
