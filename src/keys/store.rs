//! `KeyStore`: the single writer of the keys directory and of the published
//! snapshots. Every change is key file first, then the manifest (the commit
//! point), then a new `KeySet` for the readers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::disk::{DiskError, KeyDir};
use super::generate;
use super::key::{KeyRecord, Lifecycle, SigningKey};
use super::{KeyClass, KeyEntry, KeyError, KeySet, KeyView};
use crate::time::{SharedClock, UnixTime};

/// The single writer of the keys directory and of the published snapshots.
pub struct KeyStore {
    class: KeyClass,
    dir: KeyDir,
    lifecycle: Lifecycle,
    bits: u32,
    records: Vec<KeyRecord>,
    keys: HashMap<String, Arc<SigningKey>>,
    version: u64,
    tx: watch::Sender<Arc<KeySet>>,
    clock: SharedClock,
    /// A standby key (PKCS#8 DER and parsed) for revocations; see `refill_spare`.
    spare: Option<(Vec<u8>, SigningKey)>,
    /// Whether `refill_spare` keeps one (always, but for in-process test sidecars).
    standby: bool,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("class", &self.class)
            .field("dir", &self.dir)
            .field("keys", &self.records.len())
            .finish()
    }
}

// === impl KeyStore ===

impl KeyStore {
    /// Opens the keys directory, loading and checking every key. Changes
    /// nothing but leftovers of interrupted writes: the daemon applies the
    /// first rotation plan (which gives a fresh directory its first key).
    pub async fn open(
        dir: &std::path::Path,
        lifecycle: Lifecycle,
        bits: u32,
        clock: SharedClock,
    ) -> Result<(Self, KeyView), KeyError> {
        Self::open_class(dir, KeyClass::Signing, lifecycle, bits, clock).await
    }

