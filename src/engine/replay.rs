//! One-time token ids. A `ReplayStore` claims ids; a claim succeeds only if
//! none of its ids was claimed before, and then records all of them, so a
//! one-time token is accepted once whether it arrives as a token or as a
//! link inside a delegation chain. The engine knows only the trait: the
//! in-memory store here is the embedded default, and other stores (a
//! journal on disk, later the directory's shared store) plug in beside it.
//!
//! The memory store is bounded: each `(issuer, jti)` is remembered until its
//! token expires (plus skew), each issuer has its own quota so one noisy (or
//! compromised) peer cannot crowd out the others, and a full quota refuses
//! new one-time tokens rather than forgetting a live one. Ids are stored as
//! SHA-256 digests: fixed size, whatever the `jti` length.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// One-time token ids remembered per issuer by default.
pub(crate) const REPLAY_PER_ISSUER: usize = 50_000;

/// One one-time id to claim: who issued it, the `jti`, and until when the
/// claim must be remembered (the token's expiry plus skew).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OneTimeId {
    /// The token's issuer.
    pub issuer: String,
    /// Its `jti`.
    pub jti: String,
    /// When the token can no longer verify, so the record may go.
    pub forget_at: UnixTime,
}

/// The boxed future a store answers with (stores may do I/O).
pub(crate) type ClaimFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>;

/// Where one-time ids are claimed.
pub trait ReplayStore: Send + Sync + 'static {
    /// Claims every id at `now`: `replayed` if any was claimed before (and
    /// then none is recorded), `unavailable` if the store cannot remember.
    fn claim<'a>(&'a self, ids: &'a [OneTimeId], now: UnixTime) -> ClaimFuture<'a>;
}

/// The bounded in-memory store.
#[derive(Debug)]
pub(crate) struct MemoryReplay {
    issuers: Mutex<HashMap<String, IssuerSeen>>,
    per_issuer: usize,
}

#[derive(Debug, Default)]
struct IssuerSeen {
    seen: HashMap<[u8; 32], UnixTime>,
    /// When expired entries were last swept: at most once a second.
    swept_at: UnixTime,
}

/// The fixed-size form an id is remembered in.
pub(crate) fn digest(jti: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, jti.as_bytes()).as_ref());
    out
}

// === impl MemoryReplay ===

impl MemoryReplay {
    /// A store holding at most `per_issuer` live ids for each issuer.
    pub(crate) fn new(per_issuer: usize) -> Self {
        Self {
            issuers: Mutex::default(),
            per_issuer,
        }
    }

    /// The synchronous claim behind the trait (also used by stores that
    /// keep this one as their in-memory index).
    pub(crate) fn claim_now(&self, ids: &[OneTimeId], now: UnixTime) -> Result<(), Refusal> {
        let mut issuers = self.issuers.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            let entry = issuers.entry(id.issuer.clone()).or_default();
            if entry
                .seen
                .get(&digest(&id.jti))
                .is_some_and(|&until| until >= now)
            {
                return Err(Refusal::new(
                    Reason::Replayed,
                    format!(
                        "one-time token {} of {} was already used",
                        id.jti, id.issuer
                    ),
                ));
            }
            if entry.seen.len() >= self.per_issuer && entry.swept_at < now {
                entry.swept_at = now;
                entry.seen.retain(|_, until| *until >= now);
            }
            if entry.seen.len() >= self.per_issuer {
                return Err(Refusal::new(
                    Reason::Unavailable,
                    format!(
                        "replay memory for {} is full; cannot accept its one-time tokens",
                        id.issuer
                    ),
                ));
            }
        }
        for id in ids {
            let entry = issuers.entry(id.issuer.clone()).or_default();
            entry.seen.insert(digest(&id.jti), id.forget_at);
        }
        Ok(())
    }
}

// === what a persistent store built on this one needs ===

impl MemoryReplay {
    /// Remembers an id read back from a journal (no quota: it was admitted once).
    pub(crate) fn restore(&self, issuer: &str, digest: [u8; 32], forget_at: UnixTime) {
        let mut issuers = self.issuers.lock().unwrap_or_else(|p| p.into_inner());
        issuers
            .entry(issuer.to_owned())
            .or_default()
            .seen
            .insert(digest, forget_at);
    }

    /// Takes back a claim whose durable record could not be written.
    pub(crate) fn forget(&self, ids: &[OneTimeId]) {
        let mut issuers = self.issuers.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(e) = issuers.get_mut(&id.issuer) {
                e.seen.remove(&digest(&id.jti));
            }
        }
    }

    /// Every id still live at `now`, for rewriting a journal compactly.
    pub(crate) fn live(&self, now: UnixTime) -> Vec<(String, [u8; 32], UnixTime)> {
        let issuers = self.issuers.lock().unwrap_or_else(|p| p.into_inner());
        issuers
            .iter()
            .flat_map(|(issuer, e)| {
                e.seen
                    .iter()
                    .filter(move |(_, until)| **until >= now)
                    .map(move |(d, until)| (issuer.clone(), *d, *until))
            })
            .collect()
    }
}

impl Default for MemoryReplay {
    fn default() -> Self {
        Self::new(REPLAY_PER_ISSUER)
    }
}

impl ReplayStore for MemoryReplay {
    fn claim<'a>(&'a self, ids: &'a [OneTimeId], now: UnixTime) -> ClaimFuture<'a> {
        Box::pin(std::future::ready(self.claim_now(ids, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(issuer: &str, jti: &str, forget_at: i64) -> OneTimeId {
        OneTimeId {
            issuer: issuer.into(),
            jti: jti.into(),
            forget_at: UnixTime::from_secs(forget_at),
        }
    }

    fn reason(r: Result<(), Refusal>) -> Option<Reason> {
        r.err().map(|e| e.reason)
    }

    /// Second use is caught; expired entries make room; a full quota refuses,
    /// and only for that issuer; a claim of several ids is all or nothing.
    #[test]
    fn replay_rules() {
        let c = MemoryReplay::new(2);
        let t = UnixTime::from_secs;
        assert_eq!(reason(c.claim_now(&[id("i", "a", 10)], t(0))), None);
        assert_eq!(
            reason(c.claim_now(&[id("i", "a", 10)], t(5))),
            Some(Reason::Replayed)
        );
        assert_eq!(
            reason(c.claim_now(&[id("j", "a", 10)], t(5))),
            None,
            "per issuer"
        );
        assert_eq!(reason(c.claim_now(&[id("i", "b", 20)], t(5))), None);
        assert_eq!(
            reason(c.claim_now(&[id("i", "c", 20)], t(5))),
            Some(Reason::Unavailable)
        );
        assert_eq!(reason(c.claim_now(&[id("j", "c", 20)], t(5))), None);
        assert_eq!(
            reason(c.claim_now(&[id("i", "c", 20)], t(11))),
            None,
            "a expired and was swept"
        );
        // All or nothing: a chain whose link was used records none of its ids.
        assert_eq!(
            reason(c.claim_now(&[id("k", "new", 30), id("j", "a", 30)], t(6))),
            Some(Reason::Replayed)
        );
        assert_eq!(reason(c.claim_now(&[id("k", "new", 30)], t(6))), None);
    }
}
