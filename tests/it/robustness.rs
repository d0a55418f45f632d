//! Robustness of the verifier against hostile input, in process: thousands of
//! mutated tokens (bit flips, truncations, splices, re-encoded JSON) never
//! panic, never verify, and always get a reason code.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use std::time::Duration;

use tokend::{
    Clock, Engine, KeyStore, Lifecycle, MintPolicy, MintRequest, SystemClock, TrustSet, TrustView,
    VerifyPolicy,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(token: &str, rng: &mut Rng) -> String {
    let mut b = token.as_bytes().to_vec();
    match rng.below(7) {
        0 => {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        1 => b.truncate(rng.below(b.len())),
        2 => {
            let i = rng.below(b.len());
            b.insert(i, b"A.=-_\x00\xff{"[rng.below(8)]);
        }
        3 => {
            let (i, j) = (rng.below(b.len()), rng.below(b.len()));
            b.swap(i, j);
        }
        4 => {
            // Re-encode the payload with one claim changed: a valid structure, wrong signature.
            let parts: Vec<&str> = token.split('.').collect();
            let mut claims: serde_json::Value =
                serde_json::from_slice(&B64.decode(parts[1]).expect("b64")).expect("json");
            let keys = [
                "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "act", "one_time",
            ];
            let k = keys[rng.below(keys.len())];
            claims[k] = match rng.below(5) {
                0 => serde_json::Value::Null,
                1 => serde_json::json!(i64::MAX),
                2 => serde_json::json!([1, "x", {"a": []}]),
                3 => serde_json::json!({"sub": "spiffe://t/x", "prev_token": "a.b.c"}),
                _ => serde_json::json!("spiffe://t/other"),
            };
            return format!(
                "{}.{}.{}",
                parts[0],
                B64.encode(claims.to_string()),
                parts[2]
            );
        }
        5 => {
            let parts: Vec<&str> = token.split('.').collect();
            let header = [
                "{}",
                "{\"alg\":\"RS256\"}",
                "{\"alg\":\"none\",\"kid\":1}",
                "[]",
                "{\"alg\":\"RS256\",\"kid\":\"\"}",
                "\"x\"",
            ];
            return format!(
                "{}.{}.{}",
                B64.encode(header[rng.below(header.len())]),
                parts[1],
                parts[2]
            );
        }
        _ => {
            let parts: Vec<&str> = token.split('.').collect();
            return format!("{}.{}", parts[0], parts[1..].join(".."));
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// 5,000 mutations of a valid token: no panic, no acceptance, every refusal has a reason.
#[tokio::test]
async fn mutated_tokens_never_verify() {
    let dir = tempfile::tempdir().expect("tmp");
    let lc = Lifecycle {
        interval: Duration::from_secs(86_400),
        publish_ahead: Duration::from_secs(600),
        grace: Duration::from_secs(3_630),
    };
    let (mut store, view) = KeyStore::open(dir.path(), lc, 2048, Arc::new(SystemClock))
        .await
        .expect("keys");
    let now = SystemClock.now();
    store.apply_plan(now).await.expect("first key");
    let id = tokend::SpiffeId::parse("spiffe://t/me").expect("id");
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
    let req = MintRequest {
        audience: vec![id.to_string()],
        ttl: None,
        claims: Default::default(),
        one_time: false,
        bind: false,
    };
    let token = engine.mint(&req).expect("mint").token;
    assert!(
        engine.verify_at(&token, id.as_str(), now).is_ok(),
        "control"
    );

    let seed = now.as_secs() as u64 | 1;
    eprintln!("mutation seed {seed}");
    let mut rng = Rng(seed);
    let mut reasons = std::collections::BTreeMap::new();
    for _ in 0..5_000 {
        let bad = mutate(&token, &mut rng);
        if bad == token {
            continue;
        }
        match engine.verify_at(&bad, id.as_str(), now) {
            Ok(v) => panic!("mutated token verified (seed {seed}): {bad}\n{v:?}"),
            Err(e) => *reasons.entry(e.into_refusal().reason.as_str()).or_insert(0) += 1,
        }
    }
    eprintln!("refusals by reason: {reasons:?}");
    assert!(reasons.len() >= 4, "a spread of reasons: {reasons:?}");
}
