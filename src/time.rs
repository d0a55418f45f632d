//! Time as a parameter. `UnixTime` is the one instant type (whole seconds
//! since the Unix epoch, the unit of every JWT time claim); spans are
//! `std::time::Duration`. A `Clock` is the only thing that reads the wall
//! clock; engines take `now` as an argument, so tests step it.

use std::future::Future;
use std::ops::{Add, Sub};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An instant in whole seconds since the Unix epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixTime(i64);

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

// === impl UnixTime ===

impl UnixTime {
    /// The epoch itself; also "never" where a wire field has no value.
    pub const EPOCH: UnixTime = UnixTime(0);

    /// The instant `s` seconds after the epoch.
    pub const fn from_secs(s: i64) -> Self {
        Self(s)
    }

    /// Seconds since the epoch, for the wire and for claims.
    pub const fn as_secs(self) -> i64 {
        self.0
    }

    /// The span from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(self, earlier: UnixTime) -> Duration {
        Duration::from_secs(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

impl Add<Duration> for UnixTime {
    type Output = UnixTime;
    fn add(self, d: Duration) -> UnixTime {
        UnixTime(self.0.saturating_add(secs(d)))
    }
}

impl Sub<Duration> for UnixTime {
    type Output = UnixTime;
    fn sub(self, d: Duration) -> UnixTime {
        UnixTime(self.0.saturating_sub(secs(d)))
    }
}

impl std::fmt::Display for UnixTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The future `Clock::sleep_until` returns.
pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A source of the current time, and a way to wait for a later one.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> UnixTime;

    /// Completes once the clock shows `deadline` or later. The default
    /// sleeps on tokio and re-reads the clock at least once a second, so a
    /// wall clock that jumps is noticed.
    fn sleep_until(&self, deadline: UnixTime) -> Sleep<'_> {
        Box::pin(poll_until(self, deadline))
    }
}

async fn poll_until<C: Clock + ?Sized>(clock: &C, deadline: UnixTime) {
    const LONGEST_NAP: Duration = Duration::from_secs(1);
    loop {
        let now = clock.now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(deadline.since(now).min(LONGEST_NAP)).await;
    }
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock(now {})", self.now())
    }
}

/// The clock handle components share.
pub type SharedClock = Arc<dyn Clock>;

/// The real wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => UnixTime(secs(d)),
            Err(_) => UnixTime::EPOCH,
        }
    }
}

/// A clock tests set by hand. Everything that sleeps on it (the rotation
/// loop) wakes the moment it is set past its deadline: tests step time
/// instead of waiting for it.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<tokio::sync::watch::Sender<UnixTime>>);

impl ManualClock {
    /// A clock showing `now`.
    pub fn at(now: UnixTime) -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(now)))
    }

    /// Sets the clock (forward or back), waking sleepers whose time came.
    pub fn set(&self, now: UnixTime) {
        self.0.send_replace(now);
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.send_modify(|t| *t = *t + d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        *self.0.borrow()
    }

    fn sleep_until(&self, deadline: UnixTime) -> Sleep<'_> {
        let mut rx = self.0.subscribe();
        Box::pin(async move {
            // The sender lives as long as `self`, so this only ends at the deadline.
            let _ = rx.wait_for(|t| *t >= deadline).await;
        })
    }
}

/// Wall time anchored once, then advancing with tokio's clock: under
/// `tokio::time::pause()` a test steps every timer and every `now` together,
/// so loops that plan with this clock and sleep on tokio agree exactly.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    start: UnixTime,
    started: tokio::time::Instant,
}

impl TokioClock {
    /// A clock showing `start` now, moving with tokio time from here.
    pub fn starting_at(start: UnixTime) -> Self {
        Self {
            start,
            started: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> UnixTime {
        self.start + self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arithmetic saturates instead of wrapping, and `since` never goes negative.
    #[test]
    fn arithmetic_saturates() {
        let t = UnixTime::from_secs(100);
        assert_eq!(t + Duration::from_secs(5), UnixTime::from_secs(105));
        assert_eq!(t - Duration::from_secs(5), UnixTime::from_secs(95));
        assert_eq!(
            UnixTime::from_secs(i64::MAX) + Duration::from_secs(1),
            UnixTime::from_secs(i64::MAX)
        );
        assert_eq!(t.since(UnixTime::from_secs(40)), Duration::from_secs(60));
        assert_eq!(UnixTime::from_secs(40).since(t), Duration::ZERO);
    }

    /// Under paused tokio time, the tokio clock and `sleep_until` move together.
    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let clock = TokioClock::starting_at(UnixTime::from_secs(1_000));
        assert_eq!(clock.now(), UnixTime::from_secs(1_000));
        clock.sleep_until(UnixTime::from_secs(1_090)).await;
        assert_eq!(clock.now(), UnixTime::from_secs(1_090));
    }

    /// A manual clock wakes its sleepers when set past their deadline, and
    /// not before.
    #[tokio::test]
    async fn manual_clock_wakes_sleepers_when_set() {
        let clock = ManualClock::at(UnixTime::from_secs(100));
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep_until(UnixTime::from_secs(200)).await });
        clock.set(UnixTime::from_secs(150));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(60));
        tokio::time::timeout(Duration::from_secs(10), sleeper)
            .await
            .expect("woken")
            .expect("join");
    }
}
