//! The verify cache: a token that verified is remembered, by the SHA-256 of
//! its exact bytes, until it expires. A hit skips parsing and the RSA check
//! but not the decision: time and audience are checked again at `now`, every
//! key the result rested on (the token's and each delegation link's) must
//! still be in its issuer's current set with the same material, and the
//! one-time claim is made by the caller as on a miss. So a revocation, a
//! key leaving its set or a poisoned kid takes effect on the very next
//! call, while an unrelated key-set update leaves the cache warm. Refusals
//! are never remembered. Bounded: at most `capacity` entries; when full,
//! expired entries go first, then an arbitrary half.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::trust::{Anchors, Lookup};
use super::verify::{Verified, VerifyPolicy};
use crate::jose::names_audience;
use crate::time::UnixTime;

/// Entries kept at most by default (a few KiB each).
pub(crate) const DEFAULT_CAPACITY: usize = 16_384;

/// Verified tokens, by the digest of their bytes.
#[derive(Debug)]
pub(crate) struct VerifyCache {
    entries: Mutex<HashMap<[u8; 32], Arc<Verified>>>,
    capacity: usize,
}

fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// Whether a remembered result still holds at `now` for `audience`.
fn still_holds(
    v: &Verified,
    audience: &str,
    now: UnixTime,
    policy: &VerifyPolicy,
    anchors: &Anchors<'_>,
) -> bool {
    now <= v.expires_at + policy.clock_skew
        && now + policy.clock_skew >= v.not_before
        && names_audience(&v.claims, audience) == Ok(true)
        && v.keys.iter().all(|k| {
            matches!(anchors.lookup(&k.issuer, &k.kid, now, k.class), Lookup::Found(p) if p.fingerprint() == k.fingerprint)
        })
}

// === impl VerifyCache ===

impl VerifyCache {
    /// A cache of at most `capacity` entries (0 disables it).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::default(),
            capacity,
        }
    }

    /// The remembered result for exactly these bytes, if it still holds.
    /// A stale entry is dropped.
    pub(crate) fn get(
        &self,
        token: &str,
        audience: &str,
        now: UnixTime,
        policy: &VerifyPolicy,
        anchors: &Anchors<'_>,
    ) -> Option<Arc<Verified>> {
        if self.capacity == 0 {
            return None;
        }
        let key = digest(token);
        let hit = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()?;
        if still_holds(&hit, audience, now, policy, anchors) {
            return Some(hit);
        }
        // Expired, revoked or another audience: a miss. Drop it only if it
        // can never hold again (the audience may differ per caller).
        if now > hit.expires_at + policy.clock_skew
            || !hit.keys.iter().all(|k| {
                matches!(anchors.lookup(&k.issuer, &k.kid, now, k.class), Lookup::Found(p) if p.fingerprint() == k.fingerprint)
            })
        {
            self.entries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        None
    }

    /// Remembers a result that just verified.
    pub(crate) fn put(&self, token: &str, v: Arc<Verified>, now: UnixTime) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, e| e.expires_at >= now);
            if entries.len() >= self.capacity {
                let drop: Vec<_> = entries
                    .keys()
                    .take(entries.len() / 2 + 1)
                    .copied()
                    .collect();
                for k in drop {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(digest(token), v);
    }

    /// How many entries are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
