//! The one mapping from refusals to gRPC statuses: a code chosen by the
//! reason (or by the service's convention, for the SPIFFE Workload API),
//! the message `<reason>: <detail>`, and the reason in `tokend-reason`
//! metadata on every refusal. Clients read both back with `reason_of` and
//! `detail_of`.

use tonic::{Code, Status};

use crate::keys::KeyError;
use crate::reason::{Reason, Refusal};

/// Metadata key carrying the reason code.
pub const REASON_KEY: &str = "tokend-reason";

/// The gRPC code a reason maps to on tokend's own services.
fn code_for(reason: Reason) -> Code {
    match reason {
        Reason::Malformed | Reason::UnsupportedAlg | Reason::LifetimeTooLong => {
            Code::InvalidArgument
        }
        Reason::PermissionDenied => Code::PermissionDenied,
        Reason::Unavailable => Code::Unavailable,
        // A bound token without a (good) proof: not authenticated, as any
        // token that does not verify (RFC 9449 §7.1 answers 401).
        Reason::MissingProof | Reason::BadProof => Code::Unauthenticated,
        _ => Code::Unauthenticated,
    }
}

fn with_code(code: Code, r: &Refusal) -> Status {
    let mut st = Status::new(code, r.to_string());
    if let Ok(v) = r.reason.as_str().parse() {
        st.metadata_mut().insert(REASON_KEY, v);
    }
    st
}

/// The status for a refusal on tokend's own services.
pub(crate) fn status(r: Refusal) -> Status {
    with_code(code_for(r.reason), &r)
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
}
