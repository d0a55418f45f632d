//! In-process harness: a `Bank` of sidecars built with `tokend::Sidecar`
//! in one temp dir, sharing one CA and one `ManualClock`. Tests step the
//! clock (`bank.advance(..)`) and the sidecars' loops react at once; the
//! sockets, TLS and gRPC are real. Processes are only for what only a
//! process shows (signals, SIGKILL, the CLI, exit codes, logs).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokend::pb::tokend as pb;
use tokend::{ManualClock, RunningSidecar, Sidecar, TrustDomain, UnixTime};
use tonic::transport::Channel;

use crate::support::{TD, id};

/// Sidecars of trust domain `bank.internal` in one temp dir, one CA, one clock.
pub struct Bank {
    root: tempfile::TempDir,
    clock: ManualClock,
}

impl Bank {
    /// A fresh bank: temp dir, CA, clock at the current wall time.
    pub fn new() -> Bank {
        let root = crate::support::tmp();
        let td = TrustDomain::new(TD).expect("td");
        tokend::ca_init(&root.path().join("ca"), &td).expect("ca init");
        let now = tokend::Clock::now(&tokend::SystemClock);
        Bank {
            root,
            clock: ManualClock::at(now),
        }
    }

    /// The bank's directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The CA directory (ca.pem, ca.key).
    pub fn ca(&self) -> PathBuf {
        self.root.path().join("ca")
    }

    /// The shared clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// Now, by the bank's clock, in seconds.
    pub fn now(&self) -> i64 {
        tokend::Clock::now(&self.clock).as_secs()
    }

    /// Steps the bank's clock forward.
    pub fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    /// Sets the bank's clock to `secs` (forward only).
    pub fn advance_to(&self, secs: i64) {
        assert!(secs >= self.now(), "the bank's clock only moves forward");
        self.clock.set(at(secs));
    }

    /// Standard claims from `iss` to `aud`, valid for `ttl` seconds from
    /// now by the bank's clock.
    pub fn claims(&self, iss: &str, aud: &str, ttl: i64) -> serde_json::Value {
        let t = self.now();
        serde_json::json!({
            "iss": id(iss), "sub": id(iss), "aud": id(aud),
            "iat": t, "nbf": t, "exp": t + ttl, "jti": format!("jti-{iss}-{t}"),
        })
    }

    /// A builder for sidecar `name` on the bank's clock (no peer API).
    pub fn sidecar(&self, name: &str) -> Sidecar {
        Sidecar::new(self.root.path(), name).clock(Arc::new(self.clock.clone()))
    }

    /// A builder for `name` serving a peer API with a certificate from the bank's CA.
    pub fn peer(&self, name: &str) -> Sidecar {
        self.sidecar(name).peer_api(&self.ca())
    }

    /// A builder for replica `n` of `name` (its own directory
    /// `replicas/<n>/<name>`, keys and peer certificate) serving a peer API.
    pub fn replica(&self, name: &str, n: usize) -> Sidecar {
        Sidecar::new(&self.root.path().join("replicas").join(n.to_string()), name)
            .clock(Arc::new(self.clock.clone()))
            .peer_api(&self.ca())
    }

    /// Starts `builder`.
    pub async fn start(&self, builder: Sidecar) -> Node {
        let running = builder.start().await.expect("sidecar starts");
        Node {
            builder,
            running: Some(running),
        }
    }
}

/// A running in-process sidecar and the builder that made it.
pub struct Node {
    builder: Sidecar,
    running: Option<RunningSidecar>,
}

impl Node {
    fn running(&self) -> &RunningSidecar {
        self.running.as_ref().expect("running")
    }

    /// The service name.
    pub fn name(&self) -> String {
        self.running().name().to_owned()
    }

    /// Its socket.
    pub fn socket(&self) -> PathBuf {
        self.running().socket().to_owned()
    }

    /// Its keys directory (also while it is stopped).
    pub fn keys_dir(&self) -> PathBuf {
        self.builder.dir().join("keys")
    }

