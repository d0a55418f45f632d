//! Rotation: a pure planner, `plan(now, records, lifecycle)`, and the async
//! loop that applies its steps through the `KeyStore` on a timer and on admin
//! commands. The loop never mints or verifies.

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::key::{KeyRecord, Lifecycle, delete_after};
use super::{KeyError, KeyStore};
use crate::clock::SharedClock;

/// One change the planner asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Make a new key that signs from `activates_at`.
    Generate {
        /// When it starts signing.
        activates_at: i64,
    },
    /// Forget a key whose last token has expired.
    Forget {
        /// Which.
        kid: String,
    },
}

fn newest_active(now: i64, records: &[KeyRecord]) -> Option<&KeyRecord> {
    records
        .iter()
        .filter(|r| r.activates_at <= now)
        .max_by_key(|r| (r.activates_at, r.created_at))
        .filter(|r| r.revoked_at.is_none())
}

fn has_pending(now: i64, records: &[KeyRecord]) -> bool {
    records
        .iter()
        .any(|r| r.revoked_at.is_none() && r.activates_at > now)
}

/// What should change at `now`. Pure.
pub fn plan(now: i64, records: &[KeyRecord], lc: &Lifecycle) -> Vec<Step> {
    let mut steps = Vec::new();
    match newest_active(now, records) {
        None if !has_pending(now, records) => steps.push(Step::Generate { activates_at: now }),
        Some(a) if !has_pending(now, records) && now >= a.activates_at + lc.interval => {
            steps.push(Step::Generate {
                activates_at: now + lc.publish_ahead,
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

/// When the plan next changes (a rotation due, a key to delete), if ever.
pub fn next_event(now: i64, records: &[KeyRecord], lc: &Lifecycle) -> Option<i64> {
    let rotate = newest_active(now, records)
        .filter(|_| !has_pending(now, records))
        .map(|a| a.activates_at + lc.interval);
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
pub async fn apply(store: &mut KeyStore, now: i64) -> Result<(), KeyError> {
    for step in plan(now, store.records(), &store.lifecycle()) {
        match step {
            Step::Generate { activates_at } => {
                store.generate(activates_at, now).await?;
            }
            Step::Forget { kid } => store.forget(&kid)?,
        }
    }
    Ok(())
}

/// A request to the rotation task from the admin API.
#[derive(Debug)]
pub enum Command {
    /// Start a rotation now; answers with the pending key.
    Rotate(oneshot::Sender<Result<KeyRecord, String>>),
    /// Revoke a key; answers with the revoked record and the new signing kid.
    Revoke(
        String,
        oneshot::Sender<Result<(KeyRecord, String), KeyError>>,
    ),
}

/// Runs rotation until cancelled: applies the plan at every due event (and at
/// least every `max_sleep`), and serves admin commands. Errors are logged and
/// retried; the loop never exits on its own.
pub async fn run(
    mut store: KeyStore,
    mut commands: mpsc::Receiver<Command>,
    clock: SharedClock,
    cancel: CancellationToken,
) {
    const MAX_SLEEP_SECS: i64 = 60;
    const RETRY_SECS: i64 = 5;
    loop {
        let now = clock.now();
        let mut wait = match apply(&mut store, now).await {
            Ok(()) => next_event(now, store.records(), &store.lifecycle())
                .map(|t| t - now)
                .unwrap_or(MAX_SLEEP_SECS)
                .clamp(0, MAX_SLEEP_SECS),
            Err(e) => {
                tracing::error!(error = %e, "rotation step failed; retrying");
                RETRY_SECS
            }
        };
        if wait == 0 {
            wait = 1;
        }
        let sleep = tokio::time::sleep(std::time::Duration::from_millis(wait as u64 * 1000));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sleep => {}
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::Rotate(reply)) => {
                    let now = clock.now();
                    let lc = store.lifecycle();
                    let pending = store
                        .records()
                        .iter()
                        .filter(|r| r.revoked_at.is_none() && r.activates_at > now)
                        .min_by_key(|r| r.activates_at)
                        .cloned();
                    let result = match pending {
                        Some(p) => Ok(p),
                        None => store.generate(now + lc.publish_ahead, now).await.map_err(|e| e.to_string()),
                    };
                    let _ = reply.send(result);
                }
                Some(Command::Revoke(kid, reply)) => {
                    let _ = reply.send(store.revoke(&kid, clock.now()).await);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LC: Lifecycle = Lifecycle {
        interval: 100,
        publish_ahead: 10,
        grace: 30,
    };

    fn rec(kid: &str, activates_at: i64) -> KeyRecord {
        KeyRecord {
            kid: kid.into(),
            file: format!("{kid}.pk8.pem"),
            bits: 2048,
            created_at: activates_at - LC.publish_ahead,
            activates_at,
            revoked_at: None,
        }
    }

    /// An empty store gets a key active at once.
    #[test]
    fn bootstrap_generates_active_key() {
        assert_eq!(plan(5, &[], &LC), vec![Step::Generate { activates_at: 5 }]);
    }

    /// The next key is published `publish_ahead` before it signs, once the interval is up, and only once.
    #[test]
    fn rotation_publishes_ahead() {
        let a = rec("a", 0);
        assert!(plan(99, std::slice::from_ref(&a), &LC).is_empty());
        assert_eq!(
            plan(100, std::slice::from_ref(&a), &LC),
            vec![Step::Generate { activates_at: 110 }]
        );
        let b = rec("b", 110);
        assert!(
            plan(105, &[a.clone(), b.clone()], &LC).is_empty(),
            "no second pending key"
        );
        assert_eq!(next_event(105, &[a, b], &LC), Some(110));
    }

    /// A retired key is kept exactly until its last token expired (grace), then forgotten.
    #[test]
    fn retired_key_forgotten_after_grace() {
        let recs = [rec("a", 0), rec("b", 110)];
        assert!(
            plan(139, &recs, &LC)
                .iter()
                .all(|s| !matches!(s, Step::Forget { .. }))
        );
        assert_eq!(
            plan(140, &recs, &LC),
            vec![Step::Forget { kid: "a".into() }]
        );
        assert_eq!(
            super::super::key::state_at(&recs[0], &recs, 139),
            super::super::KeyState::Retired
        );
        assert_eq!(
            super::super::key::state_at(&recs[1], &recs, 109),
            super::super::KeyState::Next
        );
    }

    /// A revoked newest key does not bring the previous key back: a new one is generated.
    #[test]
    fn revoked_active_key_is_replaced_not_resurrected() {
        let mut b = rec("b", 110);
        b.revoked_at = Some(120);
        let recs = [rec("a", 0), b];
        assert!(newest_active(121, &recs).is_none());
        assert_eq!(
            plan(121, &recs, &LC)[0],
            Step::Generate { activates_at: 121 }
        );
    }
}
