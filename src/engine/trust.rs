//! Whom this sidecar trusts, as immutable snapshots. A `TrustSet` maps each
//! peer issuer to its key set (kid → public key, revoked kids, expiry hints,
//! contact state); it is never mutated in place: `apply` returns a new set,
//! and one writer publishes each new set through a `watch` that verifiers
//! read (`TrustView`). This sidecar's own keys are not copied in: `Anchors`
//! pairs a trust snapshot with the own `KeySet`, so a key the minter signs
//! with is known to the verifier at the same instant. Pure: no tasks, no I/O.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::watch;

use crate::jose::PublicKey;
use crate::keys::KeySet;
use crate::time::UnixTime;

/// The most keys one issuer may publish.
pub(crate) const MAX_KEYS_PER_ISSUER: usize = 64;
/// The most revoked kids remembered per issuer.
pub(crate) const MAX_REVOKED_PER_ISSUER: usize = 4 * MAX_KEYS_PER_ISSUER;

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The key.
    Found(&'a PublicKey),
    /// The issuer revoked this kid.
    Revoked,
    /// The issuer is known; the kid is not (or expired while out of contact).
    UnknownKid,
    /// No such issuer.
    UnknownIssuer,
}

/// One issuer's keys as its source last delivered them.
#[derive(Clone, Debug, Default)]
pub struct IssuerKeys {
    /// `self`, `file:<path>`, `peer:<address>`.
    pub source: String,
    keys: HashMap<String, Arc<PublicKey>>,
    /// Per-kid expiry hints from the publisher, applied only while `stale`.
    expires: HashMap<String, UnixTime>,
    /// The source lost contact: keys past their hint are no longer used.
    stale: bool,
    revoked: HashSet<String>,
    /// Last successful update (EPOCH: never).
    pub updated_at: UnixTime,
    /// Last error of the source, if its latest attempt failed.
    pub last_error: Option<String>,
}

impl IssuerKeys {
    /// The keys, sorted by kid.
    pub fn keys(&self) -> Vec<Arc<PublicKey>> {
        let mut keys: Vec<_> = self.keys.values().cloned().collect();
        keys.sort_by(|a, b| a.kid().cmp(b.kid()));
        keys
    }

    /// The revoked kids, sorted.
    pub fn revoked(&self) -> Vec<String> {
        let mut r: Vec<_> = self.revoked.iter().cloned().collect();
        r.sort();
        r
    }

    fn lookup(&self, kid: &str, now: UnixTime) -> Lookup<'_> {
        if self.revoked.contains(kid) {
            return Lookup::Revoked;
        }
        if self.stale && self.expires.get(kid).is_some_and(|&t| t < now) {
            return Lookup::UnknownKid;
        }
        self.keys
            .get(kid)
            .map_or(Lookup::UnknownKid, |k| Lookup::Found(k))
    }
}

/// A change a source asks the writer for.
#[derive(Debug)]
pub enum TrustUpdate {
    /// Start trusting `issuer`, with an empty set, fed by `source`.
    Register {
        /// The issuer identity.
        issuer: String,
        /// Where its keys come from, for `jwks --all`.
        source: String,
    },
    /// Replace an issuer's whole set (a fresh delivery from its source).
    Replace {
        /// The issuer identity.
        issuer: String,
        /// Its public keys.
        keys: Vec<PublicKey>,
        /// Kids it revoked.
        revoked: Vec<String>,
        /// The publisher's per-kid expiry hints.
        expires: HashMap<String, UnixTime>,
        /// When the set arrived.
        at: UnixTime,
    },
    /// The source lost (or regained) contact.
    Stale {
        /// The issuer identity.
        issuer: String,
        /// Out of contact?
        stale: bool,
    },
    /// The source failed; the previous set stays in use.
    Error {
        /// The issuer identity.
        issuer: String,
        /// What failed.
        error: String,
    },
}

/// Why an update was refused (the previous set stays).
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

/// An immutable snapshot of every peer issuer's keys.
#[derive(Clone, Debug, Default)]
pub struct TrustSet {
    issuers: HashMap<String, Arc<IssuerKeys>>,
}

// === impl TrustSet ===

