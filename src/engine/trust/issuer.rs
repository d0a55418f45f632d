//! One issuer's keys: a set per INSTANCE (a replica, as one connection or
//! one signed document delivered it), and the union a verification looks
//! in. The union is an index kid → key (with the instant it stops being
//! usable), rebuilt on every update, so a lookup costs the same whether the
//! issuer has one instance or hundreds. A kid revoked by any instance is
//! revoked for the whole identity. The highest document sequence seen from
//! each instance is remembered even after the instance leaves (bounded), so
//! an older document can never be installed again (rollback).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::{
    Lookup, MAX_INSTANCES_PER_ISSUER, MAX_REMEMBERED_INSTANCES, MAX_REVOKED_PER_ISSUER, SetError,
};
use crate::engine::document::VerifiedDocument;
use crate::jose::PublicKey;
use crate::keys::KeyClass;
use crate::time::UnixTime;

/// How long an instance whose document expired is still shown (and may be
/// fetched directly) before it is forgotten; its high-water mark stays.
const EXPIRED_INSTANCE_KEPT: Duration = Duration::from_secs(3600);

/// The signed document an instance's set came from.
#[derive(Clone, Debug)]
pub struct DocumentState {
    /// Its sequence number.
    pub seq: u64,
    /// When it was signed.
    pub issued_at: UnixTime,
    /// Its `exp`.
    pub expires_at: UnixTime,
    /// `exp` plus the verifier's skew: the keys' last usable instant.
    pub usable_until: UnixTime,
    /// The instance's own peer API, for a direct fetch.
    pub address: Option<String>,
    /// The compact JWS.
    pub jws: Arc<str>,
}

/// One instance's keys as its source last delivered them.
#[derive(Clone, Debug, Default)]
pub struct InstanceKeys {
    /// `peer:<address>`, `file:<path>`, `directory:<…>`, …
    pub source: String,
    keys: Vec<Arc<PublicKey>>,
    /// The keys its bound tokens are signed with: a class of their own.
    bound: Vec<Arc<PublicKey>>,
    /// Per-kid expiry hints, applied once the instance is stale or gone.
    expires: HashMap<String, UnixTime>,
    revoked: Vec<String>,
    /// Its source lost contact with it.
    stale: bool,
    /// It left (its lease or connection is gone for good).
    gone: bool,
    document: Option<DocumentState>,
    /// Last delivery.
    pub updated_at: UnixTime,
    /// The issuer's delivery count at its last delivery: of two instances
    /// listing one kid with different keys, the later delivery's key is
    /// used (as one set replaced another before instances existed), so a
    /// refresh from the issuer's own source restores a key a relay holding
    /// its certificate planted.
    delivery: u64,
}

// === impl InstanceKeys ===

impl InstanceKeys {
    /// A set delivered without a document (a legacy peer, a JWKS file).
    pub(super) fn plain(
        source: String,
        keys: Vec<PublicKey>,
        bound: Vec<PublicKey>,
        revoked: Vec<String>,
        expires: HashMap<String, UnixTime>,
        at: UnixTime,
    ) -> Self {
        Self {
            source,
            keys: keys.into_iter().map(Arc::new).collect(),
            bound: bound.into_iter().map(Arc::new).collect(),
            expires,
            revoked,
            updated_at: at,
            ..Self::default()
        }
    }

    /// A set delivered as a verified document.
    pub(super) fn from_document(source: String, doc: &VerifiedDocument, at: UnixTime) -> Self {
        let c = &doc.claims;
        Self {
            source,
            keys: c.keys.iter().cloned().map(Arc::new).collect(),
            bound: c.bound_keys.iter().cloned().map(Arc::new).collect(),
            expires: c.key_expires.iter().map(|(k, t)| (k.clone(), *t)).collect(),
            revoked: c.revoked.clone(),
            stale: false,
            gone: false,
            document: Some(DocumentState {
                seq: c.seq,
                issued_at: c.issued_at,
                expires_at: c.expires_at,
                usable_until: doc.usable_until,
                address: c.address.clone(),
                jws: doc.jws.clone(),
            }),
            updated_at: at,
            delivery: 0,
        }
    }

