//! Proof of possession (RFC 9449 DPoP) for bound tokens. A bound token
//! names a proof key by its thumbprint (`cnf.jkt`); each request carries a
//! fresh proof JWT signed by that key, which never leaves the sidecar that
//! minted the token. `make_proof` writes one; `check_proof` is the pure
//! decision of RFC 9449 §4.3 at an explicit `now`: structure, `typ`, ES256
//! only, a public `jwk` whose thumbprint is the token's `cnf.jkt`, the
//! signature, `htm`/`htu` against the request, `ath` against the token,
//! `iat` within the window. `SeenProofs` then refuses a `jti` seen before
//! within that window: a bounded cache local to this verifier (never a
//! consensus write per request). Every refusal is `bad_proof`, naming what
//! is wrong; a bound token with no proof at all is `missing_proof`. Where
//! a verifier requires server nonces (`nonce`), a proof without one of
//! this replica's is `use_dpop_nonce`.

mod htu;
mod nonce;
#[cfg(test)]
mod tests;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SecureRandom;
use serde_json::{Map, Value};

pub(crate) use self::htu::check_authority;
use self::htu::normalise as normalise_htu;
pub(crate) use self::nonce::{Nonces, is_nonce_syntax};
use super::replay::{MemoryReplay, OneTimeId};
use crate::jose::{self, EcPublicKey, MAX_JTI_LEN, ProofKey, int_claim};
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// The `typ` of a DPoP proof (RFC 9449 §4.2).
pub(crate) const PROOF_TYPE: &str = "dpop+jwt";
/// How far a proof's `iat` may lie from `now` by default, either way.
pub(crate) const DEFAULT_PROOF_WINDOW: Duration = Duration::from_secs(30);
/// Proof ids remembered at most per proof key.
pub(crate) const SEEN_PER_KEY: usize = 100_000;

/// The request a proof must be for: its HTTP method and target URI (for a
/// gRPC call, `POST` and `https://authority/package.Service/Method`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProofTarget<'a> {
    /// The HTTP method, e.g. `POST`.
    pub(crate) method: &'a str,
    /// The target URI; query and fragment are ignored.
    pub(crate) uri: &'a str,
}

/// A proof presented with a token: the proof, the request it must be for,
/// and whether it is presented to an exchange (a received proof may be
/// exchanged once besides its one verification).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Presented<'a> {
    /// The compact proof JWT.
    pub(crate) proof: &'a str,
    /// The request it must be for.
    pub(crate) target: ProofTarget<'a>,
    /// Presented to Exchange rather than Verify.
    pub(crate) exchange: bool,
}

/// A proof that passed `check_proof`: what remains is its replay check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckedProof {
    /// The proof key's thumbprint.
    pub(crate) jkt: String,
    /// The proof's `jti`.
    pub(crate) jti: String,
    /// Until when the proof could be accepted, so its `jti` must be remembered.
    pub(crate) forget_at: UnixTime,
    /// The proof's `nonce` claim (RFC 9449 §8), if it has one.
    pub(crate) nonce: Option<String>,
}

/// `ath`: base64url of the SHA-256 of the token's ASCII bytes.
pub(crate) fn token_hash(token: &str) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn refuse<T>(detail: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(Reason::BadProof, detail))
}

/// A DPoP proof for one request with `token`, signed by `key` at `now`:
/// header `typ`, `alg: ES256`, the public `jwk`; claims `jti` (128 random
/// bits), `htm`, `htu` (without query and fragment), `iat`, `ath`, and the
/// verifier's `nonce` when one is given (RFC 9449 §8–9).
pub(crate) fn make_proof(
    key: &ProofKey,
    target: ProofTarget<'_>,
    token: &str,
    nonce: Option<&str>,
    now: UnixTime,
) -> Result<String, Refusal> {
    if let Some(n) = nonce
        && !is_nonce_syntax(n)
    {
        return Err(Refusal::new(
            Reason::Malformed,
            "nonce is not an RFC 9449 nonce (1 to 512 printable ASCII characters, no space, \" or \\)",
        ));
    }
    if target.method.is_empty() || !target.method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(Refusal::new(
            Reason::Malformed,
            format!("method {:?} is not an HTTP method", target.method),
        ));
    }
    let htu = normalise_htu(target.uri).map_err(|e| Refusal::new(Reason::Malformed, e))?;
    let mut jti = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut jti)
        .map_err(|_| Refusal::new(Reason::Unavailable, "no randomness for a proof jti"))?;
    let mut header = Map::new();
    header.insert("typ".into(), PROOF_TYPE.into());
    header.insert("alg".into(), "ES256".into());
    header.insert("jwk".into(), Value::Object(key.public_jwk()));
    let mut claims = Map::new();
    claims.insert("jti".into(), B64.encode(jti).into());
    claims.insert("htm".into(), target.method.to_ascii_uppercase().into());
    claims.insert("htu".into(), htu.into());
    claims.insert("iat".into(), now.as_secs().into());
    claims.insert("ath".into(), token_hash(token).into());
    if let Some(n) = nonce {
        claims.insert("nonce".into(), n.into());
    }
    let input = format!(
        "{}.{}",
        B64.encode(Value::Object(header).to_string()),
        B64.encode(Value::Object(claims).to_string())
    );
    let signature = key
        .sign(input.as_bytes())
        .map_err(|e| Refusal::new(Reason::Unavailable, format!("cannot sign a proof: {e}")))?;
    Ok(format!("{input}.{signature}"))
}

