//! Minting and verification through in-process sidecars (real sockets, the
//! bank's clock), each refusal asserted by its reason code; the CLI runs as a
//! client process against them. Only SIGTERM is tested on `tokend serve`
//! processes.

use crate::inproc::{Bank, Node};
use crate::support::*;

/// Two sidecars: `a` (payments) and `b` (ledger) which trusts a's JWKS file.
async fn pair(bank: &Bank, b_extra: &str) -> (Node, Node) {
    let a = bank.start(bank.lean("payments")).await;
    std::fs::write(bank.root().join("payments.jwks.json"), a.jwks().await).expect("write jwks");
    let b = bank
        .start(
            bank.lean("ledger")
                .config(b_extra)
                .config("[[peers]]\nname = \"payments\"\njwks_file = \"../payments.jwks.json\""),
        )
        .await;
    (a, b)
}

/// A token minted by a sidecar for itself verifies there, over gRPC and the CLI.
#[tokio::test]
async fn mint_verify_round_trip_same_sidecar() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let m = a.mint("payments").await;
    let v = a.verify(&m.token).await.expect("verifies");
    assert_eq!(v.issuer, id("payments"));
    assert_eq!(v.subject, id("payments"));
    assert_eq!(v.kid, m.kid);

    let out = a
        .cli(&[
            "mint",
            "--audience",
            "payments",
            "--claim",
            "role=teller",
            "--claim",
            "limit=100",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let out = a.cli(&["verify", &token]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).expect("claims json");
    assert_eq!(claims["role"], "teller");
    assert_eq!(claims["limit"], 100);
    assert_eq!(claims["iss"], id("payments"));
    assert_eq!(claims["aud"], id("payments"));
    assert_eq!(
        claims["jti"].as_str().map(str::len),
        Some(22),
        "128-bit jti, base64url"
    );
}

/// A's token for B verifies at B (A's keys from a JWKS file); B names A as issuer.
/// Tampering, the wrong audience, expiry and an over-long lifetime are each refused by reason.
#[tokio::test]
async fn cross_sidecar_verification_and_refusals() {
    let bank = Bank::new();
    let (a, b) = pair(&bank, "[tokens]\nmax_ttl = \"10m\"\nclock_skew = \"5s\"").await;
    let m = a.mint("ledger").await;
    let v = b.verify(&m.token).await.expect("B accepts A's token");
    assert_eq!(v.issuer, id("payments"));
    assert_eq!(v.subject, id("payments"));

    // Tampered payload: same header and signature, one claim changed.
    let mut c2 = payload(&m.token);
    c2["exp"] = (c2["exp"].as_i64().expect("exp") + 1).into();
    assert_eq!(
        b.verify(&with_payload(&m.token, &c2))
            .await
            .err()
            .as_deref(),
        Some("bad_signature")
    );

    // Token for another audience.
    let other = a.mint("archive").await;
    assert_eq!(
        b.verify(&other.token).await.err().as_deref(),
        Some("wrong_audience")
    );
    // ...but the same token names archive when asked for that audience explicitly.
    let req = tokend::pb::tokend::VerifyRequest {
        token: other.token.clone(),
        audience: "archive".into(),
        ..Default::default()
    };
    assert!(
        b.tokens().await.verify(req).await.is_ok(),
        "audience given as a bare name"
    );

    // Expired, signed with A's real key: exp beyond skew in the past.
    let key = a.signing_key();
    let mut c = claims_for(&bank, "payments", "ledger", -60, 30);
    assert_eq!(
        b.verify(&forge(&key, key.kid(), &c)).await.err().as_deref(),
        Some("expired")
    );
    // Inside the skew it still passes.
    c = claims_for(&bank, "payments", "ledger", -3, 7);
    assert!(
        b.verify(&forge(&key, key.kid(), &c)).await.is_ok(),
        "3s past exp is within 5s skew"
    );

    // Not yet valid...
    let mut c = bank.claims("payments", "ledger", 60);
    c["nbf"] = (bank.now() + 30).into();
    let early = forge(&key, key.kid(), &c);
    assert_eq!(
        b.verify(&early).await.err().as_deref(),
        Some("not_yet_valid")
    );
    // ...until the clock is within the skew of nbf.
    bank.advance(24);
    assert_eq!(
        b.verify(&early).await.err().as_deref(),
        Some("not_yet_valid"),
        "6s before nbf is outside the 5s skew"
    );
    bank.advance(1);
    assert!(
        b.verify(&early).await.is_ok(),
        "5s before nbf is within skew"
    );

    // Lifetime over B's max_ttl (10m).
    let c = bank.claims("payments", "ledger", 3600);
    assert_eq!(
        b.verify(&forge(&key, key.kid(), &c)).await.err().as_deref(),
        Some("lifetime_too_long")
    );

    // Missing jti.
    let mut c = bank.claims("payments", "ledger", 60);
    c.as_object_mut().expect("obj").remove("jti");
    assert_eq!(
        b.verify(&forge(&key, key.kid(), &c)).await.err().as_deref(),
        Some("missing_claim")
    );

    // A kid A never published.
    let c = bank.claims("payments", "ledger", 60);
    assert_eq!(
        b.verify(&forge(&key, "no-such-kid", &c))
            .await
            .err()
            .as_deref(),
        Some("unknown_kid")
    );

    // An issuer B does not know.
    let c = bank.claims("mallory", "ledger", 60);
    assert_eq!(
        b.verify(&forge(&key, key.kid(), &c)).await.err().as_deref(),
        Some("unknown_issuer")
    );

    // A real token expires by the clock: B accepts A's token up to its exp
    // plus the 5s skew, and refuses it as expired one second later.
    bank.advance(u64::try_from(m.expires_at + 5 - bank.now()).expect("exp ahead"));
    assert!(
        b.verify(&m.token).await.is_ok(),
        "exp + skew is still valid"
    );
    bank.advance(1);
    assert_eq!(b.verify(&m.token).await.err().as_deref(), Some("expired"));
}

/// Claims whose exp is `exp_offset` from now by the bank's clock, issued `lifetime` before.
fn claims_for(
    bank: &Bank,
    iss: &str,
    aud: &str,
    exp_offset: i64,
    lifetime: i64,
) -> serde_json::Value {
    let t = bank.now();
    serde_json::json!({
        "iss": id(iss), "sub": id(iss), "aud": id(aud),
        "iat": t + exp_offset - lifetime, "exp": t + exp_offset, "jti": "x",
    })
}

/// Algorithm confusion and structural garbage are refused before any key is used.
#[tokio::test]
async fn algorithm_and_structure_refusals() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let m = a.mint("payments").await;
    let kid = m.kid.clone();
    for alg in ["none", "HS256", "RS512", "PS256", "ES256"] {
        let t = with_header(
            &m.token,
            &serde_json::json!({"alg": alg, "typ": "JWT", "kid": kid}),
        );
        assert_eq!(
            a.verify(&t).await.err().as_deref(),
            Some("unsupported_alg"),
            "alg {alg}"
        );
    }
    // alg none with an empty signature.
    let parts: Vec<&str> = m.token.split('.').collect();
    let none = format!(
        "{}.{}.",
        with_header(&m.token, &serde_json::json!({"alg":"none"}))
            .split('.')
            .next()
            .expect("h"),
        parts[1]
    );
    assert_eq!(a.verify(&none).await.err().as_deref(), Some("malformed"));
    // An embedded key in the header is not trusted.
    let t = with_header(
        &m.token,
        &serde_json::json!({"alg": "RS256", "kid": kid, "jwk": {"kty": "RSA"}}),
    );
    assert_eq!(a.verify(&t).await.err().as_deref(), Some("unsupported_alg"));
    for garbage in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        &"x".repeat(10_000),
    ] {
        assert_eq!(
            a.verify(garbage).await.err().as_deref(),
            Some("malformed"),
            "{garbage:.20}"
        );
    }
    // Valid structure, header without kid.
    let t = with_header(&m.token, &serde_json::json!({"alg": "RS256", "typ": "JWT"}));
    assert_eq!(a.verify(&t).await.err().as_deref(), Some("missing_claim"));
}

