//! A real etcd for the directory and shared replay store tests: one member
//! or a 3-member cluster on 127.0.0.1 with free ports (client and peer) and
//! a temp data dir, ready when `/health` says so, killed on drop.
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
    /// `http://127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn spawn(&mut self, initial_cluster: &str) {
        let log = std::fs::File::create(&self.log).expect("etcd log file");
        let child = Command::new(ETCD)
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
        http_get(self.client_port, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
    }

    /// Whether this member is the raft leader now.
    pub fn is_leader(&self) -> bool {
        http_get(self.client_port, "/metrics")
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

    fn cluster_of(n: usize) -> Etcd {
        require_etcd();
        // A probed port can be taken by someone else before etcd binds it:
        // try again with new ports a few times.
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(n) {
                Ok(e) => return e,
                Err(why) => last = why,
            }
        }
        panic!("etcd did not become healthy: {last}");
    }

    fn try_start(n: usize) -> Result<Etcd, String> {
        let dir = crate::support::tmp();
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
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

    /// A client of every member.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.endpoints(), None)
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
