//! `tokend demo --directory`: replicas and the etcd directory in one
//! process, when `etcd` (Debian `etcd-server`) is on PATH. It starts a
//! throwaway etcd on 127.0.0.1 (free ports, temp data dir), two replicas
//! of `payments` and two of `ledger`, all with `[directory]` and none with
//! a `[[peers]]` entry: ledger discovers payments' instances through etcd,
//! accepts tokens from both, claims a one-time token once across its two
//! replicas, and refuses a revoked key as soon as the revocation is put.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::{connect, reason_of};
use crate::daemon::{RunningSidecar, Sidecar};
use crate::proto::tokend::v1 as pb;

type Tokens = pb::token_service_client::TokenServiceClient<tonic::transport::Channel>;

fn say(step: &str, text: impl std::fmt::Display) {
    out!("[{step}] {text}");
}

/// A throwaway etcd, killed on drop.
struct Etcd {
    child: Child,
    endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

async fn start_etcd(root: &Path) -> Result<Etcd, String> {
    let (client, peer) = (free_port()?, free_port()?);
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "demo", "--data-dir"])
        .arg(root.join("etcd"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("demo={peer_url}")])
        .args(["--quota-backend-bytes", &(64u64 << 20).to_string()])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start etcd ({e}): install it (Debian package etcd-server)"))?;
    let etcd = Etcd { child, endpoint };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !healthy(client) {
        if Instant::now() > deadline {
            return Err("etcd did not become healthy within 20 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(etcd)
}

async fn replica(root: &Path, name: &str, n: usize, etcd: &str) -> Result<RunningSidecar, String> {
    Sidecar::new(&root.join(format!("{name}-{n}")), name)
        .peer_api(&root.join("ca"))
        .standby_key(n == 1)
        .config(&format!(
            "[directory]\netcd = [\"{etcd}\"]\nprefix = \"/demo/\"\nlease_ttl = \"5s\"\n"
        ))
        .start()
        .await
        .map_err(|e| e.to_string())
}

async fn client(s: &RunningSidecar) -> Result<Tokens, String> {
    Ok(pb::token_service_client::TokenServiceClient::new(
        connect(s.socket()).await.map_err(|e| e.to_string())?,
    ))
}

async fn mint(s: &RunningSidecar, one_time: bool) -> Result<pb::MintResponse, String> {
    client(s)
        .await?
        .mint(pb::MintRequest {
            audience: "ledger".into(),
            one_time,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.to_string())
}

async fn verify(s: &RunningSidecar, token: &str) -> Result<(), String> {
    client(s)
        .await?
        .verify(pb::VerifyRequest {
            token: token.into(),
            audience: String::new(),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|e| {
            reason_of(&e)
                .map(|r| r.as_str().to_owned())
                .unwrap_or_else(|| e.to_string())
        })
}

/// Instances of `issuer` (a service) `s` holds, not gone.
async fn instances(s: &RunningSidecar, issuer: &str) -> usize {
    let Ok(ch) = connect(s.socket()).await else {
        return 0;
    };
    let want = format!("spiffe://bank.internal/{issuer}");
    pb::admin_service_client::AdminServiceClient::new(ch)
        .get_jwks(pb::GetJwksRequest { all: true })
        .await
        .map(|r| {
            r.into_inner()
                .issuers
                .iter()
                .filter(|i| i.issuer == want)
                .map(|i| i.instances.iter().filter(|x| !x.gone).count())
                .sum()
        })
        .unwrap_or(0)
}

async fn script(payments: &[RunningSidecar], ledgers: &[RunningSidecar]) -> Result<(), String> {
    let t0 = Instant::now();
    while instances(&ledgers[0], "payments").await < 2
        || instances(&ledgers[1], "payments").await < 2
    {
        if t0.elapsed() > Duration::from_secs(20) {
            return Err("ledger never saw both payments replicas".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    say(
        "discover",
        format!(
            "both ledger replicas hold 2 payments instances from etcd after {} ms, no [[peers]] configured",
            t0.elapsed().as_millis()
        ),
    );
    for (i, p) in payments.iter().enumerate() {
        let m = mint(p, false).await?;
        for (j, l) in ledgers.iter().enumerate() {
            verify(l, &m.token).await?;
            say(
                "verify",
                format!("payments-{i} (kid {}) → ledger-{j}: ACCEPTED", &m.kid[..12]),
            );
        }
    }
    let once = mint(&payments[0], true).await?;
    let (a, b) = tokio::join!(
        verify(&ledgers[0], &once.token),
        verify(&ledgers[1], &once.token)
    );
    say(
        "one-time",
        format!(
            "the same one-time token at both ledger replicas at once: {} and {} (claimed once in etcd)",
            a.as_ref()
                .map_or_else(|e| format!("refused {e}"), |_| "accepted".into()),
            b.as_ref()
                .map_or_else(|e| format!("refused {e}"), |_| "accepted".into()),
        ),
    );
    if a.is_ok() == b.is_ok() {
        return Err("the one-time token was not accepted exactly once".into());
    }
    let doomed = mint(&payments[1], false).await?;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(
        connect(payments[1].socket())
            .await
            .map_err(|e| e.to_string())?,
    );
    let t0 = Instant::now();
    admin
        .revoke_key(pb::RevokeKeyRequest {
            kid: doomed.kid.clone(),
        })
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match verify(&ledgers[0], &doomed.token).await {
            Err(r) if r == "revoked_key" => break,
            _ if t0.elapsed() > Duration::from_secs(5) => {
                return Err("the revocation did not arrive".into());
            }
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
    say(
        "revoke",
        format!(
            "payments-1 revokes {}: ledger refuses it (revoked_key) {} ms later",
            &doomed.kid[..12],
            t0.elapsed().as_millis()
        ),
    );
    Ok(())
}

/// Runs the directory demo under `root`.
pub(super) async fn demo(root: &Path) -> Result<(), String> {
    let etcd = start_etcd(root).await?;
    say(
        "setup",
        format!(
            "etcd at {} (data in {})",
            etcd.endpoint,
            root.join("etcd").display()
        ),
    );
    let td = crate::identity::TrustDomain::new("bank.internal").map_err(|e| e.to_string())?;
    crate::ca::init(&root.join("ca"), &td).map_err(|e| e.to_string())?;
    let mut payments = Vec::new();
    let mut ledgers = Vec::new();
    for n in 0..2 {
        payments.push(replica(root, "payments", n, &etcd.endpoint).await?);
        ledgers.push(replica(root, "ledger", n, &etcd.endpoint).await?);
    }
    say(
        "setup",
        "payments-0, payments-1, ledger-0, ledger-1: each its own keys and certificate, all with [directory]",
    );
    let result = script(&payments, &ledgers).await;
    for s in payments.into_iter().chain(ledgers) {
        let _ = s.stop().await;
    }
    drop(etcd);
    result
}

/// Where the demo would look for etcd, for the message when it is missing.
pub(super) fn etcd_on_path() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
