//! The directory at 1,000 services × 3 instances on one real etcd.
//! Run: `cargo bench --bench directory` (needs `etcd`, Debian package
//! `etcd-server`, on PATH).
//!
//! Simulated publishers share this process, but each of the 3,000
//! instances has its own certificate from the bench's CA and signs its own
//! documents with it (two RSA-2048 public keys each, from a small pool, so
//! the bench does not spend minutes generating RSA keys). They share one
//! lease (a real sidecar has its own; see the README for the keep-alive
//! load). Verifiers are real `tokend serve` processes (this build's
//! binary), so their RSS and CPU are their own.
//!
//! Reports: the time for a fresh verifier to load all 3,000 documents; a
//! rotation's propagation from the put to the first successful
//! verification at a verifier (p50, p99); verifier RSS with one instance
//! and with 3,000; steady-state etcd writes/s with every instance
//! re-signing at half of the default 5-minute lifetime; and the cost per
//! verification (wall time per call, and the verifier's CPU per call) with
//! 3,000 instances loaded against one. Nothing here asserts a timing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokend::pb::tokend as pb;
use tokend::{DocumentClaims, DocumentKey, SigningKey, SpiffeId, TrustDomain, UnixTime};
use tonic::transport::Channel;

const TD: &str = "bank.internal";
const SERVICES: usize = 1_000;
const INSTANCES: usize = 3;
const PREFIX: &str = "/bench/";
/// RSA keys shared by the simulated instances (two per document).
const POOL: usize = 6;
/// Rotations timed for the propagation percentiles.
const ROTATIONS: usize = 200;
/// How long each verification row runs.
const ROW: Duration = Duration::from_secs(2);
/// Interleaved rounds of the two verification rows.
const ROUNDS: usize = 3;
/// The steady-state window.
const STEADY: Duration = Duration::from_secs(30);
/// Default document lifetime; publishers re-sign at half of it.
const LIFETIME: i64 = 300;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("directory: a benchmark; run it with `cargo bench --bench directory`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("directory bench failed: {e}");
        std::process::exit(1);
    }
}

fn now() -> i64 {
    tokend::Clock::now(&tokend::SystemClock).as_secs()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// One etcd member, killed on drop.
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

fn start_etcd(dir: &Path) -> Etcd {
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .args(["--quota-backend-bytes", &(2u64 << 30).to_string()])
        .args(["--auto-compaction-mode", "periodic"])
        .args(["--auto-compaction-retention", "10m"])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}): install the Debian package etcd-server")
        });
    Etcd { child, endpoint }
}

/// One simulated instance: its identity, key and current sequence.
struct Instance {
    service: String,
    id: String,
    key: DocumentKey,
    seq: u64,
    keys: Vec<usize>,
}

impl Instance {
    fn etcd_key(&self) -> String {
        format!("{PREFIX}keys/{TD}/{}/{}", self.service, self.id)
    }

    fn sign(&mut self, pool: &[SigningKey]) -> String {
        self.seq += 1;
        let t = now();
        let claims = DocumentClaims {
            identity: SpiffeId::parse(&format!("spiffe://{TD}/{}", self.service)).expect("id"),
            instance: self.id.clone(),
            seq: self.seq,
            issued_at: UnixTime::from_secs(t),
            expires_at: UnixTime::from_secs(t + LIFETIME),
            address: None,
            keys: self
                .keys
                .iter()
                .map(|&k| pool[k].public().clone())
                .collect(),
            bound_keys: Vec::new(),
            revoked: Vec::new(),
            key_expires: self
                .keys
                .iter()
                .map(|&k| (pool[k].kid().to_owned(), UnixTime::from_secs(t + 7200)))
                .collect(),
        };
        tokend::sign_document(&claims, &self.key).expect("sign")
    }
}

fn issue(ca: &Path, root: &Path, service: &str, n: usize) -> Result<DocumentKey, BoxError> {
    let out = root.join("certs").join(format!("{service}-{n}"));
    tokend::ca_issue(ca, service, &out, &[], 1)?;
    let cert = pem::parse(std::fs::read(out.join("cert.pem"))?)?;
    let key = pem::parse(std::fs::read(out.join("key.pem"))?)?;
    Ok(DocumentKey::from_pkcs8(
        key.contents(),
        &[cert.contents().to_vec()],
    )?)
}

