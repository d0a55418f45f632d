//! tokend.v1 AdminService: list, rotate and revoke keys (through the
//! rotation task, the keys directory's single writer), and the JWKS this
//! sidecar publishes and trusts. Admin calls are limited to admin uids.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::status::{audited, bad_request, key_status, status};
use super::uds::{Callers, caller_of};
use crate::audit::{Audit, Event};
use crate::engine::{InstanceKeys, TrustView};
use crate::identity::SpiffeId;
use crate::keys::{
    Command, KeyError, KeyRecord, KeySet, OwnKeys, delete_after, retires_at, state_at,
};
use crate::proto::tokend::v1 as pb;
use crate::reason::{Reason, Refusal};
use crate::time::SharedClock;

/// The local admin service.
#[derive(Clone, Debug)]
pub(crate) struct AdminApi {
    own: SpiffeId,
    keys: OwnKeys,
    trust: TrustView,
    /// The signing keys' rotation task.
    commands: mpsc::Sender<Command>,
    /// The bound-token keys' rotation task.
    bound_commands: mpsc::Sender<Command>,
    clock: SharedClock,
    callers: Callers,
    admins: Callers,
    audit: Audit,
    bans: Option<Arc<crate::bans::BanStore>>,
}

fn key_info(rec: &KeyRecord, set: &KeySet, now: crate::time::UnixTime) -> pb::KeyInfo {
    let all = set.records();
    pb::KeyInfo {
        kid: rec.kid.clone(),
        state: state_at(rec, &all, now).as_str().into(),
        created_at: rec.created_at.as_secs(),
        activates_at: rec.activates_at.as_secs(),
        retires_at: retires_at(rec, &all).map_or(0, |t| t.as_secs()),
        deleted_after: delete_after(rec, &all, &set.lifecycle).map_or(0, |t| t.as_secs()),
        bits: rec.bits,
    }
}

/// One instance of a trusted issuer, as `jwks --all` shows it.
fn instance_info((id, inst): (&str, &InstanceKeys)) -> pb::InstanceKeys {
    let doc = inst.document();
    pb::InstanceKeys {
        instance: id.to_owned(),
        source: inst.source.clone(),
        kids: inst.keys().iter().map(|k| k.kid().to_owned()).collect(),
        bound_kids: inst
            .bound_keys()
            .iter()
            .map(|k| k.kid().to_owned())
            .collect(),
        revoked_kids: inst.revoked().to_vec(),
        updated_at: inst.updated_at.as_secs(),
        seq: doc.map_or(0, |d| d.seq),
        document_expires_at: doc.map_or(0, |d| d.expires_at.as_secs()),
        address: doc.and_then(|d| d.address.clone()).unwrap_or_default(),
        stale: inst.is_stale(),
        gone: inst.is_gone(),
    }
}

impl AdminApi {
    /// The service for sidecar `own`. `admins` defaults to the daemon's own
    /// uid; if that cannot be read, nobody (fail closed).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        own: SpiffeId,
        keys: OwnKeys,
        trust: TrustView,
        (commands, bound_commands): (mpsc::Sender<Command>, mpsc::Sender<Command>),
        clock: SharedClock,
        callers: Callers,
        admins: Option<Vec<u32>>,
        audit: Audit,
    ) -> Self {
        let admins = admins.unwrap_or_else(|| crate::keys::daemon_uid().into_iter().collect());
        Self {
            own,
            keys,
            trust,
            commands,
            bound_commands,
            clock,
            callers,
            admins: Callers::new(Some(admins)),
            audit,
            bans: None,
        }
    }

    /// Serves the ban calls from `store`.
    pub(crate) fn with_bans(mut self, store: Arc<crate::bans::BanStore>) -> Self {
        self.bans = Some(store);
        self
    }

    fn allowed<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.callers.check(req).map_err(status)?;
        self.admins.check(req).map_err(status)
    }

    /// Asks the rotation task of the signing keys (or, `bound`, of the
    /// bound-token keys).
    async fn ask<T>(
        &self,
        bound: bool,
        command: impl FnOnce(oneshot::Sender<Result<T, KeyError>>) -> Command,
    ) -> Result<T, Status> {
        let unavailable = |d: &str| status(Refusal::new(Reason::Unavailable, d));
        let (tx, rx) = oneshot::channel();
        let task = if bound {
            &self.bound_commands
        } else {
            &self.commands
        };
        task.send(command(tx))
            .await
            .map_err(|_| unavailable("rotation task is not running"))?;
        rx.await
            .map_err(|_| unavailable("rotation task dropped the request"))?
            .map_err(key_status)
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let event = Event::new("list_keys", caller_of(&req));
        let result = self.list_keys_call(req);
        audited(&self.audit, event, result, true)
    }

    async fn rotate_key(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let mut event = Event::new("rotate_key", caller_of(&req));
        let result = self.rotate_key_call(req).await;
        if let Ok(r) = &result {
            event.kid = r.get_ref().key.as_ref().map(|k| k.kid.clone());
        }
        audited(&self.audit, event, result, true)
    }

    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let mut event = Event::new("revoke_key", caller_of(&req));
        event.kid = Some(req.get_ref().kid.chars().take(256).collect());
        let result = self.revoke_key_call(req).await;
        audited(&self.audit, event, result, true)
    }

    async fn get_jwks(
        &self,
        req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        self.get_jwks_call(req)
    }

    async fn ban(&self, req: Request<pb::BanRequest>) -> Result<Response<pb::BanResponse>, Status> {
        let mut event = Event::new("ban", caller_of(&req));
        event.ban = Some(asked_ban(&req.get_ref().kind, &req.get_ref().value));
        let result = self.ban_call(req).await;
        if let Ok(r) = &result
            && let Some(b) = &r.get_ref().ban
        {
            event.ban = Some(format!("{} {}", b.kind, b.value));
        }
        audited(&self.audit, event, result, true)
    }

    async fn unban(
        &self,
        req: Request<pb::UnbanRequest>,
    ) -> Result<Response<pb::UnbanResponse>, Status> {
        let mut event = Event::new("unban", caller_of(&req));
        event.ban = Some(asked_ban(&req.get_ref().kind, &req.get_ref().value));
        let result = self.unban_call(req).await;
        audited(&self.audit, event, result, true)
    }

    async fn list_bans(
        &self,
        req: Request<pb::ListBansRequest>,
    ) -> Result<Response<pb::ListBansResponse>, Status> {
        let event = Event::new("list_bans", caller_of(&req));
        let result = self.list_bans_call(req);
        audited(&self.audit, event, result, true)
    }
}