    /// Its keys, as delivered.
    pub fn keys(&self) -> &[Arc<PublicKey>] {
        &self.keys
    }

    /// Its bound-token signing keys, as delivered.
    pub fn bound_keys(&self) -> &[Arc<PublicKey>] {
        &self.bound
    }

    fn class(&self, class: KeyClass) -> &[Arc<PublicKey>] {
        match class {
            KeyClass::Signing => &self.keys,
            KeyClass::Bound => &self.bound,
        }
    }

    /// The kids it revoked.
    pub fn revoked(&self) -> &[String] {
        &self.revoked
    }

    /// Whether its source lost contact with it.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// Whether it left.
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// The document its set came from, if any.
    pub fn document(&self) -> Option<&DocumentState> {
        self.document.as_ref()
    }

    /// The last instant `kid` of this instance is usable (None: no bound):
    /// a document's keys while it is unexpired; once the instance is stale
    /// or gone, no later than the key's expiry hint either.
    fn usable_until(&self, kid: &str) -> Option<UnixTime> {
        let mut until = self.document.as_ref().map(|d| d.usable_until);
        if (self.stale || self.gone)
            && let Some(&hint) = self.expires.get(kid)
        {
            until = Some(until.map_or(hint, |u| u.min(hint)));
        }
        until
    }

    /// Whether nothing of it can be used again at `at`, so it may be dropped.
    fn finished(&self, at: UnixTime) -> bool {
        if let Some(d) = &self.document
            && d.usable_until + EXPIRED_INSTANCE_KEPT < at
        {
            return true;
        }
        self.gone
            && self
                .keys
                .iter()
                .chain(&self.bound)
                .all(|k| self.usable_until(k.kid()).is_some_and(|t| t < at))
    }
}

/// A key of the union, and the last instant it is usable (None: no bound).
#[derive(Clone, Debug)]
struct Usable {
    key: Arc<PublicKey>,
    until: Option<UnixTime>,
}

/// The keys of `index` usable at `now`, sorted by kid.
fn usable(index: &HashMap<String, Usable>, now: UnixTime) -> Vec<Arc<PublicKey>> {
    let mut keys: Vec<_> = index
        .values()
        .filter(|u| u.until.is_none_or(|t| t >= now))
        .map(|u| u.key.clone())
        .collect();
    keys.sort_by(|a, b| a.kid().cmp(b.kid()));
    keys
}

/// One issuer: its instances, their union, its remembered revocations and
/// the instances' document high-water marks.
#[derive(Clone, Debug, Default)]
pub struct IssuerKeys {
    /// How the issuer is configured: `self`, `file:<path>`, `peer:<address>`, …
    pub source: String,
    instances: HashMap<String, Arc<InstanceKeys>>,
    index: HashMap<String, Usable>,
    /// The bound-token keys, kept apart: a bearer token is never checked
    /// against one, a bound token only against one (or, in the legacy
    /// form, against `index`; see `verify`).
    bound_index: HashMap<String, Usable>,
    revoked: HashSet<String>,
    /// instance → (highest document seq seen, when).
    high_water: HashMap<String, (u64, UnixTime)>,
    /// Deliveries so far (orders the instances' sets).
    deliveries: u64,
    /// Last successful update (EPOCH: never).
    pub updated_at: UnixTime,
    /// Last error of a source, if its latest attempt failed.
    pub last_error: Option<String>,
}

// === impl IssuerKeys ===

impl IssuerKeys {
    /// An issuer fed by `source`, with no keys yet.
    pub(super) fn new(source: String) -> Self {
        Self {
            source,
            ..Self::default()
        }
    }

    /// Every key of the union (usable or not at any instant), sorted by kid.
    pub fn keys(&self) -> Vec<Arc<PublicKey>> {
        let mut keys: Vec<_> = self.index.values().map(|u| u.key.clone()).collect();
        keys.sort_by(|a, b| a.kid().cmp(b.kid()));
        keys
    }

