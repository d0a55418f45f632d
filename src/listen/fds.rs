//! File descriptors: raise the soft RLIMIT_NOFILE to the hard limit, and fit
//! the two listeners' connection caps under it so that neither listener can
//! make the other (or key files, peer clients, metrics) fail with EMFILE.
//!
//! Why caps rather than spare descriptors released on EMFILE: a released
//! spare is taken by whichever thread opens a file next (maybe the flooded
//! listener), and helps one accept; caps that fit the limit make EMFILE from
//! a flood impossible in the first place.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// Descriptors kept out of both listeners' caps: the runtime, the listeners
/// themselves, key and JWKS files, peer clients, metrics and logs.
pub(crate) const RESERVED_FDS: u64 = 64;

/// Ceiling tried when the hard limit is unlimited (Linux refuses more than
/// `fs.nr_open`, 1,048,576 by default).
const UNLIMITED_TARGET: u64 = 1 << 20;

/// Raises the soft NOFILE limit to the hard one and returns the soft limit
/// now in force (unchanged if it cannot be raised).
pub(crate) fn raise_nofile() -> Result<u64, String> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    let target = if hard == RLIM_INFINITY {
        UNLIMITED_TARGET.max(soft)
    } else {
        hard
    };
    if target <= soft {
        return Ok(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => {
            tracing::debug!(
                from = soft,
                to = target,
                "raised the RLIMIT_NOFILE soft limit"
            );
            Ok(target)
        }
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the RLIMIT_NOFILE soft limit");
            Ok(soft)
        }
    }
}

/// The connection caps actually used for each listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdCaps {
    /// Cap of the Unix socket.
    pub local: usize,
    /// Cap of the peer port (0 when it is not served).
    pub peer: usize,
    /// Whether the configured caps had to shrink to fit `nofile`.
    pub scaled: bool,
}

/// Fits `local + peer` connections under `nofile − RESERVED_FDS`, shrinking
/// both in proportion (each keeps at least one slot) when they do not fit.
/// Pass `peer = 0` when the peer port is not served.
pub(crate) fn fit_to_fds(nofile: u64, local: usize, peer: usize) -> FdCaps {
    let budget = usize::try_from(nofile.saturating_sub(RESERVED_FDS))
        .unwrap_or(usize::MAX)
        .max(2);
    if local.saturating_add(peer) <= budget {
        return FdCaps {
            local,
            peer,
            scaled: false,
        };
    }
    let total = local as u128 + peer as u128;
    let shrunk = (local as u128 * budget as u128 / total) as usize;
    let local_cap = shrunk.clamp(1, budget.saturating_sub(usize::from(peer > 0)));
    let peer_cap = budget
        .saturating_sub(local_cap)
        .clamp(1, peer.max(1))
        .min(peer);
    FdCaps {
        local: local_cap,
        peer: peer_cap,
        scaled: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Caps that fit are kept as configured.
    #[test]
    fn caps_that_fit_are_kept() {
        assert_eq!(
            fit_to_fds(1024, 128, 256),
            FdCaps {
                local: 128,
                peer: 256,
                scaled: false
            }
        );
    }

    /// Caps over the limit shrink in proportion, both stay at least 1, and
    /// together they never exceed the budget.
    #[test]
    fn caps_over_the_limit_shrink() {
        let c = fit_to_fds(256, 128, 256);
        assert!(c.scaled);
        assert_eq!(c.local + c.peer, 256 - RESERVED_FDS as usize);
        assert!(c.local >= 60 && c.local <= 66, "{c:?}");
        for nofile in [0, 1, 65, 66, 67, 100, 200] {
            let c = fit_to_fds(nofile, 128, 256);
            assert!(c.local >= 1 && c.peer >= 1, "{nofile}: {c:?}");
            let budget = (nofile.saturating_sub(RESERVED_FDS)).max(2) as usize;
            assert!(c.local + c.peer <= budget, "{nofile}: {c:?}");
        }
    }

    /// Without a peer port the local socket gets the whole budget.
    #[test]
    fn no_peer_port() {
        let c = fit_to_fds(100, 128, 0);
        assert_eq!((c.local, c.peer), (36, 0));
    }

    /// Raising never lowers the soft limit.
    #[test]
    fn raise_never_lowers() {
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let now = raise_nofile().expect("raise");
        assert!(now >= soft);
    }
}
