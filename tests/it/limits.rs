//! Denial of service: floods of the peer port and of the Unix socket under a
//! small file-descriptor limit (prlimit), request bodies and header-only
//! streams that never finish, and server streams that clients cancel. Every
//! test asserts that an honest client is still served and that what the
//! attacker holds in the sidecar (fds, memory, watch slots) stays bounded.
//! Figures go to stderr: `cargo test --test it limits:: -- --nocapture`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokend::pb::spiffe as spb;
use tokend::pb::tokend as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::support::*;

/// The sidecars of the flood tests run with this many file descriptors.
const NOFILE: u64 = 128;
const LIMITED: [&str; 3] = ["prlimit", "--nofile=128:128", "--"];

/// One honest call pair on a fresh connection: mint, then verify the token.
async fn honest_round(socket: &Path, audience: &str) -> Result<(), String> {
    let channel = tokend::connect(socket).await.map_err(|e| e.to_string())?;
    let mut c = pb::token_service_client::TokenServiceClient::new(channel);
    let token = c
        .mint(pb::MintRequest {
            audience: audience.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("mint: {s}"))?
        .into_inner()
        .token;
    c.verify(pb::VerifyRequest {
        token,
        audience: String::new(),
        ..Default::default()
    })
    .await
    .map_err(|s| format!("verify: {s}"))?;
    Ok(())
}

/// Up to `n` honest rounds in turn, each under a hang guard of `guard` (not
/// a latency assertion), stopping at the first failure: successes, the
/// slowest round, the error.
async fn honest_rounds(
    socket: &Path,
    audience: &str,
    n: usize,
    guard: Duration,
) -> (usize, Duration, Option<String>) {
    let (mut ok, mut slowest, mut last_err) = (0, Duration::ZERO, None);
    for _ in 0..n {
        let t = Instant::now();
        match tokio::time::timeout(guard, honest_round(socket, audience)).await {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => last_err = Some(format!("no answer within {guard:?}")),
        }
        slowest = slowest.max(t.elapsed());
        if last_err.is_some() {
            break;
        }
    }
    (ok, slowest, last_err)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// GetKeys over mTLS as `identity`.
async fn get_keys(
    addr: std::net::SocketAddr,
    ca_pem: &[u8],
    identity: Identity,
) -> Result<(), String> {
    peer_client(addr, ca_pem, identity)
        .await?
        .get_keys(pb::GetKeysRequest {})
        .await
        .map(|_| ())
        .map_err(|s| format!("GetKeys: {s}"))
}

async fn peer_client(
    addr: std::net::SocketAddr,
    ca_pem: &[u8],
    identity: Identity,
) -> Result<pb::peer_service_client::PeerServiceClient<tonic::transport::Channel>, String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("ledger")
        .identity(identity);
    let channel = Endpoint::try_from(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    Ok(pb::peer_service_client::PeerServiceClient::new(channel))
}

fn identity_in(dir: &Path) -> Identity {
    Identity::from_pem(
        std::fs::read(dir.join("cert.pem")).expect("cert"),
        std::fs::read(dir.join("key.pem")).expect("key"),
    )
}

/// Issue item 1: 300 TCP connections to the peer port that never send a
/// ClientHello (over twice the sidecar's 128 fds) take 16 slots (the peer
/// cap), not the fd table: the local socket keeps minting and verifying,
/// and the peer port serves an honest peer again once the flood goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_port_flood_leaves_the_socket_serving() {
    let root = tmp();
    ca_init(root.path());
    ca_issue(&root.path().join("ca"), root.path(), "ledger");
    let payments = ca_issue(&root.path().join("ca"), root.path(), "payments");
    let ca_pem = std::fs::read(root.path().join("ca/ca.pem")).expect("ca");
    let extra =
        "[limits]\nlocal_connections = 32\npeer_connections = 16\nhandshake_timeout = \"2s\"";
    let s = Sidecar::start_under(root.path(), "ledger", &peer_config(0, &[], extra), &LIMITED);
    let (pid, addr) = (s.pid(), s.peer_addr());
    honest_round(&s.socket, "ledger")
        .await
        .expect("honest before");
    get_keys(addr, &ca_pem, identity_in(&payments))
        .await
        .expect("peer before");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = Probe::of(pid);

    let mut flood = Vec::new();
    for _ in 0..300 {
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => flood.push(c),
            other => panic!("flood connect {}: {other:?}", flood.len()),
        }
    }
    let filled = eventually(10, || async { Probe::of(pid).fds >= before.fds + 16 }).await;
    let during = Probe::of(pid);
    assert!(
        filled,
        "the flood never reached the peer cap: {before:?} → {during:?}"
    );
    assert!(
        during.fds <= before.fds + 16 + 2,
        "the peer cap does not hold: {before:?} → {during:?}"
    );

    let (ok, slowest, err) = honest_rounds(&s.socket, "ledger", 50, Duration::from_secs(10)).await;
    let after_rounds = Probe::of(pid);
    eprintln!(
        "peer flood (300 idle TCP, NOFILE {NOFILE}): fds {} -> {} (cap 16), rss {:.1} -> {:.1} MiB, \
         honest local {ok}/50 (slowest {slowest:?}), cpu {} ticks during the rounds",
        before.fds,
        during.fds,
        mib(before.rss_kib),
        mib(after_rounds.rss_kib),
        after_rounds.cpu_ticks - during.cpu_ticks,
    );
    assert_eq!(
        ok, 50,
        "honest local calls failed during the peer flood: {err:?}"
    );

    drop(flood);
    let t = Instant::now();
    let recovered = eventually(30, || async {
        get_keys(addr, &ca_pem, identity_in(&payments))
            .await
            .is_ok()
    })
    .await;
    eprintln!(
        "peer flood: honest GetKeys again {:?} after the flood went",
        t.elapsed()
    );
    assert!(
        recovered,
        "the peer port did not serve an honest peer after the flood"
    );
    assert!(s.stderr().contains("tokend serving"));
}

