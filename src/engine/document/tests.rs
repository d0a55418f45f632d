//! Contract tests of signed key-set documents: a round trip, and every
//! refusal with its typed reason. Certificates are made here with rcgen (a
//! CA of `bank.internal`, a foreign one, leaves with zero, one or two URI
//! SANs), as `tokend ca` makes them.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::*;
use crate::identity::TrustDomain;
use crate::time::UnixTime;

const NOW: i64 = 1_800_000_000;

fn t(s: i64) -> UnixTime {
    UnixTime::from_secs(s)
}

/// A CA of trust domain `td`.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(td: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{td}").try_into().expect("uri"),
    )];
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("ca");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf of `ca` with these URI SANs and `key` (a fresh P-256 key if None).
fn leaf(ca: &Ca, uris: &[&str], key: Option<KeyPair>) -> DocumentKey {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    for u in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*u).try_into().expect("uri")));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = key.unwrap_or_else(|| KeyPair::generate().expect("key"));
    let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
    DocumentKey::from_pkcs8(&key.serialize_der(), &[cert.der().to_vec()]).expect("document key")
}

fn anchors(ca: &Ca) -> DocumentAnchors {
    DocumentAnchors::from_ca_pem(
        TrustDomain::new("bank.internal").expect("td"),
        ca.pem.as_bytes(),
    )
    .expect("anchors")
}

fn rsa_key(kid_seed: u8) -> crate::jose::PublicKey {
    let mut n = vec![0xc5; 256];
    n[255] = kid_seed | 1;
    crate::jose::PublicKey::from_components(&n, &[1, 0, 1], None).expect("key")
}

fn claims(who: &str) -> DocumentClaims {
    let k = rsa_key(3);
    DocumentClaims {
        identity: SpiffeId::parse(&format!("spiffe://bank.internal/{who}")).expect("id"),
        instance: "0123456789abcdef0123456789abcdef".into(),
        seq: 7,
        issued_at: t(NOW),
        expires_at: t(NOW + 300),
        address: Some("https://127.0.0.1:7443".into()),
        revoked: vec!["old-kid".into()],
        key_expires: BTreeMap::from([(k.kid().to_owned(), t(NOW + 3600))]),
        keys: vec![k],
        bound_keys: Vec::new(),
    }
}

fn verify(jws: &str, a: &DocumentAnchors, now: i64) -> Result<VerifiedDocument, DocumentError> {
    verify_document(jws.as_bytes(), a, t(now), &DocumentLimits::default())
}

/// A document signed with a `tokend ca issue`-style certificate (ECDSA
/// P-256 → ES256) verifies, filed under the certificate's identity, with
/// every claim as signed; its keys are usable until exp + skew.
#[test]
fn round_trip() {
    let ca = ca("bank.internal");
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], None);
    assert_eq!(key.alg(), "ES256");
    let c = claims("payments");
    let jws = sign_document(&c, &key).expect("sign");
    let v = verify(&jws, &anchors(&ca), NOW + 10).expect("verifies");
    assert_eq!(
        v.claims.identity.as_str(),
        "spiffe://bank.internal/payments"
    );
    assert_eq!(
        (v.claims.seq, v.claims.instance.as_str()),
        (7, c.instance.as_str())
    );
    assert_eq!(v.claims.keys[0].kid(), c.keys[0].kid());
    assert_eq!(v.claims.revoked, vec!["old-kid".to_owned()]);
    assert_eq!(v.claims.key_expires, c.key_expires);
    assert_eq!(v.claims.address.as_deref(), Some("https://127.0.0.1:7443"));
    assert_eq!(v.usable_until, t(NOW + 300 + 30));
    assert_eq!(&*v.jws, jws.as_str());
    // Not a token: the token layer refuses its typ and x5c.
    assert!(
        crate::jose::parse(&jws)
            .and_then(|p| crate::jose::check_alg(&p))
            .is_err()
    );
}

/// An RSA certificate key signs RS256 documents that verify.
#[test]
fn rsa_certificate_key_signs_rs256() {
    let ca = ca("bank.internal");
    let der = crate::keys::generate_pkcs8(2048).expect("rsa");
    let kp = KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(der),
        &rcgen::PKCS_RSA_SHA256,
    )
    .expect("rsa keypair");
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], Some(kp));
    assert_eq!(key.alg(), "RS256");
    let jws = sign_document(&claims("payments"), &key).expect("sign");
    verify(&jws, &anchors(&ca), NOW).expect("RS256 verifies");
}

