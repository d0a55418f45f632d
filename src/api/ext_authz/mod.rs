//! Envoy external authorization (`envoy.service.auth.v3.Authorization`) on
//! the local socket, so a service behind Envoy or Istio gets tokend with no
//! code change. Per route (`context_extensions`, over `[ext_authz]`):
//!
//! - inbound (default): verify the request's bearer token for this sidecar
//!   (or the route's `audience`), authorize its issuer and claims, and pass
//!   verified claims upstream as headers, each stripped from the client's
//!   request first; never the token itself.
//! - outbound: mint a token for the route's `audience` (set by the
//!   operator, never read from the request) and put it on the request as
//!   `authorization: Bearer …`.
//!
//! Every decision is a `CheckResponse`; only a caller refused by the uid
//! allow-list gets a gRPC error (which Envoy turns into a denial too).

mod log_limit;
mod reply;
mod route;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use tonic::{Request, Response, Status};

use self::log_limit::{LogLimit, logged_path};
use self::reply::Decision;
use self::route::{Credentials, Route, credentials, route};
use super::status::{DPOP_NONCE_KEY, is_proof_refusal, status};
use super::token::refresh_budget;
use super::uds::Callers;
use crate::config::ExtAuthzConfig;
use crate::engine::{AccessRules, ClaimHeader, Engine, MintRequest, Presented, ProofTarget};
use crate::identity::{SpiffeId, TrustDomain};
use crate::reason::{Reason, Refusal};

/// The request header in which an application relays, on an outbound bound
/// route, the `DPoP-Nonce` its upstream answered (RFC 9449 §9): the proof
/// ext_authz makes carries it. Removed before the request leaves.
pub(crate) const OUTBOUND_NONCE_HEADER: &str = "x-tokend-dpop-nonce";

/// The ext_authz service.
#[derive(Clone, Debug)]
pub(crate) struct ExtAuthzApi {
    engine: Arc<Engine>,
    td: TrustDomain,
    callers: Callers,
    config: Arc<ExtAuthzConfig>,
    /// The default claim headers the config does not set: removed from
    /// every allowed request all the same, so an application that trusted
    /// them before they were turned off is not fed a client's value.
    strip: Arc<[String]>,
    /// Caps the refusal log lines a flood of bad requests can write.
    log_limit: Arc<LogLimit>,
}

impl ExtAuthzApi {
    /// The service over `engine`, names read in `td`, open to `callers`,
    /// with `config`'s defaults.
    pub(crate) fn new(
        engine: Arc<Engine>,
        td: TrustDomain,
        callers: Callers,
        config: ExtAuthzConfig,
    ) -> Self {
        let strip = ClaimHeader::defaults()
            .into_iter()
            .map(|d| d.header)
            .filter(|name| config.headers.iter().all(|h| &h.header != name))
            .collect();
        Self {
            engine,
            td,
            callers,
            config: Arc::new(config),
            strip,
            log_limit: Arc::new(LogLimit::default()),
        }
    }

    async fn decide(
        &self,
        route: Route<'_>,
        http: &HttpRequest,
        wait: Option<Duration>,
    ) -> Decision {
        match route {
            Route::Inbound {
                audience,
                rules,
                authority,
            } => {
                let at = Addressed {
                    authority: authority.as_deref(),
                    http,
                };
                self.inbound(audience.as_ref(), &rules, at, wait).await
            }
            Route::Outbound { audience, bind } => self.outbound(&audience, bind, http).await,
        }
    }