/// Issue item 1, the socket: 200 idle Unix connections (over the 128 fds),
/// reopened as soon as the sidecar closes them, hold at most the 48 slots
/// of the local cap; each is closed a second after accept (no call), so
/// honest clients queued behind them are served, and at once when the
/// flood stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_flood_is_capped_and_idle_connections_are_closed() {
    let root = tmp();
    let extra = "[limits]\nlocal_connections = 48\nhandshake_timeout = \"1s\"";
    let s = Sidecar::start_under(root.path(), "ledger", extra, &LIMITED);
    let pid = s.pid();
    honest_round(&s.socket, "ledger")
        .await
        .expect("honest before");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = Probe::of(pid);

    let stop = tokio_util::sync::CancellationToken::new();
    let closed = Arc::new(AtomicUsize::new(0));
    let mut flooders = Vec::new();
    for _ in 0..200 {
        let (stop, closed, socket) = (stop.clone(), closed.clone(), s.socket.clone());
        flooders.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let Ok(mut c) = UnixStream::connect(&socket).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Read (the server's SETTINGS) until the sidecar closes the connection.
                let mut b = [0u8; 64];
                let until_closed =
                    async { while matches!(c.read(&mut b).await, Ok(n) if n > 0) {} };
                tokio::select! {
                    () = until_closed => { closed.fetch_add(1, Ordering::SeqCst); }
                    () = stop.cancelled() => return,
                }
            }
        }));
    }
    let filled = eventually(10, || async { Probe::of(pid).fds >= before.fds + 48 }).await;
    let during = Probe::of(pid);
    assert!(
        filled,
        "the flood never reached the local cap: {before:?} → {during:?}"
    );
    assert!(
        during.fds <= before.fds + 48 + 2,
        "the local cap does not hold: {before:?} → {during:?}"
    );

    let (ok, slowest, err) = honest_rounds(&s.socket, "ledger", 3, Duration::from_secs(60)).await;
    let held = Probe::of(pid);
    let closed_during = closed.load(Ordering::SeqCst);
    stop.cancel();
    for f in flooders {
        let _ = f.await;
    }
    let t = Instant::now();
    honest_round(&s.socket, "ledger")
        .await
        .expect("honest after the flood");
    let after_flood = t.elapsed();
    eprintln!(
        "socket flood (200 idle Unix, reopened; NOFILE {NOFILE}, cap 48, handshake_timeout 1s): \
         fds {} -> {}, rss {:.1} -> {:.1} MiB, idle closes {closed_during}, honest {ok}/3 \
         (slowest {slowest:?}), after the flood {after_flood:?}",
        before.fds,
        during.fds.max(held.fds),
        mib(before.rss_kib),
        mib(held.rss_kib),
    );
    assert_eq!(
        ok, 3,
        "honest calls failed during the socket flood: {err:?}"
    );
    assert!(
        closed_during >= 48,
        "idle connections were not closed ({closed_during})"
    );
    assert!(held.fds <= before.fds + 48 + 2, "{before:?} → {held:?}");
}

