//! Per-issuer key sets: issuer identity → kid → public key. A token naming
//! issuer X is only ever checked against X's set. Sources (this sidecar's own
//! keys, a JWKS file, a live peer) replace an issuer's set whole. An unknown
//! kid of a known issuer triggers at most one refresh at a time per issuer
//! (single-flight), and not more often than `min_refresh_interval`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use crate::jwk::PublicKey;

/// The most revoked kids remembered per issuer.
pub const MAX_REVOKED_PER_ISSUER: usize = 4 * MAX_KEYS_PER_ISSUER;

/// How soon a failed refresh may be retried.
const FAILED_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Single-flight guard: when the last refresh ran (monotonic) and whether it failed.
#[derive(Debug, Default)]
struct Gate {
    last: Option<tokio::time::Instant>,
    failed: bool,
}

/// The most keys one issuer may publish.
pub const MAX_KEYS_PER_ISSUER: usize = 64;

/// Asks a source to fetch its issuer's keys again (file re-read, peer fetch).
pub trait Refresh: Send + Sync + 'static {
    /// Fetches and installs the issuer's set; returns a description of any failure.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// The key.
    Found(Arc<PublicKey>),
    /// The issuer revoked this kid.
    Revoked,
    /// The issuer is known; the kid is not.
    UnknownKid,
    /// No such issuer.
    UnknownIssuer,
}

/// A snapshot of one issuer's trust, for `jwks --all` and status.
#[derive(Clone, Debug)]
pub struct IssuerSnapshot {
    /// The issuer identity.
    pub issuer: String,
    /// `self`, `file:<path>`, `peer:<address>`.
    pub source: String,
    /// The keys.
    pub keys: Vec<Arc<PublicKey>>,
    /// Revoked kids.
    pub revoked: Vec<String>,
    /// Last successful update, seconds since the epoch (0: never).
    pub updated_at: i64,
    /// Last error of the source.
    pub last_error: Option<String>,
}

struct IssuerKeys {
    source: String,
    keys: HashMap<String, Arc<PublicKey>>,
    /// Per-kid expiry hints from the publisher, applied only while `stale`.
    expires: HashMap<String, i64>,
    /// The source lost contact: keys past their hint are no longer used.
    stale: bool,
    revoked: HashSet<String>,
    updated_at: i64,
    last_error: Option<String>,
    refresher: Option<Arc<dyn Refresh>>,
    /// Single-flight guard and the time of the last refresh attempt.
    refresh_gate: Arc<tokio::sync::Mutex<Gate>>,
    /// Completed refreshes: the single-flight ticket.
    refreshes: Arc<std::sync::atomic::AtomicU64>,
}

/// Every issuer this sidecar trusts, with its keys.
pub struct TrustStore {
    issuers: RwLock<HashMap<String, IssuerKeys>>,
    min_refresh_interval: std::time::Duration,
    /// Bumped on every change of any set, for watchers (SPIFFE bundles).
    changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore").finish_non_exhaustive()
    }
}

/// Why a set was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    /// More keys than `MAX_KEYS_PER_ISSUER`.
    #[error("key set of {0} keys exceeds the limit of {MAX_KEYS_PER_ISSUER}")]
    TooManyKeys(usize),
    /// More revoked kids than `MAX_REVOKED_PER_ISSUER`.
    #[error("key set lists {0} revoked kids, over the limit of {MAX_REVOKED_PER_ISSUER}")]
    TooManyRevoked(usize),
    /// Issuer not registered.
    #[error("issuer {0} is not configured")]
    UnknownIssuer(String),
}

// === impl TrustStore ===

