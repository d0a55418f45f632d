//! What one Check asks for: the route's mode and rules, read from the
//! `context_extensions` the operator set on the Envoy route (over the
//! `[ext_authz]` defaults), and the request's bearer credentials. A route
//! setting an unknown key or a bad value is misconfigured and denied: a
//! misspelt `allowed_issuers` must not silently allow every issuer, and an
//! outbound audience is never guessed from the request.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::config::ExtAuthzConfig;
use crate::engine::{AccessRules, ClaimRule, check_authority, parse_issuers};
use crate::identity::{SpiffeId, TrustDomain};

/// The keys a route may set.
const INBOUND_KEYS: [&str; 5] = [
    "mode",
    "audience",
    "allowed_issuers",
    "required_claims",
    "authority",
];
const OUTBOUND_KEYS: [&str; 4] = ["mode", "audience", "bind", "authority"];

/// What a route asks tokend to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route<'a> {
    /// Verify the request's bearer token and authorize its caller.
    Inbound {
        /// The audience the token must name (`None`: this sidecar).
        audience: Option<SpiffeId>,
        /// Who may call.
        rules: Cow<'a, AccessRules>,
        /// How this service is addressed, for DPoP proofs (route, else config).
        authority: Option<Cow<'a, str>>,
    },
    /// Mint a token for `audience` and put it on the request.
    Outbound {
        /// The operator-set target.
        audience: SpiffeId,
        /// A bound token with a proof for this upstream authority (`bind = "true"`).
        bind: Option<String>,
    },
}

impl Route<'_> {
    /// The metric and log label of the mode.
    pub(super) fn mode(&self) -> &'static str {
        match self {
            Route::Inbound { .. } => "inbound",
            Route::Outbound { .. } => "outbound",
        }
    }
}

/// Reads the route's `context_extensions` over `defaults`; `Err` names the
/// misconfigured key.
pub(super) fn route<'a>(
    ext: &HashMap<String, String>,
    defaults: &'a ExtAuthzConfig,
    td: &TrustDomain,
) -> Result<Route<'a>, String> {
    let mode = ext.get("mode").map_or("inbound", String::as_str);
    let allowed: &[&str] = match mode {
        "inbound" => &INBOUND_KEYS,
        "outbound" => &OUTBOUND_KEYS,
        other => {
            return Err(format!(
                "mode {other:?} is neither \"inbound\" nor \"outbound\""
            ));
        }
    };
    let mut keys: Vec<&String> = ext.keys().collect();
    keys.sort();
    if let Some(k) = keys.into_iter().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "context_extensions key {k:?} is not one of {allowed:?} for mode {mode}"
        ));
    }
    let audience = match ext.get("audience") {
        None => None,
        Some(a) => Some(td.audience(a).map_err(|e| format!("audience {a:?}: {e}"))?),
    };
    let authority = ext
        .get("authority")
        .map(|a| check_authority(a).map_err(|e| format!("authority: {e}")))
        .transpose()?;
    if mode == "outbound" {
        let audience = audience.ok_or(
            "mode outbound needs the target in context_extensions \"audience\" \
             (never taken from the request's host)",
        )?;
        let bind = match ext.get("bind").map(String::as_str) {
            None | Some("false") => None,
            Some("true") => Some(authority.ok_or(
                "bind = \"true\" needs the upstream's \"authority\" (https://host[:port]) \
                 for the proof's URI (never taken from the request's host)",
            )?),
            Some(other) => return Err(format!("bind {other:?} is neither \"true\" nor \"false\"")),
        };
        return Ok(Route::Outbound { audience, bind });
    }
    let authority = match authority {
        Some(a) => Some(Cow::Owned(a)),
        None => defaults.authority.as_deref().map(Cow::Borrowed),
    };
    let mut rules = Cow::Borrowed(&defaults.rules);
    if let Some(text) = ext.get("allowed_issuers") {
        rules.to_mut().issuers = match text.trim() {
            "*" => None,
            t => Some(
                parse_issuers(t.split(',').map(str::trim).filter(|s| !s.is_empty()), td)
                    .map_err(|e| format!("allowed_issuers: {e}"))?,
            ),
        };
    }
    if let Some(text) = ext.get("required_claims") {
        rules.to_mut().claims =
            ClaimRule::parse_list(text).map_err(|e| format!("required_claims: {e}"))?;
    }
    Ok(Route::Inbound {
        audience,
        rules,
        authority,
    })
}