/// A gRPC POST for `path` as the h2 crate sends it.
fn grpc_post(path: &str, metadata_bytes: usize) -> http::Request<()> {
    let mut r = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if metadata_bytes > 0 {
        r = r.header("x-pad", "p".repeat(metadata_bytes));
    }
    r.body(()).expect("request")
}

/// An HTTP/2 connection to `socket` through the h2 crate.
async fn h2_connect(socket: &Path) -> h2::client::SendRequest<Bytes> {
    let io = UnixStream::connect(socket).await.expect("connect");
    let (send, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Opens a Verify stream whose body declares a message of `declared` bytes
/// and sends `sent` of them, never ending it. None if the server refused
/// (reset) the stream first.
async fn unfinished_body(
    send: &h2::client::SendRequest<Bytes>,
    declared: u32,
    sent: u32,
    metadata_bytes: usize,
) -> Option<(h2::SendStream<Bytes>, h2::client::ResponseFuture)> {
    let mut send = send.clone().ready().await.ok()?;
    let (response, mut body) = send
        .send_request(
            grpc_post("/tokend.v1.TokenService/Verify", metadata_bytes),
            false,
        )
        .ok()?;
    let sent = sent as usize;
    let mut data = Vec::with_capacity(5 + sent);
    data.push(0);
    data.extend_from_slice(&declared.to_be_bytes());
    data.resize(5 + sent, b'x');
    let mut data = Bytes::from(data);
    while !data.is_empty() {
        body.reserve_capacity(data.len());
        match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
            Some(Ok(n)) if n > 0 => {
                let chunk = data.split_to(n.min(data.len()));
                body.send_data(chunk, false).ok()?;
            }
            Some(Ok(_)) => continue,
            _ => return None,
        }
    }
    Some((body, response))
}

/// Issue item 2, the bodies: (1) the reported attack, 100 streams on one
/// connection each sending 4 MiB − 200 bytes of a message they never
/// finish, is refused at the length prefix; (2) the worst that fits the
/// limits, every other connection slot (127) with 8 streams, each holding
/// an unfinished message of max_request_bytes − 200 and ~7 KiB of metadata,
/// stays within the README's ceiling; an honest client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_bodies_hold_bounded_memory() {
    let root = tmp();
    let s = Sidecar::start(root.path(), "ledger", "");
    let pid = s.pid();
    honest_round(&s.socket, "ledger")
        .await
        .expect("honest before");
    let base = Probe::of(pid);

    // (1) One connection, 100 streams, 4 MiB − 200 bytes each.
    let conn = h2_connect(&s.socket).await;
    let mut held = Vec::new();
    let big = 4 * 1024 * 1024 - 200;
    for _ in 0..100 {
        let opened = tokio::time::timeout(
            Duration::from_secs(10),
            unfinished_body(&conn, big, big - 1, 0),
        )
        .await
        .ok()
        .flatten();
        held.extend(opened);
    }
    let reported = Probe::of(pid);
    let refused = 100 - held.len();
    drop(held);
    drop(conn);

    // (2) 127 connections × 8 streams at the limits.
    let max = 16 * 1024;
    let mut conns = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..127 {
        let c = h2_connect(&s.socket).await;
        for _ in 0..8 {
            let opened = tokio::time::timeout(
                Duration::from_secs(10),
                unfinished_body(&c, max - 200, max - 201, 7 * 1024),
            )
            .await
            .ok()
            .flatten();
            streams.extend(opened);
        }
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let full = Probe::of(pid);
    let (ok, slowest, err) = honest_rounds(&s.socket, "ledger", 5, Duration::from_secs(30)).await;
    eprintln!(
        "unfinished bodies: base rss {:.1} MiB; 100 × 4 MiB streams: {refused} refused, rss +{:.1} MiB; \
         127 conns × 8 streams × 16 KiB (+7 KiB metadata): {} held, rss +{:.1} MiB, fds {}; \
         honest {ok}/5 (slowest {slowest:?})",
        mib(base.rss_kib),
        mib(reported.rss_kib.saturating_sub(base.rss_kib)),
        streams.len(),
        mib(full.rss_kib.saturating_sub(base.rss_kib)),
        full.fds,
    );
    assert_eq!(refused, 100, "a 4 MiB message was accepted for buffering");
    assert!(
        reported.rss_kib < base.rss_kib + 16 * 1024,
        "the reported attack grew RSS: {base:?} → {reported:?}"
    );
    assert_eq!(
        streams.len(),
        127 * 8,
        "the attack could not reach the limits"
    );
    assert!(
        full.rss_kib < base.rss_kib + 64 * 1024,
        "over the stated ceiling: {base:?} → {full:?}"
    );
    assert_eq!(
        ok, 5,
        "honest calls failed with every other slot held: {err:?}"
    );
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for a gRPC POST to `path`, literals only (no
/// dynamic table, no Huffman).
fn request_headers(path: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    let literal = |b: &mut Vec<u8>, index: &[u8], value: &str| {
        b.extend_from_slice(index);
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    };
    literal(&mut b, &[0x04], path); // :path, indexed name 4
    literal(&mut b, &[0x01], "localhost"); // :authority, indexed name 1
    literal(&mut b, &[0x0f, 0x10], "application/grpc"); // content-type, index 31
    b.extend_from_slice(&[0x00, 2]);
    b.extend_from_slice(b"te");
    b.push(8);
    b.extend_from_slice(b"trailers");
    b
}

/// Issue item 2, header-only streams: one connection opening 20,000
/// streams that never send a body (ignoring the server's stream limit) gets
/// the streams past the limit refused and then the connection closed; the
/// sidecar's RSS stays near its base and an honest client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_only_streams_are_refused_past_the_limit() {
    let root = tmp();
    let s = Sidecar::start(root.path(), "ledger", "");
    let pid = s.pid();
    honest_round(&s.socket, "ledger")
        .await
        .expect("honest before");
    let base = Probe::of(pid);

    let io = UnixStream::connect(&s.socket).await.expect("connect");
    let (mut rd, mut wr) = io.into_split();
    let reader = tokio::spawn(async move {
        let (mut refused, mut goaway) = (0usize, false);
        let mut head = [0u8; 9];
        while rd.read_exact(&mut head).await.is_ok() {
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if rd.read_exact(&mut payload).await.is_err() {
                break;
            }
            match head[3] {
                3 if payload.get(..4) == Some(&[0, 0, 0, 7]) => refused += 1,
                7 => goaway = true,
                _ => {}
            }
        }
        (refused, goaway)
    });
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    wr.write_all(&out).await.expect("preface");
    let block = request_headers("/tokend.v1.TokenService/Verify");
    let mut sent = 0u32;
    'send: for batch in 0..200u32 {
        let mut out = Vec::new();
        for i in 0..100u32 {
            let id = 2 * (batch * 100 + i) + 1;
            out.extend(frame(1, 0x4, id, &block)); // HEADERS, END_HEADERS, no END_STREAM
        }
        if wr.write_all(&out).await.is_err() {
            break 'send;
        }
        sent += 100;
    }
    let during = Probe::of(pid);
    let (ok, slowest, err) = honest_rounds(&s.socket, "ledger", 5, Duration::from_secs(30)).await;
    let (refused, goaway) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the sidecar closed the abusive connection")
        .expect("reader");
    eprintln!(
        "header-only streams: sent {sent}, refused {refused}, goaway {goaway}; rss {:.1} -> {:.1} MiB; \
         honest {ok}/5 (slowest {slowest:?})",
        mib(base.rss_kib),
        mib(during.rss_kib),
    );
    assert!(refused > 0 && goaway, "the stream limit was not enforced");
    assert!(
        during.rss_kib < base.rss_kib + 32 * 1024,
        "header-only streams grew RSS: {base:?} → {during:?}"
    );
    assert_eq!(ok, 5, "honest calls failed: {err:?}");
}

fn spiffe_request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    r
}

