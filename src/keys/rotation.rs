//! Rotation: a pure planner, `plan(now, records, lifecycle)`, and the async
//! loop that applies its steps through the `KeyStore` on a timer and on admin
//! commands. The loop never mints or verifies.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::key::{KeyRecord, KeyState, Lifecycle, delete_after, state_at};
use super::{KeyClass, KeyError, KeyStore};
use crate::time::{SharedClock, UnixTime};

/// One change the planner asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Make a new key that signs from `at`, and not before it has been
    /// published for `lead` seconds.
    Generate {
        /// The planned activation time.
        at: UnixTime,
        /// The least publication time before it signs (zero: sign at once).
        lead: Duration,
    },
    /// Forget a key whose last token has expired.
    Forget {
        /// Which.
        kid: String,
    },
}

fn newest_active(now: UnixTime, records: &[KeyRecord]) -> Option<&KeyRecord> {
    records
        .iter()
        .filter(|r| r.activates_at <= now && super::key::ever_signs(r))
        .max_by_key(|r| (r.activates_at, r.seq))
        .filter(|r| r.revoked_at.is_none())
}

fn has_pending(now: UnixTime, records: &[KeyRecord]) -> bool {
    records
        .iter()
        .any(|r| r.revoked_at.is_none() && r.activates_at > now)
}

/// When the successor of `active` is generated: `publish_ahead` (plus one
/// second for whole-second rounding) before `interval` after its activation.
pub(super) fn rotation_due(active: &KeyRecord, lc: &Lifecycle) -> UnixTime {
    (active.activates_at + lc.interval - lc.publish_ahead - Duration::from_secs(1))
        .max(active.activates_at)
}

/// What should change at `now`. Pure.
pub(crate) fn plan(now: UnixTime, records: &[KeyRecord], lc: &Lifecycle) -> Vec<Step> {
    let mut steps = Vec::new();
    match newest_active(now, records) {
        None if !has_pending(now, records) => steps.push(Step::Generate {
            at: now,
            lead: Duration::ZERO,
        }),
        Some(a) if !has_pending(now, records) && now >= rotation_due(a, lc) => {
            steps.push(Step::Generate {
                at: a.activates_at + lc.interval,
                lead: lc.publish_ahead,
            })
        }
        _ => {}
    }
    for r in records {
        if delete_after(r, records, lc).is_some_and(|t| t <= now) {
            steps.push(Step::Forget { kid: r.kid.clone() });
        }
    }
    steps
}

/// When the plan next changes (a rotation due, an activation, a key to
/// delete), if ever.
pub(super) fn next_event(now: UnixTime, records: &[KeyRecord], lc: &Lifecycle) -> Option<UnixTime> {
    let rotate = newest_active(now, records)
        .filter(|_| !has_pending(now, records))
        .map(|a| rotation_due(a, lc));
    let activate = records
        .iter()
        .filter(|r| r.activates_at > now)
        .map(|r| r.activates_at);
    let forget = records.iter().filter_map(|r| delete_after(r, records, lc));
    rotate
        .into_iter()
        .chain(activate)
        .chain(forget)
        .filter(|&t| t > now)
        .min()
}

/// Applies the plan at `now` to the store.
pub(crate) async fn apply(store: &mut KeyStore, now: UnixTime) -> Result<(), KeyError> {
    for step in plan(now, store.records(), &store.lifecycle()) {
        match step {
            Step::Generate { at, lead } => {
                store.generate(at, lead).await?;
            }
            Step::Forget { kid } => store.forget(&kid).await?,
        }
    }
    Ok(())
}

/// Key gauges: the signing key's age and the number of keys in each state
/// (`tokend_bound_…` for the bound class).
fn record_metrics(class: KeyClass, now: UnixTime, records: &[KeyRecord]) {
    if let Some(a) = newest_active(now, records) {
        metrics::gauge!(class.metric("signing_key_age_seconds"))
            .set(now.since(a.activates_at).as_secs_f64());
    }
    for state in [
        KeyState::Next,
        KeyState::Active,
        KeyState::Retired,
        KeyState::Revoked,
    ] {
        let n = records
            .iter()
            .filter(|r| state_at(r, records, now) == state)
            .count();
        metrics::gauge!(class.metric("keys"), "state" => state.as_str()).set(n as f64);
    }
}

/// A request to the rotation task from the admin API.
#[derive(Debug)]
pub(crate) enum Command {
    /// Start a rotation now; answers with the pending key.
    Rotate(oneshot::Sender<Result<KeyRecord, KeyError>>),
    /// Revoke a key; answers with the revoked record and the new signing kid.
    Revoke(
        String,
        oneshot::Sender<Result<(KeyRecord, String), KeyError>>,
    ),
}

/// Runs rotation until cancelled: applies the plan at every due event (and at
/// least every `MAX_SLEEP`), and serves admin commands. It plans and waits on
/// the same clock. Errors are logged and retried; the loop never exits on
/// its own.
pub(crate) async fn run(
    mut store: KeyStore,
    mut commands: mpsc::Receiver<Command>,
    clock: SharedClock,
    cancel: CancellationToken,
) {
    const MAX_SLEEP: Duration = Duration::from_secs(60);
    const RETRY: Duration = Duration::from_secs(5);
    loop {
        let now = clock.now();
        // A shutdown does not wait for a key being generated (seconds of
        // CPU at 4096 bits): every write is atomic, and a key file the
        // manifest does not name yet is removed at the next start.
        let applied = tokio::select! {
            _ = cancel.cancelled() => return,
            r = apply(&mut store, now) => r,
        };
        let wake = match applied {
            Ok(()) => {
                record_metrics(store.class(), now, store.records());
                next_event(now, store.records(), &store.lifecycle())
                    .unwrap_or(now + MAX_SLEEP)
                    .clamp(now + Duration::from_secs(1), now + MAX_SLEEP)
            }
            Err(e) => {
                tracing::error!(error = %e, class = store.class().as_str(), "rotation step failed; retrying");
                now + RETRY
            }
        };
        let refilled = tokio::select! {
            _ = cancel.cancelled() => return,
            r = store.refill_spare() => r,
        };
        if let Err(e) = refilled {
            tracing::warn!(error = %e, "cannot prepare the standby key for revocations");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = clock.sleep_until(wake) => {}
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::Rotate(reply)) => {
                    let _ = reply.send(rotate_now(&mut store, clock.now()).await);
                }
                Some(Command::Revoke(kid, reply)) => {
                    let _ = reply.send(store.revoke(&kid).await);
                }
            },
        }
    }
}

