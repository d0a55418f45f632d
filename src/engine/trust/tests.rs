//! Unit tests of the trust snapshots: limits, staleness, revocations,
//! instances, documents and rollback.

use super::*;

fn key(kid: &str) -> PublicKey {
    PublicKey::from_components(&[0xff; 256], &[1, 0, 1], Some(kid.into())).expect("key")
}

fn replace(issuer: &str, keys: Vec<PublicKey>, hints: &[(&str, i64)]) -> TrustUpdate {
    TrustUpdate::Replace {
        issuer: issuer.into(),
        keys,
        revoked: vec![],
        expires: hints
            .iter()
            .map(|(k, t)| ((*k).to_owned(), UnixTime::from_secs(*t)))
            .collect(),
        at: UnixTime::from_secs(1),
    }
}

/// Updates build new snapshots and leave the old one untouched; a set over
/// the key limit is refused and the previous set stays; while stale, keys
/// past their publisher's hint stop being found; revocations stick.
#[test]
fn snapshots_limits_and_staleness() {
    let t = |s| UnixTime::from_secs(s);
    let (set, r) = TrustSet::default().apply(TrustUpdate::Register {
        issuer: "i".into(),
        source: "test".into(),
    });
    r.expect("register");
    let (set2, r) = set.apply(replace("i", vec![key("k1")], &[("k1", 1000)]));
    r.expect("replace");
    assert!(matches!(set.lookup("i", "k1", t(0)), Lookup::UnknownKid));
    assert!(matches!(set2.lookup("i", "k1", t(2000)), Lookup::Found(_)));
    let (set3, r) = set2.apply(replace("i", vec![key("k1"); MAX_KEYS_PER_ISSUER + 1], &[]));
    assert_eq!(r, Err(SetError::TooManyKeys(MAX_KEYS_PER_ISSUER + 1)));
    assert!(matches!(set3.lookup("i", "k1", t(0)), Lookup::Found(_)));
    assert!(set3.issuers()[0].1.last_error.is_some());
    let (stale, _) = set3.apply(TrustUpdate::Stale {
        issuer: "i".into(),
        stale: true,
    });
    assert!(matches!(stale.lookup("i", "k1", t(999)), Lookup::Found(_)));
    assert!(matches!(
        stale.lookup("i", "k1", t(1001)),
        Lookup::UnknownKid
    ));
    let (rev, _) = stale.apply(TrustUpdate::Replace {
        issuer: "i".into(),
        keys: vec![key("k1")],
        revoked: vec!["k1".into()],
        expires: HashMap::new(),
        at: t(5),
    });
    assert!(matches!(rev.lookup("i", "k1", t(0)), Lookup::Revoked));
    let (again, _) = rev.apply(replace("i", vec![key("k1")], &[]));
    assert!(
        matches!(again.lookup("i", "k1", t(0)), Lookup::Revoked),
        "a revocation is remembered when a later set omits it"
    );
    assert!(matches!(
        again.lookup("j", "k1", t(0)),
        Lookup::UnknownIssuer
    ));
    let (_, r) = again.apply(replace("j", vec![], &[]));
    assert_eq!(r, Err(SetError::UnknownIssuer("j".into())));
}

mod instances {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::engine::document::{DocumentClaims, VerifiedDocument};
    use crate::identity::SpiffeId;

    const ISS: &str = "spiffe://td/payments";

    fn t(s: i64) -> UnixTime {
        UnixTime::from_secs(s)
    }

    fn k(seed: u8) -> PublicKey {
        let mut n = vec![0xd1; 256];
        n[255] = seed | 1;
        PublicKey::from_components(&n, &[1, 0, 1], None).expect("key")
    }

    /// A verified document of instance `inst`, as `verify_document` returns it.
    fn doc(
        inst: &str,
        seq: u64,
        keys: &[&PublicKey],
        revoked: &[&str],
        iat: i64,
        exp: i64,
    ) -> TrustUpdate {
        doc_with_hints(inst, seq, keys, revoked, iat, exp, &[])
    }

