//! Shutdown: the SIGINT/SIGTERM future `main` hands to the daemon. Handlers
//! are registered when `signals()` is called, before the daemon is built, so
//! a signal arriving during startup still shuts down cleanly (removing the
//! socket) instead of killing the process. Everything else receives
//! cancellation as a value (a `CancellationToken`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::signal::unix::{SignalKind, signal};

/// Registers SIGINT and SIGTERM now; the returned future completes on the first.
pub(crate) fn signals() -> std::io::Result<impl Future<Output = ()> + Send> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
    })
}

/// Ends `stream` when `stop` is cancelled: server streams that never end on
/// their own (key watches, SPIFFE bundles) would otherwise hold a graceful
/// shutdown open for as long as a client keeps them. No task of its own:
/// the stream is polled by whoever reads it, so when a client cancels and
/// the server drops the response, everything it holds is freed at once.
pub(crate) fn until_cancelled<S: tokio_stream::Stream>(
    stream: S,
    stop: tokio_util::sync::CancellationToken,
) -> UntilCancelled<S> {
    UntilCancelled {
        stream: Some(stream),
        stop: Box::pin(stop.cancelled_owned()),
    }
}

/// The stream `until_cancelled` returns.
pub(crate) struct UntilCancelled<S> {
    stream: Option<S>,
    stop: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<S> std::fmt::Debug for UntilCancelled<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UntilCancelled")
            .field("ended", &self.stream.is_none())
            .finish()
    }
}

impl<S: tokio_stream::Stream + Unpin> tokio_stream::Stream for UntilCancelled<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        if this.stop.as_mut().poll(cx).is_ready() {
            this.stream = None;
        }
        let Some(stream) = this.stream.as_mut() else {
            return Poll::Ready(None);
        };
        let item = std::task::ready!(Pin::new(stream).poll_next(cx));
        if item.is_none() {
            this.stream = None;
        }
        Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_stream::StreamExt;
    use tokio_util::sync::CancellationToken;

    use super::*;

    /// A stream that never yields again after its first item and holds `probe`.
    fn pending_holding(probe: Arc<()>) -> impl tokio_stream::Stream<Item = u32> + Unpin {
        Box::pin(
            tokio_stream::once(1)
                .chain(tokio_stream::pending())
                .map(move |x| {
                    let _held = &probe;
                    x
                }),
        )
    }

    /// A cancelled (dropped) stream frees what it holds at once, with no
    /// task left behind, though its source never yields again.
    #[tokio::test]
    async fn dropping_frees_at_once() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let tasks_before = metrics.num_alive_tasks();
        let stop = CancellationToken::new();
        let mut probes = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..1000 {
            let probe = Arc::new(());
            probes.push(Arc::downgrade(&probe));
            let mut s = until_cancelled(pending_holding(probe), stop.clone());
            assert_eq!(s.next().await, Some(1));
            streams.push(s);
        }
        assert!(probes.iter().all(|p| p.upgrade().is_some()));
        drop(streams);
        assert!(
            probes.iter().all(|p| p.upgrade().is_none()),
            "a dropped stream kept its source alive"
        );
        assert_eq!(metrics.num_alive_tasks(), tasks_before);
    }

    /// Cancelling the token ends a stream whose source is still pending, and
    /// releases the source.
    #[tokio::test]
    async fn cancel_ends_the_stream() {
        let stop = CancellationToken::new();
        let probe = Arc::new(());
        let weak = Arc::downgrade(&probe);
        let mut s = until_cancelled(pending_holding(probe), stop.clone());
        assert_eq!(s.next().await, Some(1));
        let waiting = tokio::time::timeout(Duration::from_millis(50), s.next()).await;
        assert!(waiting.is_err(), "yielded without an item");
        stop.cancel();
        assert_eq!(s.next().await, None);
        assert!(weak.upgrade().is_none());
        assert_eq!(s.next().await, None);
    }
}
