//! Every refusal of `check_proof` and `SeenProofs`, asserting the reason,
//! and the RFC 9449 examples.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

use super::*;
use crate::jose::ProofKey;

const WINDOW: Duration = Duration::from_secs(30);
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJjbmYiOnt9fQ.c2ln";
const URI: &str = "https://ledger.bank.internal/tokend.v1.TokenService/Verify";

fn t(s: i64) -> UnixTime {
    UnixTime::from_secs(s)
}

fn post(uri: &str) -> ProofTarget<'_> {
    ProofTarget {
        method: "POST",
        uri,
    }
}

fn key() -> ProofKey {
    ProofKey::generate().expect("generate").1
}

/// A proof with the given header and claims, signed by `key` (ES256
/// whatever the header says, so only the named check can refuse it).
fn forge(key: &ProofKey, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = key.sign(input.as_bytes()).expect("sign");
    format!("{input}.{sig}")
}

fn good_header(key: &ProofKey) -> Value {
    json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": key.public_jwk()})
}

fn good_claims(now: i64) -> Value {
    json!({"jti": "j-1", "htm": "POST", "htu": URI, "iat": now, "ath": token_hash(TOKEN)})
}

fn refused(proof: &str, jkt: &str, target: ProofTarget<'_>, now: i64) -> Refusal {
    check_proof(proof, TOKEN, jkt, target, t(now), WINDOW).expect_err("refused")
}

fn assert_bad(r: Refusal, says: &str) {
    assert_eq!(r.reason, Reason::BadProof, "{r}");
    assert!(r.detail.contains(says), "{r} should say {says:?}");
}

/// A proof made here passes every check, once; the same proof again is
/// refused as a replay, and the detail says so.
#[test]
fn made_proof_checks_once() {
    let k = key();
    let proof = make_proof(&k, post(URI), TOKEN, None, t(1_000)).expect("proof");
    let ok = check_proof(&proof, TOKEN, k.jkt(), post(URI), t(1_000), WINDOW).expect("ok");
    assert_eq!(ok.jkt, k.jkt());
    assert!(ok.jti.len() >= 16, "jti carries at least 96 bits");
    let seen = SeenProofs::default();
    seen.claim(&ok, false, t(1_000)).expect("first use");
    assert_bad(
        seen.claim(&ok, false, t(1_010)).expect_err("replay"),
        "replayed",
    );
    // A received proof may be exchanged once, besides its verification.
    seen.claim(&ok, true, t(1_010)).expect("one exchange");
    assert_bad(
        seen.claim(&ok, true, t(1_011)).expect_err("replay"),
        "replayed",
    );
    // Once the proof is out of its window, its jti may go: the proof itself
    // is refused as too old by then.
    seen.claim(&ok, false, ok.forget_at + Duration::from_secs(1))
        .expect("forgotten after the window");
    assert_bad(
        refused(&proof, k.jkt(), post(URI), 1_031),
        "older than the 30s window",
    );
}

/// The header of a made proof is exactly `typ`, `alg`, and a public `jwk`.
#[test]
fn made_proof_shape() {
    let k = key();
    let proof = make_proof(&k, post(&format!("{URI}?q=1#f")), TOKEN, None, t(5)).expect("proof");
    let mut it = proof.split('.');
    let header: Value =
        serde_json::from_slice(&B64.decode(it.next().expect("h")).expect("b64")).expect("json");
    let claims: Value =
        serde_json::from_slice(&B64.decode(it.next().expect("p")).expect("b64")).expect("json");
    assert_eq!(header, good_header(&k));
    assert_eq!(claims["htu"], URI, "query and fragment dropped");
    assert_eq!(claims["htm"], "POST");
    assert_eq!(claims["iat"], 5);
    assert_eq!(claims["ath"], token_hash(TOKEN));
}

/// A proof from another key than the token's `cnf.jkt`.
#[test]
fn another_key_refused() {
    let (k, other) = (key(), key());
    let proof = make_proof(&other, post(URI), TOKEN, None, t(1_000)).expect("proof");
    assert_bad(refused(&proof, k.jkt(), post(URI), 1_000), "is not the key");
}