    fn doc_with_hints(
        inst: &str,
        seq: u64,
        keys: &[&PublicKey],
        revoked: &[&str],
        iat: i64,
        exp: i64,
        hints: &[(&PublicKey, i64)],
    ) -> TrustUpdate {
        TrustUpdate::Document {
            document: Arc::new(VerifiedDocument {
                claims: DocumentClaims {
                    identity: SpiffeId::parse(ISS).expect("id"),
                    instance: inst.into(),
                    seq,
                    issued_at: t(iat),
                    expires_at: t(exp),
                    address: None,
                    keys: keys.iter().map(|k| (*k).clone()).collect(),
                    bound_keys: Vec::new(),
                    revoked: revoked.iter().map(|r| (*r).to_owned()).collect(),
                    key_expires: hints
                        .iter()
                        .map(|(k, s)| (k.kid().to_owned(), t(*s)))
                        .collect::<BTreeMap<_, _>>(),
                },
                usable_until: t(exp),
                jws: Arc::from("test"),
                serial: "0a".into(),
            }),
            source: "test".into(),
            at: t(iat),
        }
    }

    fn registered() -> TrustSet {
        let (set, r) = TrustSet::default().apply(TrustUpdate::Register {
            issuer: ISS.into(),
            source: "test".into(),
        });
        r.expect("register");
        set
    }

    fn apply(set: &TrustSet, u: TrustUpdate) -> TrustSet {
        let (next, r) = set.apply(u);
        r.expect("applied");
        next
    }

    fn found(set: &TrustSet, key: &PublicKey, now: i64) -> bool {
        matches!(set.lookup(ISS, key.kid(), t(now)), Lookup::Found(_))
    }

    /// Two replicas' documents: the issuer accepts the union; each instance
    /// rotates on its own without touching the other's keys.
    #[test]
    fn union_of_instances_and_independent_rotation() {
        let (a1, a2, b1) = (k(1), k(2), k(3));
        let set = apply(&registered(), doc("a", 1, &[&a1], &[], 100, 400));
        let set = apply(&set, doc("b", 1, &[&b1], &[], 100, 400));
        assert!(found(&set, &a1, 150) && found(&set, &b1, 150));
        let set = apply(&set, doc("a", 2, &[&a1, &a2], &[], 110, 410));
        assert!(found(&set, &a1, 150) && found(&set, &a2, 150) && found(&set, &b1, 150));
        let set = apply(&set, doc("a", 3, &[&a2], &[], 120, 420));
        assert!(!found(&set, &a1, 150), "a's retired key left with a's set");
        assert!(found(&set, &b1, 150), "b untouched");
        assert_eq!(set.issuer(ISS).expect("issuer").instances().len(), 2);
    }

    /// A key is usable only while an unexpired document lists it.
    #[test]
    fn document_keys_stop_at_expiry() {
        let a1 = k(1);
        let set = apply(&registered(), doc("a", 1, &[&a1], &[], 100, 400));
        assert!(found(&set, &a1, 400));
        assert!(matches!(
            set.lookup(ISS, a1.kid(), t(401)),
            Lookup::UnknownKid
        ));
        let set = apply(&set, doc("a", 2, &[&a1], &[], 390, 700));
        assert!(found(&set, &a1, 600), "a newer document extends it");
    }

    /// A kid revoked by one instance is refused for the identity, even
    /// while another instance still lists it.
    #[test]
    fn revocation_by_one_instance_is_identity_wide() {
        let (a1, b1) = (k(1), k(3));
        let set = apply(&registered(), doc("a", 1, &[&a1], &[], 100, 400));
        let set = apply(&set, doc("b", 1, &[&b1, &a1], &[], 100, 400));
        let set = apply(&set, doc("a", 2, &[], &[a1.kid()], 110, 410));
        assert!(matches!(set.lookup(ISS, a1.kid(), t(150)), Lookup::Revoked));
        assert!(found(&set, &b1, 150), "b keeps working");
    }