/// Garbage, truncated, non-UTF-8 and token-shaped input is `malformed`.
#[test]
fn garbage_and_truncation_are_malformed() {
    let ca = ca("bank.internal");
    let a = anchors(&ca);
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], None);
    let jws = sign_document(&claims("payments"), &key).expect("sign");
    for bad in [
        "garbage".to_owned(),
        String::new(),
        jws[..jws.len() / 3].to_owned(),
        format!("{jws}.extra"),
        "e30.e30.AAAA".to_owned(),
    ] {
        let e = verify(&bad, &a, NOW).expect_err("refused");
        assert_eq!(e.kind(), "malformed", "{bad:?}: {e}");
    }
    let e = verify_document(&[0xff, 0xfe, b'.'], &a, t(NOW), &DocumentLimits::default())
        .expect_err("not utf-8");
    assert!(matches!(e, DocumentError::Malformed(_)), "{e}");
    // A signature cut short (still valid base64url) does not verify.
    let (input, sig) = jws.rsplit_once('.').expect("three parts");
    let sig = B64.decode(sig).expect("b64");
    let cut = format!("{input}.{}", B64.encode(&sig[..sig.len() - 4]));
    assert_eq!(
        verify(&cut, &a, NOW).expect_err("cut"),
        DocumentError::BadSignature
    );
}

/// Over the byte, key or revoked-kid limits: each its own refusal.
#[test]
fn size_limits() {
    let ca = ca("bank.internal");
    let a = anchors(&ca);
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], None);
    let jws = sign_document(&claims("payments"), &key).expect("sign");
    let at = |limits: DocumentLimits| verify_document(jws.as_bytes(), &a, t(NOW), &limits);
    let d = DocumentLimits::default();
    assert_eq!(
        at(DocumentLimits {
            max_bytes: 100,
            ..d
        })
        .expect_err("bytes"),
        DocumentError::TooLarge {
            size: jws.len(),
            max: 100
        }
    );
    assert_eq!(
        at(DocumentLimits { max_keys: 0, ..d }).expect_err("keys"),
        DocumentError::TooManyKeys { count: 1, max: 0 }
    );
    assert_eq!(
        at(DocumentLimits {
            max_revoked: 0,
            ..d
        })
        .expect_err("revoked"),
        DocumentError::TooManyRevoked { count: 1, max: 0 }
    );
    let huge = "x".repeat(MAX_DOCUMENT_BYTES + 1);
    assert_eq!(
        verify(&huge, &a, NOW).expect_err("huge").kind(),
        "too_large"
    );
}

/// A certificate of another CA — even one naming an identity of this trust
/// domain — is a bad chain.
#[test]
fn foreign_ca_is_a_bad_chain() {
    let ours = ca("bank.internal");
    let theirs = ca("bank.internal");
    let key = leaf(&theirs, &["spiffe://bank.internal/payments"], None);
    let jws = sign_document(&claims("payments"), &key).expect("sign");
    let e = verify(&jws, &anchors(&ours), NOW).expect_err("foreign");
    assert!(matches!(e, DocumentError::BadChain(_)), "{e}");
}

/// No URI SAN, two URI SANs, or an identity of another trust domain.
#[test]
fn certificate_identity_rules() {
    let ca = ca("bank.internal");
    let a = anchors(&ca);
    let sign =
        |uris: &[&str]| sign_document(&claims("payments"), &leaf(&ca, uris, None)).expect("sign");
    assert_eq!(
        verify(&sign(&[]), &a, NOW).expect_err("none"),
        DocumentError::SanCount(0)
    );
    assert_eq!(
        verify(
            &sign(&[
                "spiffe://bank.internal/payments",
                "spiffe://bank.internal/ledger"
            ]),
            &a,
            NOW
        )
        .expect_err("two"),
        DocumentError::SanCount(2)
    );
    let e = verify(&sign(&["spiffe://evil.example/payments"]), &a, NOW).expect_err("foreign td");
    assert_eq!(e.kind(), "foreign_identity", "{e}");
    let e = verify(&sign(&["https://bank.internal/payments"]), &a, NOW).expect_err("not spiffe");
    assert_eq!(e.kind(), "foreign_identity", "{e}");
}

/// A changed signature, a changed payload under the old signature, or an
/// alg that does not fit the certificate's key.
#[test]
fn signature_rules() {
    let ca = ca("bank.internal");
    let a = anchors(&ca);
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], None);
    let jws = sign_document(&claims("payments"), &key).expect("sign");
    let parts: Vec<&str> = jws.split('.').collect();
    let mut sig = B64.decode(parts[2]).expect("b64");
    sig[5] ^= 1;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], B64.encode(&sig));
    assert_eq!(
        verify(&flipped, &a, NOW).expect_err("sig"),
        DocumentError::BadSignature
    );
    let mut more = claims("payments");
    more.seq = 8;
    let payload = B64.encode(super::build::payload(&more).to_string());
    let spliced = format!("{}.{payload}.{}", parts[0], parts[2]);
    assert_eq!(
        verify(&spliced, &a, NOW).expect_err("splice"),
        DocumentError::BadSignature
    );
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(parts[0]).expect("b64")).expect("json");
    let mut header = header;
    header["alg"] = "RS256".into();
    let relabelled = format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        parts[1],
        parts[2]
    );
    assert_eq!(
        verify(&relabelled, &a, NOW).expect_err("alg"),
        DocumentError::UnsupportedAlg("RS256".into())
    );
}

