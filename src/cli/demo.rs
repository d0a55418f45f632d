//! `tokend demo`: a small bank in one process. Three sidecars (payments,
//! ledger, and a compromised archive) with a fresh CA, temp dirs and peer
//! ports on 127.0.0.1:0, built only through `daemon::Sidecar` and driven
//! over their real sockets: a token accepted, two impersonations refused, a
//! rotation picked up without a failed call.

use std::path::Path;
use std::time::Duration;

use crate::api::{connect, reason_of};
use crate::daemon::{RunningSidecar, Sidecar};
use crate::proto::tokend::v1 as pb;

type Tokens = pb::token_service_client::TokenServiceClient<tonic::transport::Channel>;

fn say(step: &str, text: impl std::fmt::Display) {
    out!("[{step}] {text}");
}

fn short(token: &str) -> String {
    format!("{}…({} bytes)", &token[..token.len().min(32)], token.len())
}

async fn sidecar(
    root: &Path,
    name: &str,
    peers: &[(&str, std::net::SocketAddr)],
) -> Result<RunningSidecar, String> {
    let mut s = Sidecar::new(root, name)
        .peer_api(&root.join("ca"))
        .config("[rotation]\ninterval = \"1h\"\npublish_ahead = \"2s\"");
    for (peer, addr) in peers {
        s = s.peer(peer, *addr);
    }
    s.start().await.map_err(|e| e.to_string())
}

async fn tokens(root: &Path, name: &str) -> Result<Tokens, String> {
    Ok(pb::token_service_client::TokenServiceClient::new(
        connect(&root.join(name).join("tokend.sock"))
            .await
            .map_err(|e| e.to_string())?,
    ))
}

async fn verify(ledger: &mut Tokens, token: &str) -> Result<pb::VerifyResponse, String> {
    ledger
        .verify(pb::VerifyRequest {
            token: token.into(),
            audience: String::new(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| {
            format!(
                "{}: {}",
                reason_of(&s).map(|r| r.as_str()).unwrap_or("error"),
                crate::api::detail_of(&s)
            )
        })
}

async fn script(root: &Path) -> Result<(), String> {
    let mut payments = tokens(root, "payments").await?;
    let mut ledger = tokens(root, "ledger").await?;

    let m = payments
        .mint(pb::MintRequest {
            audience: "ledger".into(),
            claims_json: r#"{"amount":125,"currency":"EUR"}"#.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    say(
        "mint",
        format!("payments → ledger: {} kid {}", short(&m.token), m.kid),
    );
    let v = verify(&mut ledger, &m.token).await?;
    say(
        "verify",
        format!("ledger ACCEPTS: iss {} claims {}", v.issuer, v.claims_json),
    );

    // archive is compromised: the attacker holds its private key and tries to pass as payments.
    let archive_keys = root.join("archive").join("keys");
    let key = latest_key(&archive_keys)?;
    let now = crate::time::Clock::now(&crate::time::SystemClock).as_secs();
    let claims = serde_json::json!({
        "iss": "spiffe://bank.internal/payments", "sub": "spiffe://bank.internal/payments",
        "aud": "spiffe://bank.internal/ledger", "iat": now, "nbf": now, "exp": now + 60, "jti": "forged-1",
        "amount": 1_000_000,
    });
    for (label, kid) in [
        ("archive's kid", key.kid().to_owned()),
        ("payments' kid", m.kid.clone()),
    ] {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid);
        let forged = jsonwebtoken::encode(&header, &claims, key.encoding_key())
            .map_err(|e| e.to_string())?;
        match verify(&mut ledger, &forged).await {
            Ok(_) => return Err("a forged token was accepted".into()),
            Err(e) => say(
                "forge",
                format!("archive signs iss=payments with {label}: ledger REFUSES ({e})"),
            ),
        }
    }

    let mut admin = pb::admin_service_client::AdminServiceClient::new(
        connect(&root.join("payments").join("tokend.sock"))
            .await
            .map_err(|e| e.to_string())?,
    );
    let next = admin
        .rotate_key(pb::RotateKeyRequest::default())
        .await
        .map_err(|s| s.to_string())?
        .into_inner()
        .key
        .unwrap_or_default();
    say(
        "rotate",
        format!(
            "payments publishes {} (signs in 2s); ledger learns it over the watch stream",
            next.kid
        ),
    );
    let mut accepted = 0;
    for _ in 0..30 {
        let m = payments
            .mint(pb::MintRequest {
                audience: "ledger".into(),
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        verify(&mut ledger, &m.token).await?;
        accepted += 1;
        if m.kid == next.kid {
            say(
                "rotate",
                format!(
                    "{accepted} calls across the rotation, all accepted; now signing with {}",
                    m.kid
                ),
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err("the new key never became active".into())
}

fn latest_key(dir: &Path) -> Result<crate::keys::SigningKey, String> {
    let file = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".pk8.pem"))
        .ok_or("no key file")?;
    let bytes = std::fs::read(&file).map_err(|e| e.to_string())?;
    crate::keys::parse_pkcs8_pem(&file, &bytes).map_err(|e| e.to_string())
}

/// Runs the demo (with `directory`, the etcd one); 0 when every step
/// behaved as it should.
pub(super) async fn run(directory: bool) -> u8 {
    if directory && !super::demo_directory::etcd_on_path() {
        eprintln!("tokend demo --directory: needs `etcd` on PATH (Debian package etcd-server)");
        return 1;
    }
    let root = match tempfile_dir() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokend demo: {e}");
            return 1;
        }
    };
    let result = if directory {
        super::demo_directory::demo(&root).await
    } else {
        demo(&root).await
    };
    let _ = std::fs::remove_dir_all(&root);
    match result {
        Ok(()) => {
            say("done", "demo finished");
            0
        }
        Err(e) => {
            eprintln!("tokend demo: FAILED: {e}");
            1
        }
    }
}

async fn demo(root: &Path) -> Result<(), String> {
    let td = crate::identity::TrustDomain::new("bank.internal").map_err(|e| e.to_string())?;
    crate::ca::init(&root.join("ca"), &td).map_err(|e| e.to_string())?;
    say(
        "setup",
        format!(
            "CA for spiffe://bank.internal in {}",
            root.join("ca").display()
        ),
    );
    let payments = sidecar(root, "payments", &[]).await?;
    let archive = sidecar(root, "archive", &[]).await?;
    let p_addr = payments.peer_addr().ok_or("payments has no peer address")?;
    let a_addr = archive.peer_addr().ok_or("archive has no peer address")?;
    let ledger = sidecar(root, "ledger", &[("payments", p_addr), ("archive", a_addr)]).await?;
    say(
        "setup",
        format!("sidecars: payments (peer API {p_addr}), archive ({a_addr}), ledger trusting both"),
    );
    let result = script(root).await;
    for s in [payments, archive, ledger] {
        let _ = s.stop().await;
    }
    result
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let mut rnd = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd)
        .map_err(|_| "no randomness")?;
    let dir = std::env::temp_dir().join(format!("tokend-demo-{:016x}", u64::from_le_bytes(rnd)));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
