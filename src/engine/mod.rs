//! The engine: every token decision, at an explicit `now`, opening no socket
//! and no file. `Engine` joins a minter (this sidecar's keys, through a
//! `KeyView`), the pure verifier (`verify_at`, over `Anchors`: the own keys
//! and an immutable `TrustSet` snapshot), delegation (RFC 8693 exchange)
//! and the one-time claim (behind the `ReplayStore` trait), and the signed
//! key-set documents replicas publish (`document`: build, sign, verify). The only async
//! parts are the two things a decision may wait on: a refresh of a peer's
//! keys (behind the `Refresh` trait, once per verification) and the replay
//! store. Tests and benches build an `Engine` directly. `authz` holds the
//! access rules and claim headers Envoy's external authorization applies
//! to a verified token. `dpop` and `bound` make and check RFC 9449 proofs
//! for tokens bound to this instance's proof key.

mod authz;
mod bans;
mod bound;
mod cache;
#[cfg(test)]
mod contract;
mod delegation;
mod document;
mod dpop;
mod mint;
mod replay;
mod signer;
mod trust;
mod verify;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

#[cfg(test)]
pub(crate) use self::authz::HeaderClaim;
pub(crate) use self::authz::{AccessRules, ClaimHeader, ClaimRule, parse_issuers};
pub(crate) use self::bans::normalize_serial;
pub use self::bans::{Ban, BanKind, BanList, BanView, KeyOrigin, KeyOrigins};
pub(crate) use self::delegation::{MAX_DELEGATION_DEPTH, chain_depth};
pub use self::document::{
    DEFAULT_DOCUMENT_LIFETIME, DOCUMENT_TYPE, DocumentAnchors, DocumentClaims, DocumentError,
    DocumentKey, DocumentKeyError, DocumentLimits, MAX_DOCUMENT_BYTES, MAX_DOCUMENT_LIFETIME,
    SignedDocument, VerifiedDocument, sign_document, verify_document,
};
pub(crate) use self::dpop::{
    DEFAULT_PROOF_WINDOW, Nonces, Presented, ProofTarget, check_authority,
};
pub(crate) use self::mint::{Delegation, MintError, Minter, parse_claims};
pub use self::mint::{MintPolicy, MintRequest, Minted};
pub(crate) use self::replay::{
    ClaimFuture, MemoryReplay, OneTimeId, ReplayStore, digest as replay_digest,
};
pub(crate) use self::trust::{Anchors, MAX_KEYS_PER_ISSUER};
pub use self::trust::{
    DEFAULT_INSTANCE, DocumentState, InstanceKeys, IssuerKeys, SetError, TrustSet, TrustUpdate,
    TrustView,
};
pub use self::verify::{Unverified, Verified, VerifyPolicy, verify_at};
use crate::identity::SpiffeId;
use crate::jose::PREV_TOKEN;
use crate::keys::{KeyView, ProofKeyStore};
use crate::reason::{Reason, Refusal};
use crate::time::{SharedClock, UnixTime};

/// How long a verification waits, by default, for a peer's keys to be
/// fetched again before it answers `unknown_kid`.
pub(crate) const DEFAULT_REFRESH_WAIT: Duration = Duration::from_secs(1);

/// Verified tokens remembered by default (`[tokens] verify_cache`).
pub(crate) const DEFAULT_VERIFY_CACHE: usize = cache::DEFAULT_CAPACITY;

/// Asks a peer issuer's source for its keys again, for an unknown kid.
pub trait Refresh: Send + Sync + 'static {
    /// Refreshes `issuer` (single flight and rate limited by the
    /// implementation) and returns once the outcome is in the trust view.
    fn refresh<'a>(&'a self, issuer: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// Mints, verifies and exchanges tokens for one sidecar identity.
