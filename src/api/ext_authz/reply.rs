//! A Check decision and the `CheckResponse` Envoy acts on: OK with header
//! changes for the upstream request, or a denial with the HTTP status and
//! headers the client gets (RFC 6750 §3: `WWW-Authenticate: Bearer` with
//! `error` and the reason code as `error_description`, and `tokend-reason`;
//! RFC 9449 §7.1 and §9: `WWW-Authenticate: DPoP` for a proof refusal, with
//! a `DPoP-Nonce` where nonces are required). A denial never says more than
//! the reason code; the detail goes to the log.

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, HeaderAppendAction, HttpStatusCode, OkHttpResponse,
};
use envoy_types::ext_authz::v3::{
    CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use tonic::{Code, Status};

use super::super::status::{DPOP_NONCE_KEY, REASON_KEY};
use crate::reason::{Reason, Refusal};

/// What tokend decided for one request.
#[derive(Debug)]
pub(super) enum Decision {
    /// Let it through with these header changes: `set` overwrites (a
    /// client's value never survives), `remove` strips; `respond` goes on
    /// the response to the client (the next `dpop-nonce`).
    Allow {
        /// Headers set on the upstream request.
        set: Vec<(String, String)>,
        /// Headers removed from it.
        remove: Vec<String>,
        /// Headers set on the response to the client.
        respond: Vec<(String, String)>,
    },
    /// No bearer token: 401, `WWW-Authenticate: Bearer`.
    NoToken,
    /// An `authorization` header that is not one Bearer token: 400.
    InvalidRequest(Refusal),
    /// A token that does not verify: 401 `invalid_token`.
    InvalidToken(Refusal),
    /// A proof refused where the verifier requires server nonces: 401 with
    /// `WWW-Authenticate: DPoP error="use_dpop_nonce"` (for a missing or
    /// stale nonce) or `error="invalid_token"`, and the next nonce in
    /// `DPoP-Nonce` (RFC 9449 §9).
    ProofRefused {
        /// Why.
        refusal: Refusal,
        /// The nonce for the client's next proof.
        nonce: String,
    },
    /// A valid token an authorization rule refuses: 403.
    Forbidden(Refusal),
    /// tokend cannot decide now (a store, a key): 503.
    Unavailable(Refusal),
    /// The route's `context_extensions` are wrong: 500.
    Misconfigured(String),
}

impl Decision {
    /// The metric and log label.
    pub(super) fn outcome(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "ok",
            Decision::NoToken => "no_token",
            Decision::InvalidRequest(_) => "invalid_request",
            Decision::InvalidToken(_) => "invalid_token",
            Decision::ProofRefused { refusal, .. } if refusal.reason == Reason::UseDpopNonce => {
                "use_dpop_nonce"
            }
            Decision::ProofRefused { .. } => "invalid_token",
            Decision::Forbidden(_) => "forbidden",
            Decision::Unavailable(_) => "unavailable",
            Decision::Misconfigured(_) => "misconfigured",
        }
    }

    /// A refusal of a token, by its reason: `unavailable` is tokend's
    /// trouble (503), anything else means the token does not verify (401).
    pub(super) fn refused(r: Refusal) -> Self {
        match r.reason {
            Reason::Unavailable => Decision::Unavailable(r),
            _ => Decision::InvalidToken(r),
        }
    }

    /// The response Envoy acts on.
    pub(super) fn into_response(self) -> CheckResponse {
        let (http, bearer_error, reason, code) = match self {
            Decision::Allow {
                set,
                remove,
                respond,
            } => return allow(set, remove, respond),
            Decision::ProofRefused { refusal, nonce } => return nonce_denial(&refusal, &nonce),
            Decision::NoToken => (
                HttpStatusCode::Unauthorized,
                None,
                None,
                Code::Unauthenticated,
            ),
            Decision::InvalidRequest(r) => (
                HttpStatusCode::BadRequest,
                Some("invalid_request"),
                Some(r.reason),
                Code::InvalidArgument,
            ),
            Decision::InvalidToken(r) => (
                HttpStatusCode::Unauthorized,
                Some("invalid_token"),
                Some(r.reason),
                Code::Unauthenticated,
            ),
            Decision::Forbidden(r) => (
                HttpStatusCode::Forbidden,
                Some("insufficient_scope"),
                Some(r.reason),
                Code::PermissionDenied,
            ),
            Decision::Unavailable(r) => (
                HttpStatusCode::ServiceUnavailable,
                None,
                Some(r.reason),
                Code::Unavailable,
            ),
            Decision::Misconfigured(_) => (
                HttpStatusCode::InternalServerError,
                None,
                Some(Reason::Unavailable),
                Code::Internal,
            ),
        };
        let mut denied = DeniedHttpResponseBuilder::new();
        denied.set_http_status(http);
        let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
        match (bearer_error, reason) {
            (Some(error), Some(reason)) => {
                // A proof problem is answered in the DPoP scheme (RFC 9449 §7.1).
                let challenge = match reason {
                    Reason::MissingProof | Reason::BadProof => "DPoP algs=\"ES256\", error",
                    _ => "Bearer error",
                };
                denied.add_header(
                    "www-authenticate",
                    format!("{challenge}=\"{error}\", error_description=\"{reason}\""),
                    overwrite,
                    false,
                );
            }
            _ if http == HttpStatusCode::Unauthorized => {
                denied.add_header("www-authenticate", "Bearer", overwrite, false);
            }
            _ => {}
        }
        let message = match reason {
            Some(r) => {
                denied.add_header(REASON_KEY, r.as_str(), overwrite, false);
                denied.set_body(format!("{r}\n"));
                r.as_str()
            }
            None => "no bearer token",
        };
        let mut response = CheckResponse::with_status(Status::new(code, message));
        response.set_http_response(denied);
        response
    }
}

