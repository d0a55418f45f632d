//! Authorization of a verified token, as Envoy's external authorization
//! asks it per route: which issuers may call (the token's `iss`, the
//! immediate caller: the principal Envoy RBAC and Istio's
//! AuthorizationPolicy decide by) and which claims the token must carry;
//! and which verified claims go upstream as request headers. Pure: rules
//! are parsed from text (the config or a route's `context_extensions`) and
//! applied to a `Verified`. The raw token, and the `act` object that embeds
//! the previous link's token, can never be a header.

use std::fmt;

use serde_json::Value;

use super::verify::Verified;
use crate::identity::{SpiffeId, TrustDomain};
use crate::reason::{Reason, Refusal};

/// Longest claim value passed upstream as a header; a longer one is left out.
const MAX_HEADER_VALUE: usize = 1024;

/// One required claim: present (`role`), or equal to a value (`role=teller`),
/// which for an array claim means containing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRule {
    name: String,
    value: Option<String>,
}

impl ClaimRule {
    /// Parses `name` or `name=value` (no whitespace around either part).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, value) = match text.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (text, None),
        };
        let bad = |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == ',');
        if bad(name) {
            return Err(format!(
                "{text:?}: write a claim as name or name=value (no spaces, no commas)"
            ));
        }
        if value.is_some_and(bad) {
            return Err(format!(
                "{text:?}: the value after = is empty or has a space or comma (write {name} alone to require presence)"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            value: value.map(str::to_owned),
        })
    }

    /// Parses a comma-separated list (an empty text is no rule).
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Self::parse)
            .collect()
    }

    fn holds(&self, claims: &serde_json::Map<String, Value>) -> bool {
        let Some(claim) = claims.get(&self.name) else {
            return false;
        };
        let Some(want) = &self.value else {
            return !claim.is_null();
        };
        match claim {
            Value::Array(items) => items.iter().any(|i| scalar(i).as_deref() == Some(want)),
            other => scalar(other).as_deref() == Some(want),
        }
    }
}

impl fmt::Display for ClaimRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A string, number or boolean claim as text; anything else is `None`.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses allowed issuers: service names of `td` or SPIFFE IDs, one per item.
pub(crate) fn parse_issuers<'a>(
    items: impl IntoIterator<Item = &'a str>,
    td: &TrustDomain,
) -> Result<Vec<SpiffeId>, String> {
    let mut out: Vec<SpiffeId> = Vec::new();
    for item in items {
        let id = td.audience(item).map_err(|e| format!("{item:?}: {e}"))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    if out.is_empty() {
        return Err("no issuer listed (write \"*\" for every issuer this sidecar trusts)".into());
    }
    Ok(out)
}

/// Who may call a route, and with which claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessRules {
    /// Issuers allowed; `None`: every issuer this sidecar trusts.
    pub issuers: Option<Vec<SpiffeId>>,
    /// Claims every token must carry.
    pub claims: Vec<ClaimRule>,
}

impl AccessRules {
    /// `Ok` if `v` may pass; else `permission_denied`, naming the rule.
    pub fn check(&self, v: &Verified) -> Result<(), Refusal> {
        if let Some(issuers) = &self.issuers
            && !issuers.iter().any(|i| i.as_str() == v.issuer)
        {
            return Err(Refusal::new(
                Reason::PermissionDenied,
                format!("issuer {} is not allowed on this route", v.issuer),
            ));
        }
        if let Some(rule) = self.claims.iter().find(|r| !r.holds(&v.claims)) {
            return Err(Refusal::new(
                Reason::PermissionDenied,
                format!("required claim {rule} is not in the token"),
            ));
        }
        Ok(())
    }
}

/// Where a header's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderClaim {
    /// The current actor of a delegated token (`act.sub`).
    Actor,
    /// A top-level claim (a string, number or boolean).
    Claim(String),
}

/// A verified claim passed upstream as a request header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimHeader {
    /// The header name, lower case.
    pub header: String,
    /// Its value's source.
    pub claim: HeaderClaim,
}

/// Headers a client must never set nor a claim fill: framing, routing,
/// credentials, and Envoy's own.
fn reserved_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "authorization"
            | "proxy-authorization"
            | "cookie"
            | "connection"
            | "content-length"
            | "content-type"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "tokend-reason"
    ) || name.starts_with("x-envoy-")
        || name.starts_with("grpc-")
}

