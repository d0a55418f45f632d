//! The verification contract as a table, at a fixed `now`: one row per
//! check, in the documented order, each with its exact reason code (or the
//! "needs keys" outcome that makes the async shell refresh once). Rows that
//! break two rules at once show which check comes first.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

use super::replay::{MemoryReplay, ReplayStore};
use super::trust::{Anchors, TrustSet, TrustUpdate};
use super::verify::{Unverified, VerifyPolicy, verify_at};
use crate::keys::{KeySet, KeyStore, Lifecycle, SigningKey};
use crate::reason::Reason;
use crate::time::{ManualClock, UnixTime};

const NOW: i64 = 1_800_000_000;
const OWN: &str = "spiffe://bank.internal/ledger";
const PEER: &str = "spiffe://bank.internal/payments";
const MIDDLE: &str = "spiffe://bank.internal/cards";
const SKEW: i64 = 30;
const MAX_TTL: i64 = 3_600;

const POLICY: VerifyPolicy = VerifyPolicy {
    max_ttl: Duration::from_secs(MAX_TTL as u64),
    clock_skew: Duration::from_secs(SKEW as u64),
};

/// Signs raw header and payload text (so rows can carry what no encoder would).
fn sign_raw(key: &SigningKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        key.encoding_key(),
        jsonwebtoken::Algorithm::RS256,
    )
    .expect("sign");
    format!("{input}.{sig}")
}

fn sign(key: &SigningKey, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    sign_raw(key, &header.to_string(), &claims.to_string())
}

/// Valid claims from `iss` (also `sub`) to `aud`, issued `age` seconds ago for `ttl`.
fn claims(iss: &str, aud: &str, age: i64, ttl: i64) -> Value {
    let iat = NOW - age;
    json!({"iss": iss, "sub": iss, "aud": aud, "iat": iat, "nbf": iat, "exp": iat + ttl, "jti": format!("j-{iss}-{age}-{ttl}")})
}

fn with(mut v: Value, k: &str, val: Value) -> Value {
    v[k] = val;
    v
}

fn without(mut v: Value, k: &str) -> Value {
    v.as_object_mut().expect("object").remove(k);
    v
}

/// `token` with the last character of its dot-separated part `i` changed in
/// the unused low bits only: the same bytes to a decoder that ignores
/// trailing bits, but not canonical base64url, so not the text that was
/// signed (and for the signature, not the one encoding of its bytes).
fn non_canonical(token: &str, i: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let lax = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::general_purpose::NO_PAD.with_decode_allow_trailing_bits(true),
    );
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let part = &mut parts[i];
    let unused_bits = match part.len() % 4 {
        2 => 4,
        3 => 2,
        _ => panic!("part {i} has no unused bits"),
    };
    let original = B64.decode(&*part).expect("canonical");
    let last = part.pop().expect("non-empty");
    let v = ALPHABET
        .iter()
        .position(|&c| char::from(c) == last)
        .expect("base64url");
    assert_eq!(v & ((1 << unused_bits) - 1), 0, "was canonical");
    part.push(char::from(ALPHABET[v | 1]));
    assert_eq!(lax.decode(&*part).expect("lax"), original, "same bytes");
    parts.join(".")
}

struct World {
    _dir: tempfile::TempDir,
    own: Arc<KeySet>,
    own_bound: KeySet,
    peers: TrustSet,
    own_key: Arc<SigningKey>,
    own_revoked: String,
    peer_key: SigningKey,
    peer_revoked: String,
    middle_key: SigningKey,
    stranger: SigningKey,
}

