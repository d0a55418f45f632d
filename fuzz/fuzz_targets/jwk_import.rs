//! JWK import under the policy (RSA, RS256, sig, 2048..=8192 bits, an
//! exponent ring accepts). Input starting with `{` is JWK JSON (serde_json
//! into `tokend::Jwk`); anything else builds a JWK from raw parts (modulus
//! and exponent bytes of fuzz-chosen length, member values from a small
//! vocabulary), which reaches the size and exponent checks far more often.
//! Invariants: no panic; an accepted key has 2048..=8192 bits, keeps a given
//! kid (else gets its thumbprint), and its exported JWK re-imports to the
//! same key; verifying under it never panics, and the fixture's seed token
//! verifies under it only if it is the fixture's key.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use libfuzzer_sys::fuzz_target;
use tokend::{Jwk, PublicKey};
use tokend_fuzz::fixture;

const SEED_VALID: &str = include_str!("../corpus/verify_token/seed-valid.jwt");

#[derive(Arbitrary, Debug)]
enum Member {
    Absent,
    Expected,
    Other(String),
}

impl Member {
    fn get(self, expected: &str) -> Option<String> {
        match self {
            Member::Absent => None,
            Member::Expected => Some(expected.into()),
            Member::Other(s) => Some(s),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Parts {
    kty: Member,
    kid: Member,
    alg: Member,
    use_: Member,
    /// Modulus length in bytes (mod 1100: up to 8800 bits).
    n_len: u16,
    /// The modulus's top byte (its bit size) and a fill byte.
    n_top: u8,
    n_fill: u8,
    leading_zeros: u8,
    e: Vec<u8>,
    /// Encode n and e as base64url, or send raw text.
    n_text: Option<String>,
}

fn from_parts(data: &[u8]) -> Option<Jwk> {
    let p = Parts::arbitrary(&mut Unstructured::new(data)).ok()?;
    let n_len = usize::from(p.n_len % 1100);
    let mut n = vec![0u8; usize::from(p.leading_zeros % 4)];
    if n_len > 0 {
        n.push(p.n_top);
        n.extend(std::iter::repeat_n(p.n_fill, n_len - 1));
    }
    // Let the tail of the input shape the low bytes of the modulus.
    let tail = &data[data.len().saturating_sub(n.len().min(64))..];
    let at = n.len() - tail.len();
    n[at..].copy_from_slice(tail);
    Some(Jwk {
        kty: p.kty.get("RSA").unwrap_or_default(),
        kid: p.kid.get("fuzz-kid"),
        alg: p.alg.get("RS256"),
        use_: p.use_.get("sig"),
        n: p.n_text.unwrap_or_else(|| B64.encode(&n)),
        e: B64.encode(&p.e),
    })
}

fuzz_target!(|data: &[u8]| {
    let jwk = if data.first() == Some(&b'{') {
        match serde_json::from_slice::<Jwk>(data) {
            Ok(j) => j,
            Err(_) => return,
        }
    } else {
        match from_parts(data) {
            Some(j) => j,
            None => return,
        }
    };
    let key = match PublicKey::from_jwk(&jwk) {
        Ok(k) => k,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(
        (2048..=8192).contains(&key.bits()),
        "accepted a {}-bit key",
        key.bits()
    );
    if let Some(kid) = &jwk.kid {
        assert_eq!(key.kid(), kid, "kid not kept");
    }
    let exported = key.to_jwk();
    let again = PublicKey::from_jwk(&exported).expect("an exported JWK re-imports");
    assert_eq!(again.kid(), key.kid());
    assert_eq!(again.bits(), key.bits());
    assert_eq!(again.to_jwk(), exported, "export is stable");
    if jwk.kid.is_none() {
        // No kid given: the RFC 7638 thumbprint, the same for the exported form.
        let bare = Jwk {
            kid: None,
            ..exported.clone()
        };
        assert_eq!(PublicKey::from_jwk(&bare).expect("bare").kid(), key.kid());
    }
    // ring with an arbitrary (odd or even, e > n, ...) modulus: no panic.
    let _ = key.verify(b"a.b", "AAAA");
    let f = fixture();
    let fixture_jwk = f.public.to_jwk();
    let signed_by_it = tokend::check_signature(SEED_VALID.trim(), &key).is_ok();
    let same_key = exported.n == fixture_jwk.n && exported.e == fixture_jwk.e;
    assert!(
        !signed_by_it || same_key,
        "the fixture's token verifies under another key"
    );
});