/// Issue item 3, bundles: 20,000 FetchJWTBundles streams opened and
/// cancelled, with no trust change in between, leave RSS where it was
/// (each used to keep a task until the next change: ~60 MB per 20,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_bundle_streams_free_everything() {
    let root = tmp();
    let s = Sidecar::start(root.path(), "ledger", "");
    let pid = s.pid();
    let channel = tokend::connect(&s.socket).await.expect("connect");
    let client = spb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let batch = |n: usize| {
        let client = client.clone();
        async move {
            let mut open = Vec::new();
            for _ in 0..n {
                let mut c = client.clone();
                let mut stream = c
                    .fetch_jwt_bundles(spiffe_request(spb::JwtBundlesRequest {}))
                    .await
                    .expect("bundles")
                    .into_inner();
                let first = stream.next().await.expect("a first bundle").expect("ok");
                assert!(!first.bundles.is_empty());
                open.push(stream);
            }
            // Dropping a response stream cancels it (RST_STREAM CANCEL).
        }
    };
    for _ in 0..50 {
        batch(8).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = Probe::of(pid);
    let t = Instant::now();
    for _ in 0..2500 {
        batch(8).await;
    }
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = Probe::of(pid);
    eprintln!(
        "20,000 cancelled bundle streams in {took:?}: rss {:.1} -> {:.1} MiB, threads {} -> {}",
        mib(base.rss_kib),
        mib(after.rss_kib),
        base.threads,
        after.threads,
    );
    assert!(
        after.rss_kib < base.rss_kib + 12 * 1024,
        "cancelled streams held memory: {base:?} → {after:?}"
    );
    honest_round(&s.socket, "ledger")
        .await
        .expect("honest after");
}

