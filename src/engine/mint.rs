//! Minting: builds the claims (the registered ones are ours; caller claims can
//! never set or override them), signs with the key active at `now` through
//! jsonwebtoken and the ring provider, and reuses a cached token for the same
//! request while it is still well inside its life. No network, no disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SecureRandom;
use serde_json::{Map, Value};

use crate::identity::SpiffeId;
use crate::jose::{BOUND_KID_SUFFIX, MAX_CLAIMS_LEN, MAX_TOKEN_LEN, REGISTERED_CLAIMS};
use crate::keys::{KeySet, KeyView, SigningKey};
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

const CACHE_CAPACITY: usize = 4096;

/// Why a mint was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    /// Caller claims tried to set a registered claim.
    #[error("claim {0:?} is set by tokend and cannot be given by the caller")]
    ReservedClaim(String),
    /// Caller claims are not a JSON object, repeat a member name, nest too
    /// deep or are too large.
    #[error("caller claims: {0}")]
    BadClaims(String),
    /// Requested ttl over max_ttl.
    #[error("requested ttl {}s exceeds max_ttl {}s", requested.as_secs(), max.as_secs())]
    TtlTooLong {
        /// Asked for.
        requested: Duration,
        /// Allowed.
        max: Duration,
    },
    /// The token would be larger than verifiers accept.
    #[error("token would be {0} bytes, over the {MAX_TOKEN_LEN}-byte limit verifiers accept")]
    TooLarge(usize),
    /// No active signing key.
    #[error("no active signing key")]
    NoKey,
    /// No active bound-token signing key (`keys_dir/bound/`).
    #[error("no active signing key for bound tokens")]
    NoBoundKey,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

impl MintError {
    /// The reason code clients see.
    pub fn reason(&self) -> Reason {
        match self {
            MintError::ReservedClaim(_) | MintError::BadClaims(_) | MintError::TooLarge(_) => {
                Reason::Malformed
            }
            MintError::TtlTooLong { .. } => Reason::LifetimeTooLong,
            MintError::NoKey | MintError::NoBoundKey | MintError::Sign(_) => Reason::Unavailable,
        }
    }
}

impl From<MintError> for Refusal {
    fn from(e: MintError) -> Self {
        Refusal::new(e.reason(), e.to_string())
    }
}

/// A mint request, already validated at the API edge.
#[derive(Debug, Clone)]
pub struct MintRequest {
    /// Who the token is for.
    pub audience: Vec<String>,
    /// Lifetime; `None` for the default.
    pub ttl: Option<Duration>,
    /// Caller claims.
    pub claims: Map<String, Value>,
    /// Accept-once token (never cached).
    pub one_time: bool,
    /// A bound token: `cnf.jkt` names this instance's proof key, and every
    /// use needs a DPoP proof signed by it.
    pub bind: bool,
}

/// What a delegated token carries besides the registered claims.
#[derive(Debug, Clone)]
pub(crate) struct Delegation {
    /// The original subject.
    pub subject: String,
    /// The `act` claim: this sidecar as actor, with the exchanged token.
    pub act: Value,
    /// The exchanged token's own claims; registered ones are dropped.
    pub carried: Map<String, Value>,
    /// The exchanged token's expiry: the delegated token never outlives it.
    pub not_after: UnixTime,
    /// The exchanged token was one-time: so is the delegated one.
    pub one_time: bool,
}

/// A minted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// Compact JWS.
    pub token: String,
    /// Signing key.
    pub kid: String,
    /// Issued at.
    pub issued_at: UnixTime,
    /// Expiry.
    pub expires_at: UnixTime,
    /// Token id.
    pub jti: String,
    /// For a bound token, the thumbprint of its proof key (`cnf.jkt`).
    pub jkt: Option<String>,
}

/// Lifetime limits.
#[derive(Clone, Copy, Debug)]
pub struct MintPolicy {
    /// Lifetime when none is asked for.
    pub default_ttl: Duration,
    /// Longest lifetime granted.
    pub max_ttl: Duration,
}

/// What a cached token was minted for: every part of a request that shapes
/// the token, kept as values (never joined into one string, which could
/// make two requests collide).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    audience: Vec<String>,
    ttl: Duration,
    claims: String,
    /// The proof key a bound token names; `None` for a bearer token.
    cnf: Option<String>,
}