impl TrustStore {
    /// A store that refreshes an issuer at most once per `min_refresh_interval`.
    pub fn new(min_refresh_interval: std::time::Duration) -> Self {
        Self {
            issuers: RwLock::default(),
            min_refresh_interval,
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A receiver that wakes whenever any issuer's set changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Registers an issuer with its source and optional refresher (empty set).
    pub fn register(&self, issuer: &str, source: String, refresher: Option<Arc<dyn Refresh>>) {
        let mut map = self.issuers.write().unwrap_or_else(|p| p.into_inner());
        map.insert(
            issuer.to_owned(),
            IssuerKeys {
                source,
                keys: HashMap::new(),
                expires: HashMap::new(),
                stale: false,
                revoked: HashSet::new(),
                updated_at: 0,
                last_error: None,
                refresher,
                refresh_gate: Arc::default(),
                refreshes: Arc::default(),
            },
        );
    }

    /// Replaces an issuer's whole set, with the publisher's per-kid expiry
    /// hints. Refused (keeping the previous set) if it is too large.
    pub fn replace(
        &self,
        issuer: &str,
        keys: Vec<PublicKey>,
        revoked: Vec<String>,
        expires: HashMap<String, i64>,
        now: i64,
    ) -> Result<(), SetError> {
        if keys.len() > MAX_KEYS_PER_ISSUER {
            self.note_error(issuer, format!("refused set of {} keys", keys.len()));
            return Err(SetError::TooManyKeys(keys.len()));
        }
        if revoked.len() > MAX_REVOKED_PER_ISSUER {
            self.note_error(
                issuer,
                format!("refused set with {} revoked kids", revoked.len()),
            );
            return Err(SetError::TooManyRevoked(revoked.len()));
        }
        // Built outside the lock: verifications of every issuer read it.
        let mut new_keys: HashMap<String, Arc<PublicKey>> = keys
            .into_iter()
            .map(|k| (k.kid().to_owned(), Arc::new(k)))
            .collect();
        let new_revoked: HashSet<String> = revoked.into_iter().collect();
        let mut map = self.issuers.write().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .get_mut(issuer)
            .ok_or_else(|| SetError::UnknownIssuer(issuer.to_owned()))?;
        // Remember earlier revocations too, within the bound; past it the
        // publisher's current list is authoritative.
        let mut revoked = new_revoked;
        if entry.revoked.len() + revoked.len() <= MAX_REVOKED_PER_ISSUER {
            revoked.extend(entry.revoked.iter().cloned());
        }
        new_keys.retain(|kid, _| !revoked.contains(kid));
        entry.keys = new_keys;
        entry.revoked = revoked;
        entry.expires = expires;
        entry.stale = false;
        entry.updated_at = now;
        entry.last_error = None;
        drop(map);
        self.changed();
        Ok(())
    }

    /// Marks an issuer's source as out of contact (or back): while stale, each
    /// key is used only until its publisher's expiry hint.
    pub fn set_stale(&self, issuer: &str, stale: bool) {
        let mut map = self.issuers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(issuer) {
            e.stale = stale;
        }
    }

    /// Records revocations pushed by a publisher without replacing its set.
    pub fn revoke(&self, issuer: &str, kids: &[String]) {
        let mut map = self.issuers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(issuer) {
            for k in kids.iter().take(MAX_REVOKED_PER_ISSUER) {
                e.keys.remove(k);
                if e.revoked.len() < MAX_REVOKED_PER_ISSUER {
                    e.revoked.insert(k.clone());
                }
            }
        }
        drop(map);
        self.changed();
    }

    /// Installs this sidecar's own published keys (and revocations) as
    /// `issuer`'s set, registering it as `self` on first use.
    pub fn install_own(
        &self,
        issuer: &str,
        set: &crate::keys::KeySet,
        now: i64,
    ) -> Result<(), SetError> {
        if !self.knows(issuer) {
            self.register(issuer, "self".into(), None);
        }
        let published = set.published().cloned().collect();
        let revoked = set.revoked_kids().map(str::to_owned).collect();
        self.replace(issuer, published, revoked, HashMap::new(), now)
    }

    /// Records a source error (the previous set stays in use).
    pub fn note_error(&self, issuer: &str, error: String) {
        let mut map = self.issuers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(issuer) {
            e.last_error = Some(error);
        }
    }

    /// Finds `kid` in `issuer`'s set, and nowhere else, at `now`.
    pub fn lookup(&self, issuer: &str, kid: &str, now: i64) -> Lookup {
        let map = self.issuers.read().unwrap_or_else(|p| p.into_inner());
        match map.get(issuer) {
            None => Lookup::UnknownIssuer,
            Some(e) if e.revoked.contains(kid) => Lookup::Revoked,
            Some(e) if e.stale && e.expires.get(kid).is_some_and(|&t| t < now) => {
                Lookup::UnknownKid
            }
            Some(e) => e
                .keys
                .get(kid)
                .cloned()
                .map_or(Lookup::UnknownKid, Lookup::Found),
        }
    }

    /// Whether `issuer` is configured.
    pub fn knows(&self, issuer: &str) -> bool {
        self.issuers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(issuer)
    }

    /// A ticket to pass to `refresh` after a miss: the number of refreshes of
    /// `issuer` so far. Taken before waiting, it tells whether another caller
    /// refreshed in the meantime.
    pub fn refresh_ticket(&self, issuer: &str) -> u64 {
        let map = self.issuers.read().unwrap_or_else(|p| p.into_inner());
        map.get(issuer).map_or(0, |e| {
            e.refreshes.load(std::sync::atomic::Ordering::Acquire)
        })
    }

    /// Refreshes `issuer` once, unless a refresh completed since `ticket` was
    /// taken (single flight: concurrent callers wait for the one in progress)
    /// or the rate limit forbids it.
    pub async fn refresh(&self, issuer: &str, ticket: u64) {
        let (gate, refreshes, refresher) = {
            let map = self.issuers.read().unwrap_or_else(|p| p.into_inner());
            match map.get(issuer) {
                Some(e) => (
                    e.refresh_gate.clone(),
                    e.refreshes.clone(),
                    e.refresher.clone(),
                ),
                None => return,
            }
        };
        let Some(refresher) = refresher else { return };
        let mut gate = gate.lock().await;
        if refreshes.load(std::sync::atomic::Ordering::Acquire) != ticket {
            return; // someone refreshed while we waited
        }
        // After a failure (peer down) retry sooner: it is cheap and the peer may be back.
        let window = if gate.failed {
            FAILED_REFRESH_INTERVAL
        } else {
            self.min_refresh_interval
        };
        if gate.last.is_some_and(|l| l.elapsed() < window) {
            return; // rate limited
        }
        gate.last = Some(tokio::time::Instant::now());
        metrics::counter!("tokend_key_refresh_total").increment(1);
        gate.failed = match refresher.refresh().await {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(issuer, error = %e, "refresh of issuer keys failed");
                self.note_error(issuer, e);
                true
            }
        };
        refreshes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Every issuer, sorted by name.
    pub fn snapshot(&self) -> Vec<IssuerSnapshot> {
        let map = self.issuers.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<IssuerSnapshot> = map
            .iter()
            .map(|(iss, e)| {
                let mut keys: Vec<_> = e.keys.values().cloned().collect();
                keys.sort_by(|a, b| a.kid().cmp(b.kid()));
                let mut revoked: Vec<_> = e.revoked.iter().cloned().collect();
                revoked.sort();
                IssuerSnapshot {
                    issuer: iss.clone(),
                    source: e.source.clone(),
                    keys,
                    revoked,
                    updated_at: e.updated_at,
                    last_error: e.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl Refresh for Counting {
        fn refresh(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                Ok(())
            })
        }
    }

    /// Concurrent misses for one issuer cause one refresh; a miss inside the
    /// rate-limit window causes none; after the window, one more.
    #[tokio::test(start_paused = true)]
    async fn refresh_is_single_flight_and_rate_limited() {
        let trust = Arc::new(TrustStore::new(std::time::Duration::from_secs(5)));
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        trust.register("spiffe://td/a", "test".into(), Some(counter.clone()));
        let ticket = trust.refresh_ticket("spiffe://td/a");
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let t = trust.clone();
                tokio::spawn(async move { t.refresh("spiffe://td/a", ticket).await })
            })
            .collect();
        for c in calls {
            c.await.expect("join");
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "single flight");
        let ticket = trust.refresh_ticket("spiffe://td/a");
        assert_eq!(ticket, 1);
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        trust.refresh("spiffe://td/a", ticket).await;
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "rate limited within 5s"
        );
        tokio::time::advance(std::time::Duration::from_secs(4)).await;
        trust.refresh("spiffe://td/a", ticket).await;
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            2,
            "allowed after the window"
        );
        trust.refresh("spiffe://td/a", ticket).await;
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            2,
            "stale ticket: already refreshed"
        );
        trust.refresh("spiffe://td/unknown", 0).await;
    }

    /// A set over the key limit is refused and the previous set stays; while
    /// stale, keys past their publisher's hint stop being found.
    #[test]
    fn limits_and_staleness() {
        let trust = TrustStore::new(std::time::Duration::from_secs(5));
        trust.register("i", "test".into(), None);
        let key =
            crate::jwk::PublicKey::from_components(&[0xff; 256], &[1, 0, 1], Some("k1".into()))
                .expect("key");
        let hints = HashMap::from([("k1".to_owned(), 1000)]);
        trust
            .replace("i", vec![key.clone()], vec![], hints, 0)
            .expect("ok");
        let too_many = vec![key; MAX_KEYS_PER_ISSUER + 1];
        assert_eq!(
            trust.replace("i", too_many, vec![], HashMap::new(), 1),
            Err(SetError::TooManyKeys(MAX_KEYS_PER_ISSUER + 1))
        );
        assert!(
            matches!(trust.lookup("i", "k1", 2000), Lookup::Found(_)),
            "hints ignored while in contact"
        );
        trust.set_stale("i", true);
        assert!(matches!(trust.lookup("i", "k1", 999), Lookup::Found(_)));
        assert!(
            matches!(trust.lookup("i", "k1", 1001), Lookup::UnknownKid),
            "expired hint while out of contact"
        );
        trust.revoke("i", &["k1".into()]);
        assert!(matches!(trust.lookup("i", "k1", 0), Lookup::Revoked));
        assert!(matches!(trust.lookup("j", "k1", 0), Lookup::UnknownIssuer));
    }
}
