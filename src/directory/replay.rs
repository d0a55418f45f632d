//! The replay store shared by every replica of a service: one-time ids are
//! claimed in etcd, so a token is accepted once across all of them,
//! linearizably (etcd's transactions go through its raft log, leader
//! changes included).
//!
//! A claim is one transaction for all ids of a token (its delegation links
//! too): if no key exists yet (`create_revision == 0` for each), put them
//! all; otherwise nothing. The keys are bound to a lease that outlives the
//! last moment the token could verify (`forget_at`, its `exp` plus skew),
//! so etcd forgets them by itself. Leases are shared by deadline bucket
//! (one per `LEASE_BUCKET` of deadlines), not granted per token.
//!
//! A key's value is a claimant id: this process's instance id and a fresh
//! nonce. A transaction whose outcome is unknown (a timeout or a broken
//! connection can still have committed) is sent again with the same
//! claimant, and a failed compare is resolved by reading the keys back:
//! all ours means an earlier attempt committed, so the honest caller is
//! accepted; anyone else's means `replayed`; no answer at all means
//! `unavailable`. A one-time token is never accepted twice, and never
//! accepted when etcd cannot say.

use std::collections::BTreeMap;
use std::sync::Mutex;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::engine::{ClaimFuture, OneTimeId, ReplayStore};
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// Deadlines are rounded up to a multiple of this; one lease per bucket.
pub(crate) const LEASE_BUCKET: i64 = 60;

/// Attempts of one claim transaction before the keys are read back.
const ATTEMPTS: usize = 2;

/// The shared store of one verifying service.
pub(crate) struct EtcdReplay {
    client: Client,
    /// `prefix + "jti/" + service + "/"`.
    keys: String,
    /// This process, in every claimant id.
    instance: String,
    /// Lease per bucket deadline (unix seconds).
    leases: Mutex<BTreeMap<i64, i64>>,
}

impl std::fmt::Debug for EtcdReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdReplay")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// What one transaction attempt established.
enum Outcome {
    /// All keys are ours: accepted.
    Claimed,
    /// At least one key exists: read them back to tell whose.
    Taken,
    /// No answer; the transaction may or may not have committed.
    Unknown(String),
    /// The lease is gone (revoked or expired early): grant another.
    LeaseLost,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unavailable(detail: impl Into<String>) -> Refusal {
    metrics::counter!("tokend_replay_claims_total", "store" => "etcd", "result" => "unavailable")
        .increment(1);
    Refusal::new(Reason::Unavailable, detail)
}

/// The bucket deadline a claim remembered until `forget_at` goes into.
pub(crate) fn bucket(forget_at: UnixTime) -> i64 {
    let t = forget_at.as_secs();
    (t.div_euclid(LEASE_BUCKET) + 1) * LEASE_BUCKET
}

// === impl EtcdReplay ===

impl EtcdReplay {
    /// The store of `service`'s one-time ids under `prefix`.
    pub(crate) fn new(client: Client, prefix: &str, service: &str) -> Self {
        let mut nonce = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        Self {
            client,
            keys: format!("{prefix}jti/{service}/"),
            instance: format!("{service}#{}", hex(&nonce)),
            leases: Mutex::default(),
        }
    }

    /// The etcd key of one id: the hex SHA-256 of issuer and jti.
    pub(crate) fn key(&self, id: &OneTimeId) -> String {
        let mut input = Vec::with_capacity(id.issuer.len() + id.jti.len() + 1);
        input.extend_from_slice(id.issuer.as_bytes());
        input.push(0);
        input.extend_from_slice(id.jti.as_bytes());
        let d = ring::digest::digest(&ring::digest::SHA256, &input);
        format!("{}{}", self.keys, hex(d.as_ref()))
    }

    fn claimant(&self) -> String {
        let mut nonce = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        format!("{}/{}", self.instance, hex(&nonce))
    }

    /// A lease alive at least until the bucket deadline of `forget_at`.
    async fn lease(&self, deadline: i64, now: UnixTime) -> Result<i64, Refusal> {
        {
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            leases.retain(|&d, _| d >= now.as_secs());
            if let Some(&id) = leases.get(&deadline) {
                return Ok(id);
            }
        }
        // One more bucket of slack: the lease is granted a little after `now`.
        let ttl = (deadline - now.as_secs()).max(1) + 1;
        let granted = self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map_err(|e| unavailable(format!("shared replay store: cannot grant a lease: {e}")))?;
        let id = granted.id();
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        Ok(*leases.entry(deadline).or_insert(id))
    }

    fn forget_lease(&self, deadline: i64) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.remove(&deadline);
    }

