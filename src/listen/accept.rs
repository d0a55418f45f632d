//! The accept loop shared by both listeners: take a slot, accept, run the
//! handshake under its deadline in a task of its own, hand the connection to
//! tonic. Errors back off instead of spinning; the loop (and the listening
//! socket) ends when tonic drops the stream.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::{Conn, ListenLimits};

/// Something that accepts connections (a Unix or TCP listener, or a test fake).
pub(crate) trait Listener: Send + Sync + 'static {
    /// The accepted stream.
    type Io: Send + 'static;
    /// Accepts one connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
}

impl Listener for UnixListener {
    type Io = UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

impl Listener for TcpListener {
    type Io = TcpStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// Ready connections for tonic's `serve_with_incoming*`. Dropping it stops
/// the accept loop and closes the listening socket.
#[derive(Debug)]
pub(crate) struct Incoming<IO> {
    rx: mpsc::Receiver<Conn<IO>>,
}

impl<IO> tokio_stream::Stream for Incoming<IO> {
    type Item = Result<Conn<IO>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// Serves a Unix socket: no handshake of our own, so the deadline covers the
/// HTTP/2 preface and first call (enforced by `Conn`).
pub(crate) fn unix(listener: UnixListener, limits: ListenLimits) -> Incoming<UnixStream> {
    spawn(listener, limits, "local", |s| async move { Ok(s) })
}

/// Serves the peer port: the TLS handshake (client certificate required by
/// `tls`) must finish within `limits.handshake_timeout`.
pub(crate) fn tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: ListenLimits,
) -> Incoming<TlsStream<TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    spawn(listener, limits, "peer", move |s: TcpStream| {
        let _ = s.set_nodelay(true);
        acceptor.accept(s)
    })
}

fn spawn<L, IO, F, Fut>(
    listener: L,
    limits: ListenLimits,
    label: &'static str,
    handshake: F,
) -> Incoming<IO>
where
    L: Listener,
    F: Fn(L::Io) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
    IO: Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, limits, label, handshake, tx));
    Incoming { rx }
}

