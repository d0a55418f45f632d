//! Whom this sidecar trusts, as immutable snapshots. A `TrustSet` maps each
//! peer issuer to its instances' key sets (`IssuerKeys`: instance → keys,
//! revoked kids, expiry hints, contact state, the signed document they came
//! from) and the union a verification looks in; it is never mutated in
//! place: `apply` returns a new set, and one writer publishes each new set
//! through a `watch` that verifiers read (`TrustView`). This sidecar's own
//! keys are not copied in: `Anchors` pairs a trust snapshot with the own
//! `KeySet`, so a key the minter signs with is known to the verifier at the
//! same instant. Pure: no tasks, no I/O.
//!
//! Sources speak `TrustUpdate`s: a legacy set for the issuer (`Replace`) or
//! for one instance (`Instance`), a verified signed document
//! (`Document`, rollback-checked here), an instance that left
//! (`InstanceGone`), contact lost or regained (`Stale`, `InstanceStale`).

#[cfg(test)]
mod class_tests;
mod issuer;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

pub use self::issuer::{DocumentState, InstanceKeys, IssuerKeys};
use super::document::VerifiedDocument;
use crate::jose::{BOUND_KID_SUFFIX, PublicKey};
use crate::keys::{KeyClass, KeySet};
use crate::time::UnixTime;

/// The most keys one instance may publish.
pub(crate) const MAX_KEYS_PER_ISSUER: usize = 64;
/// The most revoked kids one instance may list (and an issuer remembers).
pub(crate) const MAX_REVOKED_PER_ISSUER: usize = 4 * MAX_KEYS_PER_ISSUER;
/// The most live instances (replicas) of one issuer.
pub(crate) const MAX_INSTANCES_PER_ISSUER: usize = 256;
/// The most document high-water marks remembered per issuer, live
/// instances and ones that left.
pub(crate) const MAX_REMEMBERED_INSTANCES: usize = 4096;
/// The instance a one-set-per-issuer source (`TrustUpdate::Replace`, a JWKS
/// file) fills.
pub const DEFAULT_INSTANCE: &str = "";

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The key.
    Found(&'a PublicKey),
    /// The issuer (some instance of it) revoked this kid.
    Revoked,
    /// The issuer is known; the kid is not (or is no longer usable).
    UnknownKid,
    /// No such issuer.
    UnknownIssuer,
}

/// A change a source asks the writer for.
#[derive(Debug)]
pub enum TrustUpdate {
    /// Start trusting `issuer`, fed by `source`. An issuer already
    /// registered keeps its instances and high-water marks (only its source
    /// label changes), so registering twice is harmless.
    Register {
        /// The issuer identity.
        issuer: String,
        /// Where its keys come from, for `jwks --all`.
        source: String,
    },
    /// Replace the set of the issuer's default instance (a source that
    /// delivers one set per issuer: a JWKS file).
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
    /// Replace one instance's set, delivered without a document (a peer
    /// connection to a release that only has `GetKeys`).
    Instance {
        /// The issuer identity.
        issuer: String,
        /// The instance (for a connection: `peer:<address>`).
        instance: String,
        /// Where it came from, for `jwks --all`.
        source: String,
        /// Its public keys.
        keys: Vec<PublicKey>,
        /// Its bound-token signing keys (none from a release without them).
        bound: Vec<PublicKey>,
        /// Kids it revoked.
        revoked: Vec<String>,
        /// The publisher's per-kid expiry hints.
        expires: HashMap<String, UnixTime>,
        /// When the set arrived.
        at: UnixTime,
    },
    /// Install a verified signed document as the set of (its identity, its
    /// instance); refused as `SetError::Rollback` if a higher sequence of
    /// that instance was ever seen. The issuer must be registered.
    Document {
        /// The document (`verify_document`'s result).
        document: Arc<VerifiedDocument>,
        /// Where it came from, for `jwks --all` (`peer:<address>`,
        /// `directory:<endpoint>`, `direct:<address>`).
        source: String,
        /// When it arrived.
        at: UnixTime,
    },
    /// The instance left (its lease or connection is gone for good): its
    /// keys stay until min(its document's expiry, each key's expiry hint);
    /// its high-water mark is kept.
    InstanceGone {
        /// The issuer identity.
        issuer: String,
        /// The instance.
        instance: String,
        /// When.
        at: UnixTime,
    },
    /// The source lost (or regained) contact with every instance of `issuer`.
    Stale {
        /// The issuer identity.
        issuer: String,
        /// Out of contact?
        stale: bool,
    },
    /// The source lost (or regained) contact with one instance.
    InstanceStale {
        /// The issuer identity.
        issuer: String,
        /// The instance.
        instance: String,
        /// Out of contact?
        stale: bool,
    },
    /// The source failed; the previous sets stay in use.
    Error {
        /// The issuer identity.
        issuer: String,
        /// What failed.
        error: String,
    },
}

