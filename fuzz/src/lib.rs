//! The fixture every fuzz target shares: an `Engine` for `OWN` at a fixed
//! `NOW` that trusts exactly one peer issuer, `PEER`, with one fixed key
//! (`keys/test-only/fuzz-peer.pk8.pem`, TEST ONLY), and the invariants every
//! verification outcome must satisfy (`check_outcome`).
//!
//! Built once per process. At start it checks that the committed seed token
//! `corpus/verify_token/seed-valid.jwt` verifies, so a harness whose
//! constants drifted from `make_seeds.py` fails at once instead of fuzzing
//! an engine that refuses everything.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::{Map, Value};
use tokend::{
    Engine, KeyStore, Lifecycle, ManualClock, MintPolicy, PublicKey, Reason, SpiffeId, TrustSet,
    TrustUpdate, TrustView, UnixTime, Unverified, Verified, VerifyPolicy,
};

/// The fixed verification instant (keep in step with `make_seeds.py`).
pub const NOW_SECS: i64 = 1_800_000_000;
/// `NOW_SECS` as a `UnixTime`.
pub const NOW: UnixTime = UnixTime::from_secs(NOW_SECS);
/// The engine's own identity and the default audience.
pub const OWN: &str = "spiffe://bank.internal/ledger";
/// The one trusted peer issuer.
pub const PEER: &str = "spiffe://bank.internal/payments";
/// A kid the peer has revoked.
pub const REVOKED_KID: &str = "revoked-by-payments";
/// Clock skew tolerated by the engine, seconds.
pub const SKEW: i64 = 30;
/// Longest lifetime accepted, seconds.
pub const MAX_TTL: i64 = 3_600;

const KEY_PEM: &[u8] = include_bytes!("../../keys/test-only/fuzz-peer.pk8.pem");
const SEED_VALID: &str = include_str!("../corpus/verify_token/seed-valid.jwt");

/// The shared fixture.
pub struct Fixture {
    /// The engine under test.
    pub engine: Engine,
    /// The trusted peer's public key.
    pub public: PublicKey,
    /// Its kid (RFC 7638 thumbprint).
    pub kid: String,
    /// The trust set the engine reads (`PEER` registered, its one key in).
    pub trust: TrustSet,
    signer: RsaKeyPair,
    rng: ring::rand::SystemRandom,
    /// Signatures by signing input: libFuzzer often mutates only the edits,
    /// and an RSA signature costs more than the rest of a run.
    signatures: Mutex<HashMap<String, String>>,
}

/// The fixture, built on first use.
pub fn fixture() -> &'static Fixture {
    static F: LazyLock<Fixture> = LazyLock::new(build);
    &F
}

fn build() -> Fixture {
    let signing = tokend::parse_pkcs8_pem("fuzz-peer.pk8.pem".as_ref(), KEY_PEM)
        .expect("fixture key keys/test-only/fuzz-peer.pk8.pem");
    let public = signing.public().clone();
    let kid = public.kid().to_owned();
    let der = pem::parse(KEY_PEM).expect("pem").into_contents();
    let signer = RsaKeyPair::from_pkcs8(&der).expect("ring key");

    let (trust, r) = TrustSet::default().apply(TrustUpdate::Register {
        issuer: PEER.into(),
        source: "fuzz".into(),
    });
    r.expect("register");
    let (trust, r) = trust.apply(TrustUpdate::Replace {
        issuer: PEER.into(),
        keys: vec![public.clone()],
        revoked: vec![REVOKED_KID.into()],
        expires: Default::default(),
        at: NOW,
    });
    r.expect("replace");

    // The own key set stays empty (no key generation per process): tokens
    // naming OWN as issuer end at its (empty) key set.
    let clock = Arc::new(ManualClock::at(NOW));
    let lifecycle = Lifecycle {
        interval: Duration::from_secs(86_400),
        publish_ahead: Duration::from_secs(600),
        grace: Duration::from_secs((MAX_TTL + SKEW) as u64),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, keys) = rt
        .block_on(KeyStore::open(dir.path(), lifecycle, 2048, clock.clone()))
        .expect("empty key store");
    // The view keeps the last snapshot; the store and its directory can go.
    drop(store);
    drop(dir);

    let engine = Engine::new(
        SpiffeId::parse(OWN).expect("own id"),
        MintPolicy {
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(MAX_TTL as u64),
        },
        VerifyPolicy {
            max_ttl: Duration::from_secs(MAX_TTL as u64),
            clock_skew: Duration::from_secs(SKEW as u64),
        },
        keys,
        TrustView::fixed(trust.clone()),
        clock,
    );
    let f = Fixture {
        engine,
        public,
        kid,
        trust,
        signer,
        rng: ring::rand::SystemRandom::new(),
        signatures: Mutex::default(),
    };
    let seed = SEED_VALID.trim();
    if let Err(e) = f.engine.verify_at(seed, OWN, NOW) {
        panic!(
            "fixture broken: corpus/verify_token/seed-valid.jwt does not verify ({e:?}); \
             rerun fuzz/make_seeds.py or fix the constants"
        );
    }
    // And a token the harness signs itself.
    let own = f.sign_raw(
        &format!(r#"{{"alg":"RS256","kid":"{}"}}"#, f.kid),
        &format!(
            r#"{{"iss":"{PEER}","sub":"{PEER}","aud":"{OWN}","iat":{i},"exp":{e},"jti":"x"}}"#,
            i = NOW_SECS - 1,
            e = NOW_SECS + 60
        ),
    );
    f.engine
        .verify_at(&own, OWN, NOW)
        .expect("fixture broken: a token the harness signs does not verify");
    f
}

impl Fixture {
    /// Signs raw header and payload text with the trusted key: a compact JWS.
    pub fn sign_raw(&self, header: &str, payload: &str) -> String {
        let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let mut cache = self.signatures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sig) = cache.get(&input) {
            return format!("{input}.{sig}");
        }
        let mut sig = vec![0; self.signer.public().modulus_len()];
        self.signer
            .sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig)
            .expect("sign");
        let sig = B64.encode(sig);
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(input.clone(), sig.clone());
        format!("{input}.{sig}")
    }
}

