//! Commands that talk to a running sidecar over its Unix socket (one channel,
//! one RPC, print), and `serve` itself. Never signs, never reads keys.

use std::path::Path;

use super::{EXIT_USAGE, ProofArgs, ServeArgs};
use crate::api::{DPOP_NONCE_KEY, connect, detail_of, reason_of};
use crate::proto::tokend::v1 as pb;

fn print_status(status: &tonic::Status, prefix: &str) -> u8 {
    match reason_of(status) {
        Some(r) => eprintln!("{prefix}: {r}: {}", detail_of(status)),
        None => eprintln!("tokend: {}: {}", code_name(status.code()), status.message()),
    }
    // A verifier that requires DPoP nonces answers the next one: shown so
    // `tokend prove --nonce` can use it.
    if let Some(nonce) = status
        .metadata()
        .get(DPOP_NONCE_KEY)
        .and_then(|v| v.to_str().ok())
    {
        eprintln!("dpop-nonce: {nonce}");
    }
    1
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}").to_lowercase()
}

macro_rules! channel_or_exit {
    ($socket:expr) => {
        match connect($socket).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tokend: {e}");
                return 1;
            }
        }
    };
}

/// `tokend serve`.
pub(super) async fn serve(args: ServeArgs) -> u8 {
    let overrides = crate::config::Overrides {
        name: args.name,
        trust_domain: args.trust_domain,
        socket: args.socket,
        keys_dir: args.keys_dir,
        peer_listen: args.peer_listen,
        metrics_listen: args.metrics_listen,
        state_directory: std::env::var_os("STATE_DIRECTORY"),
    };
    let config = match crate::config::Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokend: {e}");
            return EXIT_USAGE;
        }
    };
    // Registered before anything is built: a signal during startup still shuts down cleanly.
    let shutdown = match crate::shutdown::signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tokend: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let clock = std::sync::Arc::new(crate::time::SystemClock);
    let daemon = match crate::daemon::Daemon::build(config, clock).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tokend: cannot start: {e}");
            return if e.is_config() { EXIT_USAGE } else { 1 };
        }
    };
    match daemon.run(shutdown).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tokend: {e}");
            1
        }
    }
}