// === impl TrustUpdate ===

impl TrustUpdate {
    /// The issuer the update is about.
    pub fn issuer(&self) -> &str {
        match self {
            TrustUpdate::Register { issuer, .. }
            | TrustUpdate::Replace { issuer, .. }
            | TrustUpdate::Instance { issuer, .. }
            | TrustUpdate::InstanceGone { issuer, .. }
            | TrustUpdate::Stale { issuer, .. }
            | TrustUpdate::InstanceStale { issuer, .. }
            | TrustUpdate::Error { issuer, .. } => issuer,
            TrustUpdate::Document { document, .. } => document.claims.identity.as_str(),
        }
    }
}

/// Why an update was refused (the previous set stays).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
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
    /// A new instance past `MAX_INSTANCES_PER_ISSUER`.
    #[error("issuer already has {0} live instances, the limit")]
    TooManyInstances(usize),
    /// A document older than one already seen from that instance.
    #[error(
        "rollback: document seq {got} of {issuer} instance {instance} is below seq {seen} already seen"
    )]
    Rollback {
        /// The issuer identity.
        issuer: String,
        /// The instance.
        instance: String,
        /// The highest sequence seen.
        seen: u64,
        /// The refused document's sequence.
        got: u64,
    },
}

/// An immutable snapshot of every peer issuer's keys.
#[derive(Clone, Debug, Default)]
pub struct TrustSet {
    issuers: HashMap<String, Arc<IssuerKeys>>,
}

// === impl TrustSet ===