impl CacheKey {
    fn of(req: &MintRequest, ttl: Duration, cnf: Option<&str>) -> Self {
        Self {
            audience: req.audience.clone(),
            ttl,
            claims: serde_json::Value::Object(req.claims.clone()).to_string(),
            cnf: cnf.map(str::to_owned),
        }
    }
}

/// The `cnf` claim binding a token to the proof key `jkt` (RFC 7800 §3.1,
/// RFC 9449 §6.1).
fn confirmation(jkt: &str) -> Value {
    let mut cnf = Map::new();
    cnf.insert("jkt".into(), jkt.into());
    Value::Object(cnf)
}

/// Mints tokens for this sidecar's identity: bearer tokens with the
/// signing keys, bound tokens (`cnf`) with the bound keys only.
pub(crate) struct Minter {
    issuer: SpiffeId,
    keys: KeyView,
    bound: KeyView,
    policy: MintPolicy,
    cache: Mutex<HashMap<CacheKey, Minted>>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Parses caller claims text (empty means none) into a JSON object, bounded
/// in size and depth, refusing duplicate member names at any depth.
pub(crate) fn parse_claims(text: &str) -> Result<Map<String, Value>, MintError> {
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    if text.len() > MAX_CLAIMS_LEN {
        return Err(MintError::BadClaims(format!(
            "{} bytes, over the {MAX_CLAIMS_LEN}-byte limit",
            text.len()
        )));
    }
    // Strict: a duplicated name (`{"role":"teller","role":"admin"}`) is refused
    // rather than read last-wins, and so is nesting no verifier accepts.
    let map = crate::jose::parse_object(text.as_bytes())
        .map_err(|e| MintError::BadClaims(e.to_string()))?;
    // Registered names are refused by `Minter::mint`, the one place that decides.
    Ok(map)
}

fn new_jti() -> Result<String, MintError> {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| MintError::Sign("no randomness for jti".into()))?;
    Ok(B64.encode(b))
}

// === impl Minter ===

impl Minter {
    /// A minter signing as `issuer` with keys from `keys`, and bound tokens
    /// with keys from `bound`.
    pub(crate) fn new(issuer: SpiffeId, keys: KeyView, bound: KeyView, policy: MintPolicy) -> Self {
        Self {
            issuer,
            keys,
            bound,
            policy,
            cache: Mutex::default(),
        }
    }

    /// The snapshot of the class a token bound to `cnf` (or a bearer
    /// token) is signed with, and why there may be no key in it.
    fn class_for(&self, cnf: Option<&str>) -> (Arc<KeySet>, MintError) {
        match cnf {
            None => (self.keys.current(), MintError::NoKey),
            Some(_) => (self.bound.current(), MintError::NoBoundKey),
        }
    }

    /// The lifetime limits.
    pub(crate) fn policy(&self) -> MintPolicy {
        self.policy
    }

    fn check_ttl(&self, ttl: Option<Duration>) -> Result<Duration, MintError> {
        let ttl = ttl.unwrap_or(self.policy.default_ttl);
        if ttl > self.policy.max_ttl {
            return Err(MintError::TtlTooLong {
                requested: ttl,
                max: self.policy.max_ttl,
            });
        }
        if ttl.as_secs() == 0 {
            return Err(MintError::BadClaims(
                "ttl must be at least one second".into(),
            ));
        }
        Ok(ttl)
    }

    /// The cached token for `req` (bound to `cnf`, if given), if one is
    /// still well inside its life: the cheap half of `mint`, which never signs.
    pub(crate) fn cached(
        &self,
        req: &MintRequest,
        now: UnixTime,
        cnf: Option<&str>,
    ) -> Result<Option<Minted>, MintError> {
        if req.one_time {
            return Ok(None);
        }
        let ttl = self.check_ttl(req.ttl)?;
        let (set, none) = self.class_for(cnf);
        let key = set.signing_key(now).ok_or(none)?;
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        Ok(cache
            .get(&CacheKey::of(req, ttl, cnf))
            .filter(|m| {
                m.kid == key.kid() && now >= m.issued_at && now.since(m.issued_at) * 2 < ttl
            })
            .cloned()
            .inspect(|_| metrics::counter!("tokend_mint_total", "cached" => "true").increment(1)))
    }

