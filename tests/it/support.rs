//! Test harness: start real `tokend serve` processes in temp dirs, talk to
//! them over their sockets, and forge tokens with a sidecar's own key file.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use tokend::pb::tokend as pb;
use tonic::transport::Channel;

/// The trust domain of every test sidecar.
pub const TD: &str = "bank.internal";

/// Path of the built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokend")
}

/// `spiffe://bank.internal/<name>`.
pub fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

/// A running (or stopped) sidecar process with its own directory.
pub struct Sidecar {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub keys_dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    stderr_path: PathBuf,
    /// A command the sidecar runs under (e.g. `prlimit --nofile=N:N`), or empty.
    wrapper: Vec<String>,
}

/// Writes a config for `name` under `root/name/` with `extra` TOML appended.
pub fn write_config(root: &Path, name: &str, extra: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cfg = dir.join("tokend.toml");
    let text = format!(
        "name = \"{name}\"\ntrust_domain = \"{TD}\"\nsocket = \"tokend.sock\"\nkeys_dir = \"keys\"\n{extra}\n"
    );
    std::fs::write(&cfg, text).expect("write config");
    cfg
}

impl Sidecar {
    /// Configures and starts `name`, waiting until its socket answers.
    pub fn start(root: &Path, name: &str, extra: &str) -> Sidecar {
        let cfg = write_config(root, name, extra);
        Self::start_with(root, name, &cfg).unwrap_or_else(|out| {
            panic!(
                "sidecar {name} did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts from an existing config; on failure returns the process's output.
    pub fn start_with(root: &Path, name: &str, cfg: &Path) -> Result<Sidecar, Output> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut s = Sidecar {
            name: name.to_owned(),
            socket: dir.join("tokend.sock"),
            keys_dir: dir.join("keys"),
            config: cfg.to_owned(),
            dir,
            child: None,
            stderr_path: root.join(format!("{name}.stderr")),
            wrapper: Vec::new(),
        };
        s.spawn()?;
        Ok(s)
    }

    /// Configures and starts `name` under `wrapper` (a command that execs
    /// its arguments, so the pid stays the sidecar's), e.g. `prlimit`.
    pub fn start_under(root: &Path, name: &str, extra: &str, wrapper: &[&str]) -> Sidecar {
        let cfg = write_config(root, name, extra);
        let dir = root.join(name);
        let mut s = Sidecar {
            name: name.to_owned(),
            socket: dir.join("tokend.sock"),
            keys_dir: dir.join("keys"),
            config: cfg,
            dir,
            child: None,
            stderr_path: root.join(format!("{name}.stderr")),
            wrapper: wrapper.iter().map(|w| (*w).to_owned()).collect(),
        };
        s.spawn().unwrap_or_else(|out| {
            panic!(
                "sidecar {name} did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        s
    }

    /// The process id of the running sidecar.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn spawn(&mut self) -> Result<(), Output> {
        let stderr = std::fs::File::create(&self.stderr_path).expect("stderr file");
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(bin()),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
        };
        let mut child = cmd
            .args(["serve", "--config"])
            .arg(&self.config)
            .env(
                "TOKEND_LOG",
                std::env::var("IT_TOKEND_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("TOKEND_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn tokend");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let stderr = std::fs::read(&self.stderr_path).unwrap_or_default();
                return Err(Output {
                    status,
                    stdout: Vec::new(),
                    stderr,
                });
            }
            // Ready: the socket answers and the startup line (with the peer address) is logged.
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && std::fs::read_to_string(&self.stderr_path)
                    .is_ok_and(|l| l.contains("tokend serving"))
            {
                self.child = Some(child);
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "sidecar {} not ready in 60s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again with the same config and directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().unwrap_or_else(|out| {
            panic!(
                "sidecar {} did not restart: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        sigterm(&child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// Runs `tokend ARGS --socket <this socket>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    /// Same, feeding `stdin`.
    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("TOKEND_SOCKET", &self.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cli");
        {
            let mut pipe = child.stdin.take().expect("stdin");
            if let Some(s) = stdin {
                pipe.write_all(s.as_bytes()).expect("write stdin");
            }
        }
        child.wait_with_output().expect("cli output")
    }

    /// A gRPC token client.
    pub async fn tokens(&self) -> pb::token_service_client::TokenServiceClient<Channel> {
        pb::token_service_client::TokenServiceClient::new(
            tokend::connect(&self.socket).await.expect("connect"),
        )
    }

    /// A gRPC admin client.
    pub async fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Channel> {
        pb::admin_service_client::AdminServiceClient::new(
            tokend::connect(&self.socket).await.expect("connect"),
        )
    }

    /// Mints over gRPC.
    pub async fn mint(&self, audience: &str) -> pb::MintResponse {
        let req = pb::MintRequest {
            audience: audience.into(),
            ..Default::default()
        };
        self.tokens()
            .await
            .mint(req)
            .await
            .expect("mint")
            .into_inner()
    }

    /// Verifies over gRPC: the verified response, or the reason code of the refusal.
    pub async fn verify(&self, token: &str) -> Result<pb::VerifyResponse, String> {
        crate::support::verify_with(self.tokens().await, token).await
    }

    /// This sidecar's public JWKS, as `tokend jwks` prints it.
    pub fn jwks(&self) -> String {
        let out = self.cli(&["jwks"]);
        assert!(
            out.status.success(),
            "jwks: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Loads this sidecar's signing key (the newest activated) from its key dir.
    pub fn signing_key(&self) -> tokend::SigningKey {
        signing_key_in(&self.keys_dir)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The newest activated key in a keys directory.
pub fn signing_key_in(keys_dir: &Path) -> tokend::SigningKey {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(keys_dir.join("keys.json")).expect("manifest"))
            .expect("json");
    let rec = manifest["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["revoked_at"].is_null())
        .max_by_key(|k| k["activates_at"].as_i64())
        .expect("a key")
        .clone();
    let path = keys_dir.join(rec["file"].as_str().expect("file"));
    tokend::parse_pkcs8_pem(&path, &std::fs::read(&path).expect("read key")).expect("parse key")
}

/// Now, seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64
}

/// Signs `claims` with `key` under header `kid` (RS256), as an attacker
/// holding that private key could.
pub fn forge(key: &tokend::SigningKey, kid: &str, claims: &serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.typ = Some("JWT".into());
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, key.encoding_key()).expect("encode")
}

/// Signs raw header and payload JSON text with `key` (RS256): for tokens
/// serde_json would never write, such as ones with duplicate members.
pub fn forge_raw(key: &tokend::SigningKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        key.encoding_key(),
        jsonwebtoken::Algorithm::RS256,
    )
    .expect("sign");
    format!("{input}.{sig}")
}

/// Standard claims from `iss` to `aud`, valid now for `ttl` seconds.
pub fn claims(iss: &str, aud: &str, ttl: i64) -> serde_json::Value {
    let t = now();
    serde_json::json!({
        "iss": id(iss), "sub": id(iss), "aud": id(aud),
        "iat": t, "nbf": t, "exp": t + ttl, "jti": format!("jti-{}", t),
    })
}

/// Replaces the payload of a token with `claims` (keeping header and signature).
pub fn with_payload(token: &str, claims: &serde_json::Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(claims.to_string()),
        parts[2]
    )
}

/// Replaces the header of a token with `header`.
pub fn with_header(token: &str, header: &serde_json::Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        parts[1],
        parts[2]
    )
}

/// Decodes a token's payload (unverified).
pub fn payload(token: &str) -> serde_json::Value {
    let p = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(&B64.decode(p).expect("b64")).expect("json")
}

/// Sets a file's mode.
pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A fresh temp dir.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tokend-it-")
        .tempdir()
        .expect("tempdir")
}

/// Runs a command that must exit on its own within 30 s; kills it and fails otherwise.
pub fn run_to_exit(cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("command did not exit within 30s");
        }
    }
}

/// Makes the trust domain's CA under `root/ca` with `tokend ca init`.
pub fn ca_init(root: &Path) {
    let out = Command::new(bin())
        .args(["ca", "init", "--trust-domain", TD, "--out"])
        .arg(root.join("ca"))
        .output()
        .expect("ca init");
    assert!(
        out.status.success(),
        "ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issues `root/<name>/peer/{cert,key}.pem` with `tokend ca issue` from the CA in `ca_dir`.
pub fn ca_issue(ca_dir: &Path, root: &Path, name: &str) -> PathBuf {
    let out_dir = root.join(name).join("peer");
    let out = Command::new(bin())
        .args(["ca", "issue", "--name", name, "--ca"])
        .arg(ca_dir)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("ca issue");
    assert!(
        out.status.success(),
        "ca issue: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out_dir
}

/// Config text for a sidecar with a peer API (port `port`, 0 for any) trusting `peers` by address.
pub fn peer_config(port: u16, peers: &[(&str, std::net::SocketAddr)], extra: &str) -> String {
    let mut t = format!(
        "{extra}\n[peer_api]\nlisten = \"127.0.0.1:{port}\"\nca = \"../ca/ca.pem\"\ncert = \"peer/cert.pem\"\nkey = \"peer/key.pem\"\n"
    );
    for (name, addr) in peers {
        t.push_str(&format!(
            "[[peers]]\nname = \"{name}\"\naddress = \"https://{addr}\"\n"
        ));
    }
    t
}

impl Sidecar {
    /// Starts `name` with a peer API and a certificate issued by `root/ca`.
    pub fn start_peer(
        root: &Path,
        name: &str,
        peers: &[(&str, std::net::SocketAddr)],
        extra: &str,
    ) -> Sidecar {
        ca_issue(&root.join("ca"), root, name);
        let mut s = Sidecar::start(root, name, &peer_config(0, peers, extra));
        s.pin_peer_port(peers, extra);
        s
    }

    /// The peer API address, read from the startup log line.
    pub fn peer_addr(&self) -> std::net::SocketAddr {
        let log = self.stderr();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("tokend serving"))
            .expect("serving line");
        let at = line.find("peer_api=").expect("peer_api field") + "peer_api=".len();
        line[at..]
            .split_whitespace()
            .next()
            .expect("addr")
            .parse()
            .expect("socket addr")
    }

    /// Rewrites the config with the port actually bound, so a restart reuses it.
    fn pin_peer_port(&mut self, peers: &[(&str, std::net::SocketAddr)], extra: &str) {
        let port = self.peer_addr().port();
        write_config(
            self.dir.parent().expect("root"),
            &self.name,
            &peer_config(port, peers, extra),
        );
    }

    /// Every issuer set this sidecar trusts, as `tokend jwks --all` prints it.
    pub fn jwks_all(&self) -> serde_json::Value {
        let out = self.cli(&["jwks", "--all"]);
        assert!(
            out.status.success(),
            "jwks --all: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// The `jwks --all` entry for `issuer` (a service name).
    pub fn issuer_entry(&self, issuer: &str) -> serde_json::Value {
        let all = self.jwks_all();
        all.as_array()
            .expect("array")
            .iter()
            .find(|e| e["issuer"] == id(issuer))
            .cloned()
            .unwrap_or_default()
    }

    /// The kids `tokend jwks --all` shows for `issuer` (a service name).
    pub fn kids_of(&self, issuer: &str) -> Vec<String> {
        let e = self.issuer_entry(issuer);
        e["jwks"]["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Polls `f` every 50 ms for up to `secs` seconds until it returns true.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    secs: u64,
    mut f: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits (up to 60 s) until a Unix socket accepts a connection.
pub fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

/// What a process holds, from /proc: open fds, resident memory, CPU time.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub fds: usize,
    pub rss_kib: u64,
    pub cpu_ticks: u64,
    pub threads: u64,
}

impl Probe {
    /// Reads /proc/<pid>.
    pub fn of(pid: u32) -> Probe {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the ")" of the command name: state is #3; utime #14, stime #15.
        let after: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let tick = |i: usize| {
            after
                .get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Probe {
            fds,
            rss_kib: field("VmRSS:"),
            cpu_ticks: tick(14) + tick(15),
            threads: field("Threads:"),
        }
    }
}

/// Verifies `token` for the sidecar behind `tokens` (its own audience): the
/// verified response, or the refusal's reason code. Both harnesses use it.
pub async fn verify_with(
    mut tokens: pb::token_service_client::TokenServiceClient<Channel>,
    token: &str,
) -> Result<pb::VerifyResponse, String> {
    let req = pb::VerifyRequest {
        token: token.into(),
        audience: String::new(),
        ..Default::default()
    };
    match tokens.verify(req).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(tokend::reason_of(&s)
            .map(|r| r.to_string())
            .unwrap_or_else(|| format!("no reason: {s}"))),
    }
}

impl Sidecar {
    /// Waits, without signalling, until the process exits, polling for at
    /// most `within`: its exit status, or `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
