//! A bounded memory of one-time token ids: each jti is remembered until its
//! token expires (plus skew), so a second presentation is `replayed`. When
//! full of unexpired entries it refuses new one-time tokens rather than forget.

use std::collections::HashMap;
use std::sync::Mutex;

/// The jti cache.
#[derive(Debug)]
pub struct ReplayCache {
    seen: Mutex<HashMap<String, i64>>,
    capacity: usize,
}

/// Outcome of presenting a jti.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// First presentation: accepted and remembered.
    First,
    /// Presented before.
    Again,
    /// Cache full of live entries: cannot remember, so refuse.
    Full,
}

impl ReplayCache {
    /// A cache holding at most `capacity` live ids.
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: Mutex::default(),
            capacity,
        }
    }

    /// Records `jti`, valid until `forget_at`.
    pub fn check(&self, jti: &str, forget_at: i64, now: i64) -> Seen {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&until) = seen.get(jti)
            && until >= now
        {
            return Seen::Again;
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= self.capacity {
                return Seen::Full;
            }
        }
        seen.insert(jti.to_owned(), forget_at);
        Seen::First
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Second use is caught; expired entries make room; a full cache refuses.
    #[test]
    fn replay_rules() {
        let c = ReplayCache::new(2);
        assert_eq!(c.check("a", 10, 0), Seen::First);
        assert_eq!(c.check("a", 10, 5), Seen::Again);
        assert_eq!(c.check("b", 20, 5), Seen::First);
        assert_eq!(c.check("c", 20, 5), Seen::Full);
        assert_eq!(
            c.check("c", 20, 11),
            Seen::First,
            "a expired and was evicted"
        );
    }
}
