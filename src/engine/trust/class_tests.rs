//! The two key classes at a verifier: a peer's bound-token keys are kept
//! apart from its signing keys, and `verify_at` accepts a key only for the
//! tokens of its class (bound keys for `cnf` tokens; signing keys for
//! bearer tokens, and for the legacy `<kid>.dpop` form of an earlier
//! release), whatever another instance of the issuer lists.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::engine::{Unverified, VerifyPolicy, verify_at};
use crate::keys::{KeyClass, Lifecycle, SigningKey};
use crate::reason::Reason;

const PAYMENTS: &str = "spiffe://td/payments";
const LEDGER: &str = "spiffe://td/ledger";
const NOW: i64 = 1_800_000_000;

fn t(s: i64) -> UnixTime {
    UnixTime::from_secs(s)
}

fn rsa() -> SigningKey {
    SigningKey::from_pkcs8(&crate::keys::generate_pkcs8(2048).expect("keygen")).expect("key")
}

fn instance(
    name: &str,
    keys: &[&SigningKey],
    bound: &[&SigningKey],
    revoked: &[&str],
) -> TrustUpdate {
    TrustUpdate::Instance {
        issuer: PAYMENTS.into(),
        instance: name.into(),
        source: format!("peer:{name}"),
        keys: keys.iter().map(|k| k.public().clone()).collect(),
        bound: bound.iter().map(|k| k.public().clone()).collect(),
        revoked: revoked.iter().map(|k| (*k).to_owned()).collect(),
        expires: HashMap::new(),
        at: t(NOW),
    }
}

fn trusting(updates: Vec<TrustUpdate>) -> TrustSet {
    let (mut set, r) = TrustSet::default().apply(TrustUpdate::Register {
        issuer: PAYMENTS.into(),
        source: "test".into(),
    });
    r.expect("register");
    for u in updates {
        let (next, r) = set.apply(u);
        r.expect("update");
        set = next;
    }
    set
}

fn token(key: &SigningKey, kid: &str, cnf: bool) -> String {
    signed(key, kid, PAYMENTS, cnf)
}

/// A bound token of issuer `iss`, signed by `key` under `kid`.
fn token_as(key: &SigningKey, kid: &str, iss: &str) -> String {
    signed(key, kid, iss, true)
}

fn signed(key: &SigningKey, kid: &str, iss: &str, cnf: bool) -> String {
    let mut claims = json!({"iss": iss, "sub": iss, "aud": LEDGER,
        "iat": NOW, "nbf": NOW, "exp": NOW + 60, "jti": format!("j-{kid}-{cnf}")});
    if cnf {
        claims["cnf"] = json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"});
    }
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, key.encoding_key()).expect("sign")
}

fn check(peers: &TrustSet, token: &str) -> Result<crate::engine::Verified, Unverified> {
    let lc = Lifecycle {
        interval: Duration::from_secs(3600),
        publish_ahead: Duration::from_secs(60),
        grace: Duration::from_secs(600),
    };
    let (own, own_bound) = (KeySet::empty(lc), KeySet::empty(lc));
    let anchors = Anchors {
        own_id: LEDGER,
        own: &own,
        own_bound: &own_bound,
        peers,
    };
    let policy = VerifyPolicy {
        max_ttl: Duration::from_secs(3600),
        clock_skew: Duration::from_secs(30),
    };
    verify_at(token, LEDGER, t(NOW), &policy, &anchors)
}

#[track_caller]
fn refused(r: Result<crate::engine::Verified, Unverified>, reason: Reason, says: &str) {
    let e = match r {
        Ok(v) => panic!("verified: {v:?}"),
        Err(Unverified::Refused(e)) => e,
        Err(Unverified::NeedKeys { refusal, .. }) => panic!("needs keys: {refusal}"),
    };
    assert_eq!(e.reason, reason, "{e}");
    assert!(e.detail.contains(says), "{e}");
}