// The calls behind the audited admin methods.
impl AdminApi {
    fn list_keys_call(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.allowed(&req)?;
        let set = if req.get_ref().bound {
            self.keys.bound.current()
        } else {
            self.keys.signing.current()
        };
        let now = self.clock.now();
        let keys = set
            .records()
            .iter()
            .map(|r| key_info(r, &set, now))
            .collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn rotate_key_call(
        &self,
        req: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.allowed(&req)?;
        let bound = req.get_ref().bound;
        let rec = self.ask(bound, Command::Rotate).await?;
        let set = if bound {
            self.keys.bound.current()
        } else {
            self.keys.signing.current()
        };
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(key_info(&rec, &set, self.clock.now())),
        }))
    }

    async fn revoke_key_call(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        self.allowed(&req)?;
        let kid = req.into_inner().kid;
        if kid.is_empty() {
            return Err(bad_request("kid is required"));
        }
        // A kid is a thumbprint: it names a key of one class only.
        let bound = self
            .keys
            .bound
            .current()
            .records()
            .iter()
            .any(|r| r.kid == kid);
        let (rec, active) = self.ask(bound, |tx| Command::Revoke(kid, tx)).await?;
        let set = if bound {
            self.keys.bound.current()
        } else {
            self.keys.signing.current()
        };
        Ok(Response::new(pb::RevokeKeyResponse {
            revoked: Some(key_info(&rec, &set, self.clock.now())),
            active_kid: active,
            bound,
        }))
    }

    fn get_jwks_call(
        &self,
        req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        self.callers.check(&req).map_err(status)?;
        // The JWKS documents list signing keys only: a bound-token key is
        // never exported where a third-party verifier could pick it up.
        let own = self.keys.signing.current();
        let mut issuers = vec![pb::IssuerKeys {
            issuer: self.own.to_string(),
            source: "self".into(),
            bound_kids: (self.keys.bound.current().published())
                .map(|k| k.kid().to_owned())
                .collect(),
            jwks_json: own.jwks_json(),
            updated_at: self.clock.now().as_secs(),
            revoked_kids: own.revoked_kids().map(str::to_owned).collect(),
            last_error: String::new(),
            instances: Vec::new(),
        }];
        if req.into_inner().all {
            let trust = self.trust.current();
            let now = self.clock.now();
            for (issuer, keys) in trust.issuers() {
                let usable = keys.usable_keys(now);
                issuers.push(pb::IssuerKeys {
                    issuer: issuer.to_owned(),
                    source: keys.source.clone(),
                    jwks_json: crate::jose::to_jwks_json(usable.iter().map(|k| k.as_ref())),
                    updated_at: keys.updated_at.as_secs(),
                    revoked_kids: keys.revoked(),
                    last_error: keys.last_error.clone().unwrap_or_default(),
                    instances: keys.instances().into_iter().map(instance_info).collect(),
                    bound_kids: (keys.usable_bound_keys(now).iter())
                        .map(|k| k.kid().to_owned())
                        .collect(),
                });
            }
        }
        Ok(Response::new(pb::GetJwksResponse { issuers }))
    }
}

/// A ban as asked (kind and value, bounded), for the audit record.
fn asked_ban(kind: &str, value: &str) -> String {
    let bounded = |s: &str| s.chars().take(256).collect::<String>();
    format!("{} {}", bounded(kind), bounded(value.trim()))
}

// The calls behind the audited ban methods.
impl AdminApi {
    async fn ban_call(
        &self,
        req: Request<pb::BanRequest>,
    ) -> Result<Response<pb::BanResponse>, Status> {
        self.allowed(&req)?;
        let store = super::bans::store(&self.bans)?;
        let now = self.clock.now();
        super::bans::ban(store, &self.own, req.into_inner(), now)
            .await
            .map(Response::new)
    }

    async fn unban_call(
        &self,
        req: Request<pb::UnbanRequest>,
    ) -> Result<Response<pb::UnbanResponse>, Status> {
        self.allowed(&req)?;
        let store = super::bans::store(&self.bans)?;
        super::bans::unban(store, &self.own, req.into_inner())
            .await
            .map(Response::new)
    }

    fn list_bans_call(
        &self,
        req: Request<pb::ListBansRequest>,
    ) -> Result<Response<pb::ListBansResponse>, Status> {
        self.allowed(&req)?;
        let store = super::bans::store(&self.bans)?;
        let bans = store
            .current()
            .bans()
            .iter()
            .map(super::bans::entry)
            .collect();
        Ok(Response::new(pb::ListBansResponse { bans }))
    }
}