impl ClaimHeader {
    /// Header `header` (an HTTP token, case-insensitive) filled from `claim`:
    /// a top-level claim name, or `act.sub` for the current actor.
    pub fn parse(header: &str, claim: &str) -> Result<Self, String> {
        let name = header.to_ascii_lowercase();
        let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token_char) {
            return Err(format!("{header:?} is not an HTTP header name"));
        }
        if reserved_header(&name) {
            return Err(format!("{header:?} is reserved and cannot carry a claim"));
        }
        let claim = match claim {
            "act.sub" => HeaderClaim::Actor,
            "act" => {
                return Err(
                    "\"act\" embeds the previous link's token; use \"act.sub\" for the actor"
                        .into(),
                );
            }
            c if c.is_empty() || c.contains('.') || c.chars().any(char::is_whitespace) => {
                return Err(format!(
                    "claim {c:?}: name a top-level claim (e.g. \"sub\") or \"act.sub\""
                ));
            }
            c => HeaderClaim::Claim(c.to_owned()),
        };
        Ok(Self {
            header: name,
            claim,
        })
    }

    /// The defaults: `x-tokend-sub`, `x-tokend-iss`, `x-tokend-act`.
    pub fn defaults() -> Vec<Self> {
        let h = |header: &str, claim: HeaderClaim| Self {
            header: header.to_owned(),
            claim,
        };
        vec![
            h("x-tokend-sub", HeaderClaim::Claim("sub".into())),
            h("x-tokend-iss", HeaderClaim::Claim("iss".into())),
            h("x-tokend-act", HeaderClaim::Actor),
        ]
    }

    /// This header's value for `v`, if the claim is there and fits in a
    /// header (visible ASCII and spaces, not padded, at most 1 KiB).
    pub fn value(&self, v: &Verified) -> Option<String> {
        let value = match &self.claim {
            HeaderClaim::Actor => v
                .claims
                .get("act")
                .and_then(|a| a.get("sub"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            HeaderClaim::Claim(name) => v.claims.get(name).and_then(scalar),
        }?;
        let fits = !value.is_empty()
            && value.len() <= MAX_HEADER_VALUE
            && value.bytes().all(|b| (0x20..0x7f).contains(&b))
            && value.trim() == value;
        fits.then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::UnixTime;

    fn verified(claims: Value) -> Verified {
        let claims = claims.as_object().cloned().unwrap_or_default();
        Verified {
            issuer: claims["iss"].as_str().unwrap_or_default().to_owned(),
            subject: claims["sub"].as_str().unwrap_or_default().to_owned(),
            kid: "k".into(),
            expires_at: UnixTime::from_secs(0),
            claims,
            one_time: Vec::new(),
            keys: Vec::new(),
            not_before: UnixTime::from_secs(0),
            claims_json: Default::default(),
        }
    }

    fn td() -> TrustDomain {
        TrustDomain::new("bank.internal").expect("td")
    }

    /// Issuers and required claims decide; each refusal is
    /// `permission_denied` naming the rule that failed.
    #[test]
    fn rules_allow_and_deny() {
        let v = verified(serde_json::json!({
            "iss": "spiffe://bank.internal/payments", "sub": "spiffe://bank.internal/payments",
            "role": "teller", "scopes": ["read", "write"], "level": 3, "admin": false,
        }));
        let rules = |issuers: &str, claims: &str| AccessRules {
            issuers: (issuers != "*")
                .then(|| parse_issuers(issuers.split(','), &td()).expect("issuers")),
            claims: ClaimRule::parse_list(claims).expect("claims"),
        };
        for (issuers, claims) in [
            ("*", ""),
            ("payments", ""),
            ("teller,spiffe://bank.internal/payments", "role=teller"),
            ("*", "role=teller,scopes=write,level=3,admin=false,role"),
        ] {
            assert_eq!(
                rules(issuers, claims).check(&v),
                Ok(()),
                "{issuers} {claims}"
            );
        }
        for (issuers, claims, detail) in [
            ("teller", "", "issuer spiffe://bank.internal/payments"),
            ("spiffe://other.td/payments", "", "is not allowed"),
            ("*", "role=admin", "required claim role=admin"),
            ("*", "missing", "required claim missing"),
            ("*", "scopes=delete", "scopes=delete"),
        ] {
            let e = rules(issuers, claims).check(&v).expect_err(claims);
            assert_eq!(e.reason, Reason::PermissionDenied);
            assert!(e.detail.contains(detail), "{e}");
        }
    }

    /// Bad rule text is refused, naming it.
    #[test]
    fn bad_rules_named() {
        for bad in ["", "=x", "role=", "ro le=x", "role=a b"] {
            assert!(ClaimRule::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ClaimRule::parse_list(" role=teller , level ").is_ok());
        assert!(parse_issuers(["Bad Name"], &td()).is_err());
        assert!(parse_issuers([], &td()).is_err());
    }

    /// Claim headers: sub, iss and the actor by default; absent, non-scalar
    /// or unsafe values give no value; names are checked and never carry a
    /// credential or `act` itself.
    #[test]
    fn claim_headers() {
        let plain = verified(serde_json::json!({
            "iss": "spiffe://bank.internal/payments", "sub": "spiffe://bank.internal/payments",
            "note": "a\nb", "obj": {"x": 1},
        }));
        let delegated = verified(serde_json::json!({
            "iss": "spiffe://bank.internal/ledger", "sub": "spiffe://bank.internal/payments",
            "act": {"sub": "spiffe://bank.internal/ledger", "prev_token": "t.t.t"},
        }));
        let values = |v: &Verified| -> Vec<Option<String>> {
            ClaimHeader::defaults().iter().map(|h| h.value(v)).collect()
        };
        assert_eq!(
            values(&plain),
            [
                Some("spiffe://bank.internal/payments".into()),
                Some("spiffe://bank.internal/payments".into()),
                None
            ]
        );
        assert_eq!(
            values(&delegated)[2].as_deref(),
            Some("spiffe://bank.internal/ledger")
        );
        let note = ClaimHeader::parse("X-Note", "note").expect("ok");
        assert_eq!(note.header, "x-note");
        assert_eq!(note.value(&plain), None, "a newline never reaches a header");
        assert_eq!(
            ClaimHeader::parse("x-obj", "obj")
                .expect("ok")
                .value(&plain),
            None
        );
        for (h, c) in [
            ("authorization", "sub"),
            ("x-envoy-foo", "sub"),
            ("x y", "sub"),
            ("", "sub"),
            ("x-act", "act"),
            ("x-prev", "act.prev_token"),
            ("x-sub", ""),
        ] {
            assert!(ClaimHeader::parse(h, c).is_err(), "{h} {c}");
        }
    }
}
