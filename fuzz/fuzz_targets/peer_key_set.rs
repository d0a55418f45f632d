//! Arbitrary bytes decoded (prost) as the `PeerKeySet` a peer sends, then
//! through exactly the checks a peer client runs (`peer_key_set_update`:
//! size, JWKS parse, key count, key import policy, duplicate kids) and into
//! a trust set: no panic; whatever is installed is within the bounds
//! (≤ 64 keys, each 2048..=8192 bits, distinct kids) and a revoked kid
//! is never installed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tokend::pb::tokend::PeerKeySet;
use tokend::{TrustUpdate, UnixTime};
use tokend_fuzz::{NOW, PEER, fixture};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = PeerKeySet::decode(data) else {
        return;
    };
    let sent_revoked = msg.revoked_kids.clone();
    let sent_expires = msg.key_expires_at.clone();
    let update = match tokend::peer_key_set_update(PEER, msg, NOW) {
        Ok(u) => u,
        Err(e) => {
            assert!(!e.is_empty());
            return;
        }
    };
    let TrustUpdate::Replace {
        issuer,
        keys,
        revoked,
        expires,
        at,
    } = update
    else {
        panic!("a key set became {update:?}");
    };
    assert_eq!(issuer, PEER);
    assert_eq!(at, NOW);
    assert_eq!(revoked, sent_revoked);
    assert_eq!(expires.len(), sent_expires.len());
    for (kid, t) in &sent_expires {
        assert_eq!(expires.get(kid), Some(&UnixTime::from_secs(*t)));
    }
    assert!(keys.len() <= 64, "{} keys accepted", keys.len());
    for (i, k) in keys.iter().enumerate() {
        assert!((2048..=8192).contains(&k.bits()), "{} bits", k.bits());
        assert!(
            keys[..i].iter().all(|o| o.kid() != k.kid()),
            "duplicate kid"
        );
    }
    let kids: Vec<String> = keys.iter().map(|k| k.kid().to_owned()).collect();
    let (set, r) = fixture().trust.apply(TrustUpdate::Replace {
        issuer,
        keys,
        revoked: revoked.clone(),
        expires,
        at,
    });
    if r.is_err() {
        // Refused as a whole (too many revoked kids): the previous keys stay.
        return;
    }
    let (_, entry) = set
        .issuers()
        .into_iter()
        .find(|(i, _)| *i == PEER)
        .expect("peer still registered");
    // Earlier revocations are remembered too (within the bound).
    let now_revoked = entry.revoked();
    assert!(
        revoked.iter().all(|k| now_revoked.contains(k)),
        "revocation lost"
    );
    let installed: Vec<String> = entry.keys().iter().map(|k| k.kid().to_owned()).collect();
    let mut expected: Vec<String> = kids
        .into_iter()
        .filter(|k| !now_revoked.contains(k))
        .collect();
    expected.sort();
    assert_eq!(
        installed, expected,
        "installed kids: every sent key not revoked"
    );
});