fn key() -> SigningKey {
    SigningKey::from_pkcs8(&crate::keys::generate_pkcs8(2048).expect("keygen")).expect("key")
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().expect("tmp");
        let clock = ManualClock::at(UnixTime::from_secs(NOW - 100));
        let lc = Lifecycle {
            interval: Duration::from_secs(86_400),
            publish_ahead: Duration::from_secs(60),
            grace: Duration::from_secs(3_630),
        };
        let (mut store, view) = KeyStore::open(dir.path(), lc, 2048, Arc::new(clock.clone()))
            .await
            .expect("open");
        store
            .apply_plan(UnixTime::from_secs(NOW - 100))
            .await
            .expect("first key");
        let first = view
            .current()
            .signing_key(UnixTime::from_secs(NOW - 100))
            .expect("key")
            .kid()
            .to_owned();
        clock.set(UnixTime::from_secs(NOW - 50));
        store.revoke(&first).await.expect("revoke");
        let own = view.current();
        let own_key = own
            .signing_key(UnixTime::from_secs(NOW))
            .expect("successor")
            .clone();
        let (peer_key, revoked, middle_key) = (key(), key(), key());
        let mut peers = TrustSet::default();
        for (issuer, k, rev) in [
            (PEER, &peer_key, vec![revoked.kid().to_owned()]),
            (MIDDLE, &middle_key, vec![]),
        ] {
            let (next, r) = peers.apply(TrustUpdate::Register {
                issuer: issuer.into(),
                source: "test".into(),
            });
            r.expect("register");
            let (next, r) = next.apply(TrustUpdate::Replace {
                issuer: issuer.into(),
                keys: vec![k.public().clone()],
                revoked: rev,
                expires: Default::default(),
                at: UnixTime::from_secs(NOW),
            });
            r.expect("replace");
            peers = next;
        }
        World {
            _dir: dir,
            own_bound: KeySet::empty(own.lifecycle),
            own,
            peers,
            own_key,
            own_revoked: first,
            peer_revoked: revoked.kid().to_owned(),
            peer_key,
            middle_key,
            stranger: key(),
        }
    }

    fn check(&self, token: &str, aud: &str) -> Result<(), Unverified> {
        let anchors = Anchors {
            own_id: OWN,
            own: &self.own,
            own_bound: &self.own_bound,
            peers: &self.peers,
        };
        verify_at(token, aud, UnixTime::from_secs(NOW), &POLICY, &anchors).map(|_| ())
    }

    fn peer(&self, claims: &Value) -> String {
        sign(&self.peer_key, self.peer_key.kid(), claims)
    }

    /// A token from PEER to MIDDLE, exchanged at MIDDLE into one to OWN.
    fn chain(
        &self,
        edit_link: impl Fn(Value) -> Value,
        edit_outer: impl Fn(Value) -> Value,
    ) -> String {
        let p = self.peer(&edit_link(claims(PEER, MIDDLE, 10, 300)));
        let outer = json!({
            "iss": MIDDLE, "sub": PEER, "aud": OWN, "iat": NOW - 5, "nbf": NOW - 5,
            "exp": NOW + 200, "jti": "outer", "act": {"sub": MIDDLE, "prev_token": p},
        });
        sign(&self.middle_key, self.middle_key.kid(), &edit_outer(outer))
    }
}

#[derive(Debug, PartialEq)]
enum Expect {
    Ok,
    Refused(Reason),
    /// A refresh of the peer may cure it; else this reason stands.
    NeedKeys(Reason),
}

fn outcome(r: Result<(), Unverified>) -> Expect {
    match r {
        Ok(()) => Expect::Ok,
        Err(Unverified::Refused(r)) => Expect::Refused(r.reason),
        Err(Unverified::NeedKeys { refusal, .. }) => Expect::NeedKeys(refusal.reason),
    }
}