/// Issue item 3, WatchKeys: one peer identity may hold
/// `peer_watches_per_caller` watches; cancelling one frees its slot at once
/// (no key change needed), and 2,000 opened-and-cancelled watches leave
/// RSS where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_keys_is_capped_per_peer_and_freed_on_cancel() {
    let root = tmp();
    ca_init(root.path());
    let payments = ca_issue(&root.path().join("ca"), root.path(), "payments");
    let ca_pem = std::fs::read(root.path().join("ca/ca.pem")).expect("ca");
    let s = Sidecar::start_peer(
        root.path(),
        "ledger",
        &[],
        "[limits]\npeer_watches_per_caller = 3",
    );
    let (pid, addr) = (s.pid(), s.peer_addr());
    let client = peer_client(addr, &ca_pem, identity_in(&payments))
        .await
        .expect("peer client");
    let watch = |mut c: pb::peer_service_client::PeerServiceClient<_>| async move {
        let mut stream = c.watch_keys(pb::GetKeysRequest {}).await?.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| tonic::Status::aborted("ended"))??;
        assert!(first.jwks_json.contains("\"keys\""));
        Ok::<_, tonic::Status>(stream)
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(watch(client.clone()).await.expect("within the cap"));
    }
    let refused = watch(client.clone())
        .await
        .expect_err("a fourth is refused");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    drop(open.pop());
    let freed = eventually(10, || {
        let c = client.clone();
        async move {
            match watch(c).await {
                Ok(stream) => {
                    drop(stream);
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(freed, "a cancelled watch kept its slot");
    drop(open);

    let base = Probe::of(pid);
    let mut opened = 0;
    for _ in 0..2000 {
        // The server learns of each cancel asynchronously: retry a refused one.
        for _ in 0..100 {
            if watch(client.clone()).await.is_ok() {
                opened += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = Probe::of(pid);
    eprintln!(
        "2,000 cancelled watches ({opened} opened): rss {:.1} -> {:.1} MiB",
        mib(base.rss_kib),
        mib(after.rss_kib)
    );
    assert_eq!(opened, 2000);
    assert!(
        after.rss_kib < base.rss_kib + 8 * 1024,
        "cancelled watches held memory: {base:?} → {after:?}"
    );
}

/// `idle_timeout`: a connection with no call in flight is closed (its fd
/// released), a connection with a stream open is kept, and a tonic client
/// holding the closed channel reconnects on its next call without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_clients_reconnect() {
    let root = tmp();
    let s = Sidecar::start(root.path(), "ledger", "[limits]\nidle_timeout = \"1s\"");
    let pid = s.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = Probe::of(pid).fds;
    let mut tokens = s.tokens().await;
    let channel = tokend::connect(&s.socket).await.expect("connect");
    let mut spiffe = spb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut bundles = spiffe
        .fetch_jwt_bundles(spiffe_request(spb::JwtBundlesRequest {}))
        .await
        .expect("bundles")
        .into_inner();
    bundles.next().await.expect("first").expect("ok");
    let mint = |t: &mut pb::token_service_client::TokenServiceClient<_>| {
        let mut t = t.clone();
        async move {
            t.mint(pb::MintRequest {
                audience: "ledger".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }
    };
    mint(&mut tokens).await.expect("first call");
    let open = Probe::of(pid).fds;
    assert!(open >= base + 2, "two connections open: {base} → {open}");
    let closed = eventually(10, || async { Probe::of(pid).fds < open }).await;
    assert!(closed, "the idle connection was not closed");
    mint(&mut tokens)
        .await
        .expect("the client reconnects transparently");
    let streamed = tokio::time::timeout(Duration::from_millis(100), bundles.next()).await;
    assert!(streamed.is_err(), "the bundle stream ended: {streamed:?}");
}