/// A `tokend serve` verifier process with `[directory]`.
struct Verifier {
    child: Child,
    socket: PathBuf,
    started: Instant,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Verifier {
    fn start(root: &Path, name: &str, etcd: &str) -> Result<Verifier, BoxError> {
        Self::start_with(root, name, etcd, "")
    }

    /// A verifier with extra `[directory]` lines (such as `accept`).
    fn start_with(
        root: &Path,
        name: &str,
        etcd: &str,
        directory: &str,
    ) -> Result<Verifier, BoxError> {
        let dir = root.join(name);
        tokend::ca_issue(&root.join("ca"), name, &dir.join("peer"), &[], 1)?;
        let config = format!(
            "name = \"{name}\"\ntrust_domain = \"{TD}\"\nsocket = \"tokend.sock\"\nkeys_dir = \"keys\"\n\
             [tokens]\nverify_cache = 0\n\
             [peer_api]\nlisten = \"127.0.0.1:0\"\nca = \"{}\"\ncert = \"peer/cert.pem\"\nkey = \"peer/key.pem\"\n\
             [directory]\netcd = [\"{etcd}\"]\nprefix = \"{PREFIX}\"\n{directory}\n",
            root.join("ca").join("ca.pem").display()
        );
        std::fs::write(dir.join("tokend.toml"), config)?;
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_tokend"))
            .arg("serve")
            .arg("--config")
            .arg(dir.join("tokend.toml"))
            .env("TOKEND_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()?;
        Ok(Verifier {
            child,
            socket: dir.join("tokend.sock"),
            started,
        })
    }

    async fn channel(&self) -> Channel {
        loop {
            if let Ok(c) = tokend::connect(&self.socket).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Seconds from spawn until `tokend.directory` is SERVING (its first
    /// full read installed).
    async fn wait_serving(&self) -> Duration {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut h = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        loop {
            let r = h
                .check(HealthCheckRequest {
                    service: "tokend.directory".into(),
                })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                return self.started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Instances it holds over every issuer.
    async fn instances(&self) -> usize {
        let mut admin = pb::admin_service_client::AdminServiceClient::new(self.channel().await)
            .max_decoding_message_size(256 << 20);
        match admin.get_jwks(pb::GetJwksRequest { all: true }).await {
            Ok(r) => r
                .into_inner()
                .issuers
                .iter()
                .map(|i| i.instances.iter().filter(|x| !x.gone).count())
                .sum(),
            Err(_) => 0,
        }
    }

    async fn wait_instances(&self, n: usize) -> Duration {
        while self.instances().await < n {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.started.elapsed()
    }

    fn proc_field(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// RSS in MiB.
    fn rss_mib(&self) -> f64 {
        self.proc_field("VmRSS:") as f64 / 1024.0
    }

    /// utime + stime in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<&str> = after.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        n(11) + n(12)
    }

    /// Verifies `token` in a closed loop for `ROW`: (µs per call wall, µs of
    /// verifier CPU per call, errors).
    async fn verify_cost(&self, token: &str) -> (f64, f64, usize) {
        let mut c = pb::token_service_client::TokenServiceClient::new(self.channel().await);
        let req = || pb::VerifyRequest {
            token: token.into(),
            audience: String::new(),
            ..Default::default()
        };
        for _ in 0..200 {
            let _ = c.verify(req()).await;
        }
        let ticks0 = self.cpu_ticks();
        let t0 = Instant::now();
        let (mut n, mut errors) = (0usize, 0usize);
        while t0.elapsed() < ROW {
            if c.verify(req()).await.is_err() {
                errors += 1;
            }
            n += 1;
        }
        let wall = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
        let hz = 100.0; // CLK_TCK on Linux
        let cpu = (self.cpu_ticks() - ticks0) as f64 / hz * 1e6 / n as f64;
        (wall, cpu, errors)
    }
}

fn token(key: &SigningKey, service: &str, aud: &str, jti: &str) -> String {
    let t = now();
    let claims = serde_json::json!({
        "iss": format!("spiffe://{TD}/{service}"), "sub": format!("spiffe://{TD}/{service}"),
        "aud": format!("spiffe://{TD}/{aud}"), "iat": t, "nbf": t, "exp": t + 3000, "jti": jti,
    });
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.typ = Some("JWT".into());
    h.kid = Some(key.kid().into());
    jsonwebtoken::encode(&h, &claims, key.encoding_key()).expect("encode")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn run() -> Result<(), BoxError> {
    let root = tempfile::Builder::new()
        .prefix("tokend-bench-dir-")
        .tempdir()?;
    let root = root.path();
    let etcd = start_etcd(root);
    let td = TrustDomain::new(TD)?;
    tokend::ca_init(&root.join("ca"), &td)?;
    let mut client = loop {
        if let Ok(mut c) = etcd_client::Client::connect([&etcd.endpoint], None).await
            && c.status().await.is_ok()
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let t = Instant::now();
    let pool: Vec<SigningKey> = (0..POOL)
        .map(|_| SigningKey::from_pkcs8(&tokend::generate_pkcs8(2048).expect("rsa")).expect("key"))
        .collect();
    let mut instances = Vec::with_capacity(SERVICES * INSTANCES);
    for s in 0..SERVICES {
        let service = format!("s{s:04}");
        for n in 0..INSTANCES {
            let idx = s * INSTANCES + n;
            instances.push(Instance {
                key: issue(&root.join("ca"), root, &service, n)?,
                service: service.clone(),
                id: format!("{:032x}", idx),
                seq: 0,
                keys: vec![idx % POOL, (idx + 1) % POOL],
            });
        }
    }
    println!(
        "setup: {} certificates and {POOL} RSA keys in {:.1} s",
        instances.len(),
        t.elapsed().as_secs_f64()
    );
    let lease = client.lease_grant(600, None).await?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if keeper.keep_alive().await.is_err() || acks.message().await.is_err() {
                return;
            }
        }
    });
    let put = |client: &mut etcd_client::Client, key: String, doc: String| {
        let mut c = client.clone();
        async move {
            c.put(
                key,
                doc,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await
        }
    };

    // One instance, one verifier: the baselines.
    let doc = instances[0].sign(&pool);
    let doc_bytes = doc.len();
    put(&mut client, instances[0].etcd_key(), doc).await?;
    let a = Verifier::start(root, "verifier-a", &etcd.endpoint)?;
    let a_ready_one = a.wait_serving().await;
    a.wait_instances(1).await;
    let tok = token(&pool[0], "s0000", "verifier-a", "bench-1");
    let rss_one = a.rss_mib();
    // The baseline verifier for the cost ratio: it accepts (and so loads)
    // only s0000, but otherwise runs exactly like A, at the same time.
    let one = Verifier::start_with(root, "verifier-one", &etcd.endpoint, "accept = [\"s0000\"]")?;
    one.wait_serving().await;
    let tok_one = token(&pool[0], "s0000", "verifier-one", "bench-2");

    // Every instance.
    let t = Instant::now();
    let mut total_bytes = doc_bytes;
    let mut pending = Vec::new();
    for inst in instances.iter_mut().skip(1) {
        let doc = inst.sign(&pool);
        total_bytes += doc.len();
        pending.push(tokio::spawn(put(&mut client, inst.etcd_key(), doc)));
        if pending.len() >= 64 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending.drain(..) {
        p.await??;
    }
    let publish_secs = t.elapsed().as_secs_f64();
    let n = instances.len();
    let t = Instant::now();
    a.wait_instances(n).await;
    let a_caught_up = t.elapsed();

    // A fresh verifier loading everything.
    let b = Verifier::start(root, "verifier-b", &etcd.endpoint)?;
    let b_ready = b.wait_serving().await;
    let b_all = b.wait_instances(n).await;

    // Interleaved rounds, so load on the machine hits both alike.
    let (mut one_wall, mut one_cpu, mut one_err) = (0.0, 0.0, 0);
    let (mut all_wall, mut all_cpu, mut all_err) = (0.0, 0.0, 0);
    for _ in 0..ROUNDS {
        let (w, c, e) = one.verify_cost(&tok_one).await;
        (one_wall, one_cpu, one_err) = (one_wall + w, one_cpu + c, one_err + e);
        let (w, c, e) = a.verify_cost(&tok).await;
        (all_wall, all_cpu, all_err) = (all_wall + w, all_cpu + c, all_err + e);
    }
    let rounds = ROUNDS as f64;
    (one_wall, one_cpu, all_wall, all_cpu) = (
        one_wall / rounds,
        one_cpu / rounds,
        all_wall / rounds,
        all_cpu / rounds,
    );
    let one_loaded = one.instances().await;
    let a_loaded = a.instances().await;
    let rss_all = a.rss_mib();
    let rss_b = b.rss_mib();

    // Rotations: an instance puts a document listing a key new to its
    // service; timed from the put to the first verification that passes.
    let mut c = pb::token_service_client::TokenServiceClient::new(a.channel().await);
    let mut lat = Vec::with_capacity(ROTATIONS);
    for r in 0..ROTATIONS {
        let i = 3 + (r * 37) % (n - 3);
        let service = instances[i].service.clone();
        let used: Vec<usize> = (0..INSTANCES)
            .flat_map(|k| instances[(i / INSTANCES) * INSTANCES + k].keys.clone())
            .collect();
        let Some(fresh) = (0..POOL).find(|k| !used.contains(k)) else {
            continue;
        };
        instances[i].keys = vec![fresh, instances[i].keys[0]];
        let doc = instances[i].sign(&pool);
        let tok = token(&pool[fresh], &service, "verifier-a", &format!("rot-{r}"));
        let t0 = Instant::now();
        put(&mut client, instances[i].etcd_key(), doc).await?;
        loop {
            let ok = c
                .verify(pb::VerifyRequest {
                    token: tok.clone(),
                    audience: String::new(),
                    ..Default::default()
                })
                .await
                .is_ok();
            if ok {
                lat.push(t0.elapsed());
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("rotation {r} of {service} never became usable").into());
            }
        }
    }
    lat.sort();

    // Steady state: every instance re-signs at half its lifetime, phases
    // spread evenly; etcd's revision counts the writes.
    let rev = |r: etcd_client::StatusResponse| r.header().map_or(0, |h| h.revision());
    let half = Duration::from_secs((LIFETIME / 2) as u64);
    let tick = Duration::from_millis(100);
    let per_tick = n as f64 * tick.as_secs_f64() / half.as_secs_f64();
    let rev0 = rev(client.status().await?);
    let db0 = client.status().await?.db_size();
    let t0 = Instant::now();
    let mut next = 0usize;
    let mut owed = 0.0;
    let mut inflight = Vec::new();
    while t0.elapsed() < STEADY {
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let inst = &mut instances[next % n];
            next += 1;
            let doc = inst.sign(&pool);
            inflight.push(tokio::spawn(put(&mut client, inst.etcd_key(), doc)));
        }
        tokio::time::sleep(tick).await;
    }
    for p in inflight {
        p.await??;
    }
    let steady_secs = t0.elapsed().as_secs_f64();
    let status = client.status().await?;
    let writes = (rev(status.clone()) - rev0) as f64 / steady_secs;
    let db1 = status.db_size();
    drop(one);
    let ratio_wall = all_wall / one_wall;
    let ratio_cpu = if one_cpu > 0.0 {
        all_cpu / one_cpu
    } else {
        f64::NAN
    };

    println!();
    println!(
        "directory bench: {SERVICES} services × {INSTANCES} instances = {n} documents, one etcd (3.4), verifiers are `tokend serve` processes"
    );
    println!(
        "  document size                        {doc_bytes} B (mean {:.0} B)",
        total_bytes as f64 / n as f64
    );
    println!(
        "  publish {n} documents (64 in flight)  {publish_secs:.2} s ({:.0} puts/s)",
        n as f64 / publish_secs
    );
    println!(
        "  running verifier caught up after     {:.2} s",
        a_caught_up.as_secs_f64()
    );
    println!(
        "  fresh verifier: spawn → SERVING      {:.2} s with {n} documents (baseline {:.2} s with 1: process start, key generation)",
        b_ready.as_secs_f64(),
        a_ready_one.as_secs_f64()
    );
    println!(
        "  fresh verifier: spawn → all listed   {:.2} s",
        b_all.as_secs_f64()
    );
    println!(
        "  load time attributable to documents  {:.2} s",
        (b_ready.as_secs_f64() - a_ready_one.as_secs_f64()).max(0.0)
    );
    println!(
        "  rotation put → usable ({} samples)  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    println!(
        "  verifier RSS                         {rss_one:.1} MiB with 1 instance, {rss_all:.1} MiB with {n} (fresh verifier: {rss_b:.1} MiB)"
    );
    println!(
        "  steady-state etcd writes             {writes:.1} /s over {steady_secs:.0} s (expected {:.1}: {n} ÷ {} s); db size {:.1} → {:.1} MiB",
        n as f64 / half.as_secs_f64(),
        half.as_secs(),
        db0 as f64 / 1048576.0,
        db1 as f64 / 1048576.0
    );
    println!(
        "  verify (gRPC, same token, no cache; {ROUNDS} interleaved rounds of {} s each)",
        ROW.as_secs()
    );
    println!(
        "                                       {one_loaded} instances (accept = [s0000]): {one_wall:.0} µs/call, {one_cpu:.0} µs verifier CPU/call ({one_err} errors)"
    );
    println!(
        "                                       {a_loaded} instances: {all_wall:.0} µs/call, {all_cpu:.0} µs verifier CPU/call ({all_err} errors)"
    );
    println!(
        "  cost ratio {a_loaded} ÷ {one_loaded} instances     wall {ratio_wall:.2}, verifier CPU {ratio_cpu:.2}"
    );
    Ok(())
}