    /// Mints (or reuses) a token at `now`; `cnf` binds it to that proof key.
    pub(crate) fn mint(
        &self,
        req: &MintRequest,
        now: UnixTime,
        cnf: Option<&str>,
    ) -> Result<Minted, MintError> {
        if let Some(k) = req
            .claims
            .keys()
            .find(|k| REGISTERED_CLAIMS.contains(&k.as_str()))
        {
            return Err(MintError::ReservedClaim(k.clone()));
        }
        if let Some(m) = self.cached(req, now, cnf)? {
            return Ok(m);
        }
        let ttl = self.check_ttl(req.ttl)?;
        let (set, none) = self.class_for(cnf);
        let key = set.signing_key(now).ok_or(none)?;
        let mut claims = req.claims.clone();
        if req.one_time {
            claims.insert("one_time".into(), true.into());
        }
        if let Some(jkt) = cnf {
            claims.insert("cnf".into(), confirmation(jkt));
        }
        let subject = self.issuer.as_str().to_owned();
        let minted = self.issue(claims, &req.audience, &subject, ttl, now, key)?;
        metrics::counter!("tokend_mint_total", "cached" => "false").increment(1);
        if !req.one_time {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_CAPACITY {
                cache.retain(|_, m| m.expires_at > now);
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(CacheKey::of(req, ttl, cnf), minted.clone());
        }
        Ok(minted)
    }

    /// Mints a delegated token (RFC 8693) to `audience`. The lifetime is
    /// `ttl` (default if `None`) but never past `delegation.not_after`;
    /// `cnf` binds it to that proof key. Never cached.
    pub(crate) fn mint_delegated(
        &self,
        audience: &SpiffeId,
        delegation: Delegation,
        ttl: Option<Duration>,
        now: UnixTime,
        cnf: Option<&str>,
    ) -> Result<Minted, MintError> {
        let Delegation {
            subject,
            act,
            carried,
            not_after,
            one_time,
        } = delegation;
        let ttl = self.check_ttl(ttl)?.min(not_after.since(now));
        if ttl.is_zero() {
            return Err(MintError::BadClaims(
                "the exchanged token expires now".into(),
            ));
        }
        let (set, none) = self.class_for(cnf);
        let key = set.signing_key(now).ok_or(none)?;
        let mut claims: Map<String, Value> = carried
            .into_iter()
            .filter(|(k, _)| !REGISTERED_CLAIMS.contains(&k.as_str()))
            .collect();
        claims.insert("act".into(), act);
        if one_time {
            claims.insert("one_time".into(), true.into());
        }
        if let Some(jkt) = cnf {
            claims.insert("cnf".into(), confirmation(jkt));
        }
        let minted = self.issue(claims, &[audience.to_string()], &subject, ttl, now, key)?;
        Ok(minted)
    }

    /// Adds the registered claims (ours alone) and signs.
    fn issue(
        &self,
        mut claims: Map<String, Value>,
        audience: &[String],
        subject: &str,
        ttl: Duration,
        now: UnixTime,
        key: &SigningKey,
    ) -> Result<Minted, MintError> {
        let jti = new_jti()?;
        let exp = now + ttl;
        claims.insert("iss".into(), self.issuer.as_str().into());
        claims.insert("sub".into(), subject.into());
        if audience.is_empty() {
            return Err(MintError::BadClaims(
                "at least one audience is required".into(),
            ));
        }
        let aud = match audience {
            [one] => Value::String(one.clone()),
            many => Value::Array(many.iter().cloned().map(Value::String).collect()),
        };
        claims.insert("aud".into(), aud);
        claims.insert("iat".into(), now.as_secs().into());
        claims.insert("nbf".into(), now.as_secs().into());
        claims.insert("exp".into(), exp.as_secs().into());
        claims.insert("jti".into(), jti.clone().into());
        // A bound token is signed by a bound key (published to tokend
        // verifiers only), and its kid carries the suffix too, so a bearer
        // verifier that selects keys by kid refuses it without a lookup.
        let header_kid = if claims.contains_key("cnf") {
            format!("{}{BOUND_KID_SUFFIX}", key.kid())
        } else {
            key.kid().to_owned()
        };
        let token = self.sign(&claims, &header_kid, key.encoding_key())?;
        if token.len() > MAX_TOKEN_LEN {
            return Err(MintError::TooLarge(token.len()));
        }
        let jkt = claims
            .get("cnf")
            .and_then(|c| c.get("jkt"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Minted {
            token,
            kid: key.kid().to_owned(),
            issued_at: now,
            expires_at: exp,
            jti,
            jkt,
        })
    }

    /// Signs claims as-is with the given key.
    fn sign(
        &self,
        claims: &Map<String, Value>,
        kid: &str,
        key: &jsonwebtoken::EncodingKey,
    ) -> Result<String, MintError> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.typ = Some("JWT".into());
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, key).map_err(|e| MintError::Sign(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyStore, Lifecycle};
    use crate::time::ManualClock;

    /// Caller claims are read strictly: a repeated name (at any depth) and
    /// nesting past 32 are refused, naming the problem.
    #[test]
    fn caller_claims_are_strict() {
        let e = parse_claims(r#"{"role":"teller","role":"admin"}"#).expect_err("dup");
        assert_eq!(e.to_string(), "caller claims: duplicate member \"role\"");
        assert_eq!(e.reason(), Reason::Malformed);
        let e = parse_claims(r#"{"ctx":{"role":"a","role":"b"}}"#).expect_err("dup");
        assert_eq!(
            e.to_string(),
            "caller claims: duplicate member \"role\" in /ctx"
        );
        let deep = |d: usize| format!("{}1{}", r#"{"a":"#.repeat(d), "}".repeat(d));
        parse_claims(&deep(32)).expect("32 deep");
        let e = parse_claims(&deep(33)).expect_err("33 deep");
        assert_eq!(e.to_string(), "caller claims: nested deeper than 32 levels");
        assert_eq!(
            parse_claims("[1]").expect_err("array").to_string(),
            "caller claims: not a JSON object"
        );
        assert!(
            parse_claims("{")
                .expect_err("not json")
                .to_string()
                .starts_with("caller claims: not JSON: ")
        );
    }

    /// `["cards\0ledger"]` and `["cards","ledger"]` are different requests:
    /// each gets its own token, while a repeated request reuses its own.
    #[tokio::test]
    async fn cache_key_does_not_collide() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = UnixTime::from_secs;
        let clock = ManualClock::at(t(1_000));
        let lc = Lifecycle {
            interval: Duration::from_secs(86_400),
            publish_ahead: Duration::from_secs(60),
            grace: Duration::from_secs(3_600),
        };
        let (mut store, view) = KeyStore::open(dir.path(), lc, 2048, Arc::new(clock))
            .await
            .expect("keys");
        store.apply_plan(t(1_000)).await.expect("first key");
        let issuer = SpiffeId::parse("spiffe://td/payments").expect("id");
        let minter = Minter::new(
            issuer,
            view,
            KeyView::empty(lc),
            MintPolicy {
                default_ttl: Duration::from_secs(300),
                max_ttl: Duration::from_secs(3_600),
            },
        );
        let req = |aud: &[&str]| MintRequest {
            audience: aud.iter().map(|a| a.to_string()).collect(),
            ttl: None,
            claims: Map::new(),
            one_time: false,
            bind: false,
        };
        let joined = minter
            .mint(&req(&["cards\0ledger"]), t(1_000), None)
            .expect("mint");
        let list = minter
            .mint(&req(&["cards", "ledger"]), t(1_000), None)
            .expect("mint");
        assert_ne!(joined.token, list.token);
        let aud = |t: &str| -> Value {
            let p = t.split('.').nth(1).expect("payload");
            serde_json::from_slice::<Value>(&B64.decode(p).expect("b64")).expect("json")["aud"]
                .clone()
        };
        assert_eq!(aud(&joined.token), Value::from("cards\0ledger"));
        assert_eq!(aud(&list.token), serde_json::json!(["cards", "ledger"]));
        let again = minter
            .mint(&req(&["cards", "ledger"]), t(1_001), None)
            .expect("mint");
        assert_eq!(
            again.token, list.token,
            "a repeated request is served from the cache"
        );
    }
}