    /// Opens the store of `class` in `keys_dir` (for `Bound`, the
    /// subdirectory `bound/`, created 0700 when absent: a keys directory of
    /// an earlier release has none and loads as before). Same checks, same
    /// writes, same rotation as the signing keys. A bound store keeps no
    /// standby key (one RSA keygen less at every start): revoking its
    /// signing key generates the successor then, while the old one signs.
    pub async fn open_class(
        keys_dir: &std::path::Path,
        class: KeyClass,
        lifecycle: Lifecycle,
        bits: u32,
        clock: SharedClock,
    ) -> Result<(Self, KeyView), KeyError> {
        let dir = match class.subdir() {
            Some(sub) => keys_dir.join(sub),
            None => keys_dir.to_owned(),
        };
        let dir = dir.as_path();
        let path = dir.to_owned();
        let dir = KeyDir::open(dir)?;
        let loaded = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || dir.load())
                .await
                .map_err(|e| DiskError::Io {
                    op: "load keys from",
                    path,
                    source: std::io::Error::other(format!("loader task failed: {e}")),
                })??
        };
        let mut records = Vec::new();
        let mut keys = HashMap::new();
        for l in loaded.unwrap_or_default() {
            if let Some(k) = l.key {
                keys.insert(l.record.kid.clone(), Arc::new(k));
            }
            records.push(l.record);
        }
        let (tx, rx) = watch::channel(Arc::new(KeySet::new(0, lifecycle, Vec::new())));
        let mut store = Self {
            class,
            dir,
            lifecycle,
            bits,
            records,
            keys,
            version: 0,
            tx,
            clock,
            spare: None,
            standby: class == KeyClass::Signing,
        };
        store.publish();
        Ok((store, KeyView(rx)))
    }

    /// Applies the rotation plan at `now`: a fresh directory gets its first
    /// key, due rotations and deletions happen.
    pub async fn apply_plan(&mut self, now: UnixTime) -> Result<(), KeyError> {
        super::rotation::apply(self, now).await
    }

    /// The records, for planning.
    pub fn records(&self) -> &[KeyRecord] {
        &self.records
    }

    /// The lifecycle timings.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Which class of keys it holds.
    pub fn class(&self) -> KeyClass {
        self.class
    }

    fn publish(&mut self) {
        self.version += 1;
        let entries = self
            .records
            .iter()
            .map(|r| KeyEntry {
                record: r.clone(),
                key: self.keys.get(&r.kid).cloned(),
            })
            .collect();
        self.tx
            .send_replace(Arc::new(KeySet::new(self.version, self.lifecycle, entries)));
    }

    /// Generates a key that starts signing at `at`, but never before it has
    /// been published for `lead` (zero: it may sign at once). The activation
    /// time is fixed after generation, from a whole-second clock, and rounded
    /// up, so peers always get at least `lead` of notice. Order: key file,
    /// then the manifest (the commit point), then the snapshot, so peers see
    /// it at once.
    pub async fn generate(&mut self, at: UnixTime, lead: Duration) -> Result<KeyRecord, KeyError> {
        let der = generate::generate_pkcs8_async(self.bits).await?;
        let key = SigningKey::from_pkcs8(&der)?;
        let file = self.write_key(key.kid(), &der).await?;
        let now = self.clock.now();
        let earliest = if lead.is_zero() {
            now
        } else {
            now + lead + Duration::from_secs(1)
        };
        let activates_at = at.max(earliest);
        let record = KeyRecord {
            kid: key.kid().to_owned(),
            file: file.clone(),
            bits: self.bits,
            seq: self.next_seq(),
            created_at: now,
            activates_at,
            revoked_at: None,
        };
        self.records.push(record.clone());
        if let Err(e) = self.commit(&self.records).await {
            self.records.pop();
            self.discard_file(&file).await;
            return Err(e);
        }
        match self.class {
            KeyClass::Signing => {
                tracing::info!(kid = %record.kid, activates_at = %activates_at, "generated signing key")
            }
            KeyClass::Bound => {
                tracing::info!(kid = %record.kid, activates_at = %activates_at, "generated bound-token signing key")
            }
        }
        metrics::counter!(self.class.metric("keys_generated_total")).increment(1);
        self.keys.insert(record.kid.clone(), Arc::new(key));
        self.publish();
        Ok(record)
    }

    /// Keeps one unpublished key in memory for the next revocation, so
    /// revoking the signing key costs a file write, not an RSA keygen. Never
    /// on disk nor published until used; lost harmlessly on restart.
    pub async fn refill_spare(&mut self) -> Result<(), KeyError> {
        if self.standby && self.spare.is_none() {
            let der = generate::generate_pkcs8_async(self.bits).await?;
            let key = SigningKey::from_pkcs8(&der)?;
            self.spare = Some((der, key));
        }
        Ok(())
    }

    /// Whether to keep a standby key (default yes). Without one, revoking the
    /// signing key with no pending successor generates the successor then.
    pub(crate) fn set_standby(&mut self, on: bool) {
        self.standby = on;
        if !on {
            self.spare = None;
        }
    }

    async fn take_spare_or_generate(&mut self) -> Result<(Vec<u8>, SigningKey), KeyError> {
        if let Some(spare) = self.spare.take() {
            return Ok(spare);
        }
        let der = generate::generate_pkcs8_async(self.bits).await?;
        let key = SigningKey::from_pkcs8(&der)?;
        Ok((der, key))
    }

    fn next_seq(&self) -> u64 {
        self.records
            .iter()
            .map(|r| r.seq)
            .max()
            .map_or(1, |m| m + 1)
    }

    /// Revokes `kid` now. If it is the signing key, a successor signs at once:
    /// the pending next key if there is one, else a freshly generated key. The
    /// revocation and the successor are committed in one manifest write.
    pub async fn revoke(&mut self, kid: &str) -> Result<(KeyRecord, String), KeyError> {
        let idx = self
            .records
            .iter()
            .position(|r| r.kid == kid)
            .ok_or_else(|| KeyError::NotFound(kid.to_owned()))?;
        if self.records[idx].revoked_at.is_some() {
            return Err(KeyError::AlreadyRevoked(kid.to_owned()));
        }
        let now = self.clock.now();
        let signing_now = self
            .tx
            .borrow()
            .signing_key(now)
            .map(|k| k.kid().to_owned());
        let mut new_records = self.records.clone();
        let mut now = now;
        if signing_now.as_deref() == Some(kid) {
            let pending = new_records
                .iter_mut()
                .filter(|r| r.revoked_at.is_none() && r.activates_at > now)
                .min_by_key(|r| (r.activates_at, r.seq));
            match pending {
                Some(p) => p.activates_at = now,
                None => {
                    // The standby key if there is one (no keygen on the emergency
                    // path); the manifest below commits both changes together.
                    let (der, key) = self.take_spare_or_generate().await?;
                    let file = self.write_key(key.kid(), &der).await?;
                    now = self.clock.now();
                    new_records.push(KeyRecord {
                        kid: key.kid().to_owned(),
                        file,
                        bits: self.bits,
                        seq: self.next_seq(),
                        created_at: now,
                        activates_at: now,
                        revoked_at: None,
                    });
                    self.keys.insert(key.kid().to_owned(), Arc::new(key));
                }
            }
        }
        let old_file = std::mem::take(&mut new_records[idx].file);
        new_records[idx].revoked_at = Some(now);
        self.commit(&new_records).await?;
        self.records = new_records;
        self.keys.remove(kid);
        self.publish();
        self.discard_file(&old_file).await;
        let active = self
            .tx
            .borrow()
            .signing_key(now)
            .map(|k| k.kid().to_owned())
            .unwrap_or_default();
        match self.class {
            KeyClass::Signing => tracing::warn!(kid, active = %active, "revoked signing key"),
            KeyClass::Bound => {
                tracing::warn!(kid, active = %active, "revoked bound-token signing key")
            }
        }
        metrics::counter!(self.class.metric("keys_revoked_total")).increment(1);
        Ok((self.records[idx].clone(), active))
    }

    /// Forgets a key whose last token has expired: manifest first, then the file.
    pub async fn forget(&mut self, kid: &str) -> Result<(), KeyError> {
        let Some(idx) = self.records.iter().position(|r| r.kid == kid) else {
            return Ok(());
        };
        let mut new_records = self.records.clone();
        let rec = new_records.remove(idx);
        self.commit(&new_records).await?;
        self.records = new_records;
        self.keys.remove(kid);
        self.publish();
        if !rec.file.is_empty() {
            self.discard_file(&rec.file).await;
        }
        tracing::info!(kid, class = self.class.as_str(), "deleted expired key");
        Ok(())
    }

    /// Runs `f` on the keys directory on tokio's blocking pool: key files
    /// and the manifest are written with fsyncs, which must not stall the
    /// async workers that answer verifications.
    async fn on_disk<R, F>(&self, op: &'static str, f: F) -> Result<R, DiskError>
    where
        F: FnOnce(&KeyDir) -> Result<R, DiskError> + Send + 'static,
        R: Send + 'static,
    {
        let dir = self.dir.clone();
        let path = self.dir.path().to_owned();
        tokio::task::spawn_blocking(move || f(&dir))
            .await
            .map_err(|e| DiskError::Io {
                op,
                path,
                source: std::io::Error::other(format!("disk task failed: {e}")),
            })?
    }

    /// Writes a key file (off the async workers); its file name.
    async fn write_key(&self, kid: &str, der: &[u8]) -> Result<String, DiskError> {
        let (kid, der) = (kid.to_owned(), der.to_vec());
        self.on_disk("write a key file in", move |d| d.write_key(&kid, &der))
            .await
    }

    /// Writes the manifest: the commit point. A failure after the rename (the
    /// directory fsync) means the change is already visible, so it counts as
    /// committed and is only logged; anything earlier is an error and nothing
    /// changed.
    async fn commit(&self, records: &[KeyRecord]) -> Result<(), KeyError> {
        let records = records.to_vec();
        match self
            .on_disk("write the manifest in", move |d| d.write_manifest(&records))
            .await
        {
            Ok(()) => Ok(()),
            Err(e @ DiskError::Unsynced { .. }) => {
                tracing::error!(error = %e, "key manifest committed but not yet durable");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a key file the manifest no longer names. Failure is logged, not
    /// returned: the change is committed, and the next start removes the file.
    async fn discard_file(&self, name: &str) {
        let owned = name.to_owned();
        if let Err(e) = self
            .on_disk("remove a key file from", move |d| d.remove_key_file(&owned))
            .await
        {
            tracing::warn!(file = name, error = %e, "could not remove key file; it is removed at next start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ManualClock;

    fn t(s: i64) -> UnixTime {
        UnixTime::from_secs(s)
    }

    /// Revoking the next key shortly before it activates leaves the current key
    /// signing (no gap), and a key file that cannot be removed does not stop
    /// the revocation from being published.
    #[tokio::test]
    async fn revoking_next_key_keeps_the_active_key_signing() {
        let dir = tempfile::tempdir().expect("tmp");
        let clock = ManualClock::at(t(1_000));
        let lc = Lifecycle {
            interval: Duration::from_secs(1_000),
            publish_ahead: Duration::from_secs(100),
            grace: Duration::from_secs(60),
        };
        let (mut store, view) = KeyStore::open(dir.path(), lc, 2048, Arc::new(clock.clone()))
            .await
            .expect("open");
        super::super::rotation::apply(&mut store, t(1_000))
            .await
            .expect("first key");
        let a = view
            .current()
            .signing_key(t(1_000))
            .expect("a")
            .kid()
            .to_owned();
        let b = store
            .generate(t(1_000), Duration::from_secs(100))
            .await
            .expect("next");
        assert_eq!(b.activates_at, t(1_101));
        clock.set(t(1_096));
        let (revoked, active) = store.revoke(&b.kid).await.expect("revoke");
        assert_eq!(revoked.kid, b.kid);
        assert_eq!(active, a);
        for at in [1_096, 1_101, 1_500] {
            assert_eq!(
                view.current()
                    .signing_key(t(at))
                    .map(|k| k.kid().to_owned()),
                Some(a.clone()),
                "at {at}"
            );
        }
        assert!(view.current().revoked_kids().any(|k| k == b.kid));
        assert!(!view.current().published().any(|k| k.kid() == b.kid));
    }

    /// A keys directory written by tokend 0.1.0 (`tests/fixtures/README.md`).
    const FIXTURE_V0_1_0: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keys-v0.1.0");
    /// The instant the fixture's states are given for (see its README).
    const FIXTURE_V0_1_0_T: i64 = 1_796_190_181;

    /// The manifest's records, read as plain JSON (not through `KeyDir`).
    fn manifest_records(dir: &std::path::Path) -> Vec<KeyRecord> {
        let text = std::fs::read(dir.join("keys.json")).expect("read keys.json");
        let mut doc: serde_json::Value = serde_json::from_slice(&text).expect("keys.json is JSON");
        assert_eq!(doc["format"], 1, "manifest format");
        serde_json::from_value(doc["keys"].take()).expect("manifest records")
    }

    /// The keys directory tokend 0.1.0 wrote still loads, unchanged: every
    /// kid keeps its state at T, the same key signs, exactly the unrevoked
    /// keys are published, and the manifest on disk keeps every record.
    #[tokio::test]
    async fn loads_keys_dir_written_by_v0_1_0() {
        use std::os::unix::fs::PermissionsExt;

        use crate::keys::key::{KeyState, state_at};
        use crate::keys::rotation;

        const T: UnixTime = UnixTime::from_secs(FIXTURE_V0_1_0_T);
        // [rotation] interval = "20s", publish_ahead = "8s"; [tokens]
        // max_ttl = "2m" and the default clock_skew of 30s.
        let lc = Lifecycle {
            interval: Duration::from_secs(20),
            publish_ahead: Duration::from_secs(8),
            grace: Duration::from_secs(120 + 30),
        };
        let expected = [
            (
                "HrxaIk2t4lUxof1LoOSJ0eIPKjPqZ4A_jt2snyfaLVg",
                KeyState::Revoked,
            ),
            (
                "lzbNwqVyxtmRkggsbrqkro7GtCId8qKCjdp4e7eVtpk",
                KeyState::Retired,
            ),
            (
                "rQEahNcHT_Jtck0hrsISUdT1Ew9PWf5lZ2V6FZHDz9c",
                KeyState::Active,
            ),
            (
                "o4GEmDmUFYHhpLGq3K0pEe6xSjr9PObwzSVPUc8c844",
                KeyState::Revoked,
            ),
            (
                "CfH-fOKGOU0cmRDu7Z5pYKUacRRUVruAZdLrMFXE94U",
                KeyState::Next,
            ),
        ];
        let signing = "rQEahNcHT_Jtck0hrsISUdT1Ew9PWf5lZ2V6FZHDz9c";

        // git keeps no file modes: copy, then restore the modes tokend wrote.
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        std::fs::create_dir(&dir).expect("mkdir");
        for entry in std::fs::read_dir(FIXTURE_V0_1_0).expect("fixture dir") {
            let entry = entry.expect("fixture entry");
            let to = dir.join(entry.file_name());
            std::fs::copy(entry.path(), &to).expect("copy fixture file");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");

        let original = manifest_records(&dir);
        let kids: Vec<&str> = original.iter().map(|r| r.kid.as_str()).collect();
        assert_eq!(kids, expected.map(|(k, _)| k), "the fixture's manifest");
        for (rec, (kid, state)) in original.iter().zip(expected) {
            assert_eq!(
                state_at(rec, &original, T),
                state,
                "{kid} in the fixture at T"
            );
            assert_eq!(
                rec.file.is_empty(),
                state == KeyState::Revoked,
                "{kid} file"
            );
        }
        assert_eq!(
            rotation::plan(T, &original, &lc),
            Vec::new(),
            "T must be a quiet instant: open would otherwise change the directory"
        );

        let clock = ManualClock::at(T);
        let (store, view) = KeyStore::open(&dir, lc, 2048, Arc::new(clock))
            .await
            .expect("a keys directory written by 0.1.0 opens");

        assert_eq!(store.records(), original.as_slice(), "records in memory");
        let set = view.current();
        let records = set.records();
        for (kid, state) in expected {
            let rec = records
                .iter()
                .find(|r| r.kid == kid)
                .unwrap_or_else(|| panic!("{kid} lost at open"));
            assert_eq!(state_at(rec, &records, T), state, "{kid} at T");
        }
        assert_eq!(records.len(), expected.len(), "no key added at open");
        assert_eq!(
            set.signing_key(T).map(|k| k.kid().to_owned()).as_deref(),
            Some(signing),
            "signing key at T"
        );
        let mut published: Vec<&str> = set.published().map(|k| k.kid()).collect();
        published.sort_unstable();
        let mut unrevoked: Vec<&str> = expected
            .iter()
            .filter(|(_, s)| *s != KeyState::Revoked)
            .map(|(k, _)| *k)
            .collect();
        unrevoked.sort_unstable();
        assert_eq!(published, unrevoked, "published set at T");
        let mut revoked: Vec<&str> = set.revoked_kids().collect();
        revoked.sort_unstable();
        assert_eq!(
            revoked,
            [
                "HrxaIk2t4lUxof1LoOSJ0eIPKjPqZ4A_jt2snyfaLVg",
                "o4GEmDmUFYHhpLGq3K0pEe6xSjr9PObwzSVPUc8c844"
            ],
            "revoked kids remembered"
        );

        // Whatever open wrote, the manifest still names every original key
        // with the same times, and every unrevoked key's file is still there.
        let after = manifest_records(&dir);
        for rec in &original {
            let now = after
                .iter()
                .find(|r| r.kid == rec.kid)
                .unwrap_or_else(|| panic!("{} dropped from keys.json", rec.kid));
            assert_eq!(
                (now.created_at, now.activates_at, now.revoked_at),
                (rec.created_at, rec.activates_at, rec.revoked_at),
                "{} times in keys.json",
                rec.kid
            );
            if !rec.file.is_empty() {
                assert!(dir.join(&rec.file).is_file(), "{} removed", rec.file);
            }
        }
    }

    /// The bound class opens `keys_dir/bound/` (created 0700 next to a
    /// keys directory that has none, as an earlier release left it),
    /// generates its first key there under the same rules, and leaves the
    /// signing keys' manifest and files alone.
    #[tokio::test]
    async fn bound_class_lives_in_its_own_directory() {
        use std::os::unix::fs::PermissionsExt;

        use super::super::KeyClass;

        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("keys");
        std::fs::create_dir(&dir).expect("mkdir");
        for entry in std::fs::read_dir(FIXTURE_V0_1_0).expect("fixture dir") {
            let entry = entry.expect("fixture entry");
            let to = dir.join(entry.file_name());
            std::fs::copy(entry.path(), &to).expect("copy fixture file");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let before = manifest_records(&dir);
        let lc = Lifecycle {
            interval: Duration::from_secs(20),
            publish_ahead: Duration::from_secs(8),
            grace: Duration::from_secs(150),
        };
        let now = t(FIXTURE_V0_1_0_T);
        let clock = Arc::new(ManualClock::at(now));
        let (mut bound, view) = KeyStore::open_class(&dir, KeyClass::Bound, lc, 2048, clock)
            .await
            .expect("open the bound class");
        assert!(view.current().records().is_empty(), "none yet");
        bound.apply_plan(now).await.expect("first bound key");
        let key = view.current().signing_key(now).expect("signs").clone();
        let sub = dir.join("bound");
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&sub.join(format!("{}.pk8.pem", key.kid()))), 0o600);
        assert_eq!(manifest_records(&sub)[0].kid, key.kid());
        assert_eq!(manifest_records(&dir), before, "signing keys untouched");
        assert!(before.iter().all(|r| r.kid != key.kid()));
        // The signing keys still load, with the subdirectory beside them.
        let (_, signing) = KeyStore::open(&dir, lc, 2048, Arc::new(ManualClock::at(now)))
            .await
            .expect("the signing keys load");
        assert_eq!(signing.current().records(), before);
    }
}