    /// Its peer API address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.running().peer_addr().expect("peer api")
    }

    /// Stops it as SIGTERM would (a no-op if it is stopped). A later
    /// `start` listens on the same peer port.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            if let Some(a) = r.peer_addr() {
                self.builder = self.builder.clone().peer_listen(a);
            }
            r.stop().await.expect("clean stop");
        }
    }

    /// Starts it again after `stop`, with the same directory and peer port.
    pub async fn start(&mut self) {
        assert!(
            self.running.is_none(),
            "{} is running",
            self.builder.dir().display()
        );
        self.running = Some(self.builder.start().await.expect("sidecar restarts"));
    }

    /// Stops and starts it again with the same directory (and, if it serves
    /// one, the same peer port).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// A token client.
    pub async fn tokens(&self) -> pb::token_service_client::TokenServiceClient<Channel> {
        pb::token_service_client::TokenServiceClient::new(
            tokend::connect(&self.socket()).await.expect("connect"),
        )
    }

    /// Mints a one-time token for `audience`.
    pub async fn mint_one_time(&self, audience: &str) -> String {
        self.tokens()
            .await
            .mint(pb::MintRequest {
                audience: audience.into(),
                one_time: true,
                ..Default::default()
            })
            .await
            .expect("mint one-time")
            .into_inner()
            .token
    }

    /// The grpc.health.v1 status (as its wire number) of `service` here.
    pub async fn health_status(&self, service: &str) -> i32 {
        let mut client = tonic_health::pb::health_client::HealthClient::new(
            tokend::connect(&self.socket()).await.expect("connect"),
        );
        client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("{service} has no health status: {s:?}"))
            .into_inner()
            .status
    }

    /// An admin client.
    pub async fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Channel> {
        pb::admin_service_client::AdminServiceClient::new(
            tokend::connect(&self.socket()).await.expect("connect"),
        )
    }

    /// Mints a token for `audience`.
    pub async fn mint(&self, audience: &str) -> pb::MintResponse {
        self.tokens()
            .await
            .mint(pb::MintRequest {
                audience: audience.into(),
                ..Default::default()
            })
            .await
            .expect("mint")
            .into_inner()
    }

    /// Verifies for this sidecar: the response, or the refusal's reason code.
    pub async fn verify(&self, token: &str) -> Result<pb::VerifyResponse, String> {
        crate::support::verify_with(self.tokens().await, token).await
    }

    /// Asks for a rotation; returns the new (pending) key's kid.
    pub async fn rotate(&self) -> String {
        self.admin()
            .await
            .rotate_key(pb::RotateKeyRequest::default())
            .await
            .expect("rotate")
            .into_inner()
            .key
            .expect("key")
            .kid
    }

    /// Revokes `kid`; returns the new signing kid.
    pub async fn revoke(&self, kid: &str) -> String {
        self.admin()
            .await
            .revoke_key(pb::RevokeKeyRequest { kid: kid.into() })
            .await
            .expect("revoke")
            .into_inner()
            .active_kid
    }

    /// Every key with its state, as `keys list` shows them.
    pub async fn keys(&self) -> Vec<pb::KeyInfo> {
        self.admin()
            .await
            .list_keys(pb::ListKeysRequest::default())
            .await
            .expect("list")
            .into_inner()
            .keys
    }

    /// Every issuer set this sidecar trusts (`jwks --all`).
    pub async fn trusted(&self) -> Vec<pb::IssuerKeys> {
        self.admin()
            .await
            .get_jwks(pb::GetJwksRequest { all: true })
            .await
            .expect("jwks")
            .into_inner()
            .issuers
    }

    /// What this sidecar holds for `issuer` (a service name): source, keys,
    /// last error; empty if it holds nothing.
    pub async fn issuer(&self, issuer: &str) -> pb::IssuerKeys {
        let want = id(issuer);
        self.trusted()
            .await
            .into_iter()
            .find(|i| i.issuer == want)
            .unwrap_or_default()
    }

    /// The kids this sidecar trusts for `issuer` (a service name).
    pub async fn kids_of(&self, issuer: &str) -> Vec<String> {
        let want = id(issuer);
        self.trusted()
            .await
            .into_iter()
            .find(|i| i.issuer == want)
            .map(|i| {
                let doc: serde_json::Value = serde_json::from_str(&i.jwks_json).expect("jwks json");
                doc["keys"]
                    .as_array()
                    .map(|ks| {
                        ks.iter()
                            .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Its newest activated signing key, read from its keys directory.
    pub fn signing_key(&self) -> tokend::SigningKey {
        crate::support::signing_key_in(&self.keys_dir())
    }
}

/// The wall-clock instant of `secs`, for building claims at the bank's time.
pub fn at(secs: i64) -> UnixTime {
    UnixTime::from_secs(secs)
}

/// Everything in-process sidecars log (INFO and above, plain text), from the
/// moment the first test asks for it: one global subscriber for the whole
/// test binary, so a test picks its own lines out by something unique to it
/// (a port, a kid).
pub fn logs() -> String {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    let buf = LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        buf
    });
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// === For the exchange, mint_verify and interop ports ===
// (kept in one block at the end of the file; other ports add their own)

impl Bank {
    /// `sidecar(name)` without a standby key (`Sidecar::standby_key`): for
    /// tests that never revoke, one RSA key generation less per start, which
    /// the test's runtime would otherwise wait for at its end.
    pub fn lean(&self, name: &str) -> Sidecar {
        self.sidecar(name).standby_key(false)
    }

    /// `peer(name)` without a standby key, as `lean`.
    pub fn lean_peer(&self, name: &str) -> Sidecar {
        self.peer(name).standby_key(false)
    }

    /// Starts `builder`, or says why it could not start.
    pub async fn try_start(&self, builder: Sidecar) -> Result<Node, tokend::SidecarError> {
        let running = builder.start().await?;
        Ok(Node {
            builder,
            running: Some(running),
        })
    }
}

impl Node {
    /// Its public JWKS, as `tokend jwks` fetches it.
    pub async fn jwks(&self) -> String {
        self.admin()
            .await
            .get_jwks(pb::GetJwksRequest { all: false })
            .await
            .expect("jwks")
            .into_inner()
            .issuers
            .into_iter()
            .next()
            .expect("own issuer")
            .jwks_json
    }

    /// The issuer set it holds for `issuer` (a service name), as `jwks --all`
    /// shows it, if it holds one.
    pub async fn holds(&self, issuer: &str) -> Option<pb::IssuerKeys> {
        let want = id(issuer);
        self.trusted().await.into_iter().find(|i| i.issuer == want)
    }

    /// Exchanges `token` for one to `audience`: the response, or the refusal's reason code.
    pub async fn exchange(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<pb::ExchangeResponse, String> {
        let req = pb::ExchangeRequest {
            token: token.into(),
            audience: audience.into(),
            ttl_seconds: 0,
            ..Default::default()
        };
        self.tokens()
            .await
            .exchange(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| {
                tokend::reason_of(&s)
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| format!("no reason: {s}"))
            })
    }

    /// Verifies for this sidecar: `None` and the claims if verified, else the
    /// refusal's reason and its whole message.
    pub async fn refusal(&self, token: &str) -> (Option<tokend::Reason>, String) {
        let req = pb::VerifyRequest {
            token: token.into(),
            audience: String::new(),
            ..Default::default()
        };
        match self.tokens().await.verify(req).await {
            Ok(r) => (None, format!("verified: {}", r.into_inner().claims_json)),
            Err(s) => (tokend::reason_of(&s), s.message().to_owned()),
        }
    }

    /// Runs the `tokend ARGS` CLI against this sidecar's socket (a client
    /// process; the sidecar keeps serving meanwhile).
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_stdin(args, None).await
    }

    /// Same, feeding `stdin`.
    pub async fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let socket = self.socket();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let stdin = stdin.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            use std::process::{Command, Stdio};
            let mut child = Command::new(crate::support::bin())
                .args(&args)
                .env("TOKEND_SOCKET", &socket)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn cli");
            {
                let mut pipe = child.stdin.take().expect("stdin");
                if let Some(s) = stdin {
                    pipe.write_all(s.as_bytes()).expect("write stdin");
                }
            }
            child.wait_with_output().expect("cli output")
        })
        .await
        .expect("cli task")
    }

    /// Waits (up to 10 s) until it holds keys for each of `issuers` (service names).
    pub async fn learns(&self, issuers: &[&str]) {
        for issuer in issuers {
            assert!(
                crate::support::eventually(10, || async { !self.kids_of(issuer).await.is_empty() })
                    .await,
                "{} never learnt {issuer}'s keys: {:?}",
                self.name(),
                self.issuer(issuer).await
            );
        }
    }

    /// Stops it as SIGTERM would, failing if that takes longer than `limit`.
    pub async fn stop_within(&mut self, limit: Duration) {
        tokio::time::timeout(limit, self.stop())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not stop within {limit:?}",
                    self.builder.dir().display()
                )
            });
    }
}