/// Each class is found only as itself; every mix of key and `cnf` gets its
/// reason; the legacy form verifies; an unknown bound kid asks for a
/// refresh; a revoked bound kid is `revoked_key`; a bound key another
/// instance lists as a signing key still vouches for no bearer token, and
/// one issuer's bound key for no other issuer's token.
#[test]
fn each_key_verifies_only_its_class() {
    let (signing, bound) = (rsa(), rsa());
    let peers = trusting(vec![instance("a", &[&signing], &[&bound], &[])]);
    let now = t(NOW);
    assert!(matches!(
        peers.lookup(PAYMENTS, signing.kid(), now),
        Lookup::Found(_)
    ));
    assert!(matches!(
        peers.lookup(PAYMENTS, bound.kid(), now),
        Lookup::UnknownKid
    ));
    assert!(matches!(
        peers.lookup_in(PAYMENTS, bound.kid(), now, KeyClass::Bound),
        Lookup::Found(_)
    ));
    assert!(matches!(
        peers.lookup_in(PAYMENTS, signing.kid(), now, KeyClass::Bound),
        Lookup::UnknownKid
    ));
    let held = peers.issuer(PAYMENTS).expect("issuer");
    assert_eq!(held.keys().len(), 1, "the bound key is not in the union");
    assert_eq!(held.usable_bound_keys(now)[0].kid(), bound.kid());

    let v = check(&peers, &token(&signing, signing.kid(), false)).expect("bearer");
    assert_eq!(v.keys[0].class, KeyClass::Signing);
    let dpop = |k: &SigningKey| format!("{}.dpop", k.kid());
    let v = check(&peers, &token(&bound, &dpop(&bound), true)).expect("bound");
    assert_eq!(
        (v.keys[0].class, v.keys[0].kid.as_str()),
        (KeyClass::Bound, bound.kid()),
        "the bare kid, as bans and origins name it"
    );
    let v = check(&peers, &token(&signing, &dpop(&signing), true)).expect("legacy form");
    assert_eq!(v.keys[0].class, KeyClass::Signing);

    refused(
        check(&peers, &token(&bound, bound.kid(), false)),
        Reason::Malformed,
        "signs bound tokens only",
    );
    refused(
        check(&peers, &token(&bound, &dpop(&bound), false)),
        Reason::Malformed,
        "no cnf.jkt",
    );
    refused(
        check(&peers, &token(&signing, signing.kid(), true)),
        Reason::Malformed,
        "bearer signing key",
    );
    // The signature decides too: a cnf token under the bound kid signed by
    // the signing key fails the bound key's check.
    let swapped = check(&peers, &token(&signing, &dpop(&bound), true));
    assert!(
        matches!(&swapped, Err(Unverified::NeedKeys { refusal, .. }) if refusal.reason == Reason::BadSignature),
        "{swapped:?}"
    );
    let stranger = rsa();
    let unknown = check(&peers, &token(&stranger, &dpop(&stranger), true));
    assert!(
        matches!(&unknown, Err(Unverified::NeedKeys { refusal, .. }) if refusal.reason == Reason::UnknownKid),
        "an unknown bound kid asks for a refresh: {unknown:?}"
    );

    // Another instance listing the bound key as a signing key does not
    // make it one.
    let mixed = trusting(vec![
        instance("a", &[&signing], &[&bound], &[]),
        instance("b", &[&bound], &[], &[]),
    ]);
    refused(
        check(&mixed, &token(&bound, bound.kid(), false)),
        Reason::Malformed,
        "signs bound tokens only",
    );
    check(&mixed, &token(&bound, &dpop(&bound), true)).expect("still a bound key");

    // Per issuer: payments' bound key vouches for no token of another issuer.
    let (with_cards, r) = peers.apply(TrustUpdate::Register {
        issuer: "spiffe://td/cards".into(),
        source: "test".into(),
    });
    r.expect("register cards");
    let forged = token_as(&bound, &dpop(&bound), "spiffe://td/cards");
    let other = check(&with_cards, &forged);
    assert!(
        matches!(&other, Err(Unverified::NeedKeys { issuer, refusal }) if issuer == "spiffe://td/cards" && refusal.reason == Reason::UnknownKid),
        "{other:?}"
    );

    // Revoked by its instance: refused for the whole identity.
    let revoked = trusting(vec![instance("a", &[&signing], &[&bound], &[bound.kid()])]);
    refused(
        check(&revoked, &token(&bound, &dpop(&bound), true)),
        Reason::RevokedKey,
        "revoked",
    );
}