pub struct Engine {
    own: SpiffeId,
    minter: Minter,
    policy: VerifyPolicy,
    keys: KeyView,
    /// The keys bound tokens are signed with (`keys_dir/bound/`).
    bound_keys: KeyView,
    trust: TrustView,
    refresher: Option<Arc<dyn Refresh>>,
    refresh_wait: Duration,
    replay: Arc<dyn ReplayStore>,
    cache: cache::VerifyCache,
    /// This instance's proof keys, for bound tokens and their proofs.
    proof_keys: Arc<ProofKeyStore>,
    /// How far a proof's `iat` may lie from now.
    proof_window: Duration,
    /// Proof ids this verifier has seen within the window.
    seen_proofs: dpop::SeenProofs,
    /// Server nonces this replica issues and requires (RFC 9449 §9), if on.
    nonces: Option<dpop::Nonces>,
    bans: BanView,
    origins: KeyOrigins,
    /// Where new signatures run: off the async workers, leaving a core to
    /// verifications while they come in.
    signers: Arc<signer::SignPool>,
    clock: SharedClock,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

// === impl Engine ===

impl Engine {
    /// An engine for `own`, signing with `keys` and trusting `trust`, with an
    /// in-memory replay store and no refresher (add them with `with_*`).
    pub fn new(
        own: SpiffeId,
        mint: MintPolicy,
        policy: VerifyPolicy,
        keys: KeyView,
        trust: TrustView,
        clock: SharedClock,
    ) -> Self {
        let lifecycle = keys.current().lifecycle;
        let bound_keys = KeyView::empty(lifecycle);
        Self {
            minter: Minter::new(own.clone(), keys.clone(), bound_keys.clone(), mint),
            bound_keys,
            proof_keys: Arc::new(ProofKeyStore::in_memory(
                lifecycle.interval,
                lifecycle.grace,
            )),
            proof_window: DEFAULT_PROOF_WINDOW,
            seen_proofs: dpop::SeenProofs::default(),
            nonces: None,
            own,
            policy,
            keys,
            trust,
            refresher: None,
            refresh_wait: DEFAULT_REFRESH_WAIT,
            replay: Arc::new(MemoryReplay::default()),
            cache: cache::VerifyCache::new(cache::DEFAULT_CAPACITY),
            bans: BanView::none(),
            origins: KeyOrigins::default(),
            signers: Arc::new(signer::SignPool::per_core()),
            clock,
        }
    }

    /// Signs bound tokens with the keys of `bound` (a `KeyStore` of class
    /// `Bound`). Without it a bound mint is refused as `unavailable`.
    pub fn with_bound_keys(mut self, bound: KeyView) -> Self {
        self.minter = Minter::new(
            self.own.clone(),
            self.keys.clone(),
            bound.clone(),
            self.minter.policy(),
        );
        self.bound_keys = bound;
        self
    }

    /// Remembers at most `entries` verified tokens (0: no verify cache).
    pub fn with_verify_cache(mut self, entries: usize) -> Self {
        self.cache = cache::VerifyCache::new(entries);
        self
    }

    /// Fetches peers' keys again on an unknown kid, waiting at most `wait`.
    pub fn with_refresher(mut self, refresher: Arc<dyn Refresh>, wait: Duration) -> Self {
        self.refresher = Some(refresher);
        self.refresh_wait = wait;
        self
    }

    /// Refuses, as `revoked_key`, every verification resting on material
    /// `bans` names; `origins` says which certificate delivered each peer key.
    pub fn with_bans(mut self, bans: BanView, origins: KeyOrigins) -> Self {
        self.bans = bans;
        self.origins = origins;
        self
    }

    /// Claims one-time ids in `replay` instead of the in-memory default.
    pub fn with_replay(mut self, replay: Arc<dyn ReplayStore>) -> Self {
        self.replay = replay;
        self
    }

    /// This sidecar's identity: issuer of its tokens, default audience.
    pub fn own(&self) -> &SpiffeId {
        &self.own
    }

    /// Now, by the engine's clock.
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// The own keys.
    pub fn keys(&self) -> &KeyView {
        &self.keys
    }

    /// The own bound-token signing keys (never exported to third parties).
    pub fn bound_keys(&self) -> &KeyView {
        &self.bound_keys
    }

    /// The peers' keys.
    pub fn trust(&self) -> &TrustView {
        &self.trust
    }

    /// Mints (or reuses) a token now, signing on the calling thread. A
    /// bound token names the current proof key, which is on disk first.
    pub fn mint(&self, req: &MintRequest) -> Result<Minted, Refusal> {
        let now = self.clock.now();
        let cnf = self.bind_key(req.bind, now)?;
        Ok(self.minter.mint(req, now, cnf.as_deref())?)
    }

