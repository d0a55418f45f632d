//! A real etcd for the directory and shared replay store tests: one member
//! or a 3-member cluster on 127.0.0.1 with free ports (client and peer) and
//! a temp data dir, ready when `/health` says so, killed on drop. One member
//! can also serve its clients over TLS only, requiring a client certificate
//! of a CA made by the test (`Etcd::start_tls`); its `/health` and
//! `/metrics` are then read on a separate plain metrics port.
//!
//! Kept small: a 64 MiB backend quota, a snapshot every 1,000 entries,
//! revision auto-compaction keeping 1,000 revisions, warnings-only logs.
//! etcd 3.4 (Debian's `etcd-server`) has no `--unsafe-no-fsync`, so every
//! write is fsynced as in production; the tests write little.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary the tests start (Debian package `etcd-server`).
const ETCD: &str = "etcd";

/// How long a member may take to answer `/health`.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// One etcd member process.
pub struct Member {
    /// Its name in the cluster.
    pub name: String,
    client_port: u16,
    peer_port: u16,
    /// With TLS: the plain port of `/health` and `/metrics`, and the
    /// directory of `ca.pem`, `server.pem`, `server.key`.
    tls: Option<(u16, PathBuf)>,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// One etcd server or a cluster of three; every member is killed on drop.
pub struct Etcd {
    _dir: tempfile::TempDir,
    members: Vec<Member>,
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port on 127.0.0.1")
        .port()
}

/// Fails the test, naming the package, when etcd is not installed.
fn require_etcd() {
    match Command::new(ETCD).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "`etcd` is not on PATH: install the Debian package etcd-server \
             (.ci/deps/etcd.sh does it in CI); the directory tests need a real etcd"
        ),
    }
}

