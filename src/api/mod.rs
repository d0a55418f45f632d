//! The local API: one tonic server on the Unix socket carrying tokend.v1
//! (token, admin), the SPIFFE Workload API (JWT part), Envoy's external
//! authorization and grpc.health.v1.
//! Each service holds only the handles it uses; `status` is the one place
//! refusals become wire statuses. No business logic here.

mod admin;
mod bans;
mod ext_authz;
mod spiffe;
mod status;
mod token;
mod uds;

use std::future::Future;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;

pub(crate) use self::admin::AdminApi;
pub(crate) use self::ext_authz::ExtAuthzApi;
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
    /// Envoy external authorization.
    pub ext_authz: ExtAuthzApi,
    /// grpc.health.v1 statuses; the daemon's loops set some (the peer API's).
    pub health: tonic_health::server::HealthReporter,
}

/// Largest Check request: Envoy sends the request's headers, up to its
/// default 60 KiB header limit.
const MAX_CHECK_BYTES: usize = 64 * 1024;

/// Serves every local service on `listener` until `shutdown` completes, then
/// finishes in-flight calls and returns. `listen` caps connections and closes
/// idle ones; `limits` bounds streams, request size and time.
pub(crate) async fn serve(
    listener: UnixListener,
    api: LocalApi,
    limits: crate::config::LimitsConfig,
    listen: crate::listen::ListenLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let reporter = api.health.clone();
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    reporter
        .set_serving::<pb::token_service_server::TokenServiceServer<TokenApi>>()
        .await;
    reporter
        .set_serving::<pb::admin_service_server::AdminServiceServer<AdminApi>>()
        .await;
    reporter
        .set_serving::<SpiffeWorkloadApiServer<SpiffeApi>>()
        .await;
    reporter
        .set_serving::<AuthorizationServer<ExtAuthzApi>>()
        .await;
    let max = limits.max_request_bytes;
    crate::listen::server(&limits, limits.max_streams_per_connection)
        .layer(crate::listen::TrackLayer::<UdsConnectInfo>::new())
        .add_service(health.max_decoding_message_size(max))
        .add_service(
            pb::token_service_server::TokenServiceServer::new(api.token)
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(api.admin)
                .max_decoding_message_size(max),
        )
        .add_service(SpiffeWorkloadApiServer::new(api.spiffe).max_decoding_message_size(max))
        .add_service(
            AuthorizationServer::new(api.ext_authz)
                .max_decoding_message_size(max.max(MAX_CHECK_BYTES)),
        )
        .serve_with_incoming_shutdown(crate::listen::unix(listener, listen), shutdown)
        .await
}
