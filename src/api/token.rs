//! tokend.v1 TokenService: convert proto ↔ domain, call the engine, convert
//! back. Tokens are taken exactly as sent: a byte string other than the one
//! signed is not the token. No business logic here.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::status::{audited, bad_request, status, with_nonce};
use super::uds::{Callers, caller_of};
use crate::audit::{Audit, Event};
use crate::engine::{Engine, MintRequest, Presented, ProofTarget, parse_claims};
use crate::identity::{SpiffeId, TrustDomain};
use crate::proto::tokend::v1 as pb;

/// The local token service: mint, verify, exchange.
#[derive(Clone, Debug)]
pub(crate) struct TokenApi {
    engine: Arc<Engine>,
    td: TrustDomain,
    callers: Callers,
    audit: Audit,
}

impl TokenApi {
    /// The service over `engine`, audiences read in `td`, open to
    /// `callers`; every mint and exchange, and every refusal, is audited.
    pub(crate) fn new(
        engine: Arc<Engine>,
        td: TrustDomain,
        callers: Callers,
        audit: Audit,
    ) -> Self {
        Self {
            engine,
            td,
            callers,
            audit,
        }
    }

    fn audience(&self, text: &str, field: &str) -> Result<SpiffeId, Status> {
        if text.is_empty() {
            return Err(bad_request(format!("{field} is required")));
        }
        self.td
            .audience(text)
            .map_err(|e| bad_request(format!("{field}: {e}")))
    }
}

/// Half of the caller's gRPC deadline (`grpc-timeout`), if it sent one: how
/// long a verification may wait for a peer's keys and still answer in time.
pub(super) fn refresh_budget<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(d / 2)
}

/// An audience as the caller wrote it, bounded, for the audit record of a
/// call refused before it is parsed.
fn r_audience(text: &str) -> String {
    text.chars().take(256).collect()
}

fn ttl(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

/// The proof presented with a token, if any: a proof needs the method and
/// URI of its request, and those make sense only with a proof.
fn presented<'a>(
    proof: &'a str,
    method: &'a str,
    uri: &'a str,
) -> Result<Option<Presented<'a>>, Status> {
    match (proof.is_empty(), method.is_empty(), uri.is_empty()) {
        (true, true, true) => Ok(None),
        (false, false, false) => Ok(Some(Presented {
            proof,
            target: ProofTarget { method, uri },
            exchange: false,
        })),
        _ => Err(bad_request(
            "proof, method and uri go together: give all three or none",
        )),
    }
}

#[tonic::async_trait]
impl pb::token_service_server::TokenService for TokenApi {
    async fn mint(
        &self,
        req: Request<pb::MintRequest>,
    ) -> Result<Response<pb::MintResponse>, Status> {
        let mut event = Event::new("mint", caller_of(&req));
        let result = self.mint_call(req, &mut event).await;
        audited(&self.audit, event, result, true)
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let mut event = Event::new("verify", caller_of(&req));
        let result = self.verify_call(req, &mut event).await;
        audited(&self.audit, event, result, false)
    }

    async fn exchange(
        &self,
        req: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        let mut event = Event::new("exchange", caller_of(&req));
        let result = self.exchange_call(req, &mut event).await;
        audited(&self.audit, event, result, true)
    }

    async fn prove(
        &self,
        req: Request<pb::ProveRequest>,
    ) -> Result<Response<pb::ProveResponse>, Status> {
        // A proof is a signature per request: only refusals are recorded.
        let mut event = Event::new("prove", caller_of(&req));
        let result = self.prove_call(req, &mut event).await;
        audited(&self.audit, event, result, false)
    }
}

// The calls, each filling in its audit event.
impl TokenApi {
    async fn mint_call(
        &self,
        req: Request<pb::MintRequest>,
        event: &mut Event,
    ) -> Result<Response<pb::MintResponse>, Status> {
        event.iss = Some(self.engine.own().to_string());
        event.sub = event.iss.clone();
        event.aud = Some(r_audience(&req.get_ref().audience));
        self.callers.check(&req).map_err(status)?;
        let r = req.into_inner();
        let audience = self.audience(&r.audience, "audience")?.to_string();
        event.aud = Some(audience.clone());
        let request = MintRequest {
            audience: vec![audience],
            ttl: ttl(r.ttl_seconds),
            claims: parse_claims(&r.claims_json).map_err(|e| status(e.into()))?,
            one_time: r.one_time,
            bind: r.bind,
        };
        let m = self.engine.mint_off_thread(request).await.map_err(status)?;
        event.jti = Some(m.jti.clone());
        event.kid = Some(m.kid.clone());
        Ok(Response::new(pb::MintResponse {
            token: m.token,
            kid: m.kid,
            expires_at: m.expires_at.as_secs(),
            jti: m.jti,
            jkt: m.jkt.unwrap_or_default(),
        }))
    }