/// An on-demand rotation: the pending key if there is one, else a new key
/// published `publish_ahead` before it signs.
async fn rotate_now(store: &mut KeyStore, now: UnixTime) -> Result<KeyRecord, KeyError> {
    let pending = store
        .records()
        .iter()
        .filter(|r| r.revoked_at.is_none() && r.activates_at > now)
        .min_by_key(|r| (r.activates_at, r.seq))
        .cloned();
    match pending {
        Some(p) => Ok(p),
        None => store.generate(now, store.lifecycle().publish_ahead).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LC: Lifecycle = Lifecycle {
        interval: Duration::from_secs(100),
        publish_ahead: Duration::from_secs(10),
        grace: Duration::from_secs(30),
    };

    fn t(s: i64) -> UnixTime {
        UnixTime::from_secs(s)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn rec(kid: &str, seq: u64, activates_at: i64) -> KeyRecord {
        KeyRecord {
            kid: kid.into(),
            file: format!("{kid}.pk8.pem"),
            bits: 2048,
            seq,
            created_at: t(activates_at) - LC.publish_ahead,
            activates_at: t(activates_at),
            revoked_at: None,
        }
    }

    /// An empty store gets a key active at once.
    #[test]
    fn bootstrap_generates_active_key() {
        assert_eq!(
            plan(t(5), &[], &LC),
            vec![Step::Generate {
                at: t(5),
                lead: secs(0)
            }]
        );
    }

    /// The successor is generated publish_ahead (+1 s rounding) before the
    /// interval is up, planned to activate exactly one interval after the
    /// current key, and only once.
    #[test]
    fn rotation_publishes_ahead() {
        let a = rec("a", 1, 0);
        assert!(plan(t(88), std::slice::from_ref(&a), &LC).is_empty());
        assert_eq!(next_event(t(0), std::slice::from_ref(&a), &LC), Some(t(89)));
        assert_eq!(
            plan(t(89), std::slice::from_ref(&a), &LC),
            vec![Step::Generate {
                at: t(100),
                lead: secs(10)
            }]
        );
        let b = rec("b", 2, 100);
        assert!(
            plan(t(95), &[a.clone(), b.clone()], &LC).is_empty(),
            "no second pending key"
        );
        assert_eq!(next_event(t(95), &[a, b], &LC), Some(t(100)));
    }

    /// A retired key is kept exactly until its last token expired (grace), then forgotten.
    #[test]
    fn retired_key_forgotten_after_grace() {
        let recs = [rec("a", 1, 0), rec("b", 2, 100)];
        assert!(
            plan(t(129), &recs, &LC)
                .iter()
                .all(|s| !matches!(s, Step::Forget { .. }))
        );
        assert_eq!(
            plan(t(130), &recs, &LC),
            vec![Step::Forget { kid: "a".into() }]
        );
        assert_eq!(state_at(&recs[0], &recs, t(129)), KeyState::Retired);
        assert_eq!(state_at(&recs[1], &recs, t(99)), KeyState::Next);
        assert_eq!(state_at(&recs[1], &recs, t(100)), KeyState::Active);
    }

    /// A revoked newest key does not bring the previous key back: a new one is
    /// generated; keys activated in the same second are ordered by seq.
    #[test]
    fn revoked_active_key_is_replaced_not_resurrected() {
        let mut b = rec("b", 2, 110);
        b.revoked_at = Some(t(120));
        let recs = [rec("a", 1, 0), b.clone()];
        assert!(newest_active(t(121), &recs).is_none());
        assert_eq!(
            plan(t(121), &recs, &LC)[0],
            Step::Generate {
                at: t(121),
                lead: secs(0)
            }
        );
        let c = rec("c", 3, 110);
        let recs = [rec("a", 1, 0), b, c];
        assert_eq!(
            newest_active(t(121), &recs).map(|r| r.kid.as_str()),
            Some("c")
        );
        assert_eq!(state_at(&recs[2], &recs, t(121)), KeyState::Active);
    }

    /// A next key revoked before it activated never signed: the current key
    /// keeps signing (no gap) and a replacement is planned on schedule.
    #[test]
    fn revoking_the_next_key_leaves_the_active_key_signing() {
        let mut b = rec("b", 2, 100);
        b.revoked_at = Some(t(95));
        let recs = [rec("a", 1, 0), b];
        assert_eq!(
            newest_active(t(101), &recs).map(|r| r.kid.as_str()),
            Some("a")
        );
        assert_eq!(state_at(&recs[0], &recs, t(101)), KeyState::Active);
        assert_eq!(crate::keys::retires_at(&recs[0], &recs), None);
        assert_eq!(
            plan(t(101), &recs, &LC)[0],
            Step::Generate {
                at: t(100),
                lead: secs(10)
            }
        );
    }
}
