//! End-to-end benchmark: a real sidecar in its own process over its real Unix
//! socket, each row beside a baseline measured in the same run on the same
//! cores: raw ring RSA-2048 sign/verify on every core (one thread per core),
//! and a bare tonic unary echo over a Unix socket, served by a child process
//! at the same concurrency. Run: `cargo bench --bench e2e`.
//!
//! The bench re-executes itself: `--echo-server DIR` serves the echo,
//! `--sidecar DIR [--verify-cache N]` runs a `tokend::Sidecar` (the whole
//! daemon, as `tokend serve` builds it) in that child, so the server's CPU
//! (utime + stime from /proc/<pid>/stat) is separate from the client's.
//! The open-loop verify is run twice: alone, and beside a second client
//! sending uncached (one-time) mints at a quarter of the raw signing rate,
//! which shows whether an RSA signature stalls the verifies behind it.
//! Nothing here asserts a timing.

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokend::pb::tokend as pb;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The allocator `tokend serve` runs with (src/main.rs), so the sidecar
/// child measured here is the daemon as shipped (the echo child gets it too).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Seconds measured per closed-loop row (after a short warm-up).
const ROW: Duration = Duration::from_secs(3);
/// Warm-up before each row, not measured.
const WARM: Duration = Duration::from_millis(400);
/// Seconds per open-loop row.
const OPEN: Duration = Duration::from_secs(4);
/// Rounds of the three open-loop rows (the median p99 round is reported).
const OPEN_ROUNDS: usize = 3;
/// Distinct tokens pre-minted for the "distinct" rows.
const DISTINCT: usize = 2_000;
/// The sidecar caps concurrent streams per connection at 8
/// (`limits.max_streams_per_connection`), so 64 in flight use 8
/// connections; the echo rows use the same connections.
const STREAMS_PER_CONN: usize = 8;
const HIGH: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(dir) = arg("--echo-server") {
        return echo_server(Path::new(&dir));
    }
    if let Some(dir) = arg("--sidecar") {
        let cache = arg("--verify-cache");
        return sidecar_child(Path::new(&dir), cache.as_deref());
    }
    if let Some(secs) = arg("--profile-verify") {
        return profile(secs.parse().unwrap_or(20), false);
    }
    if let Some(secs) = arg("--profile-mint") {
        return profile(secs.parse().unwrap_or(20), true);
    }
    if let Some(secs) = arg("--profile-cached") {
        return profile_cached(secs.parse().unwrap_or(20));
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`:
        // a benchmark is not a test, so do nothing there.
        println!("e2e: a benchmark; run it with `cargo bench --bench e2e`");
        return;
    }
    bench();
}

// === children ===

fn runtime() -> tokio::runtime::Runtime {
    // As `tokend serve` runs: tokio's multi-thread runtime, one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits until the parent closes our stdin (its end of the pipe).
async fn parent_gone() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}

/// A bare tonic service: `Verify` answers with the token it was sent (in
/// `claims_json`), checking nothing. The baseline for the sidecar's rows.
#[derive(Debug, Clone, Copy)]
struct Echo;

#[tonic::async_trait]
impl pb::token_service_server::TokenService for Echo {
    async fn mint(
        &self,
        _: Request<pb::MintRequest>,
    ) -> Result<Response<pb::MintResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::VerifyResponse {
            claims_json: r.token,
            ..Default::default()
        }))
    }

    async fn exchange(
        &self,
        _: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn prove(
        &self,
        _: Request<pb::ProveRequest>,
    ) -> Result<Response<pb::ProveResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

fn echo_server(dir: &Path) {
    let rt = runtime();
    rt.block_on(async {
        let socket = dir.join("echo.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind echo socket");
        println!("READY {}", socket.display());
        tonic::transport::Server::builder()
            .add_service(pb::token_service_server::TokenServiceServer::new(Echo))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                parent_gone(),
            )
            .await
            .expect("echo server");
    });
}

fn sidecar_child(dir: &Path, verify_cache: Option<&str>) {
    // As `tokend serve` starts (src/main.rs): no transparent huge pages.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    let rt = runtime();
    rt.block_on(async {
        let mut b = tokend::Sidecar::new(dir, "payments");
        if let Some(n) = verify_cache {
            b = b.config(&format!("[tokens]\nverify_cache = {n}\n"));
        }
        let running = b.start().await.expect("sidecar start");
        println!("READY {}", running.socket().display());
        parent_gone().await;
        running.stop().await.expect("sidecar stop");
    });
}

/// A child process serving on a socket; dropping `stdin` stops it.
struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    socket: PathBuf,
}

impl Server {
    fn spawn(args: &[&str]) -> Self {
        let exe = std::env::current_exe().expect("own executable");
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("child stdout"))
            .read_line(&mut line)
            .expect("child READY line");
        let socket = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("child said {line:?}"))
            .into();
        Self {
            child,
            stdin,
            socket,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

// === /proc ===

fn clk_tck() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// utime + stime of `pid` ("self" for this process), in microseconds.
fn cpu_us(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the ")" closing comm: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks * 1e6 / clk_tck()
}

/// Peak resident set (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// === raw ring on every core ===

/// Operations per second over all cores, one thread per core, and the CPU
/// (utime + stime of this process) each operation took.
fn all_cores(threads: usize, op: impl Fn() + Sync) -> (f64, f64) {
    let op = &op;
    let cpu0 = cpu_us("self");
    let start = Instant::now();
    let n: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut n = 0u64;
                    while start.elapsed() < Duration::from_secs(2) {
                        op();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    (n as f64 / secs, (cpu_us("self") - cpu0) / n.max(1) as f64)
}

// === gRPC load ===

type Op = Arc<dyn Fn(Channel, usize) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(pb::token_service_client::TokenServiceClient<Channel>, usize) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    Arc::new(move |ch, i| Box::pin(f(pb::token_service_client::TokenServiceClient::new(ch), i)))
}

async fn channels(socket: &Path, n: usize) -> Vec<Channel> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(tokend::connect(socket).await.expect("connect"));
    }
    out
}

#[derive(Debug, Default, Clone)]
struct Row {
    name: String,
    inflight: usize,
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    server_us: f64,
    client_us: f64,
    errors: usize,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i])
}

/// `inflight` callers, each calling `op` back to back for `dur`.
async fn closed_loop(
    conns: &[Channel],
    inflight: usize,
    dur: Duration,
    op: &Op,
) -> (Vec<u32>, usize, f64) {
    let seq = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = (0..inflight)
        .map(|w| {
            let ch = conns[w % conns.len()].clone();
            let op = op.clone();
            let seq = seq.clone();
            tokio::spawn(async move {
                let mut lats = Vec::new();
                let mut errors = 0;
                while Instant::now() < deadline {
                    let i = seq.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    if op(ch.clone(), i).await {
                        lats.push(t.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
                (lats, errors)
            })
        })
        .collect();
    let mut lats = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("worker");
        lats.extend(l);
        errors += e;
    }
    (lats, errors, start.elapsed().as_secs_f64())
}

fn row(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    conns: &[Channel],
    name: &str,
    inflight: usize,
    op: &Op,
) -> Row {
    let conns = &conns[..inflight.div_ceil(STREAMS_PER_CONN).min(conns.len())];
    rt.block_on(closed_loop(conns, inflight, WARM, op));
    let pid = server.pid().to_string();
    let (s0, c0) = (cpu_us(&pid), cpu_us("self"));
    let (mut lats, errors, secs) = rt.block_on(closed_loop(conns, inflight, ROW, op));
    let (s1, c1) = (cpu_us(&pid), cpu_us("self"));
    lats.sort_unstable();
    let n = lats.len().max(1) as f64;
    let r = Row {
        name: name.to_owned(),
        inflight,
        rate: lats.len() as f64 / secs,
        p50: pct(&lats, 0.50),
        p99: pct(&lats, 0.99),
        p999: pct(&lats, 0.999),
        server_us: (s1 - s0) / n,
        client_us: (c1 - c0) / n,
        errors,
    };
    eprintln!(
        "  {name} @{inflight}: {:.0}/s  (load {})",
        r.rate,
        loadavg()
    );
    r
}

/// Sends `op` on a fixed schedule at `rate`/s for `dur`; each latency runs
/// from the scheduled send time (no coordinated omission).
fn open_loop(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    conns: &[Channel],
    name: &str,
    rate: f64,
    op: &Op,
) -> Row {
    let n = (rate * OPEN.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let pid = server.pid().to_string();
    let (s0, c0) = (cpu_us(&pid), cpu_us("self"));
    let start = Instant::now() + Duration::from_millis(5);
    let mut handles = Vec::with_capacity(n);
    for k in 0..n {
        let at = start + interval.mul_f64(k as f64);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let ch = conns[k % conns.len()].clone();
        let op = op.clone();
        handles.push(rt.spawn(async move {
            let ok = op(ch, k).await;
            (at.elapsed().as_micros() as u32, ok)
        }));
    }
    let results = rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for h in handles {
            out.push(h.await.expect("call"));
        }
        out
    });
    let secs = start.elapsed().as_secs_f64();
    let (s1, c1) = (cpu_us(&pid), cpu_us("self"));
    let errors = results.iter().filter(|(_, ok)| !ok).count();
    let mut lats: Vec<u32> = results
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(l, _)| *l)
        .collect();
    lats.sort_unstable();
    let done = lats.len().max(1) as f64;
    let r = Row {
        name: name.to_owned(),
        inflight: 0,
        rate: lats.len() as f64 / secs,
        p50: pct(&lats, 0.50),
        p99: pct(&lats, 0.99),
        p999: pct(&lats, 0.999),
        server_us: (s1 - s0) / done,
        client_us: (c1 - c0) / done,
        errors,
    };
    eprintln!(
        "  {name} open loop at {rate:.0}/s: done (load {})",
        loadavg()
    );
    r
}

/// A second client: `op` on a fixed schedule at `rate`/s on its own
/// thread until `stop`, each call spawned on `rt` (so a slow answer never
/// slows the schedule). Returns how many calls succeeded.
fn background(
    rt: &tokio::runtime::Runtime,
    conns: &[Channel],
    rate: f64,
    op: &Op,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let handle = rt.handle().clone();
    let conns = conns.to_vec();
    let op = op.clone();
    std::thread::spawn(move || {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let ok = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut calls = Vec::new();
        let mut k = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let at = start + interval.mul_f64(k as f64);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (ch, op, ok) = (conns[k % conns.len()].clone(), op.clone(), ok.clone());
            calls.push(handle.spawn(async move {
                if op(ch, k).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }));
            k += 1;
        }
        for c in calls {
            let _ = handle.block_on(c);
        }
        ok.load(Ordering::Relaxed)
    })
}

// === the run ===

/// Mints `DISTINCT` tokens (distinct claims) for "payments" over `conns`,
/// 64 at a time.
async fn pre_mint(conns: &[Channel]) -> Arc<Vec<String>> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..HIGH)
        .map(|w| {
            let mut c =
                pb::token_service_client::TokenServiceClient::new(conns[w % conns.len()].clone());
            let next = next.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= DISTINCT {
                        return out;
                    }
                    let m = c
                        .mint(pb::MintRequest {
                            audience: "payments".into(),
                            claims_json: format!("{{\"n\":{i}}}"),
                            ..Default::default()
                        })
                        .await
                        .expect("pre-mint");
                    out.push(m.into_inner().token);
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(DISTINCT);
    for t in tasks {
        all.extend(t.await.expect("pre-mint task"));
    }
    Arc::new(all)
}

/// Verifies `tokens` in turn (the i-th call the i-th token, cycling).
fn verify_cycling(tokens: Arc<Vec<String>>) -> Op {
    op(move |mut c, i| {
        let token = tokens[i % tokens.len()].clone();
        async move {
            c.verify(pb::VerifyRequest {
                token,
                audience: String::new(),
                ..Default::default()
            })
            .await
            .is_ok()
        }
    })
}

/// Mints for "ledger", one-time (never cached) or not.
fn mints(one_time: bool) -> Op {
    op(move |mut c, _| async move {
        c.mint(pb::MintRequest {
            audience: "ledger".into(),
            one_time,
            ..Default::default()
        })
        .await
        .is_ok()
    })
}

/// Like `profile`, for the verify of one token with the verify cache on
/// (every call after the first a hit): `--profile-cached 20`.
fn profile_cached(secs: u64) {
    let rt = runtime();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("defaults");
    std::fs::create_dir_all(&dir).expect("dir");
    let dir = dir.display().to_string();
    let server = Server::spawn(&["--sidecar", &dir]);
    let conns = rt.block_on(channels(&server.socket, HIGH.div_ceil(STREAMS_PER_CONN)));
    let token = rt.block_on(pre_mint(&conns))[0].clone();
    let load = verify_cycling(Arc::new(vec![token]));
    println!("sidecar pid {}", server.pid());
    let pid = server.pid().to_string();
    let s0 = cpu_us(&pid);
    let (lats, errors, took) =
        rt.block_on(closed_loop(&conns, HIGH, Duration::from_secs(secs), &load));
    let s1 = cpu_us(&pid);
    println!(
        "verify cached @{HIGH}: {:.0}/s, server {:.1} µs CPU/call, {errors} errors",
        lats.len() as f64 / took,
        (s1 - s0) / lats.len().max(1) as f64
    );
    drop(conns);
    server.stop();
}

/// A load to profile under, 64 in flight for `secs` seconds: the uncached
/// verify (a sidecar with the verify cache off, 2,000 distinct tokens), or
/// with `mint` the uncached (one-time) mint. It prints the sidecar's pid
/// first, so `perf record -p PID` (or any profiler) can attach:
/// `cargo bench --bench e2e -- --profile-verify 20` (or `--profile-mint`).
fn profile(secs: u64, mint: bool) {
    let rt = runtime();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("nocache");
    std::fs::create_dir_all(&dir).expect("dir");
    let dir = dir.display().to_string();
    let server = Server::spawn(&["--sidecar", &dir, "--verify-cache", "0"]);
    let conns = rt.block_on(channels(&server.socket, HIGH.div_ceil(STREAMS_PER_CONN)));
    let tokens = rt.block_on(pre_mint(&conns));
    let load = if mint {
        mints(true)
    } else {
        verify_cycling(tokens)
    };
    let what = if mint {
        "mint uncached"
    } else {
        "verify distinct"
    };
    println!("sidecar pid {}", server.pid());
    let pid = server.pid().to_string();
    let s0 = cpu_us(&pid);
    let (lats, errors, took) =
        rt.block_on(closed_loop(&conns, HIGH, Duration::from_secs(secs), &load));
    let s1 = cpu_us(&pid);
    let n = lats.len().max(1) as f64;
    println!(
        "{what} @{HIGH}: {:.0}/s, server {:.1} µs CPU/call, {errors} errors",
        lats.len() as f64 / took,
        (s1 - s0) / n
    );
    println!("sidecar peak RSS {:.1} MiB", peak_rss_mib(server.pid()));
    drop(conns);
    server.stop();
}

/// The row with the median p99 of `rows` (odd in number).
fn median_p99(mut rows: Vec<Row>) -> Row {
    rows.sort_by(|a, b| a.p99.total_cmp(&b.p99));
    let mid = rows.len() / 2;
    rows.swap_remove(mid)
}

/// A positive rate from the environment variable `name`, if set.
fn env_rate(name: &str) -> Option<f64> {
    std::env::var(name)
        .ok()?
        .parse::<f64>()
        .ok()
        .filter(|r| *r > 0.0)
}

fn bench() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let load_start = loadavg();
    eprintln!("e2e bench: {cores} cores, load {load_start}");

    // Raw ring, no child running.
    let der = tokend::generate_pkcs8(2048).expect("key");
    let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("ring key");
    let rng = ring::rand::SystemRandom::new();
    let msg = vec![b'x'; 400];
    let (sign_rate, sign_us) = all_cores(cores, || {
        let mut sig = vec![0; pair.public().modulus_len()];
        pair.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
            .expect("sign");
    });
    let mut sig = vec![0; pair.public().modulus_len()];
    pair.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
        .expect("sign");
    let comps = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    let (verify_rate, verify_us) = all_cores(cores, || {
        ring::signature::RsaPublicKeyComponents {
            n: &comps.n,
            e: &comps.e,
        }
        .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &msg, &sig)
        .expect("verify")
    });
    eprintln!(
        "  ring: {sign_rate:.0} sign/s, {verify_rate:.0} verify/s (load {})",
        loadavg()
    );
    // Raw ring ES256 (P-256), what a DPoP proof costs to make and check.
    let es = {
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("p256");
        ring::signature::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).expect("p256 key")
    };
    let (es_sign_rate, es_sign_us) = all_cores(cores, || {
        es.sign(&rng, &msg).expect("es256 sign");
    });
    let es_sig = es.sign(&rng, &msg).expect("es256 sign");
    let es_public = ring::signature::KeyPair::public_key(&es).as_ref().to_vec();
    let (es_verify_rate, es_verify_us) = all_cores(cores, || {
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &es_public,
        )
        .verify(&msg, es_sig.as_ref())
        .expect("es256 verify")
    });

    let rt = runtime();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).expect("dir");
        d.display().to_string()
    };
    let max_conns = HIGH.div_ceil(STREAMS_PER_CONN);

    // The echo, and a sidecar without a verify cache (every verify pays the RSA check).
    let echo = Server::spawn(&["--echo-server", &dir("echo")]);
    let nocache = Server::spawn(&["--sidecar", &dir("nocache"), "--verify-cache", "0"]);
    let echo_conns = rt.block_on(channels(&echo.socket, max_conns));
    let nc_conns = rt.block_on(channels(&nocache.socket, max_conns));

    let tokens = rt.block_on(pre_mint(&nc_conns));
    let token_len = tokens[0].len();

    let verify_distinct = verify_cycling(tokens.clone());
    // The same token every call: a one-token cycle.
    let verify_same = |token: String| verify_cycling(Arc::new(vec![token]));
    // The echo carries the same bytes as "verify, distinct tokens".
    let echo_op = verify_distinct.clone();

    let mut echo_rows = Vec::new();
    let mut rows = Vec::new();
    for c in [1, HIGH] {
        echo_rows.push(row(&rt, &echo, &echo_conns, "echo", c, &echo_op));
    }
    for c in [1, HIGH] {
        rows.push(row(
            &rt,
            &nocache,
            &nc_conns,
            "verify, distinct tokens (no cache hits)",
            c,
            &verify_distinct,
        ));
    }
    let same_nc = tokens[0].clone();
    for c in [1, HIGH] {
        rows.push(row(
            &rt,
            &nocache,
            &nc_conns,
            "verify, same token, cache off",
            c,
            &verify_same(same_nc.clone()),
        ));
    }
    let peak = rows[0].rate.max(rows[1].rate);
    // E2E_OPEN_RATE fixes the offered rate (to compare two builds at the
    // same load); by default it is half the peak just measured.
    let offered = env_rate("E2E_OPEN_RATE").unwrap_or(peak / 2.0);
    // The open loop's tail moves from run to run on a shared 2-core
    // machine (the client's own scheduling is in it), so each of the three
    // rows runs OPEN_ROUNDS times, interleaved, and the round with the
    // median p99 is reported.
    let mint_rate = env_rate("E2E_MINT_RATE").unwrap_or((sign_rate / 4.0).max(1.0));
    let one_time_mint = mints(true);
    let (mut echoes, mut alone, mut beside) = (Vec::new(), Vec::new(), Vec::new());
    let mut mints_done = 0;
    for _ in 0..OPEN_ROUNDS {
        echoes.push(open_loop(
            &rt,
            &echo,
            &echo_conns,
            "echo",
            offered,
            &echo_op,
        ));
        alone.push(open_loop(
            &rt,
            &nocache,
            &nc_conns,
            "verify, distinct (no cache hits)",
            offered,
            &verify_distinct,
        ));
        // The same open-loop verify while a second client sends uncached
        // (one-time) mints at a quarter of this machine's raw signing rate:
        // an RSA signature must not stall the verifies queued behind it.
        let stop = Arc::new(AtomicBool::new(false));
        let minting = background(&rt, &nc_conns, mint_rate, &one_time_mint, stop.clone());
        beside.push(open_loop(
            &rt,
            &nocache,
            &nc_conns,
            "verify, distinct, beside uncached mints",
            offered,
            &verify_distinct,
        ));
        stop.store(true, Ordering::Relaxed);
        mints_done += minting.join().expect("mint load thread");
    }
    let open_echo = median_p99(echoes);
    let open_verify = median_p99(alone);
    let open_verify_minting = median_p99(beside);
    let rss_nocache = peak_rss_mib(nocache.pid());
    drop(nc_conns);
    nocache.stop();

    // A sidecar on defaults (mint cache and verify cache on).
    let sidecar = Server::spawn(&["--sidecar", &dir("defaults")]);
    let conns = rt.block_on(channels(&sidecar.socket, max_conns));
    let own_token = rt
        .block_on(
            pb::token_service_client::TokenServiceClient::new(conns[0].clone()).mint(
                pb::MintRequest {
                    audience: "payments".into(),
                    ..Default::default()
                },
            ),
        )
        .expect("mint")
        .into_inner()
        .token;
    for c in [1, HIGH] {
        rows.push(row(&rt, &sidecar, &conns, "mint, cached", c, &mints(false)));
    }
    for c in [1, HIGH] {
        rows.push(row(
            &rt,
            &sidecar,
            &conns,
            "mint, uncached (one_time)",
            c,
            &mints(true),
        ));
    }
    for c in [1, HIGH] {
        rows.push(row(
            &rt,
            &sidecar,
            &conns,
            "verify, same token (includes verify cache)",
            c,
            &verify_same(own_token.clone()),
        ));
    }
    // Bound tokens: a proof per request, and a verification with it (the
    // same bound token, verify cache on, a fresh proof each time).
    const URI: &str = "https://payments.bench/bench.v1.Bench/Call";
    let bound = rt
        .block_on(
            pb::token_service_client::TokenServiceClient::new(conns[0].clone()).mint(
                pb::MintRequest {
                    audience: "payments".into(),
                    ttl_seconds: 3_600,
                    bind: true,
                    ..Default::default()
                },
            ),
        )
        .expect("mint bound")
        .into_inner()
        .token;
    let prove_op = {
        let token = bound.clone();
        op(move |mut c, _| {
            let token = token.clone();
            async move {
                c.prove(pb::ProveRequest {
                    token,
                    method: "POST".into(),
                    uri: URI.into(),
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        })
    };
    let prove_verify_op = {
        let token = bound.clone();
        op(move |mut c, _| {
            let token = token.clone();
            async move {
                let Ok(p) = c
                    .prove(pb::ProveRequest {
                        token: token.clone(),
                        method: "POST".into(),
                        uri: URI.into(),
                        ..Default::default()
                    })
                    .await
                else {
                    return false;
                };
                c.verify(pb::VerifyRequest {
                    token,
                    proof: p.into_inner().proof,
                    method: "POST".into(),
                    uri: URI.into(),
                    ..Default::default()
                })
                .await
                .is_ok()
            }
        })
    };
    let mut dpop_rows = Vec::new();
    for c in [1, HIGH] {
        dpop_rows.push(row(
            &rt,
            &sidecar,
            &conns,
            "prove (ES256 proof)",
            c,
            &prove_op,
        ));
    }
    for c in [1, HIGH] {
        dpop_rows.push(row(
            &rt,
            &sidecar,
            &conns,
            "prove + verify with proof (2 calls)",
            c,
            &prove_verify_op,
        ));
    }
    let rss_defaults = peak_rss_mib(sidecar.pid());
    let rss_echo = peak_rss_mib(echo.pid());
    drop(conns);
    sidecar.stop();
    drop(echo_conns);
    echo.stop();
    let load_end = loadavg();

    // === the table ===
    println!();
    println!(
        "tokend e2e bench: {cores} cores, RSA-2048, {token_len}-byte tokens, CLK_TCK {}, {}s rows",
        clk_tck(),
        ROW.as_secs()
    );
    println!("load average (1/5/15 min): {load_start} at start, {load_end} at end");
    println!();
    println!("baselines (all cores, one thread per core):");
    println!("  ring RSA-2048 sign    {sign_rate:>9.0}/s   {sign_us:>7.1} µs CPU/op");
    println!("  ring RSA-2048 verify  {verify_rate:>9.0}/s   {verify_us:>7.1} µs CPU/op");
    println!("  ring ES256 sign       {es_sign_rate:>9.0}/s   {es_sign_us:>7.1} µs CPU/op");
    println!("  ring ES256 verify     {es_verify_rate:>9.0}/s   {es_verify_us:>7.1} µs CPU/op");
    println!();
    println!(
        "{:<44} {:>4} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>7} {:>7} {:>8} {:>4}",
        "closed loop (server: child process)",
        "infl",
        "req/s",
        "÷echo",
        "÷ring",
        "p50 µs",
        "p99 µs",
        "srv µs/c",
        "÷echo",
        "÷ring",
        "cli µs/c",
        "err"
    );
    let print = |r: &Row, echo: Option<&Row>, ring: Option<(f64, f64)>| {
        let ratio = |a: f64, b: f64| format!("{:.2}", a / b);
        println!(
            "{:<44} {:>4} {:>9.0} {:>7} {:>7} {:>8.0} {:>8.0} {:>9.1} {:>7} {:>7} {:>8.1} {:>4}",
            r.name,
            r.inflight,
            r.rate,
            echo.map_or("-".into(), |e| ratio(r.rate, e.rate)),
            ring.map_or("-".into(), |(rate, _)| ratio(r.rate, rate)),
            r.p50,
            r.p99,
            r.server_us,
            echo.map_or("-".into(), |e| ratio(r.server_us, e.server_us)),
            ring.map_or("-".into(), |(_, us)| ratio(r.server_us, us)),
            r.client_us,
            r.errors
        );
    };
    for e in &echo_rows {
        print(e, None, None);
    }
    for r in &rows {
        let echo = echo_rows.iter().find(|e| e.inflight == r.inflight);
        let ring = if r.name.starts_with("mint, uncached") {
            Some((sign_rate, sign_us))
        } else if r.name.starts_with("verify") && !r.name.contains("includes") {
            Some((verify_rate, verify_us))
        } else {
            None
        };
        print(r, echo, ring);
    }
    println!();
    println!(
        "bound tokens (DPoP), sidecar on defaults; ÷ring: ES256 sign for prove, sign + verify for the pair"
    );
    for r in &dpop_rows {
        let echo = echo_rows.iter().find(|e| e.inflight == r.inflight);
        let ring = if r.name.starts_with("prove +") {
            let us = es_sign_us + es_verify_us;
            Some((1e6 * cores as f64 / us, us))
        } else {
            Some((es_sign_rate, es_sign_us))
        };
        print(r, echo, ring);
    }
    let per_call = |name: &str, c: usize| {
        dpop_rows
            .iter()
            .find(|r| r.name.starts_with(name) && r.inflight == c)
            .map_or(f64::NAN, |r| r.server_us)
    };
    let bearer_same = |c: usize| {
        rows.iter()
            .find(|r| r.name.starts_with("verify, same token (includes") && r.inflight == c)
            .map_or(f64::NAN, |r| r.server_us)
    };
    for c in [1, HIGH] {
        let verify_proof = per_call("prove +", c) - per_call("prove (", c);
        println!(
            "  inflight {c}: verify with proof ≈ {verify_proof:.1} srv µs/call (pair − prove) vs bearer verify (cached) {:.1}: ×{:.2}",
            bearer_same(c),
            verify_proof / bearer_same(c)
        );
    }
    println!();
    let basis = if std::env::var_os("E2E_OPEN_RATE").is_some() {
        "fixed by E2E_OPEN_RATE"
    } else {
        "half the peak of verify, distinct"
    };
    println!(
        "open loop at {offered:.0}/s offered ({basis}): latency from the scheduled send; each row the median-p99 round of {OPEN_ROUNDS}"
    );
    println!(
        "{:<44} {:>9} {:>8} {:>8} {:>9} {:>9} {:>4}",
        "", "done/s", "p50 µs", "p99 µs", "p99.9 µs", "srv µs/c", "err"
    );
    for r in [&open_echo, &open_verify, &open_verify_minting] {
        println!(
            "{:<44} {:>9.0} {:>8.0} {:>8.0} {:>9.0} {:>9.1} {:>4}",
            r.name, r.rate, r.p50, r.p99, r.p999, r.server_us, r.errors
        );
    }
    println!(
        "{:<44} {:>9} {:>8} {:>8} {:>9}",
        "verify ÷ echo",
        "",
        format!("{:.2}", open_verify.p50 / open_echo.p50),
        format!("{:.2}", open_verify.p99 / open_echo.p99),
        format!("{:.2}", open_verify.p999 / open_echo.p999)
    );
    println!(
        "{:<44} {:>9} {:>8} {:>8} {:>9}",
        "verify beside mints ÷ echo",
        "",
        format!("{:.2}", open_verify_minting.p50 / open_echo.p50),
        format!("{:.2}", open_verify_minting.p99 / open_echo.p99),
        format!("{:.2}", open_verify_minting.p999 / open_echo.p999)
    );
    println!(
        "  (beside: {mints_done} uncached mints answered in {OPEN_ROUNDS} rounds, offered at {mint_rate:.0}/s (ring sign ÷ 4 unless E2E_MINT_RATE), by a second client)"
    );
    println!();
    println!(
        "peak RSS (VmHWM): sidecar on defaults {rss_defaults:.1} MiB, sidecar with verify_cache = 0 {rss_nocache:.1} MiB (after {DISTINCT} mints), echo server {rss_echo:.1} MiB"
    );
}