    /// The keys usable at `now`, sorted by kid.
    pub fn usable_keys(&self, now: UnixTime) -> Vec<Arc<PublicKey>> {
        usable(&self.index, now)
    }

    /// The bound-token keys usable at `now`, sorted by kid (diagnostics;
    /// never exported to third-party verifiers).
    pub fn usable_bound_keys(&self, now: UnixTime) -> Vec<Arc<PublicKey>> {
        usable(&self.bound_index, now)
    }

    /// The revoked kids, sorted.
    pub fn revoked(&self) -> Vec<String> {
        let mut r: Vec<_> = self.revoked.iter().cloned().collect();
        r.sort();
        r
    }

    /// Every instance with its set, sorted by instance id.
    pub fn instances(&self) -> Vec<(&str, &InstanceKeys)> {
        let mut v: Vec<_> = self
            .instances
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// The highest document sequence seen from `instance`, even if it left.
    pub fn high_water(&self, instance: &str) -> Option<u64> {
        self.high_water.get(instance).map(|(s, _)| *s)
    }

    /// Finds `kid` among the keys of `class` in the union at `now`: one
    /// revocation check and one index probe, whatever the number of
    /// instances.
    pub(super) fn lookup(&self, kid: &str, now: UnixTime, class: KeyClass) -> Lookup<'_> {
        if self.revoked.contains(kid) {
            return Lookup::Revoked;
        }
        let index = match class {
            KeyClass::Signing => &self.index,
            KeyClass::Bound => &self.bound_index,
        };
        match index.get(kid) {
            Some(u) if u.until.is_none_or(|t| t >= now) => Lookup::Found(&u.key),
            _ => Lookup::UnknownKid,
        }
    }

    /// Installs `set` as `instance`'s, refusing a new instance past the limit.
    pub(super) fn put(&mut self, instance: &str, set: InstanceKeys) -> Result<(), SetError> {
        if !self.instances.contains_key(instance) {
            self.prune(set.updated_at);
            if self.instances.len() >= MAX_INSTANCES_PER_ISSUER {
                return Err(SetError::TooManyInstances(self.instances.len()));
            }
        }
        self.updated_at = set.updated_at;
        self.last_error = None;
        self.deliveries += 1;
        let set = InstanceKeys {
            delivery: self.deliveries,
            ..set
        };
        self.instances.insert(instance.to_owned(), Arc::new(set));
        Ok(())
    }

    /// Installs a verified document as its instance's set, unless a higher
    /// sequence of that instance was ever seen (rollback). The installed
    /// document delivered again (equal sequence) changes no key but counts
    /// as the last delivery and marks its instance in contact (neither
    /// stale nor gone).
    pub(super) fn put_document(
        &mut self,
        issuer: &str,
        doc: &VerifiedDocument,
        source: String,
        at: UnixTime,
    ) -> Result<(), SetError> {
        let (instance, seq) = (doc.claims.instance.as_str(), doc.claims.seq);
        if let Some(seen) = self.high_water(instance) {
            if seq < seen {
                return Err(SetError::Rollback {
                    issuer: issuer.to_owned(),
                    instance: instance.to_owned(),
                    seen,
                    got: seq,
                });
            }
            if let Some(inst) = self.instances.get_mut(instance)
                && inst.document.as_ref().is_some_and(|d| d.seq == seq)
            {
                // The very document installed, delivered again (a reconnect,
                // a lease put again): its instance is evidently in contact.
                let inst = Arc::make_mut(inst);
                inst.stale = false;
                inst.gone = false;
                inst.updated_at = at;
                self.deliveries += 1;
                inst.delivery = self.deliveries;
                self.updated_at = at;
                self.last_error = None;
                return Ok(());
            }
        }
        self.put(instance, InstanceKeys::from_document(source, doc, at))?;
        self.high_water.insert(instance.to_owned(), (seq, at));
        self.bound_high_water();
        Ok(())
    }

