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
use std::time::Duration;

use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::status::{audited, spiffe_status, status, with_nonce};
use super::uds::Callers;
use super::uds::caller_of;
use crate::audit::{Audit, Event};
use crate::engine::{Engine, MintRequest};
use crate::identity::SpiffeId;
use crate::jose::PublicKey;
use crate::proto::spiffe as pb;
use crate::reason::{Reason, Refusal};

/// The most audiences one JWT-SVID may name.
const MAX_AUDIENCES: usize = 16;
/// The longest audience accepted, in bytes.
const MAX_AUDIENCE_LEN: usize = 256;
/// The header every Workload API call must carry.
const SECURITY_HEADER: &str = "workload.spiffe.io";
/// Bundle streams send at most one update per this interval: a peer that
/// floods valid key sets cannot make every watcher spin.
const BUNDLE_UPDATE_INTERVAL: Duration = Duration::from_millis(250);

/// The Workload API service.
#[derive(Clone, Debug)]
pub(crate) struct SpiffeApi {
    engine: Arc<Engine>,
    callers: Callers,
    shutdown: CancellationToken,
    audit: Audit,
}

impl SpiffeApi {
    /// The service over `engine`, open to `callers`; its bundle streams end
    /// on `shutdown`; JWT-SVIDs minted and refused validations are audited.
    pub(crate) fn new(
        engine: Arc<Engine>,
        callers: Callers,
        shutdown: CancellationToken,
        audit: Audit,
    ) -> Self {
        Self {
            engine,
            callers,
            shutdown,
            audit,
        }
    }

    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
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
        self.callers.check(req).map_err(spiffe_status)
    }
}

/// Every trusted issuer's keys usable now (this sidecar's and its peers':
/// a key whose signed document expired is left out), grouped by trust
/// domain, as JWKS documents.
fn bundles(engine: &Engine) -> HashMap<String, Vec<u8>> {
    let own = engine.keys().current();
    let trust = engine.trust().current();
    let now = engine.now();
    let mut by_td: BTreeMap<String, Vec<PublicKey>> = BTreeMap::new();
    by_td
        .entry(engine.own().trust_domain().to_owned())
        .or_default()
        .extend(own.published().cloned());
    for (issuer, keys) in trust.issuers() {
        if let Ok(id) = SpiffeId::parse(issuer) {
            by_td
                .entry(id.trust_domain().to_owned())
                .or_default()
                .extend(keys.usable_keys(now).iter().map(|k| k.as_ref().clone()));
        }
    }
    by_td
        .into_iter()
        .map(|(td, keys)| (td, crate::jose::to_jwks_json(&keys).into_bytes()))
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
        let mut event = Event::new("fetch_jwt_svid", caller_of(&req));
        let result = self.fetch_jwtsvid_call(req, &mut event).await;
        audited(&self.audit, event, result, true)
    }

    type FetchJWTBundlesStream = BundleStream;

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        self.fetch_jwt_bundles_call(req)
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let mut event = Event::new("validate", caller_of(&req));
        let result = self.validate_jwtsvid_call(req, &mut event).await;
        audited(&self.audit, event, result, false)
    }

    type FetchX509SVIDStream = X509Stream;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<X509Stream>, Status> {
        self.admit(&req)?;
        Err(Status::unimplemented(
            "tokend serves JWT-SVIDs only; X.509-SVIDs are not available",
        ))
    }
}

