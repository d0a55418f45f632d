//! A plain key-set message (`PeerKeySet`, from a peer of a release without
//! signed documents) checked into trust-update parts: the size, key-count
//! and key-policy checks every such delivery passes. Pure.

use super::PeerError;
use crate::engine::{MAX_KEYS_PER_ISSUER, TrustUpdate};
use crate::proto::tokend::v1 as pb;
use crate::time::UnixTime;

/// The trust update a peer's key-set message asks for, filed under `issuer`
/// (the identity its certificate proved): the size, key-count and key-policy
/// checks every delivery passes before it reaches the writer. Pure.
pub(crate) fn key_set_update(
    issuer: &str,
    msg: pb::PeerKeySet,
    at: UnixTime,
) -> Result<TrustUpdate, PeerError> {
    let SetParts {
        keys,
        revoked,
        expires,
        ..
    } = key_set_parts(msg)?;
    Ok(TrustUpdate::Replace {
        issuer: issuer.to_owned(),
        keys,
        revoked,
        expires,
        at,
    })
}

/// A key-set message's keys of both classes, revoked kids and expiry
/// hints, checked.
pub(super) struct SetParts {
    pub(super) keys: Vec<crate::jose::PublicKey>,
    /// The bound-token keys (`bound_jwks_json`; none from an older release).
    pub(super) bound: Vec<crate::jose::PublicKey>,
    pub(super) revoked: Vec<String>,
    pub(super) expires: std::collections::HashMap<String, UnixTime>,
}

pub(super) fn key_set_parts(msg: pb::PeerKeySet) -> Result<SetParts, PeerError> {
    for jwks in [&msg.jwks_json, &msg.bound_jwks_json] {
        if jwks.len() > super::MAX_JWKS_BYTES {
            return Err(PeerError::TooLarge(jwks.len()));
        }
    }
    let keys = crate::jose::parse_jwks(msg.jwks_json.as_bytes(), MAX_KEYS_PER_ISSUER)?;
    let bound = if msg.bound_jwks_json.is_empty() {
        Vec::new()
    } else {
        crate::jose::parse_jwks(msg.bound_jwks_json.as_bytes(), MAX_KEYS_PER_ISSUER)?
    };
    if let Some(k) = bound
        .iter()
        .find(|b| keys.iter().any(|k| k.kid() == b.kid()))
    {
        return Err(PeerError::BoundOverlap(k.kid().to_owned()));
    }
    let expires = msg
        .key_expires_at
        .into_iter()
        .map(|(kid, t)| (kid, UnixTime::from_secs(t)))
        .collect();
    Ok(SetParts {
        keys,
        bound,
        revoked: msg.revoked_kids,
        expires,
    })
}

/// What a peer client makes of a `PeerKeySet` before the trust writer sees
/// it: the update filed under `issuer`, or why the set is refused (too
/// large, not a JWKS, too many keys, a key outside the import policy, a
/// duplicate kid). The daemon runs exactly these checks on every delivery;
/// this is on the crate's face for tooling and the fuzz harness (`fuzz/`).
pub fn peer_key_set_update(
    issuer: &str,
    msg: pb::PeerKeySet,
    at: UnixTime,
) -> Result<TrustUpdate, String> {
    key_set_update(issuer, msg, at).map_err(|e| e.to_string())
}
