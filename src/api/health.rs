//! grpc.health.v1 on the socket, shutdown-aware: every service served is
//! registered here as SERVING; on shutdown all of them (and the overall
//! status, `""`) turn NOT_SERVING first, then every open `Watch` delivers
//! that and ends, so a watcher learns the sidecar is going and cannot hold
//! the graceful drain open. A status another loop owns (the peer API's,
//! set by the peer TLS watch on certificate expiry) is registered with
//! `follow` so shutdown turns it NOT_SERVING too; that loop sets it through
//! `reporter`.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The health statuses of the local services, and the switch that turns
/// them all NOT_SERVING on shutdown.
#[derive(Debug)]
pub(crate) struct LocalHealth {
    reporter: HealthReporter,
    names: Vec<&'static str>,
    stop: CancellationToken,
}

impl LocalHealth {
    /// Statuses whose watches end when `stop` is cancelled (after
    /// `shut_down` has turned everything NOT_SERVING).
    pub(crate) fn new(stop: CancellationToken) -> Self {
        Self {
            reporter: HealthReporter::new(),
            names: vec![""],
            stop,
        }
    }

    /// Reports the service `S` as SERVING.
    pub(crate) async fn serving<S: NamedService>(&mut self) {
        self.names.push(S::NAME);
        self.reporter.set_serving::<S>().await;
    }

    /// Reports `name` as `live` says (SERVING while true, NOT_SERVING
    /// while false), until shutdown turns it NOT_SERVING for good.
    pub(crate) async fn follow(
        &mut self,
        name: &'static str,
        mut live: tokio::sync::watch::Receiver<bool>,
    ) {
        self.names.push(name);
        let status = |on: bool| {
            if on {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        let now = status(*live.borrow_and_update());
        self.reporter.set_service_status(name, now).await;
        let reporter = self.reporter.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = live.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                let now = status(*live.borrow_and_update());
                if stop.is_cancelled() {
                    return;
                }
                reporter.set_service_status(name, now).await;
            }
        });
    }

    /// Registers `name`, whose status another loop sets through
    /// `reporter`, so that shutdown turns it NOT_SERVING as well.
    pub(crate) fn register(&mut self, name: &'static str) {
        if !self.names.contains(&name) {
            self.names.push(name);
        }
    }

    /// The statuses' reporter, for a loop that owns one of them.
    pub(crate) fn reporter(&self) -> HealthReporter {
        self.reporter.clone()
    }

    /// The grpc.health.v1 service over these statuses.
    pub(crate) fn server(&self) -> HealthServer<ShutdownHealth> {
        HealthServer::new(ShutdownHealth {
            inner: HealthService::from_health_reporter(self.reporter.clone()),
            stop: self.stop.clone(),
        })
    }

    /// Turns every service, and the overall status, NOT_SERVING, then ends
    /// the long-lived streams (health watches with the others `stop` ends).
    pub(crate) async fn shut_down(&self) {
        for name in &self.names {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        self.stop.cancel();
    }
}

/// tonic-health's service, with watches that end on shutdown.
#[derive(Debug)]
pub(crate) struct ShutdownHealth {
    inner: HealthService,
    stop: CancellationToken,
}

#[tonic::async_trait]
impl Health for ShutdownHealth {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(req).await
    }

    type WatchStream = EndingWatch;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(req).await?.into_inner();
        Ok(Response::new(EndingWatch {
            inner: Some(Box::pin(inner)),
            stop: Box::pin(self.stop.clone().cancelled_owned()),
            last: None,
        }))
    }
}

type Statuses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

/// A health watch that, once shutdown begins, delivers the change it has
/// pending (NOT_SERVING), makes sure the last status it sent is
/// NOT_SERVING, and ends. Polled by the connection; no task of its own.
pub(crate) struct EndingWatch {
    inner: Option<Statuses>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    last: Option<i32>,
}

impl std::fmt::Debug for EndingWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndingWatch")
            .field("ended", &self.inner.is_none())
            .field("last", &self.last)
            .finish()
    }
}

impl Stream for EndingWatch {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let stopping = this.stop.as_mut().poll(cx).is_ready();
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => {
                if let Ok(r) = &item {
                    this.last = Some(r.status);
                }
                return Poll::Ready(Some(item));
            }
            Poll::Ready(None) => {
                this.inner = None;
                return Poll::Ready(None);
            }
            Poll::Pending if !stopping => return Poll::Pending,
            Poll::Pending => {}
        }
        this.inner = None;
        let not_serving = WireStatus::NotServing as i32;
        if this.last == Some(not_serving) {
            return Poll::Ready(None);
        }
        this.last = Some(not_serving);
        Poll::Ready(Some(Ok(HealthCheckResponse {
            status: not_serving,
        })))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    /// A watch sees SERVING, then NOT_SERVING on shutdown, then ends.
    #[tokio::test]
    async fn watch_sees_not_serving_then_ends() {
        let stop = CancellationToken::new();
        let health = LocalHealth::new(stop.clone());
        let server = ShutdownHealth {
            inner: HealthService::from_health_reporter(health.reporter.clone()),
            stop,
        };
        let mut watch = server
            .watch(Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .expect("watch")
            .into_inner();
        let first = watch.next().await.expect("first").expect("ok");
        assert_eq!(first.status, WireStatus::Serving as i32);
        health.shut_down().await;
        let last = watch.next().await.expect("second").expect("ok");
        assert_eq!(last.status, WireStatus::NotServing as i32);
        assert!(watch.next().await.is_none(), "watch did not end");
    }
}