    async fn inbound(
        &self,
        audience: Option<&SpiffeId>,
        rules: &AccessRules,
        at: Addressed<'_>,
        wait: Option<Duration>,
    ) -> Decision {
        let http = at.http;
        let values = match header_values(http, "authorization") {
            Ok(v) => v,
            Err(why) => return Decision::InvalidRequest(Refusal::new(Reason::Malformed, why)),
        };
        let (token, bound) = match credentials(&values) {
            Credentials::Missing => return Decision::NoToken,
            Credentials::Malformed(why) => {
                return Decision::InvalidRequest(Refusal::new(Reason::Malformed, why));
            }
            Credentials::Bearer(t) => (t, false),
            Credentials::DPoP(t) => (t, true),
        };
        // RFC 9449 §4.3: exactly one DPoP header, with the DPoP scheme.
        let proofs = match header_values(http, "dpop") {
            Ok(v) => v,
            Err(why) => return Decision::InvalidRequest(Refusal::new(Reason::Malformed, why)),
        };
        let proof = match (bound, proofs.as_slice()) {
            (false, _) => None,
            (true, []) => {
                let r = Refusal::new(
                    Reason::MissingProof,
                    "authorization DPoP without a DPoP header",
                );
                // Where nonces are required, the client's next proof needs
                // one: hand it out now rather than after another refusal.
                return match self.engine.fresh_nonce() {
                    Some(nonce) => Decision::ProofRefused { refusal: r, nonce },
                    None => Decision::refused(r),
                };
            }
            (true, [one]) => Some(*one),
            (true, _) => {
                return Decision::InvalidRequest(Refusal::new(
                    Reason::BadProof,
                    "more than one DPoP header",
                ));
            }
        };
        let uri = match (proof, at.uri()) {
            (None, _) => String::new(),
            (Some(_), Ok(uri)) => uri,
            (Some(_), Err(why)) => return Decision::Misconfigured(why),
        };
        let presented = proof.map(|proof| Presented {
            proof,
            target: ProofTarget {
                method: &http.method,
                uri: &uri,
            },
            exchange: false,
        });
        let audience = audience.unwrap_or(self.engine.own());
        let verified = match self
            .engine
            .verify_proven(token, audience.as_str(), wait, presented.as_ref())
            .await
        {
            Ok(v) => v,
            // A proof refusal where nonces are required carries the next
            // nonce (RFC 9449 §9: 401 with a `DPoP-Nonce` header).
            Err(r) if is_proof_refusal(r.reason) => match self.engine.fresh_nonce() {
                Some(nonce) => return Decision::ProofRefused { refusal: r, nonce },
                None => return Decision::refused(r),
            },
            Err(r) => return Decision::refused(r),
        };
        if let Err(r) = rules.check(&verified) {
            return Decision::Forbidden(r.context(format!("sub {}", verified.subject)));
        }
        let (mut set, mut remove) = (Vec::new(), self.strip.to_vec());
        for h in &self.config.headers {
            match h.value(&verified) {
                Some(v) => set.push((h.header.clone(), v)),
                // Overwriting replaces a client's value; an absent claim's
                // header is removed instead (Envoy applies removals after
                // additions, so a header is never in both lists).
                None => remove.push(h.header.clone()),
            }
        }
        // RFC 9449 §8.2: the next nonce rides on the success, so the
        // client's next proof needs no refusal first.
        let respond = match presented {
            Some(_) => self
                .engine
                .fresh_nonce()
                .map(|n| (DPOP_NONCE_KEY.to_owned(), n))
                .into_iter()
                .collect(),
            None => Vec::new(),
        };
        Decision::Allow {
            set,
            remove,
            respond,
        }
    }

    async fn outbound(
        &self,
        audience: &SpiffeId,
        bind: Option<String>,
        http: &HttpRequest,
    ) -> Decision {
        let request = MintRequest {
            audience: vec![audience.to_string()],
            ttl: None,
            claims: serde_json::Map::new(),
            one_time: false,
            bind: bind.is_some(),
        };
        // The application relays the upstream's DPoP-Nonce in this header
        // (ext_authz never sees the upstream's answer); it never leaves.
        let nonce = match header_values(http, OUTBOUND_NONCE_HEADER) {
            Ok(v) => v,
            Err(why) => return Decision::InvalidRequest(Refusal::new(Reason::Malformed, why)),
        };
        let nonce = match nonce.as_slice() {
            [] => None,
            [one] => Some(*one),
            _ => {
                return Decision::InvalidRequest(Refusal::new(
                    Reason::Malformed,
                    format!("more than one {OUTBOUND_NONCE_HEADER} header"),
                ));
            }
        };
        let remove = vec![OUTBOUND_NONCE_HEADER.to_owned()];
        let m = match self.engine.mint_off_thread(request).await {
            Ok(m) => m,
            Err(r) => return Decision::Unavailable(r),
        };
        let Some(authority) = bind else {
            return Decision::Allow {
                set: vec![("authorization".into(), format!("Bearer {}", m.token))],
                remove,
                respond: Vec::new(),
            };
        };
        let at = Addressed {
            authority: Some(&authority),
            http,
        };
        let uri = match at.uri() {
            Ok(u) => u,
            Err(why) => return Decision::Misconfigured(why),
        };
        match self
            .engine
            .prove_with_nonce(&m.token, &http.method, &uri, nonce)
        {
            Ok(proof) => Decision::Allow {
                set: vec![
                    ("authorization".into(), format!("DPoP {}", m.token)),
                    ("dpop".into(), proof),
                ],
                remove,
                respond: Vec::new(),
            },
            Err(r) if r.reason == Reason::Malformed => {
                Decision::InvalidRequest(r.context(OUTBOUND_NONCE_HEADER))
            }
            Err(r) => Decision::Unavailable(r),
        }
    }
}

/// A request as this service is addressed: the route's (or config's)
/// authority and Envoy's view of the request. Its URI for a DPoP proof is
/// the authority and the path without query or fragment, never the Host.
#[derive(Clone, Copy)]
struct Addressed<'a> {
    authority: Option<&'a str>,
    http: &'a HttpRequest,
}

