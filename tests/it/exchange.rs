//! Token exchange (RFC 8693 delegation) across in-process sidecars talking
//! mTLS to each other: the delegated token keeps the original subject, every
//! link is verified, and a compromised middle service cannot fabricate a link.

use tokend::pb::tokend as pb;

use crate::inproc::{Bank, Node};
use crate::support::{forge, id, payload, with_payload};

/// payments → ledger → archive, with ledger and archive trusting each other
/// and payments.
async fn bank() -> (Bank, Node, Node, Node) {
    let bank = Bank::new();
    let a = bank.start(bank.lean_peer("payments")).await;
    // archive's address is needed by ledger and vice versa: reserve archive's port first.
    let archive_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let b = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", a.peer_addr())
                .peer("archive", archive_addr),
        )
        .await;
    let c = bank
        .start(
            bank.lean_peer("archive")
                .peer_listen(archive_addr)
                .peer("payments", a.peer_addr())
                .peer("ledger", b.peer_addr()),
        )
        .await;
    // Ready when each has its peers' keys: a token arriving earlier waits at
    // most one second for an on-demand fetch, which a loaded machine can miss.
    b.learns(&["payments", "archive"]).await;
    c.learns(&["payments", "ledger"]).await;
    (bank, a, b, c)
}

/// A delegated token names the original subject, the actor, and verifies
/// through every link; the chain is capped at three links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_chain_verifies_and_is_bounded() {
    let (bank, a, b, c) = bank().await;
    let t1 = a.mint("ledger").await.token;

    // The first link through the CLI (`exchange -` reads the token on stdin).
    let out = b
        .cli_stdin(&["exchange", "--audience", "archive", "-"], Some(&t1))
        .await;
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
    let t3 = c.exchange(&t2, "ledger").await.expect("second link").token;
    assert_eq!(
        b.verify(&t3).await.expect("ledger accepts 2 links").subject,
        id("payments")
    );
    let t4 = b.exchange(&t3, "archive").await.expect("third link").token;
    assert_eq!(
        c.verify(&t4)
            .await
            .expect("archive accepts 3 links")
            .subject,
        id("payments")
    );
    assert_eq!(
        c.exchange(&t4, "ledger").await.err().as_deref(),
        Some("permission_denied")
    );

    // Only tokens addressed to the exchanging sidecar can be exchanged.
    let not_for_b = a.mint("archive").await.token;
    assert_eq!(
        b.exchange(&not_for_b, "archive").await.err().as_deref(),
        Some("wrong_audience")
    );
    assert_eq!(
        b.exchange("garbage", "archive").await.err().as_deref(),
        Some("malformed")
    );

    // A link dies with the token it was made from: one second past t1's exp
    // and the default 30 s skew (by the bank's clock), the delegated token
    // is expired and t1 can no longer be exchanged.
    let t1_exp = payload(&t1)["exp"].as_i64().expect("exp");
    bank.advance(u64::try_from(t1_exp + 30 + 1 - bank.now()).expect("exp ahead"));
    assert_eq!(c.verify(&t2).await.err().as_deref(), Some("expired"));
    assert_eq!(
        b.exchange(&t1, "archive").await.err().as_deref(),
        Some("expired")
    );
}

/// ledger is compromised: with its own key it signs tokens claiming to act for
/// payments. Every fabricated link is refused by archive with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compromised_actor_cannot_fabricate_a_link() {
    let (bank, a, b, c) = bank().await;
    let key = b.signing_key();
    let t1 = a.mint("ledger").await.token;
    let for_archive = a.mint("archive").await.token;
    let forged = |act: serde_json::Value, sub: &str| {
        let mut claims = bank.claims("ledger", "archive", 60);
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
        let mut claims = bank.claims("ledger", "archive", 60);
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
    let mut late = bank.claims("ledger", "archive", 60);
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
    // Exactly the received token's exp: accepted (the bound is exact, not off by one).
    late["exp"] = t1_exp.into();
    assert!(
        c.verify(&forge(&key, key.kid(), &late)).await.is_ok(),
        "a link ending with the received token verifies"
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
    let mut claims = bank.claims("ledger", "archive", 120);
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
