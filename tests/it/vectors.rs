//! Published vectors (tests/vectors/, see its README for provenance), used as
//! they are, through tokend's own verification path: `jwk::PublicKey::from_jwk`
//! (the import every peer key goes through) and `PublicKey::verify`
//! (jsonwebtoken with the ring provider), then the full `Verifier`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::Value;
use tokend::{
    Engine, Jwk, KeyStore, Lifecycle, MintPolicy, PublicKey, Reason, SpiffeId, SystemClock,
    TrustSet, TrustUpdate, TrustView, UnixTime, VerifyPolicy, check_signature,
};

fn vector(name: &str) -> Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(&path).expect("vector file")).expect("vector json")
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn jwk(v: &Value) -> Jwk {
    serde_json::from_value(v.clone()).expect("jwk")
}

/// Runs one Wycheproof file; returns (valid, invalid, acceptable) counts.
fn wycheproof(file: &str) -> (usize, usize, usize) {
    let doc = vector(&format!("wycheproof/{file}"));
    assert_eq!(doc["algorithm"], "RSASSA-PKCS1-v1_5");
    let mut counts = (0, 0, 0);
    let mut total = 0;
    for group in doc["testGroups"].as_array().expect("groups") {
        assert_eq!(group["sha"], "SHA-256");
        let key = PublicKey::from_jwk(&jwk(&group["keyJwk"]))
            .unwrap_or_else(|e| panic!("{file}: group key refused by import policy: {e}"));
        assert_eq!(
            key.bits() as u64,
            group["keySize"].as_u64().expect("keySize")
        );
        for t in group["tests"].as_array().expect("tests") {
            total += 1;
            let id = t["tcId"].as_u64().expect("tcId");
            let msg = hex(t["msg"].as_str().expect("msg"));
            let sig = B64.encode(hex(t["sig"].as_str().expect("sig")));
            let ok = key.verify(&msg, &sig);
            match t["result"].as_str().expect("result") {
                "valid" => {
                    assert!(ok, "{file} tcId {id} ({}) must verify", t["comment"]);
                    counts.0 += 1;
                }
                "invalid" => {
                    assert!(!ok, "{file} tcId {id} ({}) must be rejected", t["comment"]);
                    counts.1 += 1;
                }
                // Either verdict conforms (MissingNull encodings); ring rejects them.
                "acceptable" => counts.2 += 1,
                other => panic!("unknown result {other}"),
            }
        }
    }
    assert_eq!(
        total as u64,
        doc["numberOfTests"].as_u64().expect("count"),
        "every test ran"
    );
    counts
}

/// Every Wycheproof RSASSA-PKCS1-v1_5 SHA-256 2048-bit vector gets the file's verdict.
/// The e=3 groups (SmallPublicKey) are accepted by tokend's import policy and run too.
#[test]
fn wycheproof_rsa_2048_sha256() {
    let (valid, invalid, _) = wycheproof("rsa_signature_2048_sha256_test.json");
    assert!(
        valid > 0 && invalid > 100,
        "valid {valid}, invalid {invalid}"
    );
}

/// The same for 3072-bit keys.
#[test]
fn wycheproof_rsa_3072_sha256() {
    let (valid, invalid, _) = wycheproof("rsa_signature_3072_sha256_test.json");
    assert!(valid > 0 && invalid > 100);
}

/// The same for 4096-bit keys.
#[test]
fn wycheproof_rsa_4096_sha256() {
    let (valid, invalid, _) = wycheproof("rsa_signature_4096_sha256_test.json");
    assert!(valid > 0 && invalid > 100);
}

fn rfc(name: &str) -> (Value, PublicKey, String) {
    let v = vector(name);
    assert_eq!(v["expect"], "valid");
    let key = PublicKey::from_jwk(&jwk(&v["jwk_public"])).expect("rfc key imports");
    let token = v["token"].as_str().expect("token").to_owned();
    (v, key, token)
}

fn flip_last_sig_bit(token: &str) -> String {
    let (head, sig) = token.rsplit_once('.').expect("sig");
    let mut bytes = B64.decode(sig).expect("b64");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    format!("{head}.{}", B64.encode(bytes))
}