/// `exp`, `iat`, `nbf` as the verifier reads them: an integer, or a finite
/// number truncated (and saturated) to one.
fn int(v: Option<&Value>) -> Option<i64> {
    let v = v?;
    v.as_i64()
        .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
}

/// The invariants of one verification of `token` for `audience` at `NOW`:
/// - a refusal carries one of `Reason::ALL` (and its wire string parses
///   back to it) and a detail;
/// - "needs keys" is only ever about the one peer, for an unknown kid or a
///   failing signature;
/// - an accepted token is signed by the trusted key (`check_signature`
///   under it passes), names that issuer and kid, and its claims satisfy
///   the documented checks at `NOW` (times with skew, audience, lifetime,
///   jti, the subject rule).
///
/// With `TOKEND_FUZZ_TRACE` set, each outcome is also printed to stderr, to
/// see what a corpus reaches:
/// `TOKEND_FUZZ_TRACE=1 <target> -runs=0 <corpus> 2>&1 | grep '^outcome' | sort | uniq -c`.
pub fn check_outcome(token: &str, audience: &str, r: &Result<Verified, Unverified>) {
    static TRACE: LazyLock<bool> =
        LazyLock::new(|| std::env::var_os("TOKEND_FUZZ_TRACE").is_some());
    if *TRACE {
        match r {
            Ok(v) if v.claims.contains_key("act") => eprintln!("outcome ok (delegated)"),
            Ok(_) => eprintln!("outcome ok"),
            Err(Unverified::Refused(x)) => eprintln!("outcome refused {}", x.reason),
            Err(Unverified::NeedKeys { refusal, .. }) => {
                eprintln!("outcome needs_keys {}", refusal.reason)
            }
        }
    }
    match r {
        Err(Unverified::Refused(refusal)) => check_reason(refusal.reason, &refusal.detail),
        Err(Unverified::NeedKeys { issuer, refusal }) => {
            check_reason(refusal.reason, &refusal.detail);
            assert_eq!(issuer, PEER, "needs keys of an issuer that is not a peer");
            assert!(
                matches!(refusal.reason, Reason::UnknownKid | Reason::BadSignature),
                "needs keys for {:?}",
                refusal.reason
            );
        }
        Ok(v) => check_accepted(token, audience, v),
    }
}

fn check_reason(reason: Reason, detail: &str) {
    assert!(
        Reason::ALL.contains(&reason),
        "reason {reason:?} not in ALL"
    );
    assert_eq!(
        reason.as_str().parse::<Reason>().ok(),
        Some(reason),
        "wire string"
    );
    assert!(!detail.is_empty(), "refusal {reason:?} without a detail");
}

fn check_accepted(token: &str, audience: &str, v: &Verified) {
    let f = fixture();
    if let Err(e) = tokend::check_signature(token, &f.public) {
        panic!("accepted a token the trusted key did not sign: {e}");
    }
    assert_eq!(v.issuer, PEER, "accepted issuer");
    assert_eq!(v.kid, f.kid, "accepted kid");
    let c: &Map<String, Value> = &v.claims;
    assert_eq!(c.get("iss").and_then(Value::as_str), Some(PEER));
    let exp = int(c.get("exp")).expect("accepted without a numeric exp");
    let iat = int(c.get("iat")).expect("accepted without a numeric iat");
    assert!(NOW_SECS <= exp.saturating_add(SKEW), "accepted expired");
    assert!(iat <= NOW_SECS + SKEW, "accepted iat in the future");
    if let Some(nbf) = c.get("nbf") {
        let nbf = int(Some(nbf)).expect("accepted a non-numeric nbf");
        assert!(nbf <= NOW_SECS + SKEW, "accepted before nbf");
    }
    assert!(
        exp.saturating_sub(iat) <= MAX_TTL,
        "accepted too long a lifetime"
    );
    assert_eq!(v.expires_at, UnixTime::from_secs(exp));
    let names = match c.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(l)) => l.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    assert!(names, "accepted for an audience it does not name");
    let jti = c
        .get("jti")
        .and_then(Value::as_str)
        .expect("accepted without jti");
    assert!(
        (1..=256).contains(&jti.len()),
        "accepted jti of {} bytes",
        jti.len()
    );
    let sub = c
        .get("sub")
        .and_then(Value::as_str)
        .expect("accepted without sub");
    assert_eq!(sub, v.subject);
    if !c.contains_key("act") {
        assert_eq!(sub, PEER, "accepted sub != iss without act");
    }
    let one_time = c.get("one_time") == Some(&Value::Bool(true));
    assert!(
        !one_time || v.one_time.iter().any(|o| o.jti == jti),
        "a one-time token without its one-time id"
    );
}