/// The bearer credentials of a request, as RFC 6750 §2.1 reads them.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Credentials<'a> {
    /// No `authorization` header, or one of another scheme.
    Missing,
    /// An `authorization` header that is not exactly one Bearer token.
    Malformed(&'static str),
    /// The token, exactly as sent.
    Bearer(&'a str),
    /// A bound token sent with the `DPoP` scheme (RFC 9449 §7.1): its proof
    /// is in the `DPoP` header.
    DPoP(&'a str),
}

/// Characters of RFC 6750's b64token (a JWT is base64url parts and dots).
fn b64token(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Reads the `authorization` values (one per header line as Envoy saw
/// them; Envoy's map joins repeated headers with a comma, which is no
/// b64token either). The scheme is case-insensitive; exactly one space,
/// then exactly one token, untrimmed.
pub(super) fn credentials<'a>(values: &[&'a str]) -> Credentials<'a> {
    let value = match values {
        [] => return Credentials::Missing,
        [one] => *one,
        _ => return Credentials::Malformed("more than one authorization header"),
    };
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let bound = scheme.eq_ignore_ascii_case("dpop");
    if !bound && !scheme.eq_ignore_ascii_case("bearer") {
        return Credentials::Missing;
    }
    if !b64token(rest) {
        return Credentials::Malformed("the credentials are not exactly one token");
    }
    if bound {
        Credentials::DPoP(rest)
    } else {
        Credentials::Bearer(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("bank.internal").expect("td")
    }

    fn ext(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Inbound by default over the config's rules; a route's keys override
    /// them; outbound needs an audience; unknown keys and modes are refused.
    #[test]
    fn routes() {
        let d = ExtAuthzConfig::default();
        let r = route(&ext(&[]), &d, &td()).expect("default");
        assert_eq!(
            r,
            Route::Inbound {
                audience: None,
                rules: Cow::Borrowed(&d.rules),
                authority: None,
            }
        );
        let r = route(
            &ext(&[
                ("audience", "ledger-api"),
                ("allowed_issuers", "payments, spiffe://bank.internal/teller"),
                ("required_claims", "role=teller"),
            ]),
            &d,
            &td(),
        )
        .expect("inbound");
        let Route::Inbound {
            audience, rules, ..
        } = r
        else {
            panic!("inbound expected")
        };
        assert_eq!(
            audience.map(|a| a.to_string()).as_deref(),
            Some("spiffe://bank.internal/ledger-api")
        );
        assert_eq!(rules.issuers.as_ref().map(Vec::len), Some(2));
        assert_eq!(rules.claims.len(), 1);
        let r = route(
            &ext(&[("mode", "outbound"), ("audience", "ledger")]),
            &d,
            &td(),
        )
        .expect("outbound");
        assert_eq!(r.mode(), "outbound");
        for (bad, says) in [
            (ext(&[("mode", "outbound")]), "needs the target"),
            (ext(&[("mode", "sideways")]), "sideways"),
            (ext(&[("allowed_issuer", "x")]), "allowed_issuer"),
            (
                ext(&[
                    ("mode", "outbound"),
                    ("audience", "l"),
                    ("required_claims", "a"),
                ]),
                "required_claims",
            ),
            (ext(&[("allowed_issuers", "")]), "no issuer listed"),
            (ext(&[("audience", "Not Valid")]), "audience"),
            (
                ext(&[("mode", "outbound"), ("audience", "l"), ("bind", "true")]),
                "needs the upstream's \"authority\"",
            ),
            (ext(&[("authority", "https://ledger/path")]), "authority"),
        ] {
            let e = route(&bad, &d, &td()).expect_err(says);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    /// Exactly one Bearer token, scheme case-insensitive, nothing trimmed;
    /// another scheme counts as no credentials.
    #[test]
    fn bearer_credentials() {
        assert_eq!(credentials(&[]), Credentials::Missing);
        assert_eq!(credentials(&["Basic dXNlcjpw"]), Credentials::Missing);
        assert_eq!(credentials(&["bEaReR a.b.c"]), Credentials::Bearer("a.b.c"));
        assert_eq!(credentials(&["DPoP a.b.c"]), Credentials::DPoP("a.b.c"));
        assert!(matches!(
            credentials(&["DPoP a.b.c d"]),
            Credentials::Malformed(_)
        ));
        assert_eq!(
            credentials(&["Bearer a.b-_c=="]),
            Credentials::Bearer("a.b-_c==")
        );
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearer  a.b.c",
            "Bearer a.b.c ",
            "Bearer a.b.c d.e.f",
            "Bearer a.b.c,Bearer d.e.f",
            "Bearer a=b",
        ] {
            assert!(
                matches!(credentials(&[bad]), Credentials::Malformed(_)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            credentials(&["Bearer a.b.c", "Bearer d.e.f"]),
            Credentials::Malformed(_)
        ));
    }
}
