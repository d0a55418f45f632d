//! `[ext_authz]`: the defaults of Envoy external authorization, which a
//! route's `context_extensions` may override: the issuers allowed, the
//! claims required, and which verified claims go upstream as headers.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::engine::{AccessRules, ClaimHeader, ClaimRule, check_authority, parse_issuers};
use crate::identity::TrustDomain;

/// The section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExtAuthzFile {
    allowed_issuers: Option<Vec<String>>,
    required_claims: Option<Vec<String>>,
    headers: Option<BTreeMap<String, String>>,
    authority: Option<String>,
}

/// Envoy external authorization defaults (`[ext_authz]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtAuthzConfig {
    /// Who may call an inbound route that sets no rules of its own.
    pub rules: AccessRules,
    /// Verified claims passed upstream, each header always stripped from
    /// the client's request first.
    pub headers: Vec<ClaimHeader>,
    /// How this service is addressed (`https://host[:port]`): with the
    /// request path, the URI a DPoP proof must be for. Never the Host header.
    pub authority: Option<String>,
}

impl Default for ExtAuthzConfig {
    fn default() -> Self {
        Self {
            rules: AccessRules::default(),
            headers: ClaimHeader::defaults(),
            authority: None,
        }
    }
}

impl ExtAuthzFile {
    /// Validates the section; names such as `payments` are read in `td`.
    pub(super) fn build(self, td: &TrustDomain) -> Result<ExtAuthzConfig, ConfigError> {
        let issuers = match self.allowed_issuers {
            None => None,
            Some(list) if list.iter().any(|i| i == "*") => {
                if list.len() > 1 {
                    return Err(invalid(
                        "ext_authz.allowed_issuers",
                        "\"*\" (every trusted issuer) stands alone",
                    ));
                }
                None
            }
            Some(list) => Some(
                parse_issuers(list.iter().map(String::as_str), td)
                    .map_err(|e| invalid("ext_authz.allowed_issuers", e))?,
            ),
        };
        let claims = self
            .required_claims
            .unwrap_or_default()
            .iter()
            .map(|c| ClaimRule::parse(c))
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("ext_authz.required_claims", e))?;
        let headers = match self.headers {
            None => ClaimHeader::defaults(),
            Some(map) => {
                let mut out: Vec<ClaimHeader> = Vec::new();
                for (header, claim) in &map {
                    let h = ClaimHeader::parse(header, claim)
                        .map_err(|e| invalid(&format!("ext_authz.headers.{header}"), e))?;
                    if out.iter().any(|o| o.header == h.header) {
                        return Err(invalid(
                            &format!("ext_authz.headers.{header}"),
                            "header listed twice (names are case-insensitive)",
                        ));
                    }
                    out.push(h);
                }
                out
            }
        };
        let authority = self
            .authority
            .map(|a| check_authority(&a))
            .transpose()
            .map_err(|e| invalid("ext_authz.authority", e))?;
        Ok(ExtAuthzConfig {
            rules: AccessRules { issuers, claims },
            headers,
            authority,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, Overrides};
    use crate::engine::HeaderClaim;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(
            text,
            Path::new("/etc/tokend"),
            Path::new("t.toml"),
            &Overrides::default(),
        )
        .map_err(|e| e.to_string())
    }

    /// No section: any trusted issuer, no required claim, the three default
    /// headers. Each key can be set.
    #[test]
    fn defaults_and_values() {
        let c = parse("").expect("defaults").ext_authz;
        assert_eq!(c, super::ExtAuthzConfig::default());
        assert_eq!(c.rules.issuers, None);
        assert_eq!(c.headers.len(), 3);
        let c = parse(
            "name = \"ledger\"\ntrust_domain = \"bank.internal\"\n[ext_authz]\n\
             allowed_issuers = [\"payments\", \"spiffe://bank.internal/teller\"]\n\
             required_claims = [\"role=teller\"]\nheaders = { \"X-Caller\" = \"sub\", \"x-actor\" = \"act.sub\" }",
        )
        .expect("set")
        .ext_authz;
        let issuers: Vec<_> = c
            .rules
            .issuers
            .expect("listed")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            issuers,
            [
                "spiffe://bank.internal/payments",
                "spiffe://bank.internal/teller"
            ]
        );
        assert_eq!(c.rules.claims.len(), 1);
        let headers: Vec<_> = c.headers.iter().map(|h| h.header.as_str()).collect();
        assert_eq!(headers, ["x-caller", "x-actor"]);
        assert_eq!(c.headers[1].claim, HeaderClaim::Actor);
        let c = parse("[ext_authz]\nheaders = {}").expect("none").ext_authz;
        assert!(c.headers.is_empty());
    }

    /// Bad values are refused, naming the key.
    #[test]
    fn bad_values_named() {
        for (text, key) in [
            ("allowed_issuers = []", "ext_authz.allowed_issuers"),
            (
                "allowed_issuers = [\"*\", \"x\"]",
                "ext_authz.allowed_issuers",
            ),
            (
                "allowed_issuers = [\"Not A Name\"]",
                "ext_authz.allowed_issuers",
            ),
            ("required_claims = [\"role=\"]", "ext_authz.required_claims"),
            (
                "headers = { authorization = \"sub\" }",
                "ext_authz.headers.authorization",
            ),
            ("headers = { x-a = \"act\" }", "ext_authz.headers.x-a"),
            (
                "headers = { x-a = \"sub\", X-A = \"iss\" }",
                "ext_authz.headers",
            ),
            ("alowed_issuers = []", "alowed_issuers"),
        ] {
            let e = parse(&format!("[ext_authz]\n{text}")).expect_err(text);
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