/// A proof refusal with the next nonce (RFC 9449 §9, Figure 24): 401,
/// `WWW-Authenticate: DPoP` with `error="use_dpop_nonce"` when the nonce is
/// what failed (else `invalid_token` and the reason code), `DPoP-Nonce`,
/// and `tokend-reason`.
fn nonce_denial(r: &Refusal, nonce: &str) -> CheckResponse {
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    let challenge = match r.reason {
        Reason::UseDpopNonce => "DPoP algs=\"ES256\", error=\"use_dpop_nonce\", \
             error_description=\"the proof needs the nonce of the DPoP-Nonce header\""
            .to_owned(),
        other => {
            format!("DPoP algs=\"ES256\", error=\"invalid_token\", error_description=\"{other}\"")
        }
    };
    let mut denied = DeniedHttpResponseBuilder::new();
    denied.set_http_status(HttpStatusCode::Unauthorized);
    denied.add_header("www-authenticate", challenge, overwrite, false);
    denied.add_header(DPOP_NONCE_KEY, nonce, overwrite, false);
    denied.add_header(REASON_KEY, r.reason.as_str(), overwrite, false);
    denied.set_body(format!("{}\n", r.reason));
    let mut response =
        CheckResponse::with_status(Status::new(Code::Unauthenticated, r.reason.as_str()));
    response.set_http_response(denied);
    response
}

fn allow(
    set: Vec<(String, String)>,
    remove: Vec<String>,
    respond: Vec<(String, String)>,
) -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    for (name, value) in respond {
        ok.add_response_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        );
    }
    for (name, value) in set {
        ok.add_header(
            name,
            value,
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        );
    }
    for name in remove {
        ok.remove_header(name);
    }
    let mut response = CheckResponse::with_status(Status::ok("ok"));
    response.set_http_response(OkHttpResponse::from(ok));
    response
}

#[cfg(test)]
mod tests {
    use envoy_types::ext_authz::v3::pb::HttpResponse;

    use super::*;

    fn denied(d: Decision) -> (i32, Vec<(String, String)>) {
        let r = d.into_response();
        match r.http_response {
            Some(HttpResponse::DeniedResponse(d)) => (
                d.status.map(|s| s.code).unwrap_or_default(),
                d.headers
                    .into_iter()
                    .filter_map(|h| h.header)
                    .map(|h| (h.key, h.value))
                    .collect(),
            ),
            other => panic!("denial expected: {other:?}"),
        }
    }

    /// Each denial has its HTTP status and RFC 6750 header; a 5xx names no
    /// Bearer error, and no denial carries the detail.
    #[test]
    fn denials() {
        let r = |reason| Refusal::new(reason, "secret detail");
        let www = |h: &[(String, String)]| {
            h.iter()
                .find(|(k, _)| k == "www-authenticate")
                .map(|(_, v)| v.clone())
        };
        let (code, h) = denied(Decision::refused(r(Reason::WrongAudience)));
        assert_eq!(code, 401);
        assert_eq!(
            www(&h).as_deref(),
            Some("Bearer error=\"invalid_token\", error_description=\"wrong_audience\"")
        );
        assert!(h.contains(&(REASON_KEY.into(), "wrong_audience".into())));
        let (code, h) = denied(Decision::NoToken);
        assert_eq!((code, www(&h).as_deref()), (401, Some("Bearer")));
        let (code, h) = denied(Decision::Forbidden(r(Reason::PermissionDenied)));
        assert_eq!(code, 403);
        assert!(www(&h).is_some_and(|w| w.contains("insufficient_scope")));
        let (code, h) = denied(Decision::refused(r(Reason::Unavailable)));
        assert_eq!((code, www(&h)), (503, None));
        let (code, _) = denied(Decision::Misconfigured("x".into()));
        assert_eq!(code, 500);
        let (code, _) = denied(Decision::InvalidRequest(r(Reason::Malformed)));
        assert_eq!(code, 400);
        // RFC 9449 §9: a missing or stale nonce is `use_dpop_nonce` with the
        // next one in DPoP-Nonce; another proof refusal keeps invalid_token
        // and carries the nonce too.
        let nonce = |h: &[(String, String)]| {
            h.iter()
                .find(|(k, _)| k == "dpop-nonce")
                .map(|(_, v)| v.clone())
        };
        let (code, h) = denied(Decision::ProofRefused {
            refusal: r(Reason::UseDpopNonce),
            nonce: "n-1".into(),
        });
        assert_eq!(code, 401);
        assert!(
            www(&h).is_some_and(|w| w.starts_with("DPoP ")
                && w.contains("error=\"use_dpop_nonce\"")
                && w.contains("error_description=")),
            "{h:?}"
        );
        assert_eq!(nonce(&h).as_deref(), Some("n-1"));
        assert!(h.contains(&(REASON_KEY.into(), "use_dpop_nonce".into())));
        let (code, h) = denied(Decision::ProofRefused {
            refusal: r(Reason::BadProof),
            nonce: "n-2".into(),
        });
        assert_eq!(code, 401);
        assert_eq!(
            www(&h).as_deref(),
            Some("DPoP algs=\"ES256\", error=\"invalid_token\", error_description=\"bad_proof\"")
        );
        assert_eq!(nonce(&h).as_deref(), Some("n-2"));
        for d in [
            Decision::ProofRefused {
                refusal: r(Reason::UseDpopNonce),
                nonce: "n".into(),
            },
            Decision::refused(r(Reason::BadSignature)),
            Decision::Forbidden(r(Reason::PermissionDenied)),
        ] {
            let resp = d.into_response();
            assert!(!format!("{resp:?}").contains("secret detail"));
        }
    }
}