    async fn verify_call(
        &self,
        req: Request<pb::VerifyRequest>,
        event: &mut Event,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let allowed = self.callers.check(&req).map_err(status);
        let wait = refresh_budget(&req);
        let r = req.into_inner();
        let result = match allowed {
            Ok(()) => self.verify_checked(&r, wait).await,
            Err(e) => Err(e),
        };
        // Only a refusal is recorded: what the token claimed and the
        // audience are noted then, not on every successful verification.
        if result.is_err() {
            event.claimed(&r.token);
            event.aud = Some(match r.audience.as_str() {
                "" => self.engine.own().to_string(),
                text => r_audience(text),
            });
        }
        result
    }

    /// `verify_call` once the caller is allowed.
    async fn verify_checked(
        &self,
        r: &pb::VerifyRequest,
        wait: Option<Duration>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let named;
        let aud = if r.audience.is_empty() {
            self.engine.own().as_str()
        } else {
            named = self.audience(&r.audience, "audience")?;
            named.as_str()
        };
        if r.token.is_empty() {
            return Err(bad_request("token is empty"));
        }
        let proof = presented(&r.proof, &r.method, &r.uri)?;
        let v = self
            .engine
            .verify_proven(&r.token, aud, wait, proof.as_ref())
            .await
            .map_err(|r| with_nonce(status(r), || self.engine.fresh_nonce()))?;
        // The next nonce rides on a proven success (RFC 9449 §8.2), so the
        // client's next proof needs no refusal first.
        let dpop_nonce = match proof {
            Some(_) => self.engine.fresh_nonce().unwrap_or_default(),
            None => String::new(),
        };
        Ok(Response::new(pb::VerifyResponse {
            issuer: v.issuer.clone(),
            subject: v.subject.clone(),
            claims_json: v.claims_json().to_owned(),
            kid: v.kid.clone(),
            expires_at: v.expires_at.as_secs(),
            dpop_nonce,
        }))
    }

    async fn exchange_call(
        &self,
        req: Request<pb::ExchangeRequest>,
        event: &mut Event,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        event.claimed(&req.get_ref().token);
        event.aud = Some(r_audience(&req.get_ref().audience));
        self.callers.check(&req).map_err(status)?;
        let wait = refresh_budget(&req);
        let r = req.into_inner();
        let aud = self.audience(&r.audience, "audience")?;
        event.aud = Some(aud.to_string());
        if r.token.is_empty() {
            return Err(bad_request("token is empty"));
        }
        let proof = presented(&r.proof, &r.method, &r.uri)?;
        let proven = proof.is_some();
        let m = self
            .engine
            .exchange_proven(&r.token, &aud, ttl(r.ttl_seconds), wait, proof, r.bind)
            .await
            .map_err(|r| with_nonce(status(r), || self.engine.fresh_nonce()))?;
        // The new token's issuer and ids; sub stays the inbound token's.
        event.iss = Some(self.engine.own().to_string());
        event.jti = Some(m.jti.clone());
        event.kid = Some(m.kid.clone());
        Ok(Response::new(pb::ExchangeResponse {
            token: m.token,
            kid: m.kid,
            expires_at: m.expires_at.as_secs(),
            jti: m.jti,
            jkt: m.jkt.unwrap_or_default(),
            dpop_nonce: if proven {
                self.engine.fresh_nonce().unwrap_or_default()
            } else {
                String::new()
            },
        }))
    }

    async fn prove_call(
        &self,
        req: Request<pb::ProveRequest>,
        event: &mut Event,
    ) -> Result<Response<pb::ProveResponse>, Status> {
        event.claimed(&req.get_ref().token);
        self.callers.check(&req).map_err(status)?;
        let r = req.into_inner();
        if r.token.is_empty() || r.method.is_empty() || r.uri.is_empty() {
            return Err(bad_request("token, method and uri are all required"));
        }
        let nonce = (!r.nonce.is_empty()).then_some(r.nonce.as_str());
        let proof = self
            .engine
            .prove_with_nonce(&r.token, &r.method, &r.uri, nonce)
            .map_err(status)?;
        Ok(Response::new(pb::ProveResponse { proof }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refresh budget is half the caller's deadline, in every unit gRPC
    /// allows; a missing or garbled header leaves the engine's own bound.
    #[test]
    fn refresh_budget_is_half_the_deadline() {
        let req = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("grpc-timeout", v.parse().expect("ascii"));
            r
        };
        assert_eq!(refresh_budget(&req("2S")), Some(Duration::from_secs(1)));
        assert_eq!(
            refresh_budget(&req("300m")),
            Some(Duration::from_millis(150))
        );
        assert_eq!(refresh_budget(&req("1H")), Some(Duration::from_secs(1800)));
        assert_eq!(refresh_budget(&req("10u")), Some(Duration::from_micros(5)));
        for bad in ["", "S", "5x", "-1S", "99999999999999999999S"] {
            assert_eq!(refresh_budget(&req(bad)), None, "{bad:?}");
        }
        assert_eq!(refresh_budget(&Request::new(())), None);
    }
}
