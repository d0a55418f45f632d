//! The JWT part of the SPIFFE Workload API on the local socket, so stock
//! SPIFFE clients work unchanged: FetchJWTSVID (mint, audiences verbatim),
//! FetchJWTBundles (every key this sidecar trusts, by trust domain, streamed
//! on change) and ValidateJWTSVID (tokend's full verifier). X.509-SVIDs are
//! not served. Every call must carry `workload.spiffe.io: true`.
//!
//! Note on bundles: the SPIFFE model keys JWT authorities by trust domain, so
//! a client validating offline against a bundle cannot tell which service's
//! key signed a token. ValidateJWTSVID keeps tokend's per-issuer binding.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::status::{reject, reject_with};
use super::uds::check_uid;
use crate::daemon::Core;
use crate::mint::MintRequest;
use crate::proto::spiffe as pb;
use crate::reason::Reason;

/// The most audiences one JWT-SVID may name.
pub const MAX_AUDIENCES: usize = 16;
/// The longest audience accepted, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 256;

/// The header every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The Workload API service.
#[derive(Clone, Debug)]
pub struct SpiffeApi(pub Arc<Core>);

fn admit<T>(core: &Core, req: &Request<T>) -> Result<(), Status> {
    match req
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => {}
        _ => {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
    }
    check_uid(req, core.config.allowed_uids.as_deref())
}

/// Every trusted issuer's keys, grouped by trust domain, as JWKS documents.
pub fn bundles(core: &Core) -> HashMap<String, Vec<u8>> {
    let mut by_td: BTreeMap<String, Vec<Arc<crate::jwk::PublicKey>>> = BTreeMap::new();
    for s in core.verifier.trust().snapshot() {
        let td = crate::identity::SpiffeId::parse(&s.issuer)
            .map(|id| id.trust_domain().to_owned())
            .unwrap_or_default();
        if !td.is_empty() {
            by_td.entry(td).or_default().extend(s.keys);
        }
    }
    by_td
        .into_iter()
        .map(|(td, keys)| {
            (
                td,
                crate::jwk::to_jwks_json(keys.iter().map(|k| k.as_ref())).into_bytes(),
            )
        })
        .collect()
}

fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::JwtBundlesResponse, Status>> + Send>>;
type X509Stream = Pin<Box<dyn Stream<Item = Result<pb::X509svidResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for SpiffeApi {
    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        admit(&self.0, &req)?;
        let r = req.into_inner();
        let core = &self.0;
        if r.audience.is_empty()
            || r.audience.len() > MAX_AUDIENCES
            || r.audience
                .iter()
                .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN)
        {
            return Err(reject(
                Reason::Malformed,
                format!(
                    "audience: 1 to {MAX_AUDIENCES} audiences of 1 to {MAX_AUDIENCE_LEN} bytes"
                ),
            ));
        }
        // Audiences are kept verbatim, so control characters are refused: they
        // have no place in an identifier and would let one audience pass for
        // a list of several in anything that joins them.
        if let Some((i, c)) = r.audience.iter().enumerate().find_map(|(i, a)| {
            a.chars()
                .find(|&c| c < '\u{20}' || c == '\u{7f}')
                .map(|c| (i, c))
        }) {
            return Err(reject(
                Reason::Malformed,
                format!(
                    "audience {i} contains control character U+{:04X}",
                    u32::from(c)
                ),
            ));
        }
        if !r.spiffe_id.is_empty() && r.spiffe_id != core.config.id.as_str() {
            return Err(reject(
                Reason::PermissionDenied,
                format!(
                    "this workload may only have {}, not {}",
                    core.config.id, r.spiffe_id
                ),
            ));
        }
        let request = MintRequest {
            audience: r.audience,
            ttl: None,
            claims: Default::default(),
            one_time: false,
        };
        let m = core.minter.mint(&request, core.clock.now())?;
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: core.config.id.to_string(),
                svid: m.token,
            }],
        }))
    }

    type FetchJWTBundlesStream = BundleStream;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        admit(&self.0, &req)?;
        let core = self.0.clone();
        let stop = core.shutdown.clone();
        let stream = WatchStream::new(core.verifier.trust().subscribe()).map(move |_| {
            Ok(pb::JwtBundlesResponse {
                bundles: bundles(&core),
            })
        });
        let stream = crate::shutdown::until_cancelled(Box::pin(stream), stop);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        admit(&self.0, &req)?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.svid.is_empty() {
            return Err(reject(Reason::Malformed, "audience and svid are required"));
        }
        let core = &self.0;
        let v = core
            .verifier
            .verify(r.svid.trim(), &r.audience, core.clock.now())
            .await
            // The Workload API reports an invalid token as InvalidArgument;
            // a transient condition stays Unavailable so clients retry.
            .map_err(|e| match e.reason {
                Reason::Unavailable => reject(e.reason, &e.detail),
                _ => reject_with(tonic::Code::InvalidArgument, e.reason, &e.detail),
            })?;
        // SPIFFE clients know nothing of `act` and would take the original
        // subject for the presenter: delegated tokens are refused here.
        if v.claims.contains_key("act") {
            return Err(reject_with(
                tonic::Code::InvalidArgument,
                Reason::Malformed,
                "a delegated token (act) is not a JWT-SVID; verify it with tokend.v1 Verify",
            ));
        }
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: v.subject,
            claims: Some(to_struct(v.claims)),
        }))
    }

    type FetchX509SVIDStream = X509Stream;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<X509Stream>, Status> {
        admit(&self.0, &req)?;
        Err(Status::unimplemented(
            "tokend serves JWT-SVIDs only; X.509-SVIDs are not available",
        ))
    }
}
