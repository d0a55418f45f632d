//! The sidecar's own signing keys. `KeyStore` is the single writer (owned by
//! the rotation task); it publishes immutable `KeySet` snapshots through a
//! `watch` channel that any number of `KeyView` readers borrow from: the
//! minter, the verifier's own-issuer entry, the peer server, the admin API.
//! `ProofKeyStore` keeps the instance's ES256 proof keys for bound tokens.
//! A second `KeyStore` of class `Bound` keeps the RSA keys bound tokens are
//! signed with in `keys_dir/bound/`, under the same disk rules and rotation;
//! `OwnKeys` pairs the two views for whoever publishes the own keys.

mod disk;
mod generate;
mod instance;
mod key;
mod proof;
mod rotation;
mod safe_path;
mod store;

use std::sync::Arc;

use tokio::sync::watch;

pub use self::disk::parse_pkcs8_pem;
pub(crate) use self::disk::{DiskError, atomic_write};
pub(crate) use self::generate::GenerateError;
pub use self::generate::generate_pkcs8;
pub use self::instance::InstanceState;
pub(crate) use self::key::{
    KeyMaterialError, KeyRecord, delete_after, ever_signs, retires_at, state_at,
};
pub use self::key::{Lifecycle, SigningKey};
pub(crate) use self::proof::ProofKeyStore;
pub(crate) use self::rotation::{Command, run as run_rotation};
pub(crate) use self::safe_path::{check_file, daemon_uid};
pub use self::store::KeyStore;
use crate::jose::PublicKey;
use crate::time::UnixTime;

/// Why a key-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Disk trouble (names the file).
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// Freshly generated material was refused (should not happen).
    #[error("generated key refused: {0}")]
    Material(#[from] KeyMaterialError),
    /// No key with that kid.
    #[error("no key with kid {0:?}")]
    NotFound(String),
    /// The key is already revoked.
    #[error("key {0:?} is already revoked")]
    AlreadyRevoked(String),
}

/// Which of this sidecar's two RSA key classes a store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyClass {
    /// The signing keys of bearer tokens: published everywhere (JWKS,
    /// SPIFFE bundles, peers, documents).
    Signing,
    /// The keys bound tokens (`cnf.jkt`) are signed with: published only
    /// to tokend verifiers (peer key exchange, signed documents), never in
    /// a JWKS or SPIFFE bundle, so a stolen bound token verifies at no
    /// bearer verifier.
    Bound,
}

impl KeyClass {
    /// The subdirectory of `keys_dir` the class is kept in (none: the root).
    pub(crate) fn subdir(self) -> Option<&'static str> {
        match self {
            KeyClass::Signing => None,
            KeyClass::Bound => Some(BOUND_DIR),
        }
    }

    /// A name for logs and errors.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KeyClass::Signing => "signing",
            KeyClass::Bound => "bound",
        }
    }

    /// The metric `tokend_<name>` of this class (`tokend_bound_<name>` for
    /// bound keys, so the signing keys' series keep their names).
    pub(crate) fn metric(self, name: &str) -> String {
        match self {
            KeyClass::Signing => format!("tokend_{name}"),
            KeyClass::Bound => format!("tokend_bound_{name}"),
        }
    }
}

/// The subdirectory of `keys_dir` the bound-token signing keys live in.
pub(crate) const BOUND_DIR: &str = "bound";

/// One key of a snapshot: its record and, unless revoked, its material.
#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    /// The manifest record.
    pub record: KeyRecord,
    /// The key (absent once revoked).
    pub key: Option<Arc<SigningKey>>,
}

/// An immutable snapshot of the key store, sorted by activation time.
#[derive(Debug)]
pub struct KeySet {
    /// Increases with every change; peers use it to notice updates.
    pub version: u64,
    /// The lifecycle timings in force.
    pub lifecycle: Lifecycle,
    entries: Vec<KeyEntry>,
}

// === impl KeySet ===

impl KeySet {
    fn new(version: u64, lifecycle: Lifecycle, mut entries: Vec<KeyEntry>) -> Self {
        entries.sort_by_key(|e| (e.record.activates_at, e.record.seq));
        Self {
            version,
            lifecycle,
            entries,
        }
    }

    /// Every record, for state derivation.
    pub fn records(&self) -> Vec<KeyRecord> {
        self.entries.iter().map(|e| e.record.clone()).collect()
    }