    /// A kid two instances list with different keys (a relay holding the
    /// issuer's certificate planting its own modulus, both plain sets: a
    /// documented key is never shadowed, see
    /// `a_plain_set_cannot_shadow_a_documented_kid`) takes the key of the
    /// latest delivery; a re-delivery of the real instance's set (the
    /// refresh from the issuer's own source) takes it back.
    #[test]
    fn a_conflicting_kid_takes_the_latest_delivery() {
        let mut n = vec![0xd1; 256];
        let real = PublicKey::from_components(&n, &[1, 0, 1], Some("kid".into())).expect("key");
        n[255] = 0x33;
        let planted = PublicKey::from_components(&n, &[1, 0, 1], Some("kid".into())).expect("key");
        let found = |s: &TrustSet| match s.lookup(ISS, "kid", t(150)) {
            Lookup::Found(k) => Some(k.fingerprint()),
            _ => None,
        };
        let plain = |instance: &str, key: &PublicKey| TrustUpdate::Instance {
            issuer: ISS.into(),
            instance: instance.into(),
            source: instance.into(),
            keys: vec![key.clone()],
            bound: Vec::new(),
            revoked: vec![],
            expires: HashMap::new(),
            at: t(100),
        };
        let set = apply(&registered(), plain("peer:real", &real));
        let set = apply(&set, plain("peer:relay", &planted));
        assert_eq!(found(&set), Some(planted.fingerprint()));
        let set = apply(&set, plain("peer:real", &real));
        assert_eq!(found(&set), Some(real.fingerprint()));
    }

    /// Rollback: a lower sequence than one seen from that instance is
    /// refused (the installed set stays), also after the instance left and
    /// was forgotten; an equal one is a harmless re-delivery; another
    /// instance's sequence is its own.
    #[test]
    fn rollback_is_refused_even_after_the_instance_left() {
        let (a1, a2) = (k(1), k(2));
        let set = apply(&registered(), doc("a", 5, &[&a2], &[a1.kid()], 100, 400));
        let (same, r) = set.apply(doc("a", 4, &[&a1], &[], 100, 400));
        assert_eq!(
            r,
            Err(SetError::Rollback {
                issuer: ISS.into(),
                instance: "a".into(),
                seen: 5,
                got: 4
            })
        );
        assert!(matches!(
            same.lookup(ISS, a1.kid(), t(150)),
            Lookup::Revoked
        ));
        assert!(
            same.issuer(ISS)
                .expect("i")
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("rollback"))
        );
        let (_, r) = set.apply(doc("a", 5, &[&a2], &[a1.kid()], 100, 400));
        r.expect("re-delivery");
        let gone = apply(
            &set,
            TrustUpdate::InstanceGone {
                issuer: ISS.into(),
                instance: "a".into(),
                at: t(150),
            },
        );
        let back = apply(&gone, doc("a", 5, &[&a2], &[a1.kid()], 100, 400));
        let (_, inst) = back.issuer(ISS).expect("i").instances()[0];
        assert!(!inst.is_gone(), "the same document put again: in contact");
        // A re-delivery later on counts as the last delivery of the issuer.
        let TrustUpdate::Document { document, .. } = doc("a", 5, &[&a2], &[a1.kid()], 100, 400)
        else {
            unreachable!()
        };
        let again = apply(
            &set,
            TrustUpdate::Document {
                document,
                source: "test".into(),
                at: t(120),
            },
        );
        assert_eq!(again.issuer(ISS).expect("i").updated_at, t(120));
        let set = apply(&set, doc("b", 1, &[&a1], &[], 100, 400));
        let set = apply(
            &set,
            TrustUpdate::InstanceGone {
                issuer: ISS.into(),
                instance: "a".into(),
                at: t(200),
            },
        );
        // Long after a's document expired, a is forgotten, its mark is not.
        let later = apply(&set, doc("b", 2, &[&a1], &[], 9_000, 9_300));
        let issuer = later.issuer(ISS).expect("i");
        assert_eq!(issuer.instances().len(), 1);
        assert_eq!(issuer.high_water("a"), Some(5));
        let (_, r) = later.apply(doc("a", 3, &[&a1], &[], 9_000, 9_300));
        assert!(matches!(
            r,
            Err(SetError::Rollback {
                seen: 5,
                got: 3,
                ..
            })
        ));
    }

    /// A gone instance's keys stay until min(document exp, expiry hint).
    #[test]
    fn gone_instance_keys_stay_until_the_earlier_bound() {
        let (a1, a2) = (k(1), k(2));
        let set = apply(
            &registered(),
            doc_with_hints(
                "a",
                1,
                &[&a1, &a2],
                &[],
                100,
                400,
                &[(&a1, 250), (&a2, 900)],
            ),
        );
        assert!(found(&set, &a1, 300), "hints apply only once gone");
        let set = apply(
            &set,
            TrustUpdate::InstanceGone {
                issuer: ISS.into(),
                instance: "a".into(),
                at: t(200),
            },
        );
        assert!(
            found(&set, &a1, 250) && !found(&set, &a1, 251),
            "hint first"
        );
        assert!(found(&set, &a2, 400) && !found(&set, &a2, 401), "exp first");
        let inst = set.issuer(ISS).expect("i").instances()[0].1.clone();
        assert!(inst.is_gone());
    }

    /// Plain per-instance sets (a peer without documents) and the legacy
    /// per-issuer `Replace` coexist as separate instances; `InstanceStale`
    /// applies hints to one instance only.
    #[test]
    fn plain_instances_and_staleness() {
        let (a1, b1) = (k(1), k(3));
        let plain = |inst: &str, key: &PublicKey, hint: i64| TrustUpdate::Instance {
            issuer: ISS.into(),
            instance: inst.into(),
            source: format!("peer:{inst}"),
            keys: vec![key.clone()],
            bound: Vec::new(),
            revoked: vec![],
            expires: HashMap::from([(key.kid().to_owned(), t(hint))]),
            at: t(100),
        };
        let set = apply(&registered(), plain("x", &a1, 200));
        let set = apply(&set, plain("y", &b1, 200));
        let set = apply(
            &set,
            TrustUpdate::InstanceStale {
                issuer: ISS.into(),
                instance: "x".into(),
                stale: true,
            },
        );
        assert!(!found(&set, &a1, 201) && found(&set, &b1, 201));
    }

    /// Lookups stay one probe with hundreds of instances (a smoke test of
    /// the index: every instance's key is found, an unknown one is not).
    #[test]
    fn many_instances_one_index() {
        let mut set = registered();
        let keys: Vec<PublicKey> = (0..=255u8).map(|i| k(i & 0xfe)).collect();
        for (i, key) in keys.iter().enumerate().take(MAX_INSTANCES_PER_ISSUER) {
            set = apply(&set, doc(&format!("i{i}"), 1, &[key], &[], 100, 400));
        }
        assert!(keys.iter().all(|key| found(&set, key, 150)));
        let (_, r) = set.apply(doc("one-too-many", 1, &[&k(9)], &[], 100, 400));
        assert_eq!(r, Err(SetError::TooManyInstances(MAX_INSTANCES_PER_ISSUER)));
    }
}

