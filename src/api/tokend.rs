//! tokend.v1 TokenService and AdminService: convert proto ↔ domain, call the
//! core, convert back. No business logic here.

use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::status::reject;
use super::uds::check_uid;
use crate::daemon::Core;
use crate::identity::SpiffeId;
use crate::keys::{KeyRecord, KeyState, delete_after, retires_at, rotation::Command, state_at};
use crate::mint::{MintRequest, parse_claims};
use crate::proto::tokend::v1 as pb;
use crate::reason::Reason;

/// The local token service.
#[derive(Clone, Debug)]
pub struct TokenApi(pub Arc<Core>);

/// The local admin service.
#[derive(Clone, Debug)]
pub struct AdminApi(pub Arc<Core>);

fn audience(core: &Core, text: &str, field: &str) -> Result<SpiffeId, Status> {
    if text.is_empty() {
        return Err(reject(Reason::Malformed, format!("{field} is required")));
    }
    core.config
        .trust_domain
        .audience(text)
        .map_err(|e| reject(Reason::Malformed, format!("{field}: {e}")))
}

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn mint(
        &self,
        req: Request<pb::MintRequest>,
    ) -> Result<Response<pb::MintResponse>, Status> {
        check_uid(&req, self.0.config.allowed_uids.as_deref())?;
        let r = req.into_inner();
        let core = &self.0;
        let request = MintRequest {
            audience: vec![audience(core, &r.audience, "audience")?.to_string()],
            ttl: (r.ttl_seconds > 0).then_some(r.ttl_seconds),
            claims: parse_claims(&r.claims_json)?,
            one_time: r.one_time,
        };
        let m = core.minter.mint(&request, core.clock.now())?;
        Ok(Response::new(pb::MintResponse {
            token: m.token,
            kid: m.kid,
            expires_at: m.expires_at,
            jti: m.jti,
        }))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        check_uid(&req, self.0.config.allowed_uids.as_deref())?;
        let r = req.into_inner();
        let core = &self.0;
        let aud = if r.audience.is_empty() {
            core.config.id.clone()
        } else {
            audience(core, &r.audience, "audience")?
        };
        if r.token.is_empty() {
            return Err(reject(Reason::Malformed, "token is empty"));
        }
        let v = core
            .verifier
            .verify(r.token.trim(), aud.as_str(), core.clock.now())
            .await?;
        let claims_json = serde_json::Value::Object(v.claims).to_string();
        Ok(Response::new(pb::VerifyResponse {
            issuer: v.issuer,
            subject: v.subject,
            claims_json,
            kid: v.kid,
            expires_at: v.expires_at,
        }))
    }

    async fn exchange(
        &self,
        req: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        check_uid(&req, self.0.config.allowed_uids.as_deref())?;
        let r = req.into_inner();
        let core = &self.0;
        let aud = audience(core, &r.audience, "audience")?;
        if r.token.is_empty() {
            return Err(reject(Reason::Malformed, "token is empty"));
        }
        let ttl = (r.ttl_seconds > 0).then_some(r.ttl_seconds);
        let now = core.clock.now();
        let m =
            crate::exchange::exchange(&core.minter, &core.verifier, r.token.trim(), &aud, ttl, now)
                .await
                .map_err(|e| reject(e.reason(), &e))?;
        Ok(Response::new(pb::ExchangeResponse {
            token: m.token,
            kid: m.kid,
            expires_at: m.expires_at,
            jti: m.jti,
        }))
    }
}

/// Converts a key record to its API form.
pub fn key_info(
    rec: &KeyRecord,
    all: &[KeyRecord],
    lc: &crate::keys::Lifecycle,
    now: i64,
) -> pb::KeyInfo {
    let state: KeyState = state_at(rec, all, now);
    pb::KeyInfo {
        kid: rec.kid.clone(),
        state: state.as_str().into(),
        created_at: rec.created_at,
        activates_at: rec.activates_at,
        retires_at: retires_at(rec, all).unwrap_or(0),
        deleted_after: delete_after(rec, all, lc).unwrap_or(0),
        bits: rec.bits,
    }
}

impl AdminApi {
    fn allowed<T>(&self, req: &Request<T>) -> Result<(), Status> {
        check_uid(req, self.0.config.allowed_uids.as_deref())?;
        // Default: the daemon's own uid; if that cannot be read, nobody (fail closed).
        let own = super::uds::own_uid().map(|u| vec![u]).unwrap_or_default();
        let admins = self.0.config.admin_uids.clone().unwrap_or(own);
        check_uid(req, Some(&admins))
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.allowed(&req)?;
        let set = self.0.keys.current();
        let all = set.records();
        let now = self.0.clock.now();
        let keys = all
            .iter()
            .map(|r| key_info(r, &all, &set.lifecycle, now))
            .collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.allowed(&req)?;
        let (tx, rx) = oneshot::channel();
        self.0
            .commands
            .send(Command::Rotate(tx))
            .await
            .map_err(|_| reject(Reason::Unavailable, "rotation task is not running"))?;
        let rec = rx
            .await
            .map_err(|_| reject(Reason::Unavailable, "rotation task dropped the request"))?
            .map_err(|e| reject(Reason::Unavailable, e))?;
        let set = self.0.keys.current();
        let all = set.records();
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(key_info(&rec, &all, &set.lifecycle, self.0.clock.now())),
        }))
    }

    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        self.allowed(&req)?;
        let kid = req.into_inner().kid;
        if kid.is_empty() {
            return Err(reject(Reason::Malformed, "kid is required"));
        }
        let (tx, rx) = oneshot::channel();
        self.0
            .commands
            .send(Command::Revoke(kid, tx))
            .await
            .map_err(|_| reject(Reason::Unavailable, "rotation task is not running"))?;
        let (rec, active) = rx
            .await
            .map_err(|_| reject(Reason::Unavailable, "rotation task dropped the request"))?
            .map_err(|e| match e {
                crate::keys::KeyError::NotFound(_) | crate::keys::KeyError::AlreadyRevoked(_) => {
                    super::status::reject_with(tonic::Code::NotFound, Reason::Malformed, &e)
                }
                other => reject(Reason::Unavailable, other),
            })?;
        let set = self.0.keys.current();
        let all = set.records();
        Ok(Response::new(pb::RevokeKeyResponse {
            revoked: Some(key_info(&rec, &all, &set.lifecycle, self.0.clock.now())),
            active_kid: active,
        }))
    }

    async fn get_jwks(
        &self,
        req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        check_uid(&req, self.0.config.allowed_uids.as_deref())?;
        let all = req.into_inner().all;
        let own = self.0.config.id.as_str().to_owned();
        let mut issuers = Vec::new();
        for s in self.0.verifier.trust().snapshot() {
            if !all && s.issuer != own {
                continue;
            }
            let entry = pb::IssuerKeys {
                issuer: s.issuer.clone(),
                source: s.source,
                jwks_json: crate::jwk::to_jwks_json(s.keys.iter().map(|k| k.as_ref())),
                updated_at: s.updated_at,
                revoked_kids: s.revoked,
                last_error: s.last_error.unwrap_or_default(),
            };
            if s.issuer == own {
                issuers.insert(0, entry);
            } else {
                issuers.push(entry);
            }
        }
        Ok(Response::new(pb::GetJwksResponse { issuers }))
    }
}