async fn accept_loop<L, IO, F, Fut>(
    listener: L,
    limits: ListenLimits,
    label: &'static str,
    handshake: F,
    tx: mpsc::Sender<Conn<IO>>,
) where
    L: Listener,
    F: Fn(L::Io) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
    IO: Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = Backoff::new(label);
    loop {
        // A slot first: at the cap, clients wait in the kernel's queue.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            () = tx.closed() => return,
        };
        let accepted = tokio::select! {
            r = std::future::poll_fn(|cx| listener.poll_accept(cx)) => r,
            () = tx.closed() => return,
        };
        let raw = match accepted {
            Ok(raw) => raw,
            Err(e) => {
                drop(slot);
                let pause = backoff.failed(&e);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = tx.closed() => return,
                }
                continue;
            }
        };
        backoff.succeeded();
        let opened = Instant::now();
        let ready = handshake(raw);
        let tx = tx.clone();
        tokio::spawn(async move {
            let io = tokio::select! {
                r = tokio::time::timeout(limits.handshake_timeout, ready) => r,
                () = tx.closed() => return,
            };
            match io {
                Ok(Ok(io)) => {
                    let _ = tx.send(Conn::new(io, slot, opened, limits, label)).await;
                }
                Ok(Err(e)) => {
                    metrics::counter!("tokend_handshake_failures_total", "listener" => label, "why" => "error").increment(1);
                    tracing::debug!(listener = label, error = %e, "handshake failed");
                }
                Err(_) => {
                    metrics::counter!("tokend_handshake_failures_total", "listener" => label, "why" => "timeout").increment(1);
                    tracing::debug!(listener = label, "handshake timed out");
                }
            }
        });
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Pauses between failing accepts (5 ms doubling to 1 s, reset by a
/// success) and rate-limited logging of them (one line per 5 s).
#[derive(Debug)]
pub(crate) struct Backoff {
    label: &'static str,
    delay: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl Backoff {
    pub(crate) fn new(label: &'static str) -> Self {
        Self {
            label,
            delay: Duration::ZERO,
            last_log: None,
            suppressed: 0,
        }
    }

    /// Records a failed accept; returns how long to wait before the next.
    pub(crate) fn failed(&mut self, e: &io::Error) -> Duration {
        self.delay = (self.delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        metrics::counter!("tokend_accept_errors_total", "listener" => self.label).increment(1);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            let errno = e.raw_os_error().map(nix::errno::Errno::from_raw);
            let exhausted = matches!(
                errno,
                Some(nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE)
            );
            tracing::warn!(
                listener = self.label,
                error = %e,
                out_of_fds = exhausted,
                suppressed = self.suppressed,
                retry_in = ?self.delay,
                "accept failed; backing off"
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        self.delay
    }

    /// Records a successful accept: the next failure starts small again.
    pub(crate) fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio_stream::StreamExt;

    use super::*;

    /// A listener whose every accept fails with EMFILE, counting attempts.
    struct OutOfFds(Arc<AtomicUsize>);

    impl Listener for OutOfFds {
        type Io = tokio::io::DuplexStream;
        fn poll_accept(&self, _: &mut Context<'_>) -> Poll<io::Result<Self::Io>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Err(io::Error::from_raw_os_error(
                nix::errno::Errno::EMFILE as i32,
            )))
        }
    }

    const LIMITS: ListenLimits = ListenLimits {
        max_connections: 4,
        handshake_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
    };

    /// EMFILE does not spin: over 10 (virtual) seconds of failures the loop
    /// tries about a dozen times, not millions; it stops when the stream drops.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let incoming = spawn(OutOfFds(attempts.clone()), LIMITS, "test", |s| async move {
            Ok(s)
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = attempts.load(Ordering::SeqCst);
        // 5+10+…+640 ms (8 tries, ~1.3 s) then one a second.
        assert!((10..=25).contains(&n), "{n} attempts in 10 s");
        drop(incoming);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = attempts.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), after, "still accepting");
    }

    /// The delay doubles from 5 ms to at most 1 s and a success resets it.
    #[test]
    fn backoff_grows_and_resets() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut b = Backoff::new("test");
            let e = io::Error::from(io::ErrorKind::ConnectionAborted);
            let delays: Vec<_> = (0..10).map(|_| b.failed(&e)).collect();
            assert_eq!(delays[0], BACKOFF_MIN);
            assert_eq!(delays[1], BACKOFF_MIN * 2);
            assert_eq!(delays[9], BACKOFF_MAX);
            assert!(delays.windows(2).all(|w| w[0] <= w[1]));
            b.succeeded();
            assert_eq!(b.failed(&e), BACKOFF_MIN);
        });
    }

    /// The cap holds: with 2 slots, a third client is not accepted until a
    /// connection drops; handshakes that time out free their slot.
    #[tokio::test]
    async fn cap_and_handshake_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let limits = ListenLimits {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(60),
        };
        // A "handshake" that never completes for the first two connections.
        let n = Arc::new(AtomicUsize::new(0));
        let count = n.clone();
        let mut incoming = spawn(listener, limits, "test", move |s| {
            let i = count.fetch_add(1, Ordering::SeqCst);
            async move {
                if i < 2 {
                    std::future::pending::<()>().await;
                }
                Ok(s)
            }
        });
        let _a = UnixStream::connect(&path).await.expect("a");
        let _b = UnixStream::connect(&path).await.expect("b");
        let _c = UnixStream::connect(&path)
            .await
            .expect("c (queued by the kernel)");
        // c is accepted only once a or b's handshake times out and frees a slot.
        let conn = tokio::time::timeout(Duration::from_secs(30), incoming.next())
            .await
            .expect("c accepted after the deadline freed a slot")
            .expect("stream open")
            .expect("ok");
        assert_eq!(n.load(Ordering::SeqCst), 3);
        drop(conn);
    }
}
