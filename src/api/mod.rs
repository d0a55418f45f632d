//! The local API: one tonic server on the Unix socket carrying tokend.v1
//! (token, admin), the SPIFFE Workload API (JWT part), Envoy's external
//! authorization, grpc.health.v1 and server reflection (v1 and v1alpha) for
//! the tokend, SPIFFE and health services.
//! Each service holds only the handles it uses; `status` is the one place
//! refusals become wire statuses. No business logic here.

mod admin;
mod bans;
mod ext_authz;
mod health;
mod spiffe;
mod status;
mod token;
mod uds;

use std::future::Future;

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::net::UnixListener;
use tonic::server::NamedService;
use tonic::transport::server::UdsConnectInfo;

pub(crate) use self::admin::AdminApi;
pub(crate) use self::ext_authz::ExtAuthzApi;
pub(crate) use self::health::LocalHealth;
pub(crate) use self::spiffe::SpiffeApi;
pub use self::status::{DPOP_NONCE_KEY, ERROR_DOMAIN, REASON_KEY, detail_of, reason_of};
pub(crate) use self::token::TokenApi;
pub(crate) use self::uds::Callers;
pub use self::uds::connect;
pub(crate) use self::uds::{SocketError, bind};
use crate::proto::spiffe::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::proto::tokend::v1 as pb;

type TokenServer = pb::token_service_server::TokenServiceServer<TokenApi>;
type AdminServer = pb::admin_service_server::AdminServiceServer<AdminApi>;
type SpiffeServer = SpiffeWorkloadApiServer<SpiffeApi>;
type HealthServer = tonic_health::pb::health_server::HealthServer<health::ShutdownHealth>;

/// The services the socket carries, as reflection lists them (the peer
/// service, compiled from the same protos, is only on the peer port).
const REFLECTED: [&str; 4] = [
    TokenServer::NAME,
    AdminServer::NAME,
    SpiffeServer::NAME,
    HealthServer::NAME,
];

/// Reflection v1 and v1alpha over every service of the socket (and
/// reflection itself), from the descriptor sets compiled with the code; the
/// google.rpc types too, so a client can decode the ErrorInfo of a refusal.
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
        REFLECTED
            .iter()
            .fold(b, |b, name| b.with_service_name(*name))
    };
    let v1 = builder()
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()?;
    let v1alpha = builder()
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

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
    /// Whether the etcd directory is live (`[directory]` only): reported
    /// as the health of service `tokend.directory`.
    pub directory_health: Option<tokio::sync::watch::Receiver<bool>>,
    /// grpc.health.v1 statuses, NOT_SERVING on shutdown; the daemon's
    /// loops set some (the peer API's, through `LocalHealth::reporter`).
    pub health: LocalHealth,
}

/// The grpc.health.v1 service name that says whether the directory is live.
pub(crate) const DIRECTORY_HEALTH: &str = "tokend.directory";

/// Largest Check request: Envoy sends the request's headers, up to its
/// default 60 KiB header limit.
const MAX_CHECK_BYTES: usize = 64 * 1024;

/// Serves every local service on `listener` until `shutdown` completes;
/// then every service turns NOT_SERVING (the peer API's too, if followed),
/// the health's stop token is cancelled (ending health watches, bundle
/// streams and the other long-lived streams), and
/// in-flight calls finish before it returns. `listen` caps connections and
/// closes idle ones; `limits` bounds streams, request size and time.
pub(crate) async fn serve(
    listener: UnixListener,
    api: LocalApi,
    limits: crate::config::LimitsConfig,
    listen: crate::listen::ListenLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let mut health = api.health;
    health.serving::<TokenServer>().await;
    health.serving::<AdminServer>().await;
    health.serving::<SpiffeServer>().await;
    health.serving::<AuthorizationServer<ExtAuthzApi>>().await;
    if let Some(live) = api.directory_health {
        health.follow(DIRECTORY_HEALTH, live).await;
    }
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let max = limits.max_request_bytes;
    let router = crate::listen::server(&limits, limits.max_streams_per_connection)
        .layer(crate::listen::TrackLayer::<UdsConnectInfo>::new())
        .add_service(health.server().max_decoding_message_size(max))
        .add_service(reflection_v1.max_decoding_message_size(max))
        .add_service(reflection_v1alpha.max_decoding_message_size(max))
        .add_service(TokenServer::new(api.token).max_decoding_message_size(max))
        .add_service(AdminServer::new(api.admin).max_decoding_message_size(max))
        .add_service(SpiffeServer::new(api.spiffe).max_decoding_message_size(max))
        .add_service(
            AuthorizationServer::new(api.ext_authz)
                .max_decoding_message_size(max.max(MAX_CHECK_BYTES)),
        );
    let shutdown = async move {
        shutdown.await;
        health.shut_down().await;
    };
    router
        .serve_with_incoming_shutdown(crate::listen::unix(listener, listen), shutdown)
        .await?;
    Ok(())
}

/// Why the local API could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The compiled descriptor sets do not describe the services (a build fault).
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}