    /// Mints (or reuses) a token now; a new signature (an RSA operation of
    /// ~0.5 ms at 2048 bits, several at 4096) runs on the signing pool
    /// (`signer`), never on the async workers that answer verifications,
    /// and on at most cores − 1 threads while verifications come in.
    pub async fn mint_off_thread(self: &Arc<Self>, req: MintRequest) -> Result<Minted, Refusal> {
        let started = std::time::Instant::now();
        let result = self.mint_queued(req).await;
        metrics::histogram!("tokend_mint_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    /// `mint_off_thread` without the latency record.
    async fn mint_queued(self: &Arc<Self>, req: MintRequest) -> Result<Minted, Refusal> {
        let now = self.clock.now();
        // A bound request is served from the cache only while its proof key
        // needs no rotation (which writes a file, off this thread).
        let cnf = if req.bind {
            self.proof_keys
                .current_if_fresh(now)
                .map(|k| Some(k.jkt().to_owned()))
        } else {
            Some(None)
        };
        if let Some(cnf) = &cnf
            && let Some(m) = self.minter.cached(&req, now, cnf.as_deref())?
        {
            return Ok(m);
        }
        let engine = Arc::clone(self);
        self.signers.run(move || engine.mint(&req)).await?
    }

    /// Runs `f` over the current snapshots: the own keys and the peers' sets.
    fn with_anchors<R>(&self, f: impl FnOnce(&Anchors<'_>) -> R) -> R {
        let own = self.keys.current();
        let own_bound = self.bound_keys.current();
        let peers = self.trust.current();
        f(&Anchors {
            own_id: self.own.as_str(),
            own: &own,
            own_bound: &own_bound,
            peers: &peers,
        })
    }

    /// The pure decision at `now` against the current snapshots: no cache,
    /// no refresh, no replay claim.
    pub fn verify_at(
        &self,
        token: &str,
        audience: &str,
        now: UnixTime,
    ) -> Result<Verified, Unverified> {
        self.with_anchors(|a| verify_at(token, audience, now, &self.policy, a))
    }

    /// Verifies `token` for `audience` now: one refresh of a peer on an
    /// unknown kid (or a failing signature), then the one-time claim. The
    /// result is shared with the verify cache, never copied.
    pub async fn verify(&self, token: &str, audience: &str) -> Result<Arc<Verified>, Refusal> {
        self.verify_within(token, audience, None).await
    }

    /// `verify`, waiting for a peer's keys at most `wait` (the caller's
    /// deadline, when it is shorter than the engine's own bound).
    pub async fn verify_within(
        &self,
        token: &str,
        audience: &str,
        wait: Option<Duration>,
    ) -> Result<Arc<Verified>, Refusal> {
        self.verify_proven(token, audience, wait, None).await
    }

    /// `verify_within` for a token presented with a DPoP `proof` for its
    /// request (RFC 9449 §4.3, §7.1); a bound token needs one.
    pub(crate) async fn verify_proven(
        &self,
        token: &str,
        audience: &str,
        wait: Option<Duration>,
        proof: Option<&Presented<'_>>,
    ) -> Result<Arc<Verified>, Refusal> {
        let started = std::time::Instant::now();
        // While verifications come in, signatures leave them a core.
        self.signers.verifying();
        let wait = wait.map_or(self.refresh_wait, |w| w.min(self.refresh_wait));
        let result = self
            .verify_once_refreshed(token, audience, wait, proof)
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.reason.as_str(),
        };
        metrics::counter!("tokend_verify_total", "result" => outcome).increment(1);
        metrics::histogram!("tokend_verify_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    async fn verify_once_refreshed(
        &self,
        token: &str,
        audience: &str,
        wait: Duration,
        proof: Option<&Presented<'_>>,
    ) -> Result<Arc<Verified>, Refusal> {
        let mut refreshed = false;
        loop {
            let now = self.clock.now();
            // The decision reads the snapshots; nothing below holds them
            // across an await.
            let decided = self.with_anchors(|a| {
                match self.cache.get(token, audience, now, &self.policy, a) {
                    Some(hit) => Ok((hit, true)),
                    None => verify_at(token, audience, now, &self.policy, a)
                        .map(|v| (Arc::new(v), false)),
                }
            });
            match decided {
                Ok((v, hit)) => {
                    // Bans are checked on every answer, remembered or not,
                    // so a ban takes effect on the next call.
                    if let Some(refusal) = self.bans.current().refusal(&v.keys, &self.origins) {
                        return Err(refusal);
                    }
                    let result = if hit { "hit" } else { "miss" };
                    metrics::counter!("tokend_verify_cache_total", "result" => result).increment(1);
                    // The proof before the one-time claim: a stolen one-time
                    // token with a bad proof must not use up the jti.
                    self.check_binding(&v, token, proof, now)?;
                    if !v.one_time.is_empty() {
                        self.replay.claim(&v.one_time, now).await?;
                    }
                    if !hit {
                        self.cache.put(token, v.clone(), now);
                    }
                    return Ok(v);
                }
                Err(Unverified::NeedKeys { issuer, refusal }) if !refreshed => {
                    let Some(refresher) = &self.refresher else {
                        return Err(refusal);
                    };
                    refreshed = true;
                    if tokio::time::timeout(wait, refresher.refresh(&issuer))
                        .await
                        .is_err()
                    {
                        tracing::debug!(issuer, "key refresh still running; answering without it");
                    }
                }
                Err(e) => return Err(e.into_refusal()),
            }
        }
    }

    /// Exchanges `token` (addressed to this sidecar) for a delegated token to
    /// `audience` (RFC 8693): the original subject, this sidecar as actor,
    /// the received token embedded as the link, one-time if it was. A bound
    /// token needs the `proof` it was received with (each received proof is
    /// exchanged at most once); the delegated token is bound to this
    /// sidecar's own proof key when the received one was bound or `bind`.
    pub async fn exchange(
        self: &Arc<Self>,
        token: &str,
        audience: &SpiffeId,
        ttl: Option<Duration>,
        wait: Option<Duration>,
    ) -> Result<Minted, Refusal> {
        self.exchange_proven(token, audience, ttl, wait, None, false)
            .await
    }

    /// `exchange` with the received token's proof, and binding on request.
    pub(crate) async fn exchange_proven(
        self: &Arc<Self>,
        token: &str,
        audience: &SpiffeId,
        ttl: Option<Duration>,
        wait: Option<Duration>,
        proof: Option<Presented<'_>>,
        bind: bool,
    ) -> Result<Minted, Refusal> {
        let proof = proof.map(|p| Presented {
            exchange: true,
            ..p
        });
        let inbound = self
            .verify_proven(token, self.own.as_str(), wait, proof.as_ref())
            .await
            .map_err(|r| r.context("received token"))?;
        let bind = bind || dpop::bound_key(&inbound.claims)?.is_some();
        if chain_depth(&inbound.claims) + 1 > MAX_DELEGATION_DEPTH {
            return Err(Refusal::new(
                Reason::PermissionDenied,
                format!("delegation chain would exceed {MAX_DELEGATION_DEPTH} links"),
            ));
        }
        let mut act = Map::new();
        act.insert("sub".into(), Value::String(self.own.to_string()));
        act.insert(PREV_TOKEN.into(), Value::String(token.to_owned()));
        let delegation = Delegation {
            subject: inbound.subject.clone(),
            act: Value::Object(act),
            one_time: verify::is_one_time(&inbound.claims),
            carried: inbound.claims.clone(),
            not_after: inbound.expires_at,
        };
        // The new signature (and a proof-key rotation, which writes a
        // file) runs on the signing pool, as a mint's does.
        let engine = Arc::clone(self);
        let audience = audience.clone();
        let minted = self
            .signers
            .run(move || {
                let now = engine.clock.now();
                let cnf = engine.bind_key(bind, now)?;
                engine
                    .minter
                    .mint_delegated(&audience, delegation, ttl, now, cnf.as_deref())
                    .map_err(|e| match e {
                        MintError::TooLarge(_) => {
                            Refusal::new(Reason::PermissionDenied, e.to_string())
                        }
                        other => other.into(),
                    })
            })
            .await??;
        metrics::counter!("tokend_exchange_total").increment(1);
        Ok(minted)
    }
}
