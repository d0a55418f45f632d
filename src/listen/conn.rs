//! One accepted connection: its IO, the listener slot it holds, how many
//! calls it has in flight, and the watchdog that closes it when it has had
//! none for too long (before its first call: `handshake_timeout` from accept;
//! afterwards: `idle_timeout` since the last one ended).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use super::ListenLimits;

/// Calls in flight on one connection, and since when it has had none.
#[derive(Debug)]
pub(crate) struct ConnState {
    opened: Instant,
    active: AtomicUsize,
    served: AtomicBool,
    /// Milliseconds after `opened` at which the last call ended.
    idle_since_ms: AtomicU64,
}

impl ConnState {
    pub(crate) fn new(opened: Instant) -> Arc<Self> {
        Arc::new(Self {
            opened,
            active: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a call until the guard drops (with its response body).
    pub(crate) fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.served.store(true, Ordering::SeqCst);
        self.idle_since_ms.store(self.now_ms(), Ordering::SeqCst);
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self.clone())
    }

    /// When the connection may be closed for idleness; None while a call is in flight.
    fn idle_deadline(&self, limits: &ListenLimits) -> Option<Instant> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if !self.served.load(Ordering::SeqCst) {
            return Some(self.opened + limits.handshake_timeout);
        }
        let since = std::time::Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.opened + since + limits.idle_timeout)
    }
}

/// One call in flight; dropping it ends the call for the idle watchdog.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<ConnState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        // The time first, then the count: the watchdog reads the count first,
        // so it never pairs "no call" with a stale idle time.
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What tonic puts in every request's extensions for a `Conn`: the inner
/// IO's own info (which `track` re-inserts, so `peer_certs()` and the Unix
/// peer credentials work as usual) and the connection's call counter.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo<T> {
    pub(crate) inner: T,
    pub(crate) state: Arc<ConnState>,
}

/// An accepted (and, on the peer port, TLS-established) connection holding
/// one slot of its listener until it drops.
#[derive(Debug)]
pub(crate) struct Conn<IO> {
    io: IO,
    state: Arc<ConnState>,
    limits: ListenLimits,
    watchdog: Pin<Box<Sleep>>,
    label: &'static str,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Conn<IO> {
    pub(crate) fn new(
        io: IO,
        slot: OwnedSemaphorePermit,
        opened: Instant,
        limits: ListenLimits,
        label: &'static str,
    ) -> Self {
        metrics::gauge!("tokend_connections", "listener" => label).increment(1.0);
        Self {
            io,
            state: ConnState::new(opened),
            limits,
            watchdog: Box::pin(tokio::time::sleep_until(opened + limits.handshake_timeout)),
            label,
            _slot: slot,
        }
    }

    /// Polls the watchdog: Ready(error) once the connection is idle past its
    /// deadline. Re-arms it on every call so that it never sleeps past the
    /// current deadline: while a call is in flight it looks again within one
    /// idle period (a call ending wakes nothing here).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let now = Instant::now();
            let armed = self.watchdog.deadline();
            let target = match self.state.idle_deadline(&self.limits) {
                Some(deadline) if deadline <= now => return Poll::Ready(self.idle_error()),
                Some(deadline) => deadline,
                None if armed > now => armed.min(now + self.limits.idle_timeout),
                None => now + self.limits.idle_timeout,
            };
            if target != armed {
                self.watchdog.as_mut().reset(target);
            }
            if self.watchdog.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn idle_error(&self) -> io::Error {
        let first = !self.state.served.load(Ordering::SeqCst);
        metrics::counter!("tokend_connections_idle_closed_total", "listener" => self.label)
            .increment(1);
        tracing::debug!(listener = self.label, first, "closing an idle connection");
        io::Error::new(
            io::ErrorKind::TimedOut,
            if first {
                "no call within the handshake timeout"
            } else {
                "no call within the idle timeout"
            },
        )
    }
}

