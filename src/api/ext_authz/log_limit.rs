//! Rate-limited refusal logs. Every request Envoy forwards is decided here,
//! so a client sending garbage tokens through Envoy would otherwise write a
//! log line per request, at the request rate, and fill the disk of the
//! host the sidecar shares with the service. Refusals are always counted
//! (`tokend_ext_authz_total`); their log lines are capped at `BURST` per
//! `WINDOW`, and the first line after a capped window says how many were
//! left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Log lines allowed per window.
pub(super) const BURST: u64 = 20;
/// The window the burst is counted in.
pub(super) const WINDOW: Duration = Duration::from_secs(1);

/// Decides which refusals are logged.
#[derive(Debug, Default)]
pub(super) struct LogLimit {
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    started: Option<Instant>,
    logged: u64,
    suppressed: u64,
}

impl LogLimit {
    /// At `now`: `Some(n)` to log this line (`n` lines were left out before
    /// it), `None` to leave it out.
    pub(super) fn admit(&self, now: Instant) -> Option<u64> {
        let mut w = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.started.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged >= BURST {
            w.suppressed += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

/// At most `MAX_LOGGED_PATH` characters of a request path go into a log line.
pub(super) const MAX_LOGGED_PATH: usize = 256;

/// `path` without its query, cut to `MAX_LOGGED_PATH` characters.
pub(super) fn logged_path(path: &str) -> &str {
    let path = path.split('?').next().unwrap_or_default();
    match path.char_indices().nth(MAX_LOGGED_PATH) {
        Some((i, _)) => &path[..i],
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_a_burst_per_window_then_says_what_it_left_out() {
        let limit = LogLimit::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limit.admit(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limit.admit(t0 + WINDOW / 2), None);
        }
        assert_eq!(limit.admit(t0 + WINDOW), Some(1000));
        assert_eq!(limit.admit(t0 + WINDOW), Some(0));
    }

    #[test]
    fn paths_lose_their_query_and_are_cut_on_a_character_boundary() {
        assert_eq!(logged_path("/a/b?token=secret"), "/a/b");
        let long = "é".repeat(MAX_LOGGED_PATH + 10);
        assert_eq!(logged_path(&long).chars().count(), MAX_LOGGED_PATH);
    }
}
