//! The peer-facing `PeerService` over mTLS TCP: GetKeys, and WatchKeys which
//! sends the current set and then every change as it is published. Reads the
//! `KeyView` only; client certificates are required by the TLS layer.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::identity::{SpiffeId, TrustDomain};
use crate::keys::{KeySet, KeyView, retires_at};
use crate::proto::tokend::v1 as pb;

/// Serves this sidecar's public keys to peers.
#[derive(Clone)]
pub(crate) struct PeerKeysApi {
    id: SpiffeId,
    td: TrustDomain,
    keys: KeyView,
    shutdown: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for PeerKeysApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerKeysApi").field("id", &self.id).finish()
    }
}

/// The wire form of a key set, with each key's expiry hint: a retired key's
/// last token expires at retirement + grace; a key with no successor yet is
/// given two rotation intervals of slack beyond its activation, plus grace.
fn key_set_message(id: &SpiffeId, set: &KeySet) -> pb::PeerKeySet {
    let records = set.records();
    let lc = set.lifecycle;
    let key_expires_at: HashMap<String, i64> = records
        .iter()
        .filter(|r| r.revoked_at.is_none())
        .map(|r| {
            let until = match retires_at(r, &records) {
                Some(t) => t + lc.grace,
                None => r.activates_at + 2 * lc.interval + lc.grace,
            };
            (r.kid.clone(), until.as_secs())
        })
        .collect();
    pb::PeerKeySet {
        issuer: id.to_string(),
        jwks_json: set.jwks_json(),
        revoked_kids: set.revoked_kids().map(str::to_owned).collect(),
        version: set.version,
        key_expires_at,
    }
}

impl PeerKeysApi {
    /// The service for sidecar `id`; its watch streams end when `shutdown` is cancelled.
    pub(crate) fn new(
        id: SpiffeId,
        td: TrustDomain,
        keys: KeyView,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            id,
            td,
            keys,
            shutdown,
        }
    }

    fn caller<T>(&self, req: &Request<T>) -> String {
        req.peer_certs()
            .and_then(|c| c.first().map(|d| super::tls::spiffe_id_of(d, &self.td)))
            .map(|r| {
                r.map(|id| id.to_string())
                    .unwrap_or_else(|e| format!("<{e}>"))
            })
            .unwrap_or_else(|| "<no certificate>".into())
    }
}

type KeyStream = Pin<Box<dyn Stream<Item = Result<pb::PeerKeySet, Status>> + Send>>;

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
        tracing::info!(peer = %self.caller(&req), "peer watching keys");
        let id = self.id.clone();
        let stream =
            WatchStream::new(self.keys.subscribe()).map(move |set| Ok(key_set_message(&id, &set)));
        let stream = crate::shutdown::until_cancelled(Box::pin(stream), self.shutdown.clone());
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves `api` with mTLS on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    api: PeerKeysApi,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .timeout(std::time::Duration::from_secs(30))
        .add_service(pb::peer_service_server::PeerServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