impl<IO> Drop for Conn<IO> {
    fn drop(&mut self) {
        metrics::gauge!("tokend_connections", "listener" => self.label).decrement(1.0);
    }
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = ConnInfo<IO::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            inner: self.io.connect_info(),
            state: self.state.clone(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut this.io).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        // Nothing to read now. hyper always keeps a read pending, so the
        // watchdog's wake-up reaches us here.
        this.poll_idle(cx).map(Err)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::sync::Semaphore;

    use super::*;

    const LIMITS: ListenLimits = ListenLimits {
        max_connections: 1,
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(10),
    };

    fn conn(slots: &Arc<Semaphore>) -> (Conn<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64);
        let slot = slots.clone().try_acquire_owned().expect("a free slot");
        (
            Conn::new(ours, slot, Instant::now(), LIMITS, "test"),
            theirs,
        )
    }

    async fn read_err(c: &mut Conn<tokio::io::DuplexStream>) -> io::ErrorKind {
        let mut b = [0u8; 8];
        c.read(&mut b)
            .await
            .expect_err("closed for idleness")
            .kind()
    }

    /// A connection that never starts a call is closed at handshake_timeout,
    /// and its slot is free again once it drops.
    #[tokio::test(start_paused = true)]
    async fn no_first_call_is_closed() {
        let slots = Arc::new(Semaphore::new(1));
        let (mut c, _peer) = conn(&slots);
        let started = Instant::now();
        assert_eq!(read_err(&mut c).await, io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.handshake_timeout);
        assert_eq!(slots.available_permits(), 0);
        drop(c);
        assert_eq!(slots.available_permits(), 1);
    }

    /// Bytes alone (a client writing garbage or pings) do not keep a
    /// connection that never started a call.
    #[tokio::test(start_paused = true)]
    async fn bytes_without_calls_do_not_count() {
        use tokio::io::AsyncWriteExt;
        let slots = Arc::new(Semaphore::new(1));
        let (mut c, mut peer) = conn(&slots);
        let writer = tokio::spawn(async move {
            for _ in 0..100 {
                if peer.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut b = [0u8; 8];
        let kind = loop {
            match c.read(&mut b).await {
                Ok(_) => continue,
                Err(e) => break e.kind(),
            }
        };
        assert_eq!(kind, io::ErrorKind::TimedOut);
        writer.abort();
    }

    /// An idle timeout shorter than the handshake timeout applies from the
    /// end of the first call, not from the handshake deadline.
    #[tokio::test(start_paused = true)]
    async fn short_idle_timeout_after_a_call() {
        let limits = ListenLimits {
            max_connections: 1,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(1),
        };
        let slots = Arc::new(Semaphore::new(1));
        let (ours, _peer) = tokio::io::duplex(64);
        let slot = slots.clone().try_acquire_owned().expect("slot");
        let mut c = Conn::new(ours, slot, Instant::now(), limits, "test");
        let mut b = [0u8; 8];
        let call = c.state.begin();
        let polled = tokio::time::timeout(Duration::from_millis(100), c.read(&mut b)).await;
        assert!(polled.is_err());
        let ended = Instant::now();
        drop(call);
        assert_eq!(read_err(&mut c).await, io::ErrorKind::TimedOut);
        assert_eq!(ended.elapsed(), limits.idle_timeout);
    }

    /// A call in flight keeps the connection however long it lasts; once it
    /// ends, the idle timeout runs from that moment.
    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_keep_the_connection() {
        let slots = Arc::new(Semaphore::new(1));
        let (mut c, _peer) = conn(&slots);
        let call = c.state.begin();
        let mut b = [0u8; 8];
        let waited = tokio::time::timeout(Duration::from_secs(3600), c.read(&mut b)).await;
        assert!(waited.is_err(), "closed with a call in flight");
        let ended = Instant::now();
        drop(call);
        assert_eq!(read_err(&mut c).await, io::ErrorKind::TimedOut);
        assert_eq!(ended.elapsed(), LIMITS.idle_timeout);
    }
}
