//! One RSA signing key: ring-validated PKCS#8, its kid (RFC 7638 thumbprint),
//! its lifecycle record, and its public half. No file I/O, no clock reads.

use std::time::Duration;

use jsonwebtoken::EncodingKey;
use serde::{Deserialize, Serialize};

use crate::jose::{JwkError, PublicKey};
use crate::time::UnixTime;

/// What the manifest (`keys.json`) remembers of a key. States are derived from
/// these times and `now`, never stored, so no state can go stale on disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// RFC 7638 thumbprint.
    pub kid: String,
    /// File name of the PKCS#8 PEM inside the keys directory; empty once revoked.
    pub file: String,
    /// Modulus size.
    pub bits: u32,
    /// Generation order (1, 2, ...): breaks ties between keys activated in the same second.
    #[serde(default)]
    pub seq: u64,
    /// When the key was generated.
    pub created_at: UnixTime,
    /// When it starts signing (publish-ahead: later than `created_at`).
    pub activates_at: UnixTime,
    /// When it was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<UnixTime>,
}

/// A key's place in its lifecycle at a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyState {
    /// Published, not yet signing.
    Next,
    /// The signing key.
    Active,
    /// No longer signing; published until its last token expires.
    Retired,
    /// Revoked: unpublished, its tokens refused.
    Revoked,
}

impl KeyState {
    /// Lower-case name for the CLI and API.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
            KeyState::Revoked => "revoked",
        }
    }
}

/// Why key material was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyMaterialError {
    /// ring refused the PKCS#8 document (not RSA, inconsistent, too small...).
    #[error("not a usable RSA private key: {0}")]
    Rejected(String),
    /// The key is valid but outside the policy's size range.
    #[error("RSA key of {0} bits is outside 2048..=8192")]
    Size(usize),
}

/// A private signing key with its public half. `Debug` never prints the secret.
pub struct SigningKey {
    encoding: EncodingKey,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.public.kid())
            .field("private", &"...")
            .finish()
    }
}

// === impl SigningKey ===

impl SigningKey {
    /// Validates PKCS#8 DER with ring and derives the kid.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyMaterialError> {
        crate::jose::install_provider();
        let pair = ring::signature::RsaKeyPair::from_pkcs8(der)
            .map_err(|e| KeyMaterialError::Rejected(e.to_string()))?;
        let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        let public = PublicKey::from_components(&c.n, &c.e, None).map_err(|e| match e {
            JwkError::BadSize(bits) => KeyMaterialError::Size(bits),
            other => KeyMaterialError::Rejected(other.to_string()),
        })?;
        Ok(Self {
            encoding: EncodingKey::from_rsa_der(der),
            public,
        })
    }

    /// The kid.
    pub fn kid(&self) -> &str {
        self.public.kid()
    }

    /// The public half, as peers and verifiers see it.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The jsonwebtoken key handed to `encode` (signed by the ring provider).
    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }
}

/// Lifecycle timing shared by the planner and the state derivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    /// Time between rotations.
    pub interval: Duration,
    /// Time a new key is published before it signs.
    pub publish_ahead: Duration,
    /// Time a key stays published after it stops signing: max_ttl + clock_skew.
    pub grace: Duration,
}

/// When `rec` stops (or stopped) signing: the activation of the next key in
/// activation order, revoked or not (a revoked successor must not bring an
/// older key back to life).
pub(crate) fn retires_at(rec: &KeyRecord, all: &[KeyRecord]) -> Option<UnixTime> {
    if let Some(r) = rec.revoked_at {
        return Some(r.min(successor_activation(rec, all).unwrap_or(r)));
    }
    successor_activation(rec, all)
}

/// Whether `rec` ever signed or will: a key revoked before its activation
/// never did, so it neither retires its predecessor nor counts as active.
pub(crate) fn ever_signs(rec: &KeyRecord) -> bool {
    rec.revoked_at.is_none_or(|r| r >= rec.activates_at)
}

fn successor_activation(rec: &KeyRecord, all: &[KeyRecord]) -> Option<UnixTime> {
    all.iter()
        .filter(|o| o.kid != rec.kid && ever_signs(o))
        .filter(|o| (o.activates_at, o.seq) > (rec.activates_at, rec.seq))
        .map(|o| o.activates_at)
        .min()
}

/// The state of `rec` at `now`.
pub(crate) fn state_at(rec: &KeyRecord, all: &[KeyRecord], now: UnixTime) -> KeyState {
    if rec.revoked_at.is_some() {
        return KeyState::Revoked;
    }
    if now < rec.activates_at {
        return KeyState::Next;
    }
    match retires_at(rec, all) {
        Some(t) if t <= now => KeyState::Retired,
        _ => KeyState::Active,
    }
}

/// When the record may be forgotten: its last token has expired (plus skew).
pub(crate) fn delete_after(rec: &KeyRecord, all: &[KeyRecord], lc: &Lifecycle) -> Option<UnixTime> {
    if let Some(r) = rec.revoked_at {
        return Some(r + lc.grace);
    }
    retires_at(rec, all).map(|t| t + lc.grace)
}