/// A proof for another method or another URI.
#[test]
fn another_request_refused() {
    let k = key();
    let proof = make_proof(&k, post(URI), TOKEN, None, t(1_000)).expect("proof");
    let get = ProofTarget {
        method: "GET",
        uri: URI,
    };
    assert_bad(refused(&proof, k.jkt(), get, 1_000), "method POST");
    let other = "https://ledger.bank.internal/tokend.v1.TokenService/Exchange";
    assert_bad(refused(&proof, k.jkt(), post(other), 1_000), "is for");
    let other_host = "https://cards.bank.internal/tokend.v1.TokenService/Verify";
    assert_bad(refused(&proof, k.jkt(), post(other_host), 1_000), "is for");
    // The same URI with a query, another case of host, or the default port is the same target.
    check_proof(
        &proof,
        TOKEN,
        k.jkt(),
        post("https://LEDGER.bank.internal:443/tokend.v1.TokenService/Verify?x#y"),
        t(1_000),
        WINDOW,
    )
    .expect("normalised htu matches");
}

/// Too old, or too far ahead.
#[test]
fn expired_and_future_proofs_refused() {
    let k = key();
    let proof = make_proof(&k, post(URI), TOKEN, None, t(1_000)).expect("proof");
    check_proof(&proof, TOKEN, k.jkt(), post(URI), t(1_030), WINDOW).expect("edge of window");
    assert_bad(refused(&proof, k.jkt(), post(URI), 1_031), "older than");
    assert_bad(refused(&proof, k.jkt(), post(URI), 969), "ahead");
}

/// `ath` for another token, and no `ath` at all.
#[test]
fn ath_for_another_token_refused() {
    let k = key();
    let proof = make_proof(&k, post(URI), "another.token.here", None, t(1_000)).expect("proof");
    assert_bad(
        refused(&proof, k.jkt(), post(URI), 1_000),
        "hash of another token",
    );
    let mut claims = good_claims(1_000);
    claims.as_object_mut().expect("obj").remove("ath");
    let proof = forge(&k, &good_header(&k), &claims);
    assert_bad(
        refused(&proof, k.jkt(), post(URI), 1_000),
        "claim ath is missing",
    );
}

/// `alg: none` (with or without a signature), HS256 and RS256 are refused
/// before any key is looked at.
#[test]
fn other_algorithms_refused() {
    let k = key();
    for alg in ["none", "HS256", "RS256", "ES384", "EdDSA"] {
        let mut h = good_header(&k);
        h["alg"] = alg.into();
        let proof = forge(&k, &h, &good_claims(1_000));
        assert_bad(refused(&proof, k.jkt(), post(URI), 1_000), "only ES256");
    }
    // The unsigned form of `none`: an empty signature.
    let mut h = good_header(&k);
    h["alg"] = "none".into();
    let unsigned = format!(
        "{}.{}.",
        B64.encode(h.to_string()),
        B64.encode(good_claims(1_000).to_string())
    );
    assert_eq!(
        refused(&unsigned, k.jkt(), post(URI), 1_000).reason,
        Reason::BadProof
    );
    // An HMAC over the input with the public x as the "secret": still refused.
    let mut h = good_header(&k);
    h["alg"] = "HS256".into();
    let input = format!(
        "{}.{}",
        B64.encode(h.to_string()),
        B64.encode(good_claims(1_000).to_string())
    );
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"x"),
        input.as_bytes(),
    );
    let hs = format!("{input}.{}", B64.encode(mac.as_ref()));
    assert_bad(refused(&hs, k.jkt(), post(URI), 1_000), "only ES256");
}

/// A private key (`d`) in the proof's `jwk` is refused even when
/// everything else holds.
#[test]
fn private_key_in_jwk_refused() {
    let k = key();
    let mut h = good_header(&k);
    h["jwk"]["d"] = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I".into();
    let proof = forge(&k, &h, &good_claims(1_000));
    assert_bad(
        refused(&proof, k.jkt(), post(URI), 1_000),
        "private member \"d\"",
    );
}

