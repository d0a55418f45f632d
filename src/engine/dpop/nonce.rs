//! Server-provided nonces (RFC 9449 §8–9), so a proof is usable once in a
//! whole service, not once per verifier replica. Each replica (each
//! process) keeps a random secret of its own, never written anywhere; a
//! nonce is `base64url(issued_at || HMAC-SHA256(secret, issued_at)[..16])`:
//! stateless (nothing is stored per nonce), accepted only by the replica
//! that issued it, for the proof window after it was issued. A proof
//! replayed to another replica carries a nonce that replica never issued,
//! and is refused `use_dpop_nonce` there; at the issuing replica its `jti`
//! is already in the seen-proof cache (`bad_proof`).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// Bytes of the HMAC tag a nonce carries (128 bits).
const TAG_LEN: usize = 16;
/// Bytes of a decoded nonce: the big-endian issue time and the tag.
const NONCE_LEN: usize = 8 + TAG_LEN;
/// Domain separation of the MAC input, so the secret signs nothing else.
const CONTEXT: &[u8] = b"tokend dpop nonce v1\0";

/// This replica's nonce issuer and checker: a per-process random key.
pub(crate) struct Nonces {
    key: hmac::Key,
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nonces(..)")
    }
}

// === impl Nonces ===

impl Nonces {
    /// A fresh issuer with a random 256-bit secret that lives only in this
    /// process: a restart (or another replica) accepts none of its nonces.
    pub(crate) fn random() -> Result<Self, Refusal> {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| Refusal::new(Reason::Unavailable, "no randomness for the nonce secret"))?;
        Ok(Self::with_secret(&secret))
    }

    /// An issuer over a known secret (tests: two issuers with one secret
    /// accept each other's nonces).
    pub(crate) fn with_secret(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn tag(&self, issued: i64) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(CONTEXT);
        ctx.update(&issued.to_be_bytes());
        let full = ctx.sign();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        tag
    }

    /// A nonce issued at `now`, for the client's next proof.
    pub(crate) fn issue(&self, now: UnixTime) -> String {
        let issued = now.as_secs();
        let mut raw = [0u8; NONCE_LEN];
        raw[..8].copy_from_slice(&issued.to_be_bytes());
        raw[8..].copy_from_slice(&self.tag(issued));
        B64.encode(raw)
    }

    /// Checks a proof's `nonce` claim at `now`: one this replica issued at
    /// most `window` ago. Any other (none, forged, another replica's, too
    /// old) is `use_dpop_nonce`, naming which.
    pub(crate) fn check(
        &self,
        nonce: Option<&str>,
        now: UnixTime,
        window: Duration,
    ) -> Result<(), Refusal> {
        let refuse = |detail: String| Err(Refusal::new(Reason::UseDpopNonce, detail));
        let Some(nonce) = nonce else {
            return refuse(
                "this verifier requires a server nonce in the proof (RFC 9449 §9): \
                 prove again with the nonce of the dpop-nonce it answered"
                    .into(),
            );
        };
        let raw = match B64.decode(nonce) {
            Ok(raw) if raw.len() == NONCE_LEN => raw,
            _ => {
                return refuse(format!(
                    "proof nonce {:?} is not a nonce of this verifier",
                    shorten(nonce)
                ));
            }
        };
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&raw[..8]);
        let issued = i64::from_be_bytes(issued);
        if !equal(&raw[8..], &self.tag(issued)) {
            return refuse(format!(
                "proof nonce {:?} was not issued by this verifier replica \
                 (another replica's, or forged)",
                shorten(nonce)
            ));
        }
        let issued = UnixTime::from_secs(issued);
        if issued > now {
            return refuse(format!(
                "proof nonce issued at {issued} lies ahead of now ({now})"
            ));
        }
        if now > issued + window {
            return refuse(format!(
                "proof nonce issued at {issued} is older than the {}s window (now {now})",
                window.as_secs()
            ));
        }
        Ok(())
    }
}

/// RFC 9449 §8.1: a nonce is `1*NQCHAR` (`%x21 / %x23-5B / %x5D-7E`), so it
/// can travel in a header or a quoted string unescaped.
pub(crate) fn is_nonce_syntax(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce.len() <= 512
        && nonce
            .bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// Equal without an early exit on the first differing byte.
fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A client-controlled value, bounded for a refusal's detail.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}
