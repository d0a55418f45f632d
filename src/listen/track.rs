//! The tower layer that counts a connection's calls for its idle watchdog:
//! a call counts from its request until its response body is dropped (so a
//! long-lived stream keeps its connection). It also puts the inner IO's
//! connect info back where tonic's accessors look for it.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;

use super::ConnInfo;
use super::conn::ActiveGuard;

/// Wraps a server's routes in `Track` (install with `Server::layer`);
/// `T` is the connect info of the listener's raw IO.
pub(crate) struct TrackLayer<T>(PhantomData<fn() -> T>);

impl<T> TrackLayer<T> {
    /// The layer for connections whose inner IO reports `T`.
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for TrackLayer<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for TrackLayer<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> std::fmt::Debug for TrackLayer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrackLayer")
    }
}

impl<S, T> tower::Layer<S> for TrackLayer<T> {
    type Service = Track<S, T>;

    fn layer(&self, inner: S) -> Self::Service {
        Track {
            inner,
            _info: PhantomData,
        }
    }
}

/// The service `TrackLayer` makes.
pub(crate) struct Track<S, T> {
    inner: S,
    _info: PhantomData<fn() -> T>,
}

impl<S: Clone, T> Clone for Track<S, T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _info: PhantomData,
        }
    }
}

impl<S, T> std::fmt::Debug for Track<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Track")
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, T> tower::Service<http::Request<Body>> for Track<S, T>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    type Response = http::Response<TrackedBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let guard = req.extensions_mut().remove::<ConnInfo<T>>().map(|info| {
            req.extensions_mut().insert(info.inner);
            info.state.begin()
        });
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                _call: guard,
            }))
        })
    }
}

/// A response body that keeps its call counted until it is dropped.
#[derive(Debug)]
pub(crate) struct TrackedBody {
    inner: Body,
    _call: Option<ActiveGuard>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
