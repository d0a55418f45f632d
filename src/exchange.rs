//! Token exchange (RFC 8693 delegation): verify the token this service
//! received (it must be for this sidecar), then mint a token to the next
//! service that keeps the original subject and records the chain in `act`,
//! with the received token embedded so every link stays verifiable. Composes
//! `verify` and `mint` only.

use serde_json::{Map, Value};

use crate::identity::SpiffeId;
use crate::mint::{Delegation, MintError, Minted, Minter};
use crate::reason::Reason;
use crate::verify::{self, MAX_DELEGATION_DEPTH, MAX_TOKEN_LEN, PREV_TOKEN, Verifier, chain_depth};

/// Why an exchange was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The received token did not verify.
    #[error("received token: {0}")]
    Inbound(verify::Error),
    /// The chain would grow past the limit.
    #[error("delegation chain would exceed {MAX_DELEGATION_DEPTH} links")]
    TooDeep,
    /// The delegated token would be refused by verifiers for its size.
    #[error(
        "delegated token would be {0} bytes, over the {MAX_TOKEN_LEN}-byte limit verifiers accept"
    )]
    TooLarge(usize),
    /// Minting the delegated token failed.
    #[error(transparent)]
    Mint(#[from] MintError),
}

impl ExchangeError {
    /// The reason code clients see.
    pub fn reason(&self) -> Reason {
        match self {
            ExchangeError::Inbound(e) => e.reason,
            ExchangeError::TooDeep | ExchangeError::TooLarge(_) => Reason::PermissionDenied,
            ExchangeError::Mint(e) => e.reason(),
        }
    }
}

/// Exchanges `token` (addressed to this sidecar) for a delegated token to `audience`.
pub async fn exchange(
    minter: &Minter,
    verifier: &Verifier,
    token: &str,
    audience: &SpiffeId,
    ttl: Option<u64>,
    now: i64,
) -> Result<Minted, ExchangeError> {
    let inbound = verifier
        .verify(token, verifier.own().as_str(), now)
        .await
        .map_err(ExchangeError::Inbound)?;
    if chain_depth(&inbound.claims) + 1 > MAX_DELEGATION_DEPTH {
        return Err(ExchangeError::TooDeep);
    }
    let mut act = Map::new();
    act.insert("sub".into(), Value::String(minter.issuer().to_string()));
    act.insert(PREV_TOKEN.into(), Value::String(token.to_owned()));
    let delegation = Delegation {
        subject: inbound.subject,
        act: Value::Object(act),
        carried: inbound.claims,
        not_after: inbound.expires_at,
    };
    let minted = minter.mint_delegated(audience, delegation, ttl, now)?;
    if minted.token.len() > MAX_TOKEN_LEN {
        return Err(ExchangeError::TooLarge(minted.token.len()));
    }
    Ok(minted)
}