/// Every check of the verification order, at its boundaries, with its code.
#[tokio::test]
async fn verification_contract_table() {
    use Expect::*;
    use Reason::*;
    let w = World::new().await;
    let good = claims(PEER, OWN, 10, 300);
    let hdr = |h: Value| sign_raw(&w.peer_key, &h.to_string(), &good.to_string());
    let kid = w.peer_key.kid();
    let rows: Vec<(&str, String, &str, Expect)> = vec![
        // 0. the control
        ("valid peer token", w.peer(&good), OWN, Ok),
        (
            "valid own token",
            sign(&w.own_key, w.own_key.kid(), &claims(OWN, OWN, 10, 300)),
            OWN,
            Ok,
        ),
        // 1. structure
        ("two parts", "a.b".into(), OWN, Refused(Malformed)),
        (
            "four parts",
            format!("{}.x", w.peer(&good)),
            OWN,
            Refused(Malformed),
        ),
        (
            "header not base64url",
            format!("*{}", w.peer(&good)),
            OWN,
            Refused(Malformed),
        ),
        (
            "header not JSON",
            sign_raw(&w.peer_key, "nope", &good.to_string()),
            OWN,
            Refused(Malformed),
        ),
        (
            "duplicate header member",
            sign_raw(
                &w.peer_key,
                &format!(r#"{{"alg":"RS256","kid":"{kid}","kid":"{kid}"}}"#),
                &good.to_string(),
            ),
            OWN,
            Refused(Malformed),
        ),
        (
            "payload not an object",
            sign_raw(
                &w.peer_key,
                &json!({"alg":"RS256","kid":kid}).to_string(),
                "[1]",
            ),
            OWN,
            Refused(Malformed),
        ),
        (
            "duplicate claim",
            sign_raw(
                &w.peer_key,
                &json!({"alg":"RS256","kid":kid}).to_string(),
                &format!(r#"{{"iss":"{OWN}","iss":"{PEER}"}}"#),
            ),
            OWN,
            Refused(Malformed),
        ),
        (
            "oversized",
            w.peer(&with(good.clone(), "pad", "x".repeat(9_000).into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "empty signature",
            {
                let t = w.peer(&good);
                format!("{}.", &t[..t.rfind('.').expect("dot")])
            },
            OWN,
            Refused(Malformed),
        ),
        (
            "signature in non-canonical base64url (same bytes)",
            non_canonical(&w.peer(&good), 2),
            OWN,
            Refused(Malformed),
        ),
        (
            "header in non-canonical base64url (same bytes)",
            non_canonical(&w.peer(&good), 0),
            OWN,
            Refused(Malformed),
        ),
        (
            "payload in non-canonical base64url (same bytes)",
            {
                // Trailing blanks are valid JSON; pick a length with unused bits.
                let mut payload = good.to_string();
                while payload.len().is_multiple_of(3) {
                    payload.push(' ');
                }
                let header = json!({"alg": "RS256", "kid": kid}).to_string();
                non_canonical(&sign_raw(&w.peer_key, &header, &payload), 1)
            },
            OWN,
            Refused(Malformed),
        ),
        // 2. algorithm (before issuer: an HS256 token of an unknown issuer is still unsupported_alg)
        (
            "alg HS256",
            hdr(json!({"alg":"HS256","kid":kid})),
            OWN,
            Refused(UnsupportedAlg),
        ),
        (
            "alg none",
            hdr(json!({"alg":"none","kid":kid})),
            OWN,
            Refused(UnsupportedAlg),
        ),
        (
            "crit",
            hdr(json!({"alg":"RS256","kid":kid,"crit":["x"]})),
            OWN,
            Refused(UnsupportedAlg),
        ),
        (
            "embedded jwk",
            hdr(json!({"alg":"RS256","kid":kid,"jwk":{}})),
            OWN,
            Refused(UnsupportedAlg),
        ),
        (
            "remote jku",
            hdr(json!({"alg":"RS256","kid":kid,"jku":"https://x"})),
            OWN,
            Refused(UnsupportedAlg),
        ),
        (
            "typ of another JWS kind",
            hdr(json!({"alg":"RS256","kid":kid,"typ":"dpop+jwt"})),
            OWN,
            Refused(Malformed),
        ),
        (
            "alg before issuer",
            sign_raw(
                &w.stranger,
                &json!({"alg":"HS256","kid":"x"}).to_string(),
                &claims("spiffe://bank.internal/nobody", OWN, 10, 300).to_string(),
            ),
            OWN,
            Refused(UnsupportedAlg),
        ),
        // 3. issuer
        (
            "iss missing",
            w.peer(&without(good.clone(), "iss")),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "iss not a string",
            w.peer(&with(good.clone(), "iss", 7.into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "unknown issuer",
            sign(
                &w.stranger,
                w.stranger.kid(),
                &claims("spiffe://bank.internal/nobody", OWN, 10, 300),
            ),
            OWN,
            Refused(UnknownIssuer),
        ),
        // 4. kid, in that issuer's set only
        (
            "kid missing",
            hdr(json!({"alg":"RS256"})),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "kid unknown to a peer: refresh",
            sign(&w.stranger, w.stranger.kid(), &good),
            OWN,
            NeedKeys(UnknownKid),
        ),
        (
            "kid unknown to ourselves: final",
            sign(&w.stranger, w.stranger.kid(), &claims(OWN, OWN, 10, 300)),
            OWN,
            Refused(UnknownKid),
        ),
        (
            "another issuer's kid",
            sign(&w.middle_key, w.middle_key.kid(), &good),
            OWN,
            NeedKeys(UnknownKid),
        ),
        (
            "peer revoked kid",
            sign(&w.stranger, &w.peer_revoked, &good),
            OWN,
            Refused(RevokedKey),
        ),
        (
            "own revoked kid",
            sign(&w.stranger, &w.own_revoked, &claims(OWN, OWN, 10, 300)),
            OWN,
            Refused(RevokedKey),
        ),
        // 5. signature
        (
            "stranger signs with the peer's kid: refresh",
            sign(&w.stranger, kid, &good),
            OWN,
            NeedKeys(BadSignature),
        ),
        (
            "stranger signs with our kid: final",
            sign(&w.stranger, w.own_key.kid(), &claims(OWN, OWN, 10, 300)),
            OWN,
            Refused(BadSignature),
        ),
        // 6. times, with skew, at the boundaries
        (
            "exp missing",
            w.peer(&without(good.clone(), "exp")),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "exp not a number",
            w.peer(&with(good.clone(), "exp", "soon".into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "expired just past skew",
            w.peer(&claims(PEER, OWN, 300 + SKEW + 1, 300)),
            OWN,
            Refused(Expired),
        ),
        (
            "expired exactly at skew",
            w.peer(&claims(PEER, OWN, 300 + SKEW, 300)),
            OWN,
            Ok,
        ),
        (
            "nbf past skew",
            w.peer(&with(good.clone(), "nbf", (NOW + SKEW + 1).into())),
            OWN,
            Refused(NotYetValid),
        ),
        (
            "nbf at skew",
            w.peer(&with(good.clone(), "nbf", (NOW + SKEW).into())),
            OWN,
            Ok,
        ),
        (
            "iat in the future past skew",
            w.peer(&claims(PEER, OWN, -(SKEW + 1), 300)),
            OWN,
            Refused(NotYetValid),
        ),
        (
            "iat missing",
            w.peer(&without(good.clone(), "iat")),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "expired beats wrong audience",
            w.peer(&claims(PEER, "spiffe://bank.internal/x", 1_000, 300)),
            OWN,
            Refused(Expired),
        ),
        // 7. audience
        (
            "wrong audience",
            w.peer(&good),
            "spiffe://bank.internal/cards",
            Refused(WrongAudience),
        ),
        (
            "aud missing",
            w.peer(&without(good.clone(), "aud")),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "aud list naming us",
            w.peer(&with(good.clone(), "aud", json!(["x", OWN]))),
            OWN,
            Ok,
        ),
        (
            "aud a number",
            w.peer(&with(good.clone(), "aud", 1.into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "wrong audience beats long lifetime",
            w.peer(&claims(PEER, "spiffe://bank.internal/x", 10, MAX_TTL + 1)),
            OWN,
            Refused(WrongAudience),
        ),
        // 8. lifetime
        (
            "lifetime at max_ttl",
            w.peer(&claims(PEER, OWN, 10, MAX_TTL)),
            OWN,
            Ok,
        ),
        (
            "lifetime over max_ttl",
            w.peer(&claims(PEER, OWN, 10, MAX_TTL + 1)),
            OWN,
            Refused(LifetimeTooLong),
        ),
        // 9. required claims and the subject rule
        (
            "sub missing",
            w.peer(&without(good.clone(), "sub")),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "jti missing",
            w.peer(&without(good.clone(), "jti")),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "jti empty",
            w.peer(&with(good.clone(), "jti", "".into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "jti too long",
            w.peer(&with(good.clone(), "jti", "j".repeat(257).into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "sub other than iss without act",
            w.peer(&with(good.clone(), "sub", MIDDLE.into())),
            OWN,
            Refused(Malformed),
        ),
        // 10. delegation links
        ("valid chain", w.chain(|l| l, |o| o), OWN, Ok),
        (
            "act not an object",
            w.chain(|l| l, |o| with(o, "act", "x".into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "act.sub not the issuer",
            w.chain(
                |l| l,
                |mut o| {
                    o["act"]["sub"] = PEER.into();
                    o
                },
            ),
            OWN,
            Refused(Malformed),
        ),
        (
            "link missing",
            w.chain(
                |l| l,
                |mut o| {
                    o["act"] = json!({"sub": MIDDLE});
                    o
                },
            ),
            OWN,
            Refused(MissingClaim),
        ),
        (
            "link not for the actor",
            w.chain(|l| with(l, "aud", OWN.into()), |o| o),
            OWN,
            Refused(WrongAudience),
        ),
        (
            "link of another subject",
            w.chain(|l| l, |o| with(o, "sub", OWN.into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "outlives its link",
            w.chain(|l| l, |o| with(o, "exp", (NOW + 10_000).into())),
            OWN,
            Refused(LifetimeTooLong),
        ),
        (
            "claims added by the actor",
            w.chain(|l| l, |o| with(o, "role", "admin".into())),
            OWN,
            Refused(Malformed),
        ),
        (
            "link signed by a stranger",
            {
                let p = sign(&w.stranger, kid, &claims(PEER, MIDDLE, 10, 300));
                let o = json!({"iss": MIDDLE, "sub": PEER, "aud": OWN, "iat": NOW - 5, "nbf": NOW - 5, "exp": NOW + 200, "jti": "o2", "act": {"sub": MIDDLE, "prev_token": p}});
                sign(&w.middle_key, w.middle_key.kid(), &o)
            },
            OWN,
            NeedKeys(BadSignature),
        ),
    ];
    let mut failures = Vec::new();
    for (name, token, aud, expect) in rows {
        let got = outcome(w.check(&token, aud));
        if got != expect {
            failures.push(format!("{name}: expected {expect:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "contract rows failed:\n{}",
        failures.join("\n")
    );
}

/// Step 11, replay: a one-time token carries its id (and those of its
/// one-time links) out of the pure check; the store accepts each once.
#[tokio::test]
async fn one_time_ids_and_replay() {
    let w = World::new().await;
    let anchors = Anchors {
        own_id: OWN,
        own: &w.own,
        own_bound: &w.own_bound,
        peers: &w.peers,
    };
    let now = UnixTime::from_secs(NOW);
    let once = w.peer(&with(claims(PEER, OWN, 10, 300), "one_time", true.into()));
    let v = verify_at(&once, OWN, now, &POLICY, &anchors).expect("verifies");
    assert_eq!(v.one_time.len(), 1);
    assert_eq!(
        v.one_time[0].forget_at,
        UnixTime::from_secs(NOW - 10 + 300 + SKEW)
    );
    let store = MemoryReplay::default();
    store.claim(&v.one_time, now).await.expect("first use");
    let again = store.claim(&v.one_time, now).await.expect_err("second use");
    assert_eq!(again.reason, Reason::Replayed);
    // A one-time link inside a chain is claimed with the outer token.
    let chain = w.chain(|l| with(l, "one_time", true.into()), |o| o);
    let v = verify_at(&chain, OWN, now, &POLICY, &anchors).expect("chain verifies");
    assert_eq!(v.one_time.len(), 1, "the link's id");
    assert_eq!(v.one_time[0].issuer, PEER);
    let plain = w.peer(&claims(PEER, OWN, 10, 300));
    assert!(
        verify_at(&plain, OWN, now, &POLICY, &anchors)
            .expect("ok")
            .one_time
            .is_empty()
    );
}

/// The verify cache: a hit for the same bytes, audience and keys; a miss for
/// other bytes, an expired token, another audience, a revoked or replaced
/// key; warm across an unrelated key-set update; one-time ids still handed
/// to the caller on a hit (so the replay claim is never skipped).
#[tokio::test]
async fn verify_cache_rules() {
    use super::cache::VerifyCache;
    let w = World::new().await;
    let cache = VerifyCache::new(8);
    let now = UnixTime::from_secs(NOW);
    fn anchors<'a>(w: &'a World, peers: &'a TrustSet) -> Anchors<'a> {
        Anchors {
            own_id: OWN,
            own: &w.own,
            own_bound: &w.own_bound,
            peers,
        }
    }
    let token = w.peer(&claims(PEER, OWN, 10, 300));
    let v = verify_at(&token, OWN, now, &POLICY, &anchors(&w, &w.peers)).expect("verifies");
    cache.put(&token, Arc::new(v), now);
    let hit = |t: &str, aud: &str, at: i64, peers: &TrustSet| {
        cache
            .get(
                t,
                aud,
                UnixTime::from_secs(at),
                &POLICY,
                &anchors(&w, peers),
            )
            .is_some()
    };
    assert!(hit(&token, OWN, NOW, &w.peers), "hit");
    assert!(
        !hit(&format!("{token} "), OWN, NOW, &w.peers),
        "other bytes"
    );
    assert!(!hit(&token, MIDDLE, NOW, &w.peers), "another audience");
    assert!(hit(&token, OWN, NOW, &w.peers), "kept for its own audience");
    // An unrelated issuer's update leaves it warm.
    let (other, r) = w.peers.apply(TrustUpdate::Replace {
        issuer: MIDDLE.into(),
        keys: vec![w.stranger.public().clone()],
        revoked: vec![],
        expires: Default::default(),
        at: now,
    });
    r.expect("unrelated update");
    assert!(
        hit(&token, OWN, NOW, &other),
        "warm after an unrelated update"
    );
    // Its kid revoked: a miss, at once.
    let (revoked, r) = w.peers.apply(TrustUpdate::Replace {
        issuer: PEER.into(),
        keys: vec![w.peer_key.public().clone()],
        revoked: vec![w.peer_key.kid().to_owned()],
        expires: Default::default(),
        at: now,
    });
    r.expect("revocation");
    assert!(!hit(&token, OWN, NOW, &revoked), "revoked key");
    // Re-cache, then its kid now names other material (a poisoned set).
    let v = verify_at(&token, OWN, now, &POLICY, &anchors(&w, &w.peers)).expect("verifies");
    cache.put(&token, Arc::new(v), now);
    let mut swapped = w.stranger.public().to_jwk();
    swapped.kid = Some(w.peer_key.kid().to_owned());
    let (poisoned, r) = w.peers.apply(TrustUpdate::Replace {
        issuer: PEER.into(),
        keys: vec![crate::jose::PublicKey::from_jwk(&swapped).expect("jwk")],
        revoked: vec![],
        expires: Default::default(),
        at: now,
    });
    r.expect("poison");
    assert!(!hit(&token, OWN, NOW, &poisoned), "same kid, other key");
    // Expiry: past exp + skew, a miss, and the entry is gone.
    let v = verify_at(&token, OWN, now, &POLICY, &anchors(&w, &w.peers)).expect("verifies");
    cache.put(&token, Arc::new(v), now);
    assert!(
        hit(&token, OWN, NOW - 10 + 300 + SKEW, &w.peers),
        "at exp + skew"
    );
    assert!(
        !hit(&token, OWN, NOW - 10 + 300 + SKEW + 1, &w.peers),
        "expired"
    );
    assert_eq!(cache.len(), 0, "an expired entry is dropped");
    // One-time: the hit still carries the id to claim.
    let once = w.peer(&with(claims(PEER, OWN, 10, 300), "one_time", true.into()));
    let v = verify_at(&once, OWN, now, &POLICY, &anchors(&w, &w.peers)).expect("verifies");
    cache.put(&once, Arc::new(v), now);
    let cached = cache
        .get(&once, OWN, now, &POLICY, &anchors(&w, &w.peers))
        .expect("hit");
    assert_eq!(cached.one_time.len(), 1, "the caller still claims the jti");
    // A delegated token's hit rests on its link's key too.
    let chain = w.chain(|l| l, |o| o);
    let v = verify_at(&chain, OWN, now, &POLICY, &anchors(&w, &w.peers)).expect("chain");
    assert_eq!(v.keys.len(), 2, "outer and link keys");
    cache.put(&chain, Arc::new(v), now);
    assert!(hit(&chain, OWN, NOW, &w.peers));
    assert!(
        !hit(&chain, OWN, NOW, &revoked),
        "the link's key was revoked"
    );
    // Bounded.
    for i in 0..20 {
        let t = w.peer(&with(
            claims(PEER, OWN, 10, 300),
            "jti",
            format!("b{i}").into(),
        ));
        let v = verify_at(&t, OWN, now, &POLICY, &anchors(&w, &w.peers)).expect("ok");
        cache.put(&t, Arc::new(v), now);
        assert!(cache.len() <= 8);
    }
}
