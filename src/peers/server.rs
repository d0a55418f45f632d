//! The peer-facing `PeerService` over mTLS TCP: GetKeys, and WatchKeys which
//! sends the current set and then every change as it is published; and
//! GetDocument / WatchDocuments, the same as this instance's signed key-set
//! documents (from the `DocumentPublisher`). Reads the `KeyView` and the
//! document watch only; client certificates are required by the TLS layer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status};

use super::publisher::DocumentHandle;
use crate::config::LimitsConfig;
use crate::engine::SignedDocument;
use crate::identity::{SpiffeId, TrustDomain};
use crate::keys::{OwnKeys, OwnSet};
use crate::proto::tokend::v1 as pb;

/// Serves this sidecar's public keys to peers.
#[derive(Clone)]
pub(crate) struct PeerKeysApi {
    id: SpiffeId,
    td: TrustDomain,
    keys: OwnKeys,
    documents: Option<DocumentHandle>,
    shutdown: tokio_util::sync::CancellationToken,
    watches: Arc<WatchSlots>,
}

/// Open `WatchKeys` streams per caller identity, so that one certificate of
/// the trust domain cannot hold an unbounded number of them.
#[derive(Debug)]
struct WatchSlots {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl WatchSlots {
    fn take(self: &Arc<Self>, caller: &str) -> Option<WatchSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(caller.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(WatchSlot {
            slots: self.clone(),
            caller: caller.to_owned(),
        })
    }
}

/// One open watch; dropping it (the stream ends or is cancelled) frees the slot.
#[derive(Debug)]
struct WatchSlot {
    slots: Arc<WatchSlots>,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

impl std::fmt::Debug for PeerKeysApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerKeysApi").field("id", &self.id).finish()
    }
}

/// The wire form of the own keys, with each key's expiry hint
/// (`KeySet::expiry_hints`): the bound-token keys in their own field.
fn key_set_message(id: &SpiffeId, set: &OwnSet) -> pb::PeerKeySet {
    let bound_jwks_json = if set.bound.published().next().is_some() {
        set.bound.jwks_json()
    } else {
        String::new()
    };
    pb::PeerKeySet {
        issuer: id.to_string(),
        jwks_json: set.signing.jwks_json(),
        revoked_kids: set.revoked_kids(),
        version: set.version(),
        bound_jwks_json,
        key_expires_at: set
            .expiry_hints()
            .into_iter()
            .map(|(kid, t)| (kid, t.as_secs()))
            .collect(),
    }
}

impl PeerKeysApi {
    /// The service for sidecar `id`; its watch streams end when `shutdown`
    /// is cancelled; each caller identity may hold `watches_per_caller` at once.
    pub(crate) fn new(
        id: SpiffeId,
        td: TrustDomain,
        keys: OwnKeys,
        shutdown: tokio_util::sync::CancellationToken,
        watches_per_caller: usize,
    ) -> Self {
        Self {
            id,
            td,
            keys,
            documents: None,
            shutdown,
            watches: Arc::new(WatchSlots {
                max: watches_per_caller,
                open: Mutex::default(),
            }),
        }
    }

    /// Also serves this instance's documents, from `documents`.
    pub(crate) fn with_documents(mut self, documents: DocumentHandle) -> Self {
        self.documents = Some(documents);
        self
    }

    fn documents(&self) -> Result<&DocumentHandle, Status> {
        self.documents.as_ref().ok_or_else(|| {
            Status::unimplemented("this sidecar publishes no signed key-set documents")
        })
    }

    fn caller<T>(&self, req: &Request<T>) -> String {
        req.peer_certs()
            .and_then(|c| c.first().map(|d| super::tls::svid_id(d, &self.td)))
            .map(|r| {
                r.map(|id| id.to_string())
                    .unwrap_or_else(|e| format!("<{e}>"))
            })
            .unwrap_or_else(|| "<no certificate>".into())
    }
}

type KeyStream = Pin<Box<dyn Stream<Item = Result<pb::PeerKeySet, Status>> + Send>>;
type DocumentStream = Pin<Box<dyn Stream<Item = Result<pb::KeySetDocument, Status>> + Send>>;

fn document_message(doc: &SignedDocument) -> pb::KeySetDocument {
    pb::KeySetDocument {
        jws: doc.jws.to_string(),
    }
}

