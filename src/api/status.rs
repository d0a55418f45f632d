//! The one mapping from refusals to gRPC statuses: a code chosen by the
//! reason (or by the service's convention, for the SPIFFE Workload API),
//! the message `<reason>: <detail>`, and the reason in `tokend-reason`
//! metadata on every refusal, and a `google.rpc.ErrorInfo` in the status
//! details (`grpc-status-details-bin`), where stock gRPC clients look:
//! reason `BAD_SIGNATURE` (the code in the UPPER_SNAKE_CASE ErrorInfo asks
//! for), domain [`ERROR_DOMAIN`], metadata `code` (the lower-case code) and
//! `detail` (the same text as the message's). Clients read them back with
//! `reason_of` and `detail_of`, or any language's rich-error reader.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::keys::KeyError;
use crate::reason::{Reason, Refusal};

/// Metadata key carrying the reason code.
pub const REASON_KEY: &str = "tokend-reason";

/// Metadata key carrying a fresh server nonce (RFC 9449 §9's `DPoP-Nonce`)
/// on a proof refusal, where the verifier requires nonces.
pub const DPOP_NONCE_KEY: &str = "dpop-nonce";

/// The `google.rpc.ErrorInfo` domain of every tokend refusal: stable, so
/// clients can match `(domain, reason)` across versions.
pub const ERROR_DOMAIN: &str = "tokend.dev";

/// The gRPC code a reason maps to on tokend's own services.
fn code_for(reason: Reason) -> Code {
    match reason {
        Reason::Malformed | Reason::UnsupportedAlg | Reason::LifetimeTooLong => {
            Code::InvalidArgument
        }
        Reason::PermissionDenied => Code::PermissionDenied,
        Reason::Unavailable => Code::Unavailable,
        // A bound token without a (good) proof, or without this replica's
        // nonce: not authenticated, as any token that does not verify
        // (RFC 9449 §7.1 and §9 answer 401).
        Reason::MissingProof | Reason::BadProof | Reason::UseDpopNonce => Code::Unauthenticated,
        _ => Code::Unauthenticated,
    }
}

/// The ErrorInfo `reason` of a code: `bad_signature` → `BAD_SIGNATURE`.
fn error_info_reason(reason: Reason) -> String {
    reason.as_str().to_ascii_uppercase()
}

fn with_code(code: Code, r: &Refusal) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Ok(v) = r.reason.as_str().parse() {
        metadata.insert(REASON_KEY, v);
    }
    let info = HashMap::from([
        ("code".to_owned(), r.reason.as_str().to_owned()),
        ("detail".to_owned(), r.detail.clone()),
    ]);
    let details = ErrorDetails::with_error_info(error_info_reason(r.reason), ERROR_DOMAIN, info);
    Status::with_error_details_and_metadata(code, r.to_string(), details, metadata)
}

/// The status for a refusal on tokend's own services.
pub(crate) fn status(r: Refusal) -> Status {
    with_code(code_for(r.reason), &r)
}

/// Whether a refusal is about the proof, so the client needs a (fresh)
/// nonce to prove again: `missing_proof`, `bad_proof`, `use_dpop_nonce`.
pub(crate) fn is_proof_refusal(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::MissingProof | Reason::BadProof | Reason::UseDpopNonce
    )
}

/// `st` with `nonce` in its `dpop-nonce` metadata (RFC 9449 §9), when the
/// status is a proof refusal and the verifier issued a nonce.
pub(crate) fn with_nonce(mut st: Status, nonce: impl FnOnce() -> Option<String>) -> Status {
    if !reason_of(&st).is_some_and(is_proof_refusal) {
        return st;
    }
    if let Some(v) = nonce().and_then(|n| n.parse().ok()) {
        st.metadata_mut().insert(DPOP_NONCE_KEY, v);
    }
    st
}

/// A malformed request field (not a token): `malformed`, InvalidArgument.
pub(crate) fn bad_request(detail: impl Into<String>) -> Status {
    status(Refusal::new(Reason::Malformed, detail))
}

/// The status for a refusal on the SPIFFE Workload API, which reports an
/// invalid token as InvalidArgument; a transient condition stays
/// Unavailable so clients retry, and a denied caller PermissionDenied.
pub(crate) fn spiffe_status(r: Refusal) -> Status {
    let code = match r.reason {
        Reason::Unavailable => Code::Unavailable,
        Reason::PermissionDenied => Code::PermissionDenied,
        _ => Code::InvalidArgument,
    };
    with_code(code, &r)
}

