//! The one mapping from domain errors to gRPC statuses: a code, the message
//! `<reason>: <detail>`, and the reason in `tokend-reason` metadata.

use tonic::{Code, Status};

use crate::reason::Reason;

/// Metadata key carrying the reason code.
pub const REASON_KEY: &str = "tokend-reason";

/// The status for a refusal.
pub fn reject(reason: Reason, detail: impl std::fmt::Display) -> Status {
    let code = match reason {
        Reason::Malformed | Reason::UnsupportedAlg => Code::InvalidArgument,
        Reason::PermissionDenied => Code::PermissionDenied,
        Reason::Unavailable => Code::Unavailable,
        Reason::LifetimeTooLong => Code::InvalidArgument,
        _ => Code::Unauthenticated,
    };
    reject_with(code, reason, detail)
}

/// A refusal with an explicit gRPC code (for requests, not tokens, that are wrong).
pub fn reject_with(code: Code, reason: Reason, detail: impl std::fmt::Display) -> Status {
    let mut st = Status::new(code, format!("{reason}: {detail}"));
    if let Ok(v) = reason.as_str().parse() {
        st.metadata_mut().insert(REASON_KEY, v);
    }
    st
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

impl From<crate::verify::Error> for Status {
    fn from(e: crate::verify::Error) -> Self {
        reject(e.reason, e.detail)
    }
}

impl From<crate::mint::MintError> for Status {
    fn from(e: crate::mint::MintError) -> Self {
        reject(e.reason(), &e)
    }
}