/// The checks of RFC 9449 §4.3 on `proof`, presented with the bound `token`
/// whose `cnf.jkt` is `jkt`, for the request `target`, at `now`. Pure; the
/// `jti` replay check is `SeenProofs::claim` on the result.
pub(crate) fn check_proof(
    proof: &str,
    token: &str,
    jkt: &str,
    target: ProofTarget<'_>,
    now: UnixTime,
    window: Duration,
) -> Result<CheckedProof, Refusal> {
    let parts = jose::parse(proof).map_err(|r| Refusal::new(Reason::BadProof, r.detail))?;
    // typ first: a token or any other JWS is not a proof, whatever it signs.
    match parts.header.get("typ").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case(PROOF_TYPE) => {}
        _ => return refuse(format!("header typ is not {PROOF_TYPE}")),
    }
    // ES256 only: never none, an HMAC (a shared secret proves nothing), or
    // another algorithm tokend does not sign proofs with.
    if parts.alg != "ES256" {
        return refuse(format!(
            "proof alg {:?} is not accepted; only ES256",
            parts.alg
        ));
    }
    if parts.header.contains_key("crit") {
        return refuse("header has crit extensions tokend does not implement");
    }
    let Some(Value::Object(jwk)) = parts.header.get("jwk") else {
        return refuse("header jwk (the proof key) is missing or not an object");
    };
    let key =
        EcPublicKey::from_jwk(jwk).map_err(|e| Refusal::new(Reason::BadProof, e.to_string()))?;
    if !key.verify(parts.signing_input.as_bytes(), parts.signature) {
        return refuse("signature does not verify under the proof's jwk");
    }
    // The key that signed must be the one the token is bound to.
    let thumbprint = key.thumbprint();
    if thumbprint != jkt {
        return refuse(format!(
            "proof key {thumbprint} is not the key {jkt} the token is bound to"
        ));
    }
    let Ok(claims) = parts.claims else {
        return refuse("payload is not a JSON object");
    };
    let string = |name: &str| -> Result<&str, Refusal> {
        match claims.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => refuse(format!("claim {name} is not a string")),
            None => refuse(format!("claim {name} is missing")),
        }
    };
    let jti = string("jti")?;
    if jti.is_empty() || jti.len() > MAX_JTI_LEN {
        return refuse(format!("claim jti must be 1 to {MAX_JTI_LEN} bytes"));
    }
    let htm = string("htm")?;
    if htm != target.method.to_ascii_uppercase() {
        return refuse(format!(
            "proof is for method {htm}, the request is {}",
            target.method
        ));
    }
    let htu = normalise_htu(string("htu")?).map_err(|e| Refusal::new(Reason::BadProof, e))?;
    let want = normalise_htu(target.uri).map_err(|e| Refusal::new(Reason::Malformed, e))?;
    if htu != want {
        return refuse(format!("proof is for {htu}, the request is for {want}"));
    }
    let iat = int_claim(&claims, "iat")
        .map_err(|r| Refusal::new(Reason::BadProof, r.detail))?
        .map(UnixTime::from_secs);
    let Some(iat) = iat else {
        return refuse("claim iat is missing");
    };
    if now > iat + window {
        return refuse(format!(
            "proof made at {iat} is older than the {}s window (now {now})",
            window.as_secs()
        ));
    }
    if iat > now + window {
        return refuse(format!(
            "proof made at {iat} lies more than {}s ahead (now {now})",
            window.as_secs()
        ));
    }
    if string("ath")? != token_hash(token) {
        return refuse("claim ath is the hash of another token");
    }
    // Whether a nonce is required, and whose, is the verifier's to say
    // (`Nonces::check`); here only its type.
    let nonce = match claims.get("nonce") {
        None => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => return refuse("claim nonce is not a string"),
    };
    Ok(CheckedProof {
        jkt: thumbprint,
        jti: jti.to_owned(),
        forget_at: iat + window + Duration::from_secs(1),
        nonce,
    })
}

/// The `cnf.jkt` of a token's claims: `Ok(None)` for a bearer token, an
/// error if `cnf` is there but not a thumbprint confirmation.
pub(crate) fn bound_key(claims: &Map<String, Value>) -> Result<Option<&str>, Refusal> {
    match claims.get("cnf") {
        None => Ok(None),
        Some(Value::Object(cnf)) => match cnf.get("jkt") {
            Some(Value::String(jkt)) if !jkt.is_empty() => Ok(Some(jkt)),
            _ => Err(Refusal::new(
                Reason::Malformed,
                "claim cnf has no jkt: tokend binds tokens only by key thumbprint",
            )),
        },
        Some(_) => Err(Refusal::new(
            Reason::Malformed,
            "claim cnf is not an object",
        )),
    }
}

/// Proof ids seen by this verifier, each remembered until its proof falls
/// out of the window: bounded per proof key, local, in memory.
#[derive(Debug)]
pub(crate) struct SeenProofs(MemoryReplay);

impl Default for SeenProofs {
    fn default() -> Self {
        Self(MemoryReplay::new(SEEN_PER_KEY))
    }
}

// === impl SeenProofs ===

impl SeenProofs {
    /// Records `proof`'s `jti` at `now` (for an exchange, or a request):
    /// `bad_proof` if it was seen before for the same use.
    pub(crate) fn claim(
        &self,
        proof: &CheckedProof,
        exchange: bool,
        now: UnixTime,
    ) -> Result<(), Refusal> {
        let use_ = if exchange { "exchange" } else { "request" };
        let id = OneTimeId {
            issuer: format!("dpop {use_} {}", proof.jkt),
            jti: proof.jti.clone(),
            forget_at: proof.forget_at,
        };
        self.0
            .claim_now(std::slice::from_ref(&id), now)
            .map_err(|r| match r.reason {
                Reason::Replayed => Refusal::new(
                    Reason::BadProof,
                    format!("proof {} was already used (replayed proof)", proof.jti),
                ),
                _ => r,
            })
    }
}