/// `tokend mint`.
pub(super) async fn mint(
    socket: &Path,
    audience: String,
    ttl: Option<u64>,
    claims: Vec<(String, serde_json::Value)>,
    one_time: bool,
    bind: bool,
) -> u8 {
    let mut object = serde_json::Map::new();
    for (k, v) in claims {
        if object.insert(k.clone(), v).is_some() {
            eprintln!("tokend: --claim {k} is given twice; give each claim once");
            return EXIT_USAGE;
        }
    }
    let claims_json = if object.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(object).to_string()
    };
    let mut client = pb::token_service_client::TokenServiceClient::new(channel_or_exit!(socket));
    let req = pb::MintRequest {
        audience,
        ttl_seconds: ttl.unwrap_or(0),
        claims_json,
        one_time,
        bind,
    };
    match client.mint(req).await {
        Ok(r) => {
            out!("{}", r.into_inner().token);
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend verify`.
pub(super) async fn verify(
    socket: &Path,
    token: String,
    audience: Option<String>,
    proof: ProofArgs,
) -> u8 {
    let mut client = pb::token_service_client::TokenServiceClient::new(channel_or_exit!(socket));
    let req = pb::VerifyRequest {
        token,
        audience: audience.unwrap_or_default(),
        proof: proof.proof.unwrap_or_default(),
        method: proof.method.unwrap_or_default(),
        uri: proof.uri.unwrap_or_default(),
    };
    match client.verify(req).await {
        Ok(r) => {
            let r = r.into_inner();
            let claims: serde_json::Value =
                serde_json::from_str(&r.claims_json).unwrap_or_default();
            out!(
                "{}",
                serde_json::to_string_pretty(&claims).unwrap_or_default()
            );
            0
        }
        Err(s) => print_status(&s, "rejected"),
    }
}

/// `tokend exchange`.
pub(super) async fn exchange(
    socket: &Path,
    token: String,
    audience: String,
    proof: ProofArgs,
    bind: bool,
) -> u8 {
    let mut client = pb::token_service_client::TokenServiceClient::new(channel_or_exit!(socket));
    match client
        .exchange(pb::ExchangeRequest {
            token,
            audience,
            ttl_seconds: 0,
            proof: proof.proof.unwrap_or_default(),
            method: proof.method.unwrap_or_default(),
            uri: proof.uri.unwrap_or_default(),
            bind,
        })
        .await
    {
        Ok(r) => {
            out!("{}", r.into_inner().token);
            0
        }
        Err(s) => print_status(&s, "rejected"),
    }
}

/// `tokend prove`.
pub(super) async fn prove(
    socket: &Path,
    token: String,
    method: String,
    uri: String,
    nonce: Option<String>,
) -> u8 {
    let mut client = pb::token_service_client::TokenServiceClient::new(channel_or_exit!(socket));
    let req = pb::ProveRequest {
        token,
        method,
        uri,
        nonce: nonce.unwrap_or_default(),
    };
    match client.prove(req).await {
        Ok(r) => {
            out!("{}", r.into_inner().proof);
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

fn time(t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    let st = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64);
    humantime::format_rfc3339_seconds(st).to_string()
}

/// `tokend keys list`.
pub(super) async fn keys_list(socket: &Path, bound: bool) -> u8 {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel_or_exit!(socket));
    match client.list_keys(pb::ListKeysRequest { bound }).await {
        Ok(r) => {
            out!(
                "{:<44} {:<8} {:<21} {:<21} {:<21} {:<21}",
                "KID",
                "STATE",
                "CREATED",
                "ACTIVATES",
                "RETIRES",
                "DELETED-AFTER"
            );
            for k in r.into_inner().keys {
                out!(
                    "{:<44} {:<8} {:<21} {:<21} {:<21} {:<21}",
                    k.kid,
                    k.state,
                    time(k.created_at),
                    time(k.activates_at),
                    time(k.retires_at),
                    time(k.deleted_after)
                );
            }
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend keys rotate`.
pub(super) async fn keys_rotate(socket: &Path, bound: bool) -> u8 {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel_or_exit!(socket));
    match client.rotate_key(pb::RotateKeyRequest { bound }).await {
        Ok(r) => {
            let k = r.into_inner().key.unwrap_or_default();
            out!(
                "new key {} published; signs from {}",
                k.kid,
                time(k.activates_at)
            );
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend keys revoke`.
pub(super) async fn keys_revoke(socket: &Path, kid: String) -> u8 {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel_or_exit!(socket));
    match client.revoke_key(pb::RevokeKeyRequest { kid }).await {
        Ok(r) => {
            let r = r.into_inner();
            out!(
                "revoked {}; {} is now {}",
                r.revoked.unwrap_or_default().kid,
                if r.bound {
                    "bound-token signing key"
                } else {
                    "signing key"
                },
                r.active_kid
            );
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend ban add KIND VALUE [--reason R]`.
pub(super) async fn ban(socket: &Path, kind: String, value: String, reason: String) -> u8 {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel_or_exit!(socket));
    match client
        .ban(pb::BanRequest {
            kind,
            value,
            reason,
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let b = r.ban.unwrap_or_default();
            let state = if r.added {
                "now banned"
            } else {
                "already banned"
            };
            out!("{} {} {state}", b.kind, b.value);
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend ban remove KIND VALUE`.
pub(super) async fn unban(socket: &Path, kind: String, value: String) -> u8 {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel_or_exit!(socket));
    match client.unban(pb::UnbanRequest { kind, value }).await {
        Ok(r) if r.get_ref().removed => {
            out!("ban lifted");
            0
        }
        Ok(_) => {
            eprintln!("no such ban");
            1
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend ban list`.
pub(super) async fn bans(socket: &Path) -> u8 {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel_or_exit!(socket));
    match client.list_bans(pb::ListBansRequest {}).await {
        Ok(r) => {
            let list: Vec<_> = r
                .into_inner()
                .bans
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "kind": b.kind, "value": b.value,
                        "reason": b.reason, "banned_at": b.banned_at,
                    })
                })
                .collect();
            out!(
                "{}",
                serde_json::to_string_pretty(&list).unwrap_or_default()
            );
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend jwks [--all]`.
pub(super) async fn jwks(socket: &Path, all: bool) -> u8 {
    let mut client = pb::admin_service_client::AdminServiceClient::new(channel_or_exit!(socket));
    match client.get_jwks(pb::GetJwksRequest { all }).await {
        Ok(r) => {
            let issuers = r.into_inner().issuers;
            let doc =
                |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
            let out = if all {
                let list: Vec<_> = issuers
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "issuer": i.issuer,
                            "source": i.source,
                            "updated_at": i.updated_at,
                            "revoked_kids": i.revoked_kids,
                            "last_error": if i.last_error.is_empty() { serde_json::Value::Null } else { i.last_error.clone().into() },
                            "jwks": doc(&i.jwks_json),
                            "bound_kids": i.bound_kids,
                            "instances": i.instances.iter().map(|n| serde_json::json!({
                                "instance": n.instance,
                                "source": n.source,
                                "kids": n.kids,
                                "bound_kids": n.bound_kids,
                                "revoked_kids": n.revoked_kids,
                                "updated_at": n.updated_at,
                                "seq": n.seq,
                                "document_expires_at": n.document_expires_at,
                                "address": n.address,
                                "stale": n.stale,
                                "gone": n.gone,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                serde_json::Value::Array(list)
            } else {
                issuers
                    .first()
                    .map(|i| doc(&i.jwks_json))
                    .unwrap_or_default()
            };
            out!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            0
        }
        Err(s) => print_status(&s, "refused"),
    }
}

/// `tokend health`: grpc.health.v1 Check of `service` (`""`: the sidecar).
/// Prints the status by its protocol name; 0 only when SERVING.
pub(super) async fn health(socket: &Path, service: String) -> u8 {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel_or_exit!(socket));
    let what = if service.is_empty() {
        "tokend".to_owned()
    } else {
        service.clone()
    };
    match client
        .check(tonic_health::pb::HealthCheckRequest { service })
        .await
    {
        Ok(r) => {
            let status = r.into_inner().status;
            let name = ServingStatus::try_from(status)
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_else(|_| format!("status {status}"));
            if status == ServingStatus::Serving as i32 {
                out!("{what}: {name}");
                0
            } else {
                eprintln!("{what}: {name}");
                1
            }
        }
        Err(s) => {
            eprintln!("{what}: {}: {}", code_name(s.code()), s.message());
            1
        }
    }
}
