//! Shutdown: the SIGINT/SIGTERM future `main` hands to the daemon. Handlers
//! are registered when `signals()` is called, before the daemon is built, so
//! a signal arriving during startup still shuts down cleanly (removing the
//! socket) instead of killing the process. Everything else receives
//! cancellation as a value (a `CancellationToken`).

use std::future::Future;

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

/// Forwards `stream` until `stop` is cancelled, then ends it: server streams
/// that never end on their own (key watches, SPIFFE bundles) would otherwise
/// hold a graceful shutdown open for as long as a client keeps them.
pub(crate) fn until_cancelled<T, S>(
    mut stream: S,
    stop: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    S: tokio_stream::Stream<Item = T> + Send + Unpin + 'static,
{
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else { return };
            tokio::select! {
                _ = stop.cancelled() => return,
                sent = tx.send(item) => if sent.is_err() { return },
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