/// A plain set that reuses a documented key's kid with other material (a
/// poisoning relay) cannot shadow the documented key, whichever came last.
#[test]
fn a_plain_set_cannot_shadow_a_documented_kid() {
    use std::sync::Arc;

    use crate::engine::document::{DocumentClaims, VerifiedDocument};
    use crate::identity::SpiffeId;

    let t = UnixTime::from_secs;
    let honest = PublicKey::from_components(&[0xd3; 256], &[1, 0, 1], None).expect("key");
    let poison = PublicKey::from_components(&[0xe5; 256], &[1, 0, 1], Some(honest.kid().into()))
        .expect("key");
    let (set, _) = TrustSet::default().apply(TrustUpdate::Register {
        issuer: "spiffe://td/p".into(),
        source: "t".into(),
    });
    let doc = TrustUpdate::Document {
        document: Arc::new(VerifiedDocument {
            claims: DocumentClaims {
                identity: SpiffeId::parse("spiffe://td/p").expect("id"),
                instance: "a".into(),
                seq: 1,
                issued_at: t(100),
                expires_at: t(400),
                address: None,
                keys: vec![honest.clone()],
                bound_keys: Vec::new(),
                revoked: vec![],
                key_expires: Default::default(),
            },
            usable_until: t(400),
            jws: Arc::from("x"),
            serial: "01".into(),
        }),
        source: "t".into(),
        at: t(100),
    };
    let (set, r) = set.apply(doc);
    r.expect("doc");
    let (set, r) = set.apply(TrustUpdate::Instance {
        issuer: "spiffe://td/p".into(),
        instance: "relay".into(),
        source: "t".into(),
        keys: vec![poison],
        bound: Vec::new(),
        revoked: vec![],
        expires: HashMap::new(),
        at: t(200),
    });
    r.expect("plain");
    match set.lookup("spiffe://td/p", honest.kid(), t(250)) {
        Lookup::Found(k) => assert_eq!(k.fingerprint(), honest.fingerprint()),
        other => panic!("{other:?}"),
    }
}