// The calls, each filling in its audit event.
impl SpiffeApi {
    async fn fetch_jwtsvid_call(
        &self,
        req: Request<pb::JwtsvidRequest>,
        event: &mut Event,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let own = self.engine.own();
        event.iss = Some(own.to_string());
        event.sub = event.iss.clone();
        event.aud = Some(req.get_ref().audience.join(" ").chars().take(256).collect());
        self.admit(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty()
            || r.audience.len() > MAX_AUDIENCES
            || r.audience
                .iter()
                .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN)
        {
            return Err(status(Refusal::new(
                Reason::Malformed,
                format!(
                    "audience: 1 to {MAX_AUDIENCES} audiences of 1 to {MAX_AUDIENCE_LEN} bytes"
                ),
            )));
        }
        // Audiences are kept verbatim, so control characters are refused: they
        // have no place in an identifier and would let one audience pass for
        // a list of several in anything that joins them.
        if let Some((i, c)) = r.audience.iter().enumerate().find_map(|(i, a)| {
            a.chars()
                .find(|&c| c < '\u{20}' || c == '\u{7f}')
                .map(|c| (i, c))
        }) {
            return Err(status(Refusal::new(
                Reason::Malformed,
                format!(
                    "audience {i} contains control character U+{:04X}",
                    u32::from(c)
                ),
            )));
        }
        if !r.spiffe_id.is_empty() && r.spiffe_id != own.as_str() {
            return Err(status(Refusal::new(
                Reason::PermissionDenied,
                format!("this workload may only have {own}, not {}", r.spiffe_id),
            )));
        }
        let request = MintRequest {
            audience: r.audience,
            ttl: None,
            claims: Default::default(),
            one_time: false,
            // The Workload API has no field to ask for binding: SVIDs are
            // bearer tokens; bound tokens come from tokend.v1 Mint.
            bind: false,
        };
        let m = self.engine.mint_off_thread(request).await.map_err(status)?;
        event.jti = Some(m.jti.clone());
        event.kid = Some(m.kid.clone());
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: own.to_string(),
                svid: m.token,
            }],
        }))
    }

    fn fetch_jwt_bundles_call(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        self.admit(&req)?;
        let engine = self.engine.clone();
        let own = WatchStream::new(engine.keys().subscribe()).map(|_| ());
        // One opening bundle: the peers stream only adds changes.
        let peers = WatchStream::from_changes(engine.trust().subscribe()).map(|_| ());
        // WatchStream keeps only the latest change; the throttle bounds how
        // often a watcher is woken, however fast sets arrive.
        let stream = own
            .merge(peers)
            .throttle(BUNDLE_UPDATE_INTERVAL)
            .map(move |()| {
                Ok(pb::JwtBundlesResponse {
                    bundles: bundles(&engine),
                })
            });
        let stream = crate::shutdown::until_cancelled(Box::pin(stream), self.shutdown.clone());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid_call(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
        event: &mut Event,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let admitted = self.admit(&req);
        let r = req.into_inner();
        let result = match admitted {
            Ok(()) => self.validate_checked(&r).await,
            Err(e) => Err(e),
        };
        // Only a refusal is recorded: what the SVID claimed and the
        // audience are noted then, not on every successful validation.
        if result.is_err() {
            event.claimed(&r.svid);
            event.aud = Some(r.audience.chars().take(256).collect());
        }
        result
    }

    /// `validate_jwtsvid_call` once the caller is admitted.
    async fn validate_checked(
        &self,
        r: &pb::ValidateJwtsvidRequest,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        if r.audience.is_empty() || r.svid.is_empty() {
            return Err(spiffe_status(Refusal::new(
                Reason::Malformed,
                "audience and svid are required",
            )));
        }
        let v = self
            .engine
            .verify(&r.svid, &r.audience)
            .await
            .map_err(|r| with_nonce(spiffe_status(r), || self.engine.fresh_nonce()))?;
        // SPIFFE clients know nothing of `act` and would take the original
        // subject for the presenter: delegated tokens are refused here.
        if v.claims.contains_key("act") {
            return Err(spiffe_status(Refusal::new(
                Reason::Malformed,
                "a delegated token (act) is not a JWT-SVID; verify it with tokend.v1 Verify",
            )));
        }
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: v.subject.clone(),
            claims: Some(to_struct(v.claims.clone())),
        }))
    }
}
