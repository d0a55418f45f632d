//! The local API: one tonic server on the Unix socket carrying tokend.v1
//! (token, admin), the SPIFFE Workload API (JWT part) and grpc.health.v1.
//! Each service holds only the handles it uses; `status` is the one place
//! refusals become wire statuses. No business logic here.

mod admin;
mod spiffe;
mod status;
mod token;
mod uds;

use std::future::Future;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub(crate) use self::admin::AdminApi;
pub(crate) use self::spiffe::SpiffeApi;
pub use self::status::{REASON_KEY, detail_of, reason_of};
pub(crate) use self::token::TokenApi;
pub(crate) use self::uds::Callers;
pub use self::uds::connect;
pub(crate) use self::uds::{SocketError, bind};
use crate::proto::spiffe::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::proto::tokend::v1 as pb;

/// The services the local socket carries.
#[derive(Debug)]
pub(crate) struct LocalApi {
    /// tokend.v1 TokenService.
    pub token: TokenApi,
    /// tokend.v1 AdminService.
    pub admin: AdminApi,
    /// The SPIFFE Workload API.
    pub spiffe: SpiffeApi,
}

/// Serves every local service on `listener` until `shutdown` completes, then
/// finishes in-flight calls and returns.
pub(crate) async fn serve(
    listener: UnixListener,
    api: LocalApi,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::token_service_server::TokenServiceServer<TokenApi>>()
        .await;
    reporter
        .set_serving::<pb::admin_service_server::AdminServiceServer<AdminApi>>()
        .await;
    reporter
        .set_serving::<SpiffeWorkloadApiServer<SpiffeApi>>()
        .await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(pb::token_service_server::TokenServiceServer::new(api.token))
        .add_service(pb::admin_service_server::AdminServiceServer::new(api.admin))
        .add_service(SpiffeWorkloadApiServer::new(api.spiffe))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
