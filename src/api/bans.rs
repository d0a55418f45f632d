//! The AdminService's ban calls: parse and normalise what the operator
//! typed (a serial in any common form, a bare service name for a SPIFFE
//! ID), persist through the `BanStore`, and answer. Nothing else.

use std::sync::Arc;

use tonic::Status;

use super::status::{bad_request, status};
use crate::bans::BanStore;
use crate::engine::{Ban, BanKind, normalize_serial};
use crate::identity::{SpiffeId, TrustDomain};
use crate::proto::tokend::v1 as pb;
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// The longest value a ban accepts.
const MAX_VALUE: usize = 512;

/// `kind` and `value` as the store keeps them, or why not.
pub(super) fn parse(own: &SpiffeId, kind: &str, value: &str) -> Result<(BanKind, String), Status> {
    let kind = BanKind::parse(kind).ok_or_else(|| {
        bad_request(format!(
            "ban kind {kind:?}: use serial, instance, kid or spiffe_id"
        ))
    })?;
    let value = value.trim();
    if value.is_empty() || value.len() > MAX_VALUE {
        return Err(bad_request(format!(
            "ban value must be 1 to {MAX_VALUE} characters"
        )));
    }
    let value = match kind {
        BanKind::Serial => normalize_serial(value)
            .ok_or_else(|| bad_request(format!("serial {value:?} is not hexadecimal")))?,
        BanKind::SpiffeId => {
            let td =
                TrustDomain::new(own.trust_domain()).map_err(|e| bad_request(e.to_string()))?;
            td.audience(value)
                .map_err(|e| bad_request(e.to_string()))?
                .to_string()
        }
        BanKind::Instance | BanKind::Kid => value.to_owned(),
    };
    Ok((kind, value))
}

/// The wire form of a ban.
pub(super) fn entry(b: &Ban) -> pb::BanEntry {
    pb::BanEntry {
        kind: b.kind.as_str().into(),
        value: b.value.clone(),
        reason: b.reason.clone(),
        banned_at: b.at.as_secs(),
    }
}

/// The store, or `unavailable` on a sidecar built without one.
pub(super) fn store(bans: &Option<Arc<BanStore>>) -> Result<&Arc<BanStore>, Status> {
    bans.as_ref()
        .ok_or_else(|| status(Refusal::new(Reason::Unavailable, "bans are not kept here")))
}

/// Puts a ban in force.
pub(super) async fn ban(
    store: &BanStore,
    own: &SpiffeId,
    req: pb::BanRequest,
    now: UnixTime,
) -> Result<pb::BanResponse, Status> {
    let (kind, value) = parse(own, &req.kind, &req.value)?;
    let ban = Ban {
        kind,
        value,
        reason: req.reason.chars().take(MAX_VALUE).collect(),
        at: now,
    };
    let added = store
        .add(ban.clone())
        .await
        .map_err(|e| status(Refusal::new(Reason::Unavailable, e.to_string())))?;
    tracing::warn!(
        kind = kind.as_str(),
        value = %ban.value,
        reason = %ban.reason,
        added,
        "ban in force: material it names is refused"
    );
    Ok(pb::BanResponse {
        ban: Some(entry(&ban)),
        added,
    })
}

/// Lifts a ban.
pub(super) async fn unban(
    store: &BanStore,
    own: &SpiffeId,
    req: pb::UnbanRequest,
) -> Result<pb::UnbanResponse, Status> {
    let (kind, value) = parse(own, &req.kind, &req.value)?;
    let removed = store
        .remove(kind, &value)
        .await
        .map_err(|e| status(Refusal::new(Reason::Unavailable, e.to_string())))?;
    tracing::warn!(kind = kind.as_str(), value = %value, removed, "ban lifted");
    Ok(pb::UnbanResponse { removed })
}