impl Addressed<'_> {
    fn uri(&self) -> Result<String, String> {
        let Some(authority) = self.authority else {
            return Err(
                "a DPoP request needs the service's authority: [ext_authz] authority or the \
                 route's context_extensions \"authority\" (never the Host header)"
                    .into(),
            );
        };
        let path = self.http.path.split(['?', '#']).next().unwrap_or_default();
        if !path.starts_with('/') {
            return Err(format!("request path {path:?} does not start with /"));
        }
        Ok(format!("{authority}{path}"))
    }
}

/// The request's values of header `name`, one per header line: from
/// Envoy's raw header list when it sends one (`encode_raw_headers`), else
/// its map.
fn header_values<'a>(http: &'a HttpRequest, name: &str) -> Result<Vec<&'a str>, &'static str> {
    if let Some(map) = http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        return map
            .headers
            .iter()
            .filter(|h| h.key.eq_ignore_ascii_case(name))
            .map(|h| {
                if h.raw_value.is_empty() {
                    Ok(h.value.as_str())
                } else {
                    std::str::from_utf8(&h.raw_value)
                        .map_err(|_| "an authorization or DPoP header is not UTF-8")
                }
            })
            .collect();
    }
    Ok(http
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect())
}

/// Counts the decision and logs a refusal (never the token; the path
/// without its query and at most 256 characters of it), at most
/// `log_limit::BURST` refusal lines a second (see `log_limit`).
fn record(limit: &LogLimit, mode: &'static str, decision: &Decision, http: &HttpRequest) {
    let outcome = decision.outcome();
    metrics::counter!("tokend_ext_authz_total", "mode" => mode, "outcome" => outcome).increment(1);
    let path = logged_path(&http.path);
    let method = http.method.as_str();
    if let Decision::Allow { .. } = decision {
        tracing::debug!(mode, outcome, method = ?method, path = ?path, "ext_authz allowed");
        return;
    }
    let Some(suppressed) = limit.admit(std::time::Instant::now()) else {
        return;
    };
    match decision {
        Decision::Allow { .. } => {}
        Decision::NoToken => {
            tracing::info!(mode, outcome, method = ?method, path = ?path, suppressed, "ext_authz refused: no bearer token");
        }
        Decision::InvalidRequest(r)
        | Decision::InvalidToken(r)
        | Decision::ProofRefused { refusal: r, .. }
        | Decision::Forbidden(r)
        | Decision::Unavailable(r) => tracing::info!(
            mode,
            outcome,
            reason = %r.reason,
            detail = ?r.detail,
            method = ?method,
            path = ?path,
            suppressed,
            "ext_authz refused"
        ),
        Decision::Misconfigured(why) => tracing::error!(
            outcome,
            error = %why,
            method = ?method,
            path = ?path,
            suppressed,
            "ext_authz route misconfigured in Envoy's context_extensions; request denied"
        ),
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzApi {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        self.callers.check(&req).map_err(status)?;
        let wait = refresh_budget(&req);
        let attributes = req.into_inner().attributes.unwrap_or_default();
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let (mode, decision) = match route(&attributes.context_extensions, &self.config, &self.td) {
            Err(why) => ("invalid", Decision::Misconfigured(why)),
            Ok(route) => (route.mode(), self.decide(route, &http, wait).await),
        };
        record(&self.log_limit, mode, &decision, &http);
        Ok(Response::new(decision.into_response()))
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

    use super::*;

    /// The raw header list (Envoy's `encode_raw_headers`) is read when sent,
    /// one entry per header line, so two `authorization` lines are two
    /// values; otherwise the map is.
    #[test]
    fn authorization_from_raw_headers_or_map() {
        let raw = |entries: &[(&str, &[u8])]| HttpRequest {
            header_map: Some(HeaderMap {
                headers: entries
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).to_owned(),
                        value: String::new(),
                        raw_value: v.to_vec(),
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        let one = raw(&[("Authorization", b"Bearer a.b.c"), ("x-other", b"1")]);
        assert_eq!(
            header_values(&one, "authorization"),
            Ok(vec!["Bearer a.b.c"])
        );
        let two = raw(&[
            ("authorization", b"Bearer a.b.c"),
            ("authorization", b"Bearer d"),
        ]);
        let values = header_values(&two, "authorization").expect("utf-8");
        assert!(matches!(credentials(&values), Credentials::Malformed(_)));
        assert!(header_values(&raw(&[("authorization", b"\xff")]), "authorization").is_err());
        let mut map = HttpRequest::default();
        map.headers
            .insert("authorization".into(), "Bearer a.b.c".into());
        assert_eq!(
            header_values(&map, "authorization"),
            Ok(vec!["Bearer a.b.c"])
        );
    }
}