    async fn attempt(&self, keys: &[String], claimant: &str, lease: i64) -> Outcome {
        let compares: Vec<Compare> = keys
            .iter()
            .map(|k| Compare::create_revision(k.as_str(), CompareOp::Equal, 0))
            .collect();
        let puts: Vec<TxnOp> = keys
            .iter()
            .map(|k| {
                TxnOp::put(
                    k.as_str(),
                    claimant,
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(puts);
        match self.client.clone().txn(txn).await {
            Ok(r) if r.succeeded() => Outcome::Claimed,
            Ok(_) => Outcome::Taken,
            Err(etcd_client::Error::GRpcStatus(s))
                if s.code() == tonic::Code::NotFound && s.message().contains("lease") =>
            {
                Outcome::LeaseLost
            }
            Err(e) => Outcome::Unknown(e.to_string()),
        }
    }

    /// Reads the keys back (linearizably): `Ok(None)` all ours,
    /// `Ok(Some(key))` that key is someone else's, `Err` no answer or
    /// not all there (so no claim of ours is known to have committed).
    async fn all_ours(&self, keys: &[String], claimant: &str) -> Result<Option<String>, String> {
        let mut client = self.client.clone();
        let mut missing = 0;
        for k in keys {
            let got = client
                .get(k.as_str(), None)
                .await
                .map_err(|e| e.to_string())?;
            match got.kvs().first() {
                Some(kv) if kv.value() == claimant.as_bytes() => {}
                Some(_) => return Ok(Some(k.clone())),
                None => missing += 1,
            }
        }
        if missing == 0 {
            Ok(None)
        } else {
            Err(format!(
                "{missing} of {} claimed keys are absent",
                keys.len()
            ))
        }
    }

    async fn claim_ids(&self, ids: &[OneTimeId], now: UnixTime) -> Result<(), Refusal> {
        let Some(last) = ids.iter().map(|i| i.forget_at).max() else {
            return Ok(());
        };
        let keys: Vec<String> = ids.iter().map(|i| self.key(i)).collect();
        let claimant = self.claimant();
        let deadline = bucket(last);
        let mut why = String::new();
        let mut tried = 0;
        while tried < ATTEMPTS {
            tried += 1;
            let lease = self.lease(deadline, now).await?;
            match self.attempt(&keys, &claimant, lease).await {
                Outcome::Claimed => {
                    metrics::counter!("tokend_replay_claims_total", "store" => "etcd", "result" => "claimed")
                        .increment(1);
                    return Ok(());
                }
                Outcome::Taken => break,
                Outcome::LeaseLost => {
                    self.forget_lease(deadline);
                    why = "the lease was lost".into();
                }
                Outcome::Unknown(e) => {
                    metrics::counter!("tokend_replay_unknown_outcomes_total").increment(1);
                    why = e;
                }
            }
        }
        // Taken, or no answer: whose are the keys?
        match self.all_ours(&keys, &claimant).await {
            Ok(None) => {
                metrics::counter!("tokend_replay_claims_total", "store" => "etcd", "result" => "claimed")
                    .increment(1);
                Ok(())
            }
            Ok(Some(key)) => {
                metrics::counter!("tokend_replay_claims_total", "store" => "etcd", "result" => "replayed")
                    .increment(1);
                let which = ids
                    .iter()
                    .zip(&keys)
                    .find(|(_, k)| **k == key)
                    .map(|(i, _)| format!("{} of {}", i.jti, i.issuer))
                    .unwrap_or_default();
                Err(Refusal::new(
                    Reason::Replayed,
                    format!("one-time token {which} was already used (shared replay store)"),
                ))
            }
            Err(read) => Err(unavailable(format!(
                "shared replay store unreachable, one-time token not accepted: {why}{}{read}",
                if why.is_empty() { "" } else { "; " }
            ))),
        }
    }
}

impl ReplayStore for EtcdReplay {
    fn claim<'a>(&'a self, ids: &'a [OneTimeId], now: UnixTime) -> ClaimFuture<'a> {
        Box::pin(self.claim_ids(ids, now))
    }
}

/// How long a claim's lease lives at `now` for a bucket `deadline`.
#[cfg(test)]
fn lease_ttl(deadline: i64, now: UnixTime) -> std::time::Duration {
    std::time::Duration::from_secs(((deadline - now.as_secs()).max(1) + 1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket deadline is always after `forget_at`, by at most one bucket,
    /// and ids forgotten within one bucket share it (one lease).
    #[test]
    fn buckets_outlive_and_share() {
        for t in [0i64, 1, 59, 60, 61, 1_700_000_000, 1_700_000_059] {
            let d = bucket(UnixTime::from_secs(t));
            assert!(d > t && d <= t + LEASE_BUCKET, "{t} -> {d}");
            assert_eq!(d % LEASE_BUCKET, 0);
        }
        assert_eq!(
            bucket(UnixTime::from_secs(120)),
            bucket(UnixTime::from_secs(179))
        );
        let now = UnixTime::from_secs(100);
        assert!(
            lease_ttl(bucket(UnixTime::from_secs(130)), now) >= std::time::Duration::from_secs(30)
        );
    }
}