/// Structure and `typ`: not a JWS, `typ` JWT or absent, no `jwk`, a bad
/// signature, `crit`, missing claims.
#[test]
fn structure_refused() {
    let k = key();
    assert_bad(
        refused("not-a-jws", k.jkt(), post(URI), 1_000),
        "compact JWS",
    );
    for typ in [json!("JWT"), Value::Null] {
        let mut h = good_header(&k);
        if typ.is_null() {
            h.as_object_mut().expect("obj").remove("typ");
        } else {
            h["typ"] = typ;
        }
        let proof = forge(&k, &h, &good_claims(1_000));
        assert_bad(refused(&proof, k.jkt(), post(URI), 1_000), "typ");
    }
    let mut h = good_header(&k);
    h.as_object_mut().expect("obj").remove("jwk");
    let proof = forge(&k, &h, &good_claims(1_000));
    assert_bad(refused(&proof, k.jkt(), post(URI), 1_000), "jwk");
    let mut h = good_header(&k);
    h["crit"] = json!(["exp"]);
    let proof = forge(&k, &h, &good_claims(1_000));
    assert_bad(refused(&proof, k.jkt(), post(URI), 1_000), "crit");
    // A signature by another key under this key's jwk.
    let other = key();
    let proof = forge(&other, &good_header(&k), &good_claims(1_000));
    assert_bad(refused(&proof, k.jkt(), post(URI), 1_000), "signature");
    for claim in ["jti", "htm", "htu", "iat"] {
        let mut c = good_claims(1_000);
        c.as_object_mut().expect("obj").remove(claim);
        let proof = forge(&k, &good_header(&k), &c);
        assert_bad(
            refused(&proof, k.jkt(), post(URI), 1_000),
            &format!("claim {claim}"),
        );
    }
    let mut dup = forge(&k, &good_header(&k), &good_claims(1_000));
    dup.push('.');
    assert_eq!(
        refused(&dup, k.jkt(), post(URI), 1_000).reason,
        Reason::BadProof
    );
}

/// RFC 9449's examples, as published (`tests/vectors/rfc9449_dpop.json`).
fn rfc9449() -> Value {
    serde_json::from_str(include_str!("../../../tests/vectors/rfc9449_dpop.json"))
        .expect("the RFC 9449 vector file is JSON")
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("vector field {key} is a string"))
}

/// RFC 9449's example proofs through the engine's own checks, each at a
/// clock set to its `iat`: the §7.1 resource request proof (Figure 13)
/// verifies for its token, method, URI and time, and its replay is refused;
/// one second past the window it is too old. The token request proofs of
/// §4.1 (Figure 2) and §5 (Figure 7) carry no `ath` (they go to a token
/// endpoint, with no access token yet): their signatures verify under the
/// embedded key (the checks pass up to `ath`), and they are refused as
/// proofs for an access token, which is what tokend verifies them for.
#[test]
fn rfc9449_example_proofs() {
    let v = rfc9449();
    let jkt = text(&v, "proof_jwk_thumbprint");
    let proofs = v["proofs"].as_array().expect("proofs");
    assert_eq!(proofs.len(), 3);
    for p in proofs {
        let target = ProofTarget {
            method: text(p, "method"),
            uri: text(p, "uri"),
        };
        let iat = p["iat"].as_i64().expect("iat");
        let proof = text(p, "proof");
        match p["access_token"].as_str() {
            Some(token) => {
                let ok = check_proof(proof, token, jkt, target, t(iat), WINDOW)
                    .unwrap_or_else(|r| panic!("{}: {r}", text(p, "where")));
                assert_eq!(ok.jkt, jkt);
                assert_eq!(ok.nonce, None);
                let seen = SeenProofs::default();
                seen.claim(&ok, false, t(iat)).expect("first use");
                assert_bad(
                    seen.claim(&ok, false, t(iat)).expect_err("replay"),
                    "already used",
                );
                let late = check_proof(proof, token, jkt, target, t(iat + 31), WINDOW);
                assert_bad(late.expect_err("too old"), "older than");
                let other = check_proof(proof, "another token", jkt, target, t(iat), WINDOW);
                assert_bad(other.expect_err("another token"), "ath");
            }
            None => {
                // Every check before `ath` holds (signature, key, htm, htu,
                // iat): the refusal is for the missing `ath` alone.
                let r = check_proof(proof, "any token", jkt, target, t(iat), WINDOW)
                    .expect_err("no ath");
                assert_bad(r, "claim ath is missing");
                let mut broken = proof.to_owned().into_bytes();
                let at = broken.len() - 10;
                broken[at] = if broken[at] == b'A' { b'B' } else { b'A' };
                let broken = String::from_utf8(broken).expect("ascii");
                let r = check_proof(&broken, "any token", jkt, target, t(iat), WINDOW)
                    .expect_err("bad signature");
                assert_bad(r, "signature does not verify");
            }
        }
    }
}

