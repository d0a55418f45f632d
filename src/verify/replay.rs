//! A bounded memory of one-time token ids: each `(issuer, jti)` is remembered
//! until its token expires (plus skew), so a second presentation is
//! `replayed`. Each issuer has its own quota, so one noisy (or compromised)
//! peer cannot crowd out the others; when an issuer's quota is full of
//! unexpired entries, its new one-time tokens are refused rather than an old
//! one forgotten. Ids are stored as SHA-256 digests: fixed size, whatever the
//! `jti` length.

use std::collections::HashMap;
use std::sync::Mutex;

/// The jti cache.
#[derive(Debug)]
pub struct ReplayCache {
    issuers: Mutex<HashMap<String, IssuerSeen>>,
    per_issuer: usize,
}

#[derive(Debug, Default)]
struct IssuerSeen {
    seen: HashMap<[u8; 32], i64>,
    /// When expired entries were last swept: at most once a second.
    swept_at: i64,
}

/// Outcome of presenting a jti.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// First presentation: accepted and remembered.
    First,
    /// Presented before.
    Again,
    /// The issuer's quota is full of live entries: cannot remember, so refuse.
    Full,
}

fn digest(jti: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, jti.as_bytes()).as_ref());
    out
}

impl ReplayCache {
    /// A cache holding at most `per_issuer` live ids for each issuer.
    pub fn new(per_issuer: usize) -> Self {
        Self {
            issuers: Mutex::default(),
            per_issuer,
        }
    }

    /// Records `issuer`'s `jti`, remembered until `forget_at`.
    pub fn check(&self, issuer: &str, jti: &str, forget_at: i64, now: i64) -> Seen {
        let id = digest(jti);
        let mut issuers = self.issuers.lock().unwrap_or_else(|p| p.into_inner());
        let entry = issuers.entry(issuer.to_owned()).or_default();
        if let Some(&until) = entry.seen.get(&id)
            && until >= now
        {
            return Seen::Again;
        }
        if entry.seen.len() >= self.per_issuer && entry.swept_at < now {
            entry.swept_at = now;
            entry.seen.retain(|_, until| *until >= now);
        }
        if entry.seen.len() >= self.per_issuer {
            return Seen::Full;
        }
        entry.seen.insert(id, forget_at);
        Seen::First
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second use is caught; expired entries make room; a full quota refuses,
    /// and only for that issuer.
    #[test]
    fn replay_rules() {
        let c = ReplayCache::new(2);
        assert_eq!(c.check("i", "a", 10, 0), Seen::First);
        assert_eq!(c.check("i", "a", 10, 5), Seen::Again);
        assert_eq!(c.check("j", "a", 10, 5), Seen::First, "per issuer");
        assert_eq!(c.check("i", "b", 20, 5), Seen::First);
        assert_eq!(c.check("i", "c", 20, 5), Seen::Full);
        assert_eq!(
            c.check("j", "c", 20, 5),
            Seen::First,
            "other issuers unaffected"
        );
        assert_eq!(
            c.check("i", "c", 20, 11),
            Seen::First,
            "a expired and was swept"
        );
        assert_eq!(c.check("i", &"x".repeat(100_000), 20, 11), Seen::Full);
    }
}