impl TrustSet {
    /// Finds `kid` among `issuer`'s signing keys, and nowhere else, at `now`.
    pub fn lookup(&self, issuer: &str, kid: &str, now: UnixTime) -> Lookup<'_> {
        self.lookup_in(issuer, kid, now, KeyClass::Signing)
    }

    /// Finds `kid` among `issuer`'s keys of `class`, and nowhere else, at `now`.
    pub fn lookup_in(&self, issuer: &str, kid: &str, now: UnixTime, class: KeyClass) -> Lookup<'_> {
        match self.issuers.get(issuer) {
            None => Lookup::UnknownIssuer,
            Some(e) => e.lookup(kid, now, class),
        }
    }

    /// Whether `issuer` is trusted at all.
    pub fn knows(&self, issuer: &str) -> bool {
        self.issuers.contains_key(issuer)
    }

    /// One issuer's keys, if trusted.
    pub fn issuer(&self, issuer: &str) -> Option<&IssuerKeys> {
        self.issuers.get(issuer).map(Arc::as_ref)
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
                match self.issuers.get_mut(&issuer) {
                    Some(e) => Arc::make_mut(e).source = source,
                    None => {
                        self.issuers
                            .insert(issuer, Arc::new(IssuerKeys::new(source)));
                    }
                }
                Ok(())
            }
            TrustUpdate::Replace {
                issuer,
                keys,
                revoked,
                expires,
                at,
            } => {
                let source = self.entry(&issuer)?.source.clone();
                self.put_instance(
                    &issuer,
                    DEFAULT_INSTANCE,
                    InstanceKeys::plain(source, keys, Vec::new(), revoked, expires, at),
                )
            }
            TrustUpdate::Instance {
                issuer,
                instance,
                source,
                keys,
                bound,
                revoked,
                expires,
                at,
            } => {
                let set = InstanceKeys::plain(source, keys, bound, revoked, expires, at);
                self.put_instance(&issuer, &instance, set)
            }
            TrustUpdate::Document {
                document,
                source,
                at,
            } => {
                let issuer = document.claims.identity.as_str();
                let entry = self.entry(issuer)?;
                let result = entry.put_document(issuer, &document, source, at);
                if let Err(e) = &result {
                    entry.last_error = Some(format!("refused: {e}"));
                }
                entry.rebuild(Some(at));
                result
            }
            TrustUpdate::InstanceGone {
                issuer,
                instance,
                at,
            } => {
                let entry = self.entry(&issuer)?;
                entry.set_gone(&instance);
                entry.rebuild(Some(at));
                Ok(())
            }
            TrustUpdate::Stale { issuer, stale } => {
                let entry = self.entry(&issuer)?;
                entry.set_stale(None, stale);
                entry.rebuild(None);
                Ok(())
            }
            TrustUpdate::InstanceStale {
                issuer,
                instance,
                stale,
            } => {
                let entry = self.entry(&issuer)?;
                entry.set_stale(Some(&instance), stale);
                entry.rebuild(None);
                Ok(())
            }
            TrustUpdate::Error { issuer, error } => {
                self.entry(&issuer)?.last_error = Some(error);
                Ok(())
            }
        }
    }

    /// Installs a plain set, after the per-set limits.
    fn put_instance(
        &mut self,
        issuer: &str,
        instance: &str,
        set: InstanceKeys,
    ) -> Result<(), SetError> {
        let (keys, revoked) = (
            set.keys().len().max(set.bound_keys().len()),
            set.revoked().len(),
        );
        let refusal = if keys > MAX_KEYS_PER_ISSUER {
            Some(SetError::TooManyKeys(keys))
        } else if revoked > MAX_REVOKED_PER_ISSUER {
            Some(SetError::TooManyRevoked(revoked))
        } else {
            None
        };
        let entry = self.entry(issuer)?;
        if let Some(e) = refusal {
            entry.last_error = Some(format!("refused: {e}"));
            return Err(e);
        }
        let at = set.updated_at;
        let result = entry.put(instance, set);
        if let Err(e) = &result {
            entry.last_error = Some(format!("refused: {e}"));
        }
        entry.rebuild(Some(at));
        result
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
/// keys of both classes, read straight from its key stores' snapshots, and
/// the peers' sets.
#[derive(Debug, Clone, Copy)]
pub struct Anchors<'a> {
    /// This sidecar's identity: the issuer of `own`.
    pub own_id: &'a str,
    /// This sidecar's signing keys (bearer tokens).
    pub own: &'a KeySet,
    /// This sidecar's bound-token signing keys.
    pub own_bound: &'a KeySet,
    /// Every peer issuer's keys.
    pub peers: &'a TrustSet,
}

impl<'a> Anchors<'a> {
    /// Finds `kid` among `issuer`'s keys of `class` only; a bound token's
    /// kid (`<kid>.dpop`) names the key `<kid>`. A kid revoked in either
    /// class is revoked.
    pub fn lookup(&self, issuer: &str, kid: &str, now: UnixTime, class: KeyClass) -> Lookup<'a> {
        let kid = kid.strip_suffix(BOUND_KID_SUFFIX).unwrap_or(kid);
        if issuer == self.own_id {
            let revoked = |set: &KeySet| set.revoked_kids().any(|k| k == kid);
            if revoked(self.own) || revoked(self.own_bound) {
                return Lookup::Revoked;
            }
            let set = match class {
                KeyClass::Signing => self.own,
                KeyClass::Bound => self.own_bound,
            };
            return set
                .published()
                .find(|k| k.kid() == kid)
                .map_or(Lookup::UnknownKid, Lookup::Found);
        }
        self.peers.lookup_in(issuer, kid, now, class)
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
