//! Mint and verify throughput against a raw-ring baseline measured in the same
//! run, reported as ratios (tokend cost ÷ bare RSA cost), so the numbers mean
//! the same on any machine. Run: `cargo bench --bench tokend`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokend::{
    Clock, Engine, KeyStore, Lifecycle, MintPolicy, MintRequest, SpiffeId, SystemClock, TrustSet,
    TrustView, VerifyPolicy,
};

fn time_per_op(mut f: impl FnMut(), min: Duration) -> f64 {
    for _ in 0..20 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < min {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let now = SystemClock.now();
    let lc = Lifecycle {
        interval: Duration::from_secs(86_400),
        publish_ahead: Duration::from_secs(600),
        grace: Duration::from_secs(3_630),
    };
    let (mut store, view) = rt
        .block_on(KeyStore::open(dir.path(), lc, 2048, Arc::new(SystemClock)))
        .expect("keys");
    rt.block_on(store.apply_plan(now)).expect("first key");
    let id = SpiffeId::parse("spiffe://bench/payments").expect("id");
    let engine = Engine::new(
        id.clone(),
        MintPolicy {
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(3_600),
        },
        VerifyPolicy {
            max_ttl: Duration::from_secs(3_600),
            clock_skew: Duration::from_secs(30),
        },
        view,
        TrustView::fixed(TrustSet::default()),
        Arc::new(SystemClock),
    );

    // Baselines: bare ring RSA-2048 PKCS#1 v1.5 SHA-256 sign and verify of a token-sized message.
    let pem_path = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".pk8.pem"))
        .expect("key file");
    let der = pem::parse(std::fs::read(&pem_path).expect("read"))
        .expect("pem")
        .into_contents();
    let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("ring key");
    let rng = ring::rand::SystemRandom::new();
    let msg = vec![b'x'; 400];
    let mut sig = vec![0; pair.public().modulus_len()];
    let ring_sign = time_per_op(
        || {
            pair.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
                .expect("sign")
        },
        Duration::from_secs(2),
    );
    // The provider parses the key on every signature (jsonwebtoken hands it
    // DER each call); this row shows what that parse adds to a bare signature.
    let parse_and_sign = time_per_op(
        || {
            let p = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("parse");
            p.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
                .expect("sign")
        },
        Duration::from_secs(2),
    );
    pair.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
        .expect("sign");
    let comps = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    let ring_verify = time_per_op(
        || {
            ring::signature::RsaPublicKeyComponents {
                n: &comps.n,
                e: &comps.e,
            }
            .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &msg, &sig)
            .expect("verify")
        },
        Duration::from_secs(2),
    );

    let aud = SpiffeId::parse("spiffe://bench/ledger").expect("aud");
    let fresh = MintRequest {
        audience: vec![aud.to_string()],
        ttl: None,
        claims: Default::default(),
        one_time: true,
        bind: false,
    };
    let cached = MintRequest {
        one_time: false,
        audience: vec![id.to_string()],
        ..fresh.clone()
    };
    let mint_fresh = time_per_op(
        || drop(engine.mint(&fresh).expect("mint")),
        Duration::from_secs(2),
    );
    let mint_cached = time_per_op(
        || drop(engine.mint(&cached).expect("mint")),
        Duration::from_secs(1),
    );
    let token = engine.mint(&cached).expect("mint").token;
    let verify_at = time_per_op(
        || drop(engine.verify_at(&token, id.as_str(), now).expect("verify")),
        Duration::from_secs(2),
    );
    let verify = time_per_op(
        || {
            drop(
                rt.block_on(engine.verify(&token, id.as_str()))
                    .expect("verify"),
            )
        },
        Duration::from_secs(2),
    );

    println!("tokend bench (RSA-2048, {} byte token)", token.len());
    println!("{:<34} {:>12} {:>10}", "operation", "µs/op", "ratio");
    let row = |name: &str, ns: f64, base: f64| {
        println!("{name:<34} {:>12.1} {:>9.2}x", ns / 1000.0, ns / base)
    };
    row("baseline: ring sign", ring_sign, ring_sign);
    row(
        "ring parse PKCS#8 + sign (no cache)",
        parse_and_sign,
        ring_sign,
    );
    row("mint (fresh signature)", mint_fresh, ring_sign);
    row("mint (cache hit)", mint_cached, ring_sign);
    row("baseline: ring verify", ring_verify, ring_verify);
    row("verify_at (pure decision)", verify_at, ring_verify);
    row("verify (engine: + metrics, replay)", verify, ring_verify);
}
