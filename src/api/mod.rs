//! The local API: one tonic server on the Unix socket carrying tokend.v1
//! (token, admin), the SPIFFE Workload API (JWT part) and grpc.health.v1.
//! No business logic here.

mod spiffe;
mod status;
mod tokend;
mod uds;

use std::future::Future;
use std::sync::Arc;

use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;

pub use self::spiffe::{MAX_AUDIENCE_LEN, MAX_AUDIENCES, SECURITY_HEADER, SpiffeApi, bundles};
pub use self::status::{REASON_KEY, detail_of, reason_of, reject, reject_with};
pub use self::tokend::{AdminApi, TokenApi, key_info};
pub use self::uds::{bind, caller_uid, check_uid, own_uid};
use crate::daemon::Core;
use crate::proto::tokend::v1 as pb;

/// Opens a gRPC channel to the sidecar listening on `socket` (clients, CLI, tests).
pub async fn connect(socket: &std::path::Path) -> Result<tonic::transport::Channel, String> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    tonic::transport::Endpoint::try_from("http://tokend.local")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to tokend at {}: {e}", socket.display()))
}

/// Serves every local service on `listener` until `shutdown` completes, then
/// finishes in-flight calls and returns. `listen` caps connections and closes
/// idle ones; `[limits]` bounds streams, request size and time.
pub async fn serve(
    listener: UnixListener,
    core: Arc<Core>,
    listen: crate::listen::ListenLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let limits = core.config.limits;
    let max = limits.max_request_bytes;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::token_service_server::TokenServiceServer<TokenApi>>()
        .await;
    reporter
        .set_serving::<pb::admin_service_server::AdminServiceServer<AdminApi>>()
        .await;
    reporter
        .set_serving::<crate::proto::spiffe::spiffe_workload_api_server::SpiffeWorkloadApiServer<SpiffeApi>>()
        .await;
    crate::listen::server(&limits, limits.max_streams_per_connection)
        .layer(crate::listen::TrackLayer::<UdsConnectInfo>::new())
        .add_service(health.max_decoding_message_size(max))
        .add_service(
            pb::token_service_server::TokenServiceServer::new(TokenApi(core.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(AdminApi(core.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            crate::proto::spiffe::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(
                SpiffeApi(core),
            )
            .max_decoding_message_size(max),
        )
        .serve_with_incoming_shutdown(crate::listen::unix(listener, listen), shutdown)
        .await
}