#[tonic::async_trait]
impl pb::peer_service_server::PeerService for PeerKeysApi {
    async fn get_keys(
        &self,
        req: Request<pb::GetKeysRequest>,
    ) -> Result<Response<pb::PeerKeySet>, Status> {
        tracing::debug!(peer = %self.caller(&req), "GetKeys");
        Ok(Response::new(key_set_message(
            &self.id,
            &self.keys.current(),
        )))
    }

    type WatchKeysStream = KeyStream;

    async fn watch_keys(
        &self,
        req: Request<pb::GetKeysRequest>,
    ) -> Result<Response<KeyStream>, Status> {
        let caller = self.caller(&req);
        let Some(slot) = self.watches.take(&caller) else {
            tracing::warn!(peer = %caller, max = self.watches.max, "too many key watches; refused");
            return Err(Status::resource_exhausted(format!(
                "at most {} concurrent WatchKeys per peer identity",
                self.watches.max
            )));
        };
        tracing::info!(peer = %caller, "peer watching keys");
        let id = self.id.clone();
        let keys = self.keys.clone();
        // The current set, then one message per change of either class.
        let changes = WatchStream::new(self.keys.signing.subscribe())
            .map(|_| ())
            .merge(WatchStream::from_changes(self.keys.bound.subscribe()).map(|_| ()));
        let stream = changes.map(move |()| {
            let _held = &slot;
            Ok(key_set_message(&id, &keys.current()))
        });
        let stream = crate::shutdown::until_cancelled(Box::pin(stream), self.shutdown.clone());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_document(
        &self,
        req: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<pb::KeySetDocument>, Status> {
        tracing::debug!(peer = %self.caller(&req), "GetDocument");
        let doc = self.documents()?.fresh();
        Ok(Response::new(document_message(&doc)))
    }

    type WatchDocumentsStream = DocumentStream;

    async fn watch_documents(
        &self,
        req: Request<pb::GetDocumentRequest>,
    ) -> Result<Response<DocumentStream>, Status> {
        let documents = self.documents()?.subscribe();
        let caller = self.caller(&req);
        let Some(slot) = self.watches.take(&caller) else {
            tracing::warn!(peer = %caller, max = self.watches.max, "too many document watches; refused");
            return Err(Status::resource_exhausted(format!(
                "at most {} concurrent watches per peer identity",
                self.watches.max
            )));
        };
        tracing::info!(peer = %caller, "peer watching documents");
        let stream = WatchStream::new(documents).map(move |doc| {
            let _held = &slot;
            Ok(document_message(&doc))
        });
        let stream = crate::shutdown::until_cancelled(Box::pin(stream), self.shutdown.clone());
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The largest request a peer may send (GetKeysRequest is empty).
pub(crate) const MAX_PEER_REQUEST: usize = 4 * 1024;
/// Concurrent streams per peer connection: a peer client uses one watch and
/// an occasional GetKeys (`limits.max_streams_per_connection` if lower).
pub(crate) const MAX_PEER_STREAMS: u32 = 4;

/// Serves `api` with mTLS on `listener` until `shutdown`. The TLS handshake
/// (client certificate required by `tls`) runs under `listen`'s deadline and
/// connection cap; `limits` bounds time, `MAX_PEER_STREAMS` streams and
/// `MAX_PEER_REQUEST` request size; HTTP/2 keepalive pings
/// free the slots of peers that vanished without closing.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    api: PeerKeysApi,
    limits: &LimitsConfig,
    listen: crate::listen::ListenLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    crate::listen::server(
        limits,
        MAX_PEER_STREAMS.min(limits.max_streams_per_connection),
    )
    .http2_keepalive_interval(Some(Duration::from_secs(30)))
    .http2_keepalive_timeout(Some(Duration::from_secs(10)))
    .layer(crate::listen::TrackLayer::<TlsConnectInfo<TcpConnectInfo>>::new())
    .add_service(
        pb::peer_service_server::PeerServiceServer::new(api)
            .max_decoding_message_size(MAX_PEER_REQUEST),
    )
    .serve_with_incoming_shutdown(crate::listen::tls(listener, tls, listen), shutdown)
    .await
}