/// RFC 9449 §7.1's `ath` example; §6.1's `jkt` of the example proof key
/// (RFC 7638 thumbprint), which the §6.1 example token (Figure 8, signed by
/// an authorization server key the RFC does not give: illustrative) binds
/// to; RFC 7638 §3.1's RSA example thumbprint (also RFC 9449 Figure 25's
/// `dpop_jkt`); and the nonces of §8 and §8.2 are valid nonce syntax.
#[test]
fn rfc9449_example_values() {
    let v = rfc9449();
    let ath = &v["ath"];
    assert_eq!(token_hash(text(ath, "access_token")), text(ath, "ath"));
    let jwk = v["proof_jwk"].as_object().expect("jwk");
    let key = crate::jose::EcPublicKey::from_jwk(jwk).expect("public P-256 key");
    assert_eq!(key.thumbprint(), text(&v, "proof_jwk_thumbprint"));
    let bound = text(&v["bound_access_token"], "token");
    let claims: Value = serde_json::from_slice(
        &B64.decode(bound.split('.').nth(1).expect("payload"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(
        bound_key(claims.as_object().expect("claims")).expect("cnf"),
        Some(text(&v, "proof_jwk_thumbprint"))
    );
    let rsa = &v["rfc7638"]["jwk"];
    let n = B64.decode(text(rsa, "n")).expect("n");
    let e = B64.decode(text(rsa, "e")).expect("e");
    let rsa = crate::jose::PublicKey::from_components(&n, &e, None).expect("RSA key");
    assert_eq!(rsa.kid(), text(&v["rfc7638"], "thumbprint"));
    for n in v["nonces"]["values"].as_array().expect("nonces") {
        let n = n.as_str().expect("nonce");
        assert!(is_nonce_syntax(n), "{n}");
    }
}

/// `cnf` is read strictly: absent is a bearer token, a `jkt` binds, any
/// other shape is malformed.
#[test]
fn bound_key_reads_cnf() {
    let m = |v: Value| v.as_object().cloned().expect("obj");
    assert_eq!(bound_key(&m(json!({}))).expect("bearer"), None);
    assert_eq!(
        bound_key(&m(json!({"cnf": {"jkt": "abc"}}))).expect("bound"),
        Some("abc")
    );
    for bad in [json!({"cnf": "abc"}), json!({"cnf": {"x5t#S256": "abc"}})] {
        assert_eq!(
            bound_key(&m(bad)).expect_err("bad").reason,
            Reason::Malformed
        );
    }
}

/// Server nonces (RFC 9449 §9): a nonce is accepted by the issuer that made
/// it (or one holding the same secret: nothing is stored per nonce) for
/// the window; another replica's, a forged, a tampered, an expired, a
/// future or a missing nonce is `use_dpop_nonce`, naming which.
#[test]
fn nonces_are_pinned_to_their_replica_and_window() {
    let a = Nonces::with_secret(b"replica a secret");
    let b = Nonces::with_secret(b"replica b secret");
    let nonce = a.issue(t(1_000));
    assert!(is_nonce_syntax(&nonce), "{nonce}");
    assert!(
        nonce.len() >= 32,
        "at least 128 bits of tag besides the time"
    );
    assert_eq!(a.check(Some(&nonce), t(1_000), WINDOW), Ok(()));
    assert_eq!(a.check(Some(&nonce), t(1_030), WINDOW), Ok(()));
    let same = Nonces::with_secret(b"replica a secret");
    assert_eq!(same.check(Some(&nonce), t(1_010), WINDOW), Ok(()));
    let use_nonce = |r: Result<(), Refusal>, says: &str| {
        let r = r.expect_err("refused");
        assert_eq!(r.reason, Reason::UseDpopNonce, "{r}");
        assert!(r.detail.contains(says), "{r} should say {says:?}");
    };
    use_nonce(
        b.check(Some(&nonce), t(1_000), WINDOW),
        "not issued by this verifier",
    );
    use_nonce(a.check(None, t(1_000), WINDOW), "requires a server nonce");
    use_nonce(
        a.check(Some(&nonce), t(1_031), WINDOW),
        "older than the 30s window",
    );
    use_nonce(a.check(Some(&nonce), t(999), WINDOW), "lies ahead");
    for garbage in ["", "abc", "!!!!", "eyJ7S_zG.eyJH0-Z.HX4w-7v"] {
        use_nonce(
            a.check(Some(garbage), t(1_000), WINDOW),
            "not a nonce of this verifier",
        );
    }
    // The issue time is under the MAC: moving it refuses the nonce.
    let mut raw = B64.decode(&nonce).expect("b64");
    raw[7] ^= 1;
    use_nonce(
        a.check(Some(&B64.encode(&raw)), t(1_000), WINDOW),
        "not issued by this verifier",
    );
    let mut raw = B64.decode(&nonce).expect("b64");
    raw[20] ^= 1;
    use_nonce(
        a.check(Some(&B64.encode(&raw)), t(1_000), WINDOW),
        "not issued by this verifier",
    );
}

/// A proof made with a nonce carries it in its `nonce` claim and
/// `check_proof` hands it on; a nonce that is not RFC 9449 syntax is not
/// put in a proof; a `nonce` claim that is not a string is `bad_proof`.
#[test]
fn proof_nonce_claim() {
    let k = key();
    let n = Nonces::with_secret(b"s").issue(t(1_000));
    let proof = make_proof(&k, post(URI), TOKEN, Some(&n), t(1_000)).expect("proof");
    let claims: Value = serde_json::from_slice(
        &B64.decode(proof.split('.').nth(1).expect("payload"))
            .expect("b64"),
    )
    .expect("json");
    assert_eq!(claims["nonce"], json!(n));
    let ok = check_proof(&proof, TOKEN, k.jkt(), post(URI), t(1_000), WINDOW).expect("ok");
    assert_eq!(ok.nonce.as_deref(), Some(n.as_str()));
    let plain = make_proof(&k, post(URI), TOKEN, None, t(1_000)).expect("proof");
    let ok = check_proof(&plain, TOKEN, k.jkt(), post(URI), t(1_000), WINDOW).expect("ok");
    assert_eq!(ok.nonce, None);
    for bad in ["", "a b", "a\"b", "a\\b", "é"] {
        let r = make_proof(&k, post(URI), TOKEN, Some(bad), t(1_000)).expect_err("bad nonce");
        assert_eq!(r.reason, Reason::Malformed, "{bad:?}: {r}");
    }
    assert!(
        is_nonce_syntax("eyJ7S_zG.eyJH0-Z.HX4w-7v"),
        "RFC 9449 Figure 20's nonce"
    );
    let mut claims = good_claims(1_000);
    claims["nonce"] = json!(42);
    let forged = forge(&k, &good_header(&k), &claims);
    assert_bad(
        refused(&forged, k.jkt(), post(URI), 1_000),
        "claim nonce is not a string",
    );
}