/// A plain HTTP/1.0 GET on 127.0.0.1:`port`, the body if it answered.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl Member {
    /// `http://127.0.0.1:<client port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The plain port answering `/health` and `/metrics`.
    fn health_port(&self) -> u16 {
        self.tls
            .as_ref()
            .map_or(self.client_port, |(port, _)| *port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn spawn(&mut self, initial_cluster: &str) {
        let log = std::fs::File::create(&self.log).expect("etcd log file");
        let mut cmd = Command::new(ETCD);
        if let Some((metrics_port, dir)) = &self.tls {
            cmd.arg("--cert-file")
                .arg(dir.join("server.pem"))
                .arg("--key-file")
                .arg(dir.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(dir.join("ca.pem"))
                .arg("--client-cert-auth")
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{metrics_port}"));
        }
        let child = cmd
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &self.peer_url()])
            .args(["--initial-advertise-peer-urls", &self.peer_url()])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tokend-test"])
            .args(["--quota-backend-bytes", &(64u64 << 20).to_string()])
            .args(["--snapshot-count", "1000"])
            .args(["--auto-compaction-mode", "revision"])
            .args(["--auto-compaction-retention", "1000"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd (package etcd-server): {e}"));
        self.child = Some(child);
    }

    fn healthy(&self) -> bool {
        http_get(self.health_port(), "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
    }

    /// Whether this member is the raft leader now.
    pub fn is_leader(&self) -> bool {
        http_get(self.health_port(), "/metrics")
            .is_some_and(|b| b.lines().any(|l| l.trim() == "etcd_server_is_leader 1"))
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs the member (a crash: no goodbye to the cluster).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed member again on its ports and data dir (its
    /// cluster membership is in the data dir).
    pub fn restart(&mut self, initial_cluster: &str) {
        assert!(self.child.is_none(), "member {} is running", self.name);
        self.spawn(initial_cluster);
        let deadline = Instant::now() + READY_WITHIN;
        while !self.healthy() {
            assert!(
                self.running(),
                "member {} exited: {}",
                self.name,
                self.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "member {} not healthy again",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Etcd {
    /// One member, ready.
    pub fn start() -> Etcd {
        Self::cluster_of(1)
    }

    /// A cluster of three members, all healthy (a leader elected).
    pub fn cluster() -> Etcd {
        Self::cluster_of(3)
    }

    /// One member serving clients over TLS only (`https://`), requiring a
    /// client certificate of the test's CA; the files are in `tls_dir()`.
    pub fn start_tls() -> Etcd {
        Self::start_with(1, true)
    }

    fn cluster_of(n: usize) -> Etcd {
        Self::start_with(n, false)
    }

    fn start_with(n: usize, tls: bool) -> Etcd {
        require_etcd();
        // A probed port can be taken by someone else before etcd binds it:
        // try again with new ports a few times.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(n, tls) {
                Ok(e) => return e,
                Err(why) => last = why,
            }
        }
        panic!("etcd did not become healthy: {last}");
    }

    fn try_start(n: usize, tls: bool) -> Result<Etcd, String> {
        let dir = crate::support::tmp();
        if tls {
            write_tls_files(dir.path());
        }
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                tls: tls.then(|| (free_port(), dir.path().to_owned())),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.spawn(&initial);
        }
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if members.iter().all(Member::healthy) {
                return Ok(Etcd { _dir: dir, members });
            }
            for m in &mut members {
                if !m.running() {
                    return Err(format!("member {} exited: {}", m.name, m.log_text()));
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = members.iter().map(Member::log_text).collect();
                return Err(format!("not healthy within {READY_WITHIN:?}: {logs:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The directory of the TLS files (with `start_tls`): `ca.pem` (etcd's
    /// CA, which also issued `client.pem`/`client.key`), and
    /// `foreign.pem`/`foreign.key`, a client certificate of another CA.
    pub fn tls_dir(&self) -> PathBuf {
        self.members[0]
            .tls
            .as_ref()
            .map(|(_, dir)| dir.clone())
            .expect("an etcd started with start_tls")
    }

    /// A `[directory]` section for this TLS etcd under `prefix`, with
    /// etcd's CA and the client certificate `client` (`client` or
    /// `foreign`; None: no client certificate).
    pub fn tls_directory_toml(&self, prefix: &str, client: Option<&str>) -> String {
        let dir = self.tls_dir();
        let mut out = format!(
            "{}ca = \"{}\"\n",
            self.directory_toml(prefix),
            dir.join("ca.pem").display()
        );
        if let Some(name) = client {
            out.push_str(&format!(
                "cert = \"{}\"\nkey = \"{}\"\n",
                dir.join(format!("{name}.pem")).display(),
                dir.join(format!("{name}.key")).display()
            ));
        }
        out
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// The endpoints as a TOML array: `["http://…", …]`.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    /// A `[directory]` section pointing at this etcd under `prefix`.
    pub fn directory_toml(&self, prefix: &str) -> String {
        format!(
            "[directory]\netcd = {}\nprefix = \"{prefix}\"\n",
            self.endpoints_toml()
        )
    }

    /// A client of every member (with TLS: etcd's CA and `client.pem`).
    pub async fn client(&self) -> etcd_client::Client {
        self.client_with(etcd_client::ConnectOptions::new()).await
    }

    /// A client of every member with `options` (plus, with TLS, etcd's CA
    /// and `client.pem`).
    pub async fn client_with(
        &self,
        mut options: etcd_client::ConnectOptions,
    ) -> etcd_client::Client {
        if let Some((_, dir)) = &self.members[0].tls {
            let read = |f: &str| std::fs::read(dir.join(f)).expect("tls file");
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
                    .identity(etcd_client::Identity::from_pem(
                        read("client.pem"),
                        read("client.key"),
                    )),
            );
        }
        etcd_client::Client::connect(self.endpoints(), Some(options))
            .await
            .expect("etcd client")
    }

    /// The members.
    pub fn members(&mut self) -> &mut [Member] {
        &mut self.members
    }

    /// Kills the current leader (SIGKILL) and returns its name; waits up to
    /// 10 s for a member to report itself leader first.
    pub fn kill_leader(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = self.members.iter_mut().find(|m| m.is_leader()) {
                m.kill();
                return m.name.clone();
            }
            assert!(Instant::now() < deadline, "no etcd leader within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts a single-member etcd killed with `kill_all` (same data dir).
    pub fn restart_single(&mut self) {
        assert_eq!(self.members.len(), 1, "restart_single is for one member");
        let m = &mut self.members[0];
        let initial = format!("{}={}", m.name, m.peer_url());
        m.restart(&initial);
    }

    /// Kills every member (etcd down).
    pub fn kill_all(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }
}

/// A CA, a leaf it signs for 127.0.0.1 (server and client use), written
/// as `<name>.pem`/`<name>.key`; the CA as `<ca>.pem`.
fn issue(dir: &std::path::Path, ca_name: &str, leaves: &[&str]) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("tokend test {ca_name}"));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    std::fs::write(dir.join(format!("{ca_name}.pem")), ca_cert.pem()).expect("write ca");
    let issuer = Issuer::new(ca, ca_key);
    for leaf in leaves {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.distinguished_name.push(DnType::CommonName, *leaf);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).expect("leaf cert");
        std::fs::write(dir.join(format!("{leaf}.pem")), cert.pem()).expect("write leaf");
        std::fs::write(dir.join(format!("{leaf}.key")), key.serialize_pem()).expect("write key");
    }
}

/// etcd's CA (`ca.pem`) with `server` and `client`, and a foreign CA
/// (`foreign-ca.pem`) with a client certificate `foreign`.
fn write_tls_files(dir: &std::path::Path) {
    issue(dir, "ca", &["server", "client"]);
    issue(dir, "foreign-ca", &["foreign"]);
}

/// The harness itself: a single member and a cluster start, answer, and
/// a killed leader is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_harness_starts_and_fails_over() {
    let one = Etcd::start();
    let mut c = one.client().await;
    c.put("k", "v", None).await.expect("put");
    let got = c.get("k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"v");
    drop(one);

    let mut three = Etcd::cluster();
    let killed = three.kill_leader();
    let mut c = three.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if c.put("after", killed.as_str(), None).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader after killing {killed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        three
            .members()
            .iter()
            .filter(|m| m.name != killed)
            .any(|m| m.is_leader()),
        "a surviving member leads"
    );
}

/// The TLS member answers a client holding its CA and a client
/// certificate, and refuses one without a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_harness_serves_tls_with_client_certificates() {
    let etcd = Etcd::start_tls();
    assert!(etcd.endpoints()[0].starts_with("https://127.0.0.1:"));
    let mut c = etcd.client().await;
    c.put("k", "v", None).await.expect("put over TLS");
    let got = c.get("k", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"v");

    let ca = std::fs::read(etcd.tls_dir().join("ca.pem")).expect("ca");
    let anonymous = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_secs(2))
        .with_tls(
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)),
        );
    if let Ok(mut c) = etcd_client::Client::connect(etcd.endpoints(), Some(anonymous)).await {
        assert!(
            c.get("k", None).await.is_err(),
            "no client certificate, no answer"
        );
    }
}