/// RFC 7515 A.2: the RS256 example verifies against its key at the signature
/// layer, payload bytes (CR LF included) exactly as published; one flipped bit fails.
#[test]
fn rfc7515_a2_signature() {
    let (v, key, token) = rfc("rfc7515_a2.json");
    let parts = check_signature(&token, &key).expect("A.2 verifies");
    let claims = parts.claims.expect("JSON claims");
    assert_eq!(claims["iss"], "joe");
    assert_eq!(claims["exp"], 1300819380);
    let payload_b64 = token.split('.').nth(1).expect("payload");
    assert_eq!(
        B64.decode(payload_b64).expect("b64"),
        v["payload"].as_str().expect("payload").as_bytes()
    );
    let err = check_signature(&flip_last_sig_bit(&token), &key).expect_err("flipped");
    assert_eq!(err.reason, Reason::BadSignature);
}

/// RFC 7520 4.1: verifies at the signature layer (the payload is prose, not JSON).
#[test]
fn rfc7520_4_1_signature() {
    let (v, key, token) = rfc("rfc7520_4_1.json");
    let parts = check_signature(&token, &key).expect("4.1 verifies");
    assert_eq!(
        parts.claims.expect_err("not JSON"),
        v["payload"].as_str().expect("payload").as_bytes()
    );
    assert_eq!(parts.kid.as_deref(), Some("bilbo.baggins@hobbiton.example"));
    assert_eq!(
        check_signature(&flip_last_sig_bit(&token), &key)
            .expect_err("flipped")
            .reason,
        Reason::BadSignature
    );
}

/// An engine for ledger trusting `issuer` with `key` only; its own keys
/// directory is empty (no key is generated: nothing here mints).
async fn verifier_trusting(issuer: &str, key: PublicKey) -> (Engine, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let lc = Lifecycle {
        interval: Duration::from_secs(86_400),
        publish_ahead: Duration::from_secs(600),
        grace: Duration::from_secs(3_630),
    };
    let (_store, keys) = KeyStore::open(dir.path(), lc, 2048, Arc::new(SystemClock))
        .await
        .expect("keys");
    let (set, r) = TrustSet::default().apply(TrustUpdate::Register {
        issuer: issuer.into(),
        source: "test".into(),
    });
    r.expect("register");
    let (set, r) = set.apply(TrustUpdate::Replace {
        issuer: issuer.into(),
        keys: vec![key],
        revoked: vec![],
        expires: Default::default(),
        at: UnixTime::EPOCH,
    });
    r.expect("install");
    let own = SpiffeId::parse("spiffe://bank.internal/ledger").expect("id");
    let engine = Engine::new(
        own,
        MintPolicy {
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(3_600),
        },
        VerifyPolicy {
            max_ttl: Duration::from_secs(3_600),
            clock_skew: Duration::from_secs(30),
        },
        keys,
        TrustView::fixed(set),
        Arc::new(SystemClock),
    );
    (engine, dir)
}

fn refused(engine: &Engine, token: &str, aud: &SpiffeId, now: UnixTime) -> Reason {
    engine
        .verify_at(token, aud.as_str(), now)
        .expect_err("refused")
        .into_refusal()
        .reason
}

/// The full verifier refuses both RFC tokens with the reason its check order
/// gives first, at a fixed clock before A.2's exp and at today's time.
#[tokio::test]
async fn rfc_tokens_through_full_verifier() {
    let aud = SpiffeId::parse("spiffe://bank.internal/ledger").expect("id");
    let (_, key, token) = rfc("rfc7515_a2.json");
    let before_exp = UnixTime::from_secs(1300819380 - 60);
    // "joe" trusted with the A.2 key: the header has no kid, which tokend requires.
    let (v, _d) = verifier_trusting("joe", key.clone()).await;
    assert_eq!(refused(&v, &token, &aud, before_exp), Reason::MissingClaim);
    // Not trusted at all: unknown issuer, before any key is consulted.
    let (v, _d) = verifier_trusting("spiffe://bank.internal/payments", key).await;
    let today = tokend::Clock::now(&SystemClock);
    assert_eq!(refused(&v, &token, &aud, today), Reason::UnknownIssuer);

    let (_, key, token) = rfc("rfc7520_4_1.json");
    let (v, _d) = verifier_trusting("spiffe://bank.internal/payments", key).await;
    assert_eq!(refused(&v, &token, &aud, before_exp), Reason::Malformed);
}