    /// Marks `instance` stale (or in contact again).
    pub(super) fn set_stale(&mut self, instance: Option<&str>, stale: bool) {
        for (id, inst) in self.instances.iter_mut() {
            if instance.is_none_or(|i| i == id) {
                Arc::make_mut(inst).stale = stale;
            }
        }
    }

    /// Marks `instance` gone: its keys stay until min(document exp, hint).
    pub(super) fn set_gone(&mut self, instance: &str) {
        if let Some(inst) = self.instances.get_mut(instance) {
            Arc::make_mut(inst).gone = true;
        }
    }

    /// Forgets instances nothing of which can be used again (their
    /// high-water marks stay).
    fn prune(&mut self, at: UnixTime) {
        self.instances.retain(|_, i| !i.finished(at));
    }

    /// Keeps at most `MAX_REMEMBERED_INSTANCES` marks, dropping the oldest
    /// of instances that are no longer present.
    fn bound_high_water(&mut self) {
        let excess = self
            .high_water
            .len()
            .saturating_sub(MAX_REMEMBERED_INSTANCES);
        if excess == 0 {
            return;
        }
        let mut gone: Vec<_> = self
            .high_water
            .iter()
            .filter(|(i, _)| !self.instances.contains_key(*i))
            .map(|(i, (_, t))| (*t, i.clone()))
            .collect();
        gone.sort();
        for (_, i) in gone.into_iter().take(excess) {
            self.high_water.remove(&i);
        }
    }

    /// Rebuilds the revocations and the kid index from the instances; with
    /// `at`, first forgets instances that are finished.
    pub(super) fn rebuild(&mut self, at: Option<UnixTime>) {
        if let Some(at) = at {
            self.prune(at);
        }
        let current: HashSet<String> = self
            .instances
            .values()
            .flat_map(|i| i.revoked.iter().cloned())
            .collect();
        // Remember earlier revocations too, within the bound; past it the
        // instances' current lists are authoritative.
        let merged: HashSet<String> = current.union(&self.revoked).cloned().collect();
        self.revoked = if merged.len() <= MAX_REVOKED_PER_ISSUER {
            merged
        } else {
            current
        };
        self.bound_index = self.build_index(KeyClass::Bound);
        let mut index = self.build_index(KeyClass::Signing);
        // A key some instance names a bound key never verifies a bearer
        // token, whatever another delivery says of it.
        index.retain(|kid, _| !self.bound_index.contains_key(kid));
        self.index = index;
    }

    /// The kid index of one class of keys over every instance.
    fn build_index(&self, class: KeyClass) -> HashMap<String, Usable> {
        // One entry per kid. Kids are thumbprints for every key tokend makes,
        // so two instances listing one kid list one key; should they differ
        // (a plain set from a compromised or foreign relay reusing a kid),
        // a key from a signed document beats one from a plain set, then the
        // later delivery wins (the issuer's delivery count, so a re-delivery
        // of an unchanged set takes the kid back, whatever the clock): a
        // poisoned entry cannot shadow a key its owner signed for.
        let mut index: HashMap<String, (Usable, (bool, u64))> = HashMap::new();
        for inst in self.instances.values() {
            let rank = (inst.document.is_some(), inst.delivery);
            for key in inst.class(class) {
                if self.revoked.contains(key.kid()) {
                    continue;
                }
                let until = inst.usable_until(key.kid());
                let fresh = || {
                    (
                        Usable {
                            key: key.clone(),
                            until,
                        },
                        rank,
                    )
                };
                match index.get_mut(key.kid()) {
                    None => {
                        index.insert(key.kid().to_owned(), fresh());
                    }
                    Some((u, r)) if u.key.fingerprint() == key.fingerprint() => {
                        u.until = match (u.until, until) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        };
                        *r = (*r).max(rank);
                    }
                    Some(entry) if rank > entry.1 => *entry = fresh(),
                    Some(_) => {}
                }
            }
        }
        index.into_iter().map(|(k, (u, _))| (k, u)).collect()
    }
}