/// A one-time token is accepted once and then refused as replayed.
#[tokio::test]
async fn one_time_token_replayed() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let req = tokend::pb::tokend::MintRequest {
        audience: "payments".into(),
        one_time: true,
        ..Default::default()
    };
    let m = a.tokens().await.mint(req).await.expect("mint").into_inner();
    assert!(a.verify(&m.token).await.is_ok());
    assert_eq!(a.verify(&m.token).await.err().as_deref(), Some("replayed"));
    // Ordinary tokens are reused from the cache and verify any number of times.
    let x = a.mint("payments").await;
    let y = a.mint("payments").await;
    assert_eq!(
        x.token, y.token,
        "a repeated request reuses the cached token"
    );
    assert!(a.verify(&x.token).await.is_ok() && a.verify(&x.token).await.is_ok());
    // Reuse lasts less than half the token's life (default ttl 300s) by the clock.
    bank.advance(149);
    assert_eq!(a.mint("payments").await.token, x.token, "reused at 149s");
    bank.advance(1);
    let z = a.mint("payments").await;
    assert_ne!(z.token, x.token, "a fresh token at half its life");
    assert!(a.verify(&z.token).await.is_ok());
}

/// Callers cannot set registered claims nor exceed max_ttl.
#[tokio::test]
async fn mint_refusals() {
    let bank = Bank::new();
    let a = bank
        .start(bank.lean("payments").config("[tokens]\nmax_ttl = \"10m\""))
        .await;
    let mut c = a.tokens().await;
    for claim in ["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "act"] {
        let req = tokend::pb::tokend::MintRequest {
            audience: "ledger".into(),
            claims_json: format!("{{\"{claim}\": \"x\"}}"),
            ..Default::default()
        };
        let s = c.mint(req).await.expect_err("refused");
        assert_eq!(
            tokend::reason_of(&s),
            Some(tokend::Reason::Malformed),
            "{claim}"
        );
        assert!(s.message().contains(claim), "{}", s.message());
    }
    let req = tokend::pb::tokend::MintRequest {
        audience: "ledger".into(),
        ttl_seconds: 3600,
        ..Default::default()
    };
    let s = c.mint(req).await.expect_err("too long");
    assert_eq!(tokend::reason_of(&s), Some(tokend::Reason::LifetimeTooLong));
    let req = tokend::pb::tokend::MintRequest {
        audience: "not a name!".into(),
        ..Default::default()
    };
    let s = c.mint(req).await.expect_err("bad audience");
    assert_eq!(tokend::reason_of(&s), Some(tokend::Reason::Malformed));
    let out = a
        .cli(&["mint", "--audience", "ledger", "--claim", "sub=ledger"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("malformed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A restart keeps the same kid, and tokens minted before it still verify.
#[tokio::test]
async fn restart_keeps_kid_and_old_tokens_verify() {
    let bank = Bank::new();
    let (mut a, mut b) = pair(&bank, "").await;
    let before = a.mint("ledger").await;
    a.restart().await;
    b.restart().await;
    let after = a.mint("ledger").await;
    assert_eq!(before.kid, after.kid);
    assert!(
        b.verify(&before.token).await.is_ok(),
        "old token verifies after both restarts"
    );
    assert!(b.verify(&after.token).await.is_ok());
    assert_eq!(
        a.jwks().await,
        std::fs::read_to_string(bank.root().join("payments.jwks.json")).expect("jwks"),
        "the same JWKS as before the restart"
    );
}

/// SIGTERM stops the daemon cleanly: exit 0 and the socket file is removed.
/// (A process test: only a process receives the signal.)
#[tokio::test]
async fn sigterm_removes_socket() {
    let root = tmp();
    let mut a = Sidecar::start(root.path(), "payments", "");
    assert!(a.socket.exists());
    let status = a.stop().expect("was running");
    assert!(status.success(), "{status:?}: {}", a.stderr());
    assert!(!a.socket.exists(), "socket removed");
    assert!(a.stderr().contains("tokend stopped"));
}

/// A second daemon refuses to take over a live socket: "in use", a runtime
/// error (`tokend serve` exits 1 for it, not 64), and the first keeps
/// serving. Once the first stops, its socket file is gone.
#[tokio::test]
async fn live_socket_not_stolen() {
    let bank = Bank::new();
    let mut a = bank.start(bank.lean("payments")).await;
    let err = bank
        .try_start(bank.lean("payments"))
        .await
        .err()
        .expect("second daemon refused");
    assert_eq!(
        err.to_string(),
        format!(
            "socket {} is in use by a running process (another tokend?)",
            a.socket().display()
        )
    );
    assert!(
        matches!(&err, tokend::SidecarError::Daemon(d) if !d.is_config()),
        "a runtime error (exit 1), not a usage one (exit 64): {err:?}"
    );
    assert!(
        a.verify(&a.mint("payments").await.token).await.is_ok(),
        "first daemon still serves"
    );

    let socket = a.socket();
    a.stop().await;
    assert!(
        !socket.exists(),
        "socket removed on stop: the path is free again"
    );
}

/// The socket gets the configured mode, and a caller whose uid is allowed is served.
#[tokio::test]
async fn socket_mode_and_allowed_uid() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let bank = Bank::new();
    let own = std::fs::metadata("/proc/self").expect("proc").uid();
    let a = bank
        .start(
            bank.lean("payments")
                .config(&format!("socket_mode = \"0660\"\nallowed_uids = [{own}]")),
        )
        .await;
    let mode = std::fs::metadata(a.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    assert!(a.verify(&a.mint("payments").await.token).await.is_ok());
    let b = bank.start(bank.lean("ledger")).await;
    assert_eq!(
        std::fs::metadata(b.socket())
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "default 0600"
    );
}

/// Callers outside allowed_uids are refused with permission_denied.
#[tokio::test]
async fn uid_allow_list() {
    let bank = Bank::new();
    let a = bank
        .start(bank.lean("payments").config("allowed_uids = [4242424]"))
        .await;
    let req = tokend::pb::tokend::MintRequest {
        audience: "ledger".into(),
        ..Default::default()
    };
    let s = a.tokens().await.mint(req).await.expect_err("denied");
    assert_eq!(
        tokend::reason_of(&s),
        Some(tokend::Reason::PermissionDenied)
    );
}

/// A JWKS-file peer follows its file: a key removed from the file stops being
/// accepted, and a corrupt rewrite is refused while the previous set stays.
/// (The file watcher polls every 2 s of real time.)
#[tokio::test]
async fn jwks_file_changes_are_followed() {
    let bank = Bank::new();
    let (a, b) = pair(&bank, "").await;
    let file = bank.root().join("payments.jwks.json");
    let m = a.mint("ledger").await;
    assert!(b.verify(&m.token).await.is_ok());

    std::fs::write(&file, "{\"keys\": [").expect("corrupt");
    assert!(
        eventually(10, || async {
            b.holds("payments")
                .await
                .is_some_and(|i| i.last_error.contains("not a JWKS"))
        })
        .await,
        "refusal recorded: {:?}",
        b.holds("payments").await
    );
    assert!(b.verify(&m.token).await.is_ok(), "previous set stays");

    std::fs::write(&file, "{\"keys\": []}").expect("empty");
    assert!(
        eventually(10, || async {
            b.verify(&m.token).await.err().as_deref() == Some("unknown_kid")
        })
        .await,
        "key removed from the file is no longer accepted"
    );
}

/// A JWS of another type (say a DPoP proof) signed by a trusted key is not a token.
#[tokio::test]
async fn other_jws_types_are_refused() {
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let key = a.signing_key();
    let claims = bank.claims("payments", "payments", 60);
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(key.kid().into());
    for (typ, expect) in [
        (Some("dpop+jwt"), Some("malformed")),
        (Some("jwt"), None),
        (None, None),
    ] {
        header.typ = typ.map(str::to_owned);
        let t = jsonwebtoken::encode(&header, &claims, key.encoding_key()).expect("encode");
        assert_eq!(a.verify(&t).await.err().as_deref(), expect, "typ {typ:?}");
    }
}

/// Duplicate members in a header or payload signed by a trusted key are
/// `malformed`, never read last-wins; so is a payload nested past 32 levels.
/// Minting refuses the same in caller claims, naming the member.
#[tokio::test]
async fn duplicate_members_and_deep_nesting_are_malformed() {
    use tokend::Reason::Malformed;
    let bank = Bank::new();
    let a = bank.start(bank.lean("payments")).await;
    let key = a.signing_key();
    let kid = key.kid().to_owned();
    let (me, other) = (id("payments"), id("archive"));
    let t = bank.now();
    let header = format!(r#"{{"alg":"RS256","typ":"JWT","kid":"{kid}"}}"#);
    let body = |extra: &str| {
        format!(
            r#"{{"sub":"{me}","iat":{t},"nbf":{t},"exp":{},"jti":"j-{t}"{extra}}}"#,
            t + 60
        )
    };
    // The raw forger itself makes tokens that verify.
    let good = forge_raw(
        &key,
        &header,
        &body(&format!(r#","iss":"{me}","aud":"{me}""#)),
    );
    assert_eq!(a.refusal(&good).await.0, None, "control token");
    for (extra, name) in [
        (
            format!(r#","iss":"{other}","iss":"{me}","aud":"{me}""#),
            "iss",
        ),
        (
            format!(r#","iss":"{me}","aud":"{other}","aud":"{me}""#),
            "aud",
        ),
        (
            format!(r#","iss":"{me}","aud":"{me}","role":"teller","role":"admin""#),
            "role",
        ),
    ] {
        let token = forge_raw(&key, &header, &body(&extra));
        assert_eq!(
            a.refusal(&token).await,
            (
                Some(Malformed),
                format!("malformed: payload: duplicate member \"{name}\"")
            ),
            "{extra}"
        );
    }
    let claims = body(&format!(r#","iss":"{me}","aud":"{me}""#));
    let nested = claims.replacen('{', r#"{"ctx":{"k":1,"k":2},"#, 1);
    let token = forge_raw(&key, &header, &nested);
    assert_eq!(
        a.refusal(&token).await.1,
        "malformed: payload: duplicate member \"k\" in /ctx"
    );
    for (h, name) in [
        (
            format!(r#"{{"alg":"none","alg":"RS256","typ":"JWT","kid":"{kid}"}}"#),
            "alg",
        ),
        (
            format!(r#"{{"alg":"RS256","typ":"JWT","kid":"other","kid":"{kid}"}}"#),
            "kid",
        ),
    ] {
        let token = forge_raw(&key, &h, &claims);
        assert_eq!(
            a.refusal(&token).await,
            (
                Some(Malformed),
                format!("malformed: header: duplicate member \"{name}\"")
            ),
            "{h}"
        );
    }
    let deep = |d: usize| format!("{}1{}", r#"{"a":"#.repeat(d - 1), "}".repeat(d - 1));
    let ok = claims.replacen('{', &format!(r#"{{"n":{},"#, deep(32)), 1);
    assert_eq!(
        a.refusal(&forge_raw(&key, &header, &ok)).await.0,
        None,
        "32 deep"
    );
    let too_deep = claims.replacen('{', &format!(r#"{{"n":{},"#, deep(33)), 1);
    assert_eq!(
        a.refusal(&forge_raw(&key, &header, &too_deep)).await,
        (
            Some(Malformed),
            "malformed: payload: nested deeper than 32 levels".into()
        )
    );

    let mut c = a.tokens().await;
    for (claims_json, expect) in [
        (
            r#"{"role":"teller","role":"admin"}"#.to_owned(),
            "malformed: caller claims: duplicate member \"role\"",
        ),
        (
            format!(r#"{{"n":{}}}"#, deep(33)),
            "malformed: caller claims: nested deeper than 32 levels",
        ),
    ] {
        let req = tokend::pb::tokend::MintRequest {
            audience: "ledger".into(),
            claims_json,
            ..Default::default()
        };
        let s = c.mint(req).await.expect_err("refused");
        assert_eq!(tokend::reason_of(&s), Some(Malformed));
        assert_eq!(s.message(), expect);
    }
    // The CLI does not collapse a repeated --claim into its last value either.
    let out = a
        .cli(&[
            "mint",
            "--audience",
            "ledger",
            "--claim",
            "role=teller",
            "--claim",
            "role=admin",
        ])
        .await;
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "tokend: --claim role is given twice; give each claim once"
    );
}

/// SIGTERM the moment the socket answers (before the startup log line) still
/// shuts down cleanly: signal handlers are installed before anything is built.
/// (A process test: only a process receives the signal.)
#[test]
fn sigterm_during_startup_cleans_up() {
    let root = tmp();
    let cfg = write_config(root.path(), "payments", "");
    let sock = root.path().join("payments/tokend.sock");
    for _ in 0..5 {
        let child = std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        wait_for_socket(&sock);
        sigterm(&child);
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{:?}", out.status);
        assert!(!sock.exists(), "socket removed");
    }
}