/// The status for a failed admin key operation: an unknown or already
/// revoked kid is the caller's mistake (NotFound), anything else is the
/// store's trouble (Unavailable).
pub(crate) fn key_status(e: KeyError) -> Status {
    match e {
        KeyError::NotFound(_) | KeyError::AlreadyRevoked(_) => with_code(
            Code::NotFound,
            &Refusal::new(Reason::Malformed, e.to_string()),
        ),
        other => status(Refusal::new(Reason::Unavailable, other.to_string())),
    }
}

/// Records `event` with `result`'s outcome (a refusal's code and detail, as
/// the caller sees them) and hands `result` back. Successes are recorded
/// only when `record_ok` (mints, exchanges, admin actions; not every
/// verification).
pub(crate) fn audited<T>(
    audit: &crate::audit::Audit,
    mut event: crate::audit::Event,
    result: Result<T, Status>,
    record_ok: bool,
) -> Result<T, Status> {
    match &result {
        Ok(_) if !record_ok => return result,
        Ok(_) => {}
        Err(st) => {
            let code = reason_of(st).map_or_else(
                || format!("{:?}", st.code()).to_ascii_lowercase(),
                |r| r.as_str().to_owned(),
            );
            event.refused(&code, detail_of(st));
        }
    }
    audit.record(event);
    result
}

/// The reason a status carries, if it came from tokend.
pub fn reason_of(status: &Status) -> Option<Reason> {
    status
        .metadata()
        .get(REASON_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The detail part of a tokend status message (after `<reason>: `).
pub fn detail_of(status: &Status) -> &str {
    let msg = status.message();
    match reason_of(status) {
        Some(r) => msg
            .strip_prefix(r.as_str())
            .and_then(|m| m.strip_prefix(": "))
            .unwrap_or(msg),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason round-trips through a status: metadata, message and the
    /// code each service convention gives it.
    #[test]
    fn every_reason_round_trips() {
        for reason in Reason::ALL {
            let st = status(Refusal::new(reason, "why"));
            assert_eq!(reason_of(&st), Some(reason));
            assert_eq!(detail_of(&st), "why");
            assert_eq!(st.code(), code_for(reason));
            let sp = spiffe_status(Refusal::new(reason, "why"));
            assert_eq!(reason_of(&sp), Some(reason));
        }
        assert_eq!(
            status(Refusal::new(Reason::Expired, "x")).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            spiffe_status(Refusal::new(Reason::Expired, "x")).code(),
            Code::InvalidArgument
        );
        let nf = key_status(KeyError::NotFound("k".into()));
        assert_eq!(
            (nf.code(), reason_of(&nf)),
            (Code::NotFound, Some(Reason::Malformed))
        );
        assert_eq!(reason_of(&Status::internal("x")), None);
    }

    /// A fresh nonce goes into `dpop-nonce` on proof refusals only, and only
    /// when the verifier issued one.
    #[test]
    fn nonce_only_on_proof_refusals() {
        let nonce_of = |st: &Status| {
            st.metadata()
                .get(DPOP_NONCE_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        for reason in Reason::ALL {
            let st = with_nonce(status(Refusal::new(reason, "why")), || Some("n-1".into()));
            let want = is_proof_refusal(reason).then(|| "n-1".to_owned());
            assert_eq!(nonce_of(&st), want, "{reason}");
            assert_eq!(reason_of(&st), Some(reason));
        }
        let off = with_nonce(status(Refusal::new(Reason::UseDpopNonce, "x")), || None);
        assert_eq!(nonce_of(&off), None);
        assert_eq!(
            status(Refusal::new(Reason::UseDpopNonce, "x")).code(),
            Code::Unauthenticated
        );
    }

    /// Every refusal carries an ErrorInfo: the code upper-cased (as
    /// ErrorInfo's `[A-Z0-9_]+` asks), tokend's domain, the lower-case code
    /// and the detail; the metadata and message are unchanged.
    #[test]
    fn every_reason_carries_error_info() {
        for reason in Reason::ALL {
            for st in [
                status(Refusal::new(reason, "why")),
                spiffe_status(Refusal::new(reason, "why")),
            ] {
                let info = st.get_details_error_info().expect("ErrorInfo");
                assert!(
                    info.reason
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                );
                assert_eq!(info.reason, reason.as_str().to_ascii_uppercase());
                assert_eq!(info.domain, ERROR_DOMAIN);
                assert_eq!(
                    info.metadata.get("code").map(String::as_str),
                    Some(reason.as_str())
                );
                assert_eq!(info.metadata.get("detail").map(String::as_str), Some("why"));
                assert_eq!(reason_of(&st), Some(reason));
                assert_eq!(st.message(), format!("{reason}: why"));
            }
        }
        assert_eq!(error_info_reason(Reason::BadSignature), "BAD_SIGNATURE");
    }
}