    /// The key that signs at `now`: the most recently activated key, unless
    /// that one is revoked (an older key never resumes signing).
    pub fn signing_key(&self, now: UnixTime) -> Option<&Arc<SigningKey>> {
        let newest = self
            .entries
            .iter()
            .rev()
            .find(|e| e.record.activates_at <= now && ever_signs(&e.record))?;
        if newest.record.revoked_at.is_some() {
            return None;
        }
        newest.key.as_ref()
    }

    /// The public keys peers may verify with: every unrevoked key still held.
    pub fn published(&self) -> impl Iterator<Item = &PublicKey> {
        self.entries
            .iter()
            .filter(|e| e.record.revoked_at.is_none())
            .filter_map(|e| e.key.as_ref().map(|k| k.public()))
    }

    /// Kids revoked and still remembered.
    pub fn revoked_kids(&self) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(|e| e.record.revoked_at.is_some())
            .map(|e| e.record.kid.as_str())
    }

    /// kid → the latest instant a token signed by that (unrevoked) key can
    /// still be valid if this sidecar rotates on schedule: a retired key's
    /// last token expires at retirement + grace; a key with no successor yet
    /// is given two rotation intervals beyond its activation, plus grace.
    /// Peers keep a key they can no longer refresh until this instant.
    pub fn expiry_hints(&self) -> std::collections::BTreeMap<String, UnixTime> {
        let records = self.records();
        let lc = self.lifecycle;
        records
            .iter()
            .filter(|r| r.revoked_at.is_none())
            .map(|r| {
                let until = match retires_at(r, &records) {
                    Some(t) => t + lc.grace,
                    None => r.activates_at + 2 * lc.interval + lc.grace,
                };
                (r.kid.clone(), until)
            })
            .collect()
    }

    /// The published set as a JWKS document.
    pub fn jwks_json(&self) -> String {
        crate::jose::to_jwks_json(self.published())
    }

    /// A set with no key (an engine built without bound keys).
    pub(crate) fn empty(lifecycle: Lifecycle) -> Self {
        Self::new(0, lifecycle, Vec::new())
    }
}

/// A reader of the key store's snapshots. Cheap to clone.
#[derive(Clone, Debug)]
pub struct KeyView(watch::Receiver<Arc<KeySet>>);

// === impl KeyView ===

impl KeyView {
    /// The current snapshot.
    pub fn current(&self) -> Arc<KeySet> {
        self.0.borrow().clone()
    }

    /// A receiver that wakes on every change (for streams to peers).
    pub fn subscribe(&self) -> watch::Receiver<Arc<KeySet>> {
        self.0.clone()
    }

    /// A view that always shows a set with no key.
    pub(crate) fn empty(lifecycle: Lifecycle) -> Self {
        Self(watch::channel(Arc::new(KeySet::empty(lifecycle))).1)
    }
}

/// This sidecar's own keys of both classes, as peers are told of them: the
/// peer key exchange and the signed documents publish both, each class
/// apart; every export to third-party verifiers reads `signing` only.
#[derive(Clone, Debug)]
pub(crate) struct OwnKeys {
    /// Bearer tokens' signing keys.
    pub(crate) signing: KeyView,
    /// Bound tokens' signing keys.
    pub(crate) bound: KeyView,
}

/// A snapshot of both classes.
#[derive(Clone, Debug)]
pub(crate) struct OwnSet {
    /// Bearer tokens' signing keys.
    pub(crate) signing: Arc<KeySet>,
    /// Bound tokens' signing keys.
    pub(crate) bound: Arc<KeySet>,
}

impl OwnKeys {
    /// Both current snapshots.
    pub(crate) fn current(&self) -> OwnSet {
        OwnSet {
            signing: self.signing.current(),
            bound: self.bound.current(),
        }
    }
}

impl OwnSet {
    /// Grows with every change of either class (each version only grows).
    pub(crate) fn version(&self) -> u64 {
        self.signing.version + self.bound.version
    }

    /// Kids of both classes revoked and still remembered.
    pub(crate) fn revoked_kids(&self) -> Vec<String> {
        self.signing
            .revoked_kids()
            .chain(self.bound.revoked_kids())
            .map(str::to_owned)
            .collect()
    }

    /// Both classes' expiry hints (kids are thumbprints: they never collide).
    pub(crate) fn expiry_hints(&self) -> std::collections::BTreeMap<String, UnixTime> {
        let mut hints = self.signing.expiry_hints();
        hints.extend(self.bound.expiry_hints());
        hints
    }
}
