//! The engine's side of bound tokens (RFC 9449 DPoP): which proof key a
//! token minted now is bound to, proofs for the application (`prove`), and
//! the binding rule after a token verified (`check_binding`): a bound token
//! needs a good proof, a proof needs a bound token. The proof format and
//! its checks are `dpop`; the keys are `keys::ProofKeyStore`. Server
//! nonces (RFC 9449 §9), when required, are this replica's `dpop::Nonces`.

use std::sync::Arc;
use std::time::Duration;

use super::dpop::{self, Presented, ProofTarget};
use super::{Engine, Verified};
use crate::keys::ProofKeyStore;
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

// === impl Engine: bound tokens ===

impl Engine {
    /// Binds tokens to the proof keys of `store` (kept on disk) instead of
    /// the in-memory default.
    pub(crate) fn with_proof_keys(mut self, store: Arc<ProofKeyStore>) -> Self {
        self.proof_keys = store;
        self
    }

    /// Accepts proofs whose `iat` lies at most `window` from now.
    pub(crate) fn with_proof_window(mut self, window: Duration) -> Self {
        self.proof_window = window;
        self
    }

    /// Requires every proof to carry a nonce this replica issued within the
    /// proof window (RFC 9449 §9); refusals then come with a fresh one.
    pub(crate) fn with_proof_nonces(mut self, nonces: dpop::Nonces) -> Self {
        self.nonces = Some(nonces);
        self
    }

    /// A fresh nonce for the next proof, when this verifier requires them
    /// (`None` otherwise): for a refusal's `dpop-nonce`, or a success's
    /// next nonce. Stateless: an HMAC, nothing stored.
    pub fn fresh_nonce(&self) -> Option<String> {
        self.nonces.as_ref().map(|n| n.issue(self.clock.now()))
    }

    /// The thumbprint of the proof key a token minted now is bound to.
    pub(super) fn bind_key(&self, bind: bool, now: UnixTime) -> Result<Option<String>, Refusal> {
        if !bind {
            return Ok(None);
        }
        self.proof_keys
            .current(now)
            .map(|k| Some(k.jkt().to_owned()))
            .map_err(|e| Refusal::new(Reason::Unavailable, format!("no proof key: {e}")))
    }

    /// A DPoP proof for one request with `token`, which must be bound to a
    /// proof key this sidecar holds. The key never leaves the sidecar.
    pub fn prove(&self, token: &str, method: &str, uri: &str) -> Result<String, Refusal> {
        self.prove_with_nonce(token, method, uri, None)
    }

    /// `prove`, carrying the verifier's `nonce` (RFC 9449 §8–9) when given.
    pub fn prove_with_nonce(
        &self,
        token: &str,
        method: &str,
        uri: &str,
        nonce: Option<&str>,
    ) -> Result<String, Refusal> {
        let parts = crate::jose::parse(token)?;
        let Ok(claims) = parts.claims else {
            return Err(Refusal::new(
                Reason::Malformed,
                "payload is not a JSON object",
            ));
        };
        let Some(jkt) = dpop::bound_key(&claims)? else {
            return Err(Refusal::new(
                Reason::Malformed,
                "the token is a bearer token (no cnf.jkt): there is nothing to prove",
            ));
        };
        let Some(key) = self.proof_keys.by_jkt(jkt) else {
            return Err(Refusal::new(
                Reason::PermissionDenied,
                format!("the token is bound to proof key {jkt}, which this sidecar does not hold"),
            ));
        };
        let started = std::time::Instant::now();
        let target = ProofTarget { method, uri };
        let proof = dpop::make_proof(&key, target, token, nonce, self.clock.now())?;
        metrics::counter!("tokend_prove_total").increment(1);
        metrics::histogram!("tokend_prove_seconds").record(started.elapsed().as_secs_f64());
        Ok(proof)
    }

    /// The binding rule after a token verified: a bound token needs a good
    /// proof, and a proof is only for a bound token.
    pub(super) fn check_binding(
        &self,
        v: &Verified,
        token: &str,
        proof: Option<&Presented<'_>>,
        now: UnixTime,
    ) -> Result<(), Refusal> {
        match (dpop::bound_key(&v.claims)?, proof) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(Refusal::new(
                Reason::BadProof,
                "a proof was presented with a bearer token (not bound to any key)",
            )),
            (Some(jkt), None) => Err(Refusal::new(
                Reason::MissingProof,
                format!(
                    "the token is bound to proof key {jkt}: present it with a DPoP proof, not as a bearer token"
                ),
            )),
            (Some(jkt), Some(p)) => {
                let checked =
                    dpop::check_proof(p.proof, token, jkt, p.target, now, self.proof_window)?;
                // The nonce before the jti: a proof replayed to another
                // replica is refused there without being remembered.
                if let Some(nonces) = &self.nonces {
                    nonces.check(checked.nonce.as_deref(), now, self.proof_window)?;
                }
                self.seen_proofs.claim(&checked, p.exchange, now)
            }
        }
    }
}
