//! Listeners a client cannot exhaust, for both servers (the Unix socket and
//! the mTLS peer port). Each listener:
//!
//! - caps its open connections with a semaphore whose permit lives in the
//!   connection's IO wrapper (`Conn`) and is released when it drops; while
//!   the cap is reached it stops accepting, so further clients wait in the
//!   kernel's queue and cost this process no file descriptor;
//! - performs the TLS handshake itself, in its own task, under
//!   `handshake_timeout` (the peer port), so a client that never sends a
//!   ClientHello holds a slot for that long at most;
//! - closes a connection that has no call in flight: before its first call
//!   after `handshake_timeout` from accept, later after `idle_timeout` (the
//!   `track` layer counts calls, the wrapper's watchdog acts on the count);
//! - backs off (5 ms growing to 1 s) on accept errors instead of spinning,
//!   logging at most one line per 5 s.
//!
//! `fds` raises the soft RLIMIT_NOFILE to the hard limit at start and fits
//! the two caps below it, keeping `RESERVED_FDS` for everything else, so a
//! flood of one listener cannot make the other fail with EMFILE.

mod accept;
mod conn;
mod fds;
mod track;

use std::time::Duration;

pub(crate) use self::accept::{tls, unix};
pub(crate) use self::conn::{Conn, ConnInfo};
pub(crate) use self::fds::{FdCaps, RESERVED_FDS, fit_to_fds, raise_nofile};
pub(crate) use self::track::TrackLayer;

/// What one listener allows; built from `[limits]` and the fd budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ListenLimits {
    /// Open connections at once (handshaking ones included).
    pub max_connections: usize,
    /// Time from accept to the first call, TLS handshake included.
    pub handshake_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// Largest header block a client may send: gRPC metadata is small; tokens
/// travel in the body.
pub(crate) const MAX_HEADER_LIST_BYTES: u32 = 8 * 1024;
/// Per-stream receive window: bounds what one stream can have buffered
/// before the server reads it (the HTTP/2 default, not hyper's 1 MiB).
pub(crate) const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// Per-connection receive window: bounds what a connection can have
/// buffered unread across all its streams (hyper's default is 1 MiB).
pub(crate) const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;

/// Streams a client may open beyond the limit (each refused) before its
/// connection is closed with ENHANCE_YOUR_CALM. hyper's default; tonic
/// passes "no limit" unless it is set (RUSTSEC-2024-0003).
pub(crate) const MAX_REFUSED_STREAMS: usize = 1024;
/// Streams a client may reset before the server accepted them (rapid reset,
/// CVE-2023-44487) before its connection is closed: h2's default, made explicit.
pub(crate) const MAX_PENDING_RESETS: usize = 20;

/// A tonic server builder with HTTP/2 limits: `max_streams` concurrent
/// streams per connection, header list size, receive windows, refused and
/// reset stream limits, and the request timeout of `[limits]`. Used by both
/// the local and the peer server.
pub(crate) fn server(
    limits: &crate::config::LimitsConfig,
    max_streams: u32,
) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(max_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_max_local_error_reset_streams(Some(MAX_REFUSED_STREAMS))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .timeout(limits.request_timeout)
}