impl TrustSet {
    /// Finds `kid` in `issuer`'s set, and nowhere else, at `now`.
    pub fn lookup(&self, issuer: &str, kid: &str, now: UnixTime) -> Lookup<'_> {
        match self.issuers.get(issuer) {
            None => Lookup::UnknownIssuer,
            Some(e) => e.lookup(kid, now),
        }
    }

    /// Whether `issuer` is trusted at all.
    pub fn knows(&self, issuer: &str) -> bool {
        self.issuers.contains_key(issuer)
    }

    /// Every issuer with its keys, sorted by issuer.
    pub fn issuers(&self) -> Vec<(&str, &IssuerKeys)> {
        let mut v: Vec<_> = self
            .issuers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// The set after `update`; a refused update leaves `self` as it was and
    /// records the refusal as the issuer's last error.
    pub fn apply(&self, update: TrustUpdate) -> (TrustSet, Result<(), SetError>) {
        let mut next = self.clone();
        let result = next.apply_in_place(update);
        (next, result)
    }

    fn entry(&mut self, issuer: &str) -> Result<&mut IssuerKeys, SetError> {
        self.issuers
            .get_mut(issuer)
            .map(Arc::make_mut)
            .ok_or_else(|| SetError::UnknownIssuer(issuer.to_owned()))
    }

    fn apply_in_place(&mut self, update: TrustUpdate) -> Result<(), SetError> {
        match update {
            TrustUpdate::Register { issuer, source } => {
                self.issuers.insert(
                    issuer,
                    Arc::new(IssuerKeys {
                        source,
                        ..IssuerKeys::default()
                    }),
                );
                Ok(())
            }
            TrustUpdate::Replace {
                issuer,
                keys,
                revoked,
                expires,
                at,
            } => {
                let refusal = if keys.len() > MAX_KEYS_PER_ISSUER {
                    Some(SetError::TooManyKeys(keys.len()))
                } else if revoked.len() > MAX_REVOKED_PER_ISSUER {
                    Some(SetError::TooManyRevoked(revoked.len()))
                } else {
                    None
                };
                let entry = self.entry(&issuer)?;
                if let Some(e) = refusal {
                    entry.last_error = Some(format!("refused: {e}"));
                    return Err(e);
                }
                // Remember earlier revocations too, within the bound; past it
                // the publisher's current list is authoritative.
                let mut revoked: HashSet<String> = revoked.into_iter().collect();
                if entry.revoked.len() + revoked.len() <= MAX_REVOKED_PER_ISSUER {
                    revoked.extend(entry.revoked.iter().cloned());
                }
                entry.keys = keys
                    .into_iter()
                    .filter(|k| !revoked.contains(k.kid()))
                    .map(|k| (k.kid().to_owned(), Arc::new(k)))
                    .collect();
                entry.revoked = revoked;
                entry.expires = expires;
                entry.stale = false;
                entry.updated_at = at;
                entry.last_error = None;
                Ok(())
            }
            TrustUpdate::Stale { issuer, stale } => {
                self.entry(&issuer)?.stale = stale;
                Ok(())
            }
            TrustUpdate::Error { issuer, error } => {
                self.entry(&issuer)?.last_error = Some(error);
                Ok(())
            }
        }
    }
}

/// A reader of the published trust snapshots. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TrustView(watch::Receiver<Arc<TrustSet>>);

impl TrustView {
    /// Wraps the receiving end of the writer's channel.
    pub(crate) fn new(rx: watch::Receiver<Arc<TrustSet>>) -> Self {
        Self(rx)
    }

    /// A view that always shows `set` (tests, benches, offline tools).
    pub fn fixed(set: TrustSet) -> Self {
        Self(watch::channel(Arc::new(set)).1)
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<TrustSet> {
        self.0.borrow().clone()
    }

    /// A receiver that wakes on every published change (SPIFFE bundle streams).
    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustSet>> {
        self.0.clone()
    }
}

/// Everything a verification may check a key against: this sidecar's own
/// keys, read straight from its key store's snapshot, and the peers' sets.
#[derive(Debug, Clone, Copy)]
pub struct Anchors<'a> {
    /// This sidecar's identity: the issuer of `own`.
    pub own_id: &'a str,
    /// This sidecar's keys.
    pub own: &'a KeySet,
    /// Every peer issuer's keys.
    pub peers: &'a TrustSet,
}

impl<'a> Anchors<'a> {
    /// Finds `kid` in `issuer`'s keys only.
    pub fn lookup(&self, issuer: &str, kid: &str, now: UnixTime) -> Lookup<'a> {
        if issuer == self.own_id {
            if self.own.revoked_kids().any(|k| k == kid) {
                return Lookup::Revoked;
            }
            return self
                .own
                .published()
                .find(|k| k.kid() == kid)
                .map_or(Lookup::UnknownKid, Lookup::Found);
        }
        self.peers.lookup(issuer, kid, now)
    }

    /// Whether `issuer` is this sidecar or a trusted peer.
    pub fn knows(&self, issuer: &str) -> bool {
        issuer == self.own_id || self.peers.knows(issuer)
    }

    /// Whether a refresh could teach us more about `issuer` (a peer, not us).
    pub fn is_peer(&self, issuer: &str) -> bool {
        issuer != self.own_id && self.peers.knows(issuer)
    }
}

#[cfg(test)]
mod tests {
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
}
