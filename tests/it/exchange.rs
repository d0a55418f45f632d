//! Token exchange (RFC 8693 delegation) across real sidecars: the delegated
//! token keeps the original subject, every link is verified, and a
//! compromised middle service cannot fabricate a link.

use tokend::pb::tokend as pb;

use crate::support::*;

/// payments → ledger → archive, with ledger and archive trusting each other
/// and payments.
fn bank(root: &std::path::Path) -> (Sidecar, Sidecar, Sidecar) {
    ca_init(root);
    let a = Sidecar::start_peer(root, "payments", &[], "");
    // archive's address is needed by ledger and vice versa: reserve archive's port first.
    let archive_port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let b = Sidecar::start_peer(
        root,
        "ledger",
        &[("payments", a.peer_addr()), ("archive", archive_port)],
        "",
    );
    ca_issue(&root.join("ca"), root, "archive");
    let cfg = write_config(
        root,
        "archive",
        &peer_config(
            archive_port.port(),
            &[("payments", a.peer_addr()), ("ledger", b.peer_addr())],
            "",
        ),
    );
    let c = Sidecar::start_with(root, "archive", &cfg)
        .unwrap_or_else(|o| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    (a, b, c)
}

async fn exchange(
    s: &Sidecar,
    token: &str,
    audience: &str,
) -> Result<pb::ExchangeResponse, String> {
    let req = pb::ExchangeRequest {
        token: token.into(),
        audience: audience.into(),
        ttl_seconds: 0,
    };
    s.tokens()
        .await
        .exchange(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|st| {
            tokend::reason_of(&st)
                .map(|r| r.to_string())
                .unwrap_or_else(|| st.to_string())
        })
}

/// A delegated token names the original subject, the actor, and verifies
/// through every link; the chain is capped at three links.
#[tokio::test]
async fn delegation_chain_verifies_and_is_bounded() {
    let root = tmp();
    let (a, b, c) = bank(root.path());
    let t1 = a.mint("ledger").await.token;

    let out = b.cli_stdin(&["exchange", "--audience", "archive", "-"], Some(&t1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t2 = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let v = c
        .verify(&t2)
        .await
        .expect("archive accepts the delegated token");
    assert_eq!(v.issuer, id("ledger"));
    assert_eq!(v.subject, id("payments"), "original subject kept");
    let claims: serde_json::Value = serde_json::from_str(&v.claims_json).expect("claims");
    assert_eq!(claims["act"]["sub"], id("ledger"));
    assert_eq!(claims["act"]["prev_token"], t1.as_str());
    assert!(
        claims["exp"].as_i64() <= payload(&t1)["exp"].as_i64(),
        "never outlives the received token"
    );

    // archive → ledger → archive: links 2 and 3 verify; a fourth is refused.
    let t3 = exchange(&c, &t2, "ledger")
        .await
        .expect("second link")
        .token;
    assert_eq!(
        b.verify(&t3).await.expect("ledger accepts 2 links").subject,
        id("payments")
    );
    let t4 = exchange(&b, &t3, "archive")
        .await
        .expect("third link")
        .token;
    assert_eq!(
        c.verify(&t4)
            .await
            .expect("archive accepts 3 links")
            .subject,
        id("payments")
    );
    assert_eq!(
        exchange(&c, &t4, "ledger").await.err().as_deref(),
        Some("permission_denied")
    );

    // Only tokens addressed to the exchanging sidecar can be exchanged.
    let not_for_b = a.mint("archive").await.token;
    assert_eq!(
        exchange(&b, &not_for_b, "archive").await.err().as_deref(),
        Some("wrong_audience")
    );
    assert_eq!(
        exchange(&b, "garbage", "archive").await.err().as_deref(),
        Some("malformed")
    );
}

/// ledger is compromised: with its own key it signs tokens claiming to act for
/// payments. Every fabricated link is refused by archive with its reason.
#[tokio::test]
async fn compromised_actor_cannot_fabricate_a_link() {
    let root = tmp();
    let (a, b, c) = bank(root.path());
    let key = b.signing_key();
    let t1 = a.mint("ledger").await.token;
    let for_archive = a.mint("archive").await.token;
    let forged = |act: serde_json::Value, sub: &str| {
        let mut claims = claims("ledger", "archive", 60);
        claims["sub"] = id(sub).into();
        claims["act"] = act;
        forge(&key, key.kid(), &claims)
    };

    let honest = forged(
        serde_json::json!({"sub": id("ledger"), "prev_token": t1}),
        "payments",
    );
    assert!(
        c.verify(&honest).await.is_ok(),
        "control: a correct link built by hand verifies"
    );

    let cases = [
        (
            "no prev_token",
            forged(serde_json::json!({"sub": id("ledger")}), "payments"),
            "missing_claim",
        ),
        (
            "act names someone else",
            forged(
                serde_json::json!({"sub": id("payments"), "prev_token": t1}),
                "payments",
            ),
            "malformed",
        ),
        (
            "prev token not for ledger",
            forged(
                serde_json::json!({"sub": id("ledger"), "prev_token": for_archive}),
                "payments",
            ),
            "wrong_audience",
        ),
        (
            "subject changed",
            forged(
                serde_json::json!({"sub": id("ledger"), "prev_token": t1}),
                "archive",
            ),
            "malformed",
        ),
        (
            "prev token tampered",
            forged(
                serde_json::json!({"sub": id("ledger"), "prev_token": with_payload(&t1, &{ let mut p = payload(&t1); p["exp"] = (p["exp"].as_i64().expect("exp") + 600).into(); p })}),
                "payments",
            ),
            "bad_signature",
        ),
        (
            "prev token is garbage",
            forged(
                serde_json::json!({"sub": id("ledger"), "prev_token": "x.y.z"}),
                "payments",
            ),
            "malformed",
        ),
    ];
    for (what, token, reason) in cases {
        assert_eq!(
            c.verify(&token).await.err().as_deref(),
            Some(reason),
            "{what}"
        );
    }

    // Adding a claim the subject never had (privilege escalation).
    let escalated = {
        let mut claims = claims("ledger", "archive", 60);
        claims["sub"] = id("payments").into();
        claims["role"] = "admin".into();
        claims["act"] = serde_json::json!({"sub": id("ledger"), "prev_token": t1});
        forge(&key, key.kid(), &claims)
    };
    assert_eq!(
        c.verify(&escalated).await.err().as_deref(),
        Some("malformed")
    );

    // One second past the received token, within clock skew: still refused
    // (an allowance per link would add up along a chain).
    let t1_exp = payload(&t1)["exp"].as_i64().expect("exp");
    let mut late = claims("ledger", "archive", 60);
    late["sub"] = id("payments").into();
    late["exp"] = (t1_exp + 1).into();
    late["act"] = serde_json::json!({"sub": id("ledger"), "prev_token": t1});
    assert_eq!(
        c.verify(&forge(&key, key.kid(), &late))
            .await
            .err()
            .as_deref(),
        Some("lifetime_too_long")
    );

    // Outliving the received token.
    let short = {
        let req = pb::MintRequest {
            audience: "ledger".into(),
            ttl_seconds: 5,
            ..Default::default()
        };
        a.tokens()
            .await
            .mint(req)
            .await
            .expect("mint")
            .into_inner()
            .token
    };
    let mut claims = claims("ledger", "archive", 120);
    claims["sub"] = id("payments").into();
    claims["act"] = serde_json::json!({"sub": id("ledger"), "prev_token": short});
    assert_eq!(
        c.verify(&forge(&key, key.kid(), &claims))
            .await
            .err()
            .as_deref(),
        Some("lifetime_too_long")
    );
}