/// Expired (exp ≤ now − skew), issued in the future (iat > now + skew),
/// and too long a lifetime, each named.
#[test]
fn time_rules() {
    let ca = ca("bank.internal");
    let a = anchors(&ca);
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], None);
    let jws = sign_document(&claims("payments"), &key).expect("sign");
    verify(&jws, &a, NOW + 300 + 29).expect("within the skew");
    assert_eq!(
        verify(&jws, &a, NOW + 330).expect_err("expired").kind(),
        "expired"
    );
    verify(&jws, &a, NOW - 30).expect("iat within the skew");
    assert_eq!(
        verify(&jws, &a, NOW - 31).expect_err("future"),
        DocumentError::IssuedInFuture {
            iat: t(NOW),
            now: t(NOW - 31),
            skew: 30
        }
    );
    let mut long = claims("payments");
    long.expires_at = t(NOW) + MAX_DOCUMENT_LIFETIME + Duration::from_secs(1);
    let jws = sign_document(&long, &key).expect("sign");
    assert_eq!(
        verify(&jws, &a, NOW).expect_err("long").kind(),
        "lifetime_too_long"
    );
}

/// A document signed by ledger's certificate that claims to be payments'
/// keys is refused: the identity is the certificate's, never the claim.
#[test]
fn document_for_another_identity_is_refused() {
    let ca = ca("bank.internal");
    let ledger = leaf(&ca, &["spiffe://bank.internal/ledger"], None);
    let jws = sign_document(&claims("payments"), &ledger).expect("sign");
    let e = verify(&jws, &anchors(&ca), NOW).expect_err("mismatch");
    assert_eq!(
        e,
        DocumentError::IdentityMismatch {
            claimed: "spiffe://bank.internal/payments".into(),
            certified: SpiffeId::parse("spiffe://bank.internal/ledger").expect("id"),
        }
    );
    assert!(e.to_string().contains("ledger") && e.to_string().contains("payments"));
}

/// The signing key must be the leaf certificate's.
#[test]
fn key_must_match_its_certificate() {
    let ca = ca("bank.internal");
    let mut params = CertificateParams::new(vec!["x".to_owned()]).expect("params");
    params.subject_alt_names.push(SanType::URI(
        "spiffe://bank.internal/x".try_into().expect("uri"),
    ));
    let cert_key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&cert_key, &ca.issuer).expect("leaf");
    let other = KeyPair::generate().expect("key");
    assert_eq!(
        DocumentKey::from_pkcs8(&other.serialize_der(), &[cert.der().to_vec()])
            .expect_err("mismatch"),
        DocumentKeyError::Mismatch
    );
}

/// A key whose kid is not its RFC 7638 thumbprint is refused: no document
/// can carry another key's kid.
#[test]
fn kids_must_be_thumbprints() {
    let ca = ca("bank.internal");
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], None);
    let mut c = claims("payments");
    c.keys = vec![
        crate::jose::PublicKey::from_components(&[0xc7; 256], &[1, 0, 1], Some("chosen".into()))
            .expect("key"),
    ];
    let jws = sign_document(&c, &key).expect("sign");
    let e = verify(&jws, &anchors(&ca), NOW).expect_err("kid");
    assert!(
        matches!(&e, DocumentError::Malformed(m) if m.contains("thumbprint")),
        "{e}"
    );
}

/// `bound_jwks` carries the bound-token keys apart from `jwks`; a document
/// without it (an earlier release) has none; a key in both lists, or a
/// `bound_jwks` that is no JWKS, is refused as `malformed`.
#[test]
fn bound_keys_travel_apart() {
    let ca = ca("bank.internal");
    let key = leaf(&ca, &["spiffe://bank.internal/payments"], None);
    let mut c = claims("payments");
    c.bound_keys = vec![rsa_key(9)];
    let jws = sign_document(&c, &key).expect("sign");
    let v = verify(&jws, &anchors(&ca), NOW + 10).expect("verifies");
    assert_eq!(v.claims.keys.len(), 1);
    assert_eq!(v.claims.keys[0].kid(), c.keys[0].kid());
    assert_eq!(v.claims.bound_keys.len(), 1);
    assert_eq!(v.claims.bound_keys[0].kid(), rsa_key(9).kid());
    let payload = build::payload(&c);
    assert_eq!(payload["jwks"]["keys"].as_array().map(Vec::len), Some(1));

    let old = verify(
        &sign_document(&claims("payments"), &key).expect("sign"),
        &anchors(&ca),
        NOW + 10,
    )
    .expect("verifies");
    assert!(old.claims.bound_keys.is_empty());
    assert!(
        !build::payload(&claims("payments"))
            .as_object()
            .is_some_and(|o| o.contains_key("bound_jwks"))
    );

    c.bound_keys = vec![c.keys[0].clone()];
    let e = verify(
        &sign_document(&c, &key).expect("sign"),
        &anchors(&ca),
        NOW + 10,
    )
    .expect_err("overlap");
    assert_eq!(e.kind(), "malformed");
    assert!(e.to_string().contains("both jwks and bound_jwks"), "{e}");
}
