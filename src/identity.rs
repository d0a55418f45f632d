//! Identities: trust domain, service name, SPIFFE ID, and the audience
//! normalisation of DESIGN.md (`ledger` ≡ `spiffe://td/ledger`). Pure.

use std::fmt;

/// An identity error names the offending text and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Trust domain not made of lowercase letters, digits, `.`, `-`, `_`.
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-', '_'")]
    TrustDomain(String),
    /// Service name not made of the allowed characters.
    #[error("invalid service name {0:?}: use letters, digits, '.', '-', '_' (1 to 128 characters)")]
    ServiceName(String),
    /// Not of the form `spiffe://<td>/<name>`.
    #[error("invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/<service>")]
    SpiffeId(String),
    /// A full identity of another trust domain given where a local one is needed.
    #[error("{0:?} is not in trust domain {1:?}")]
    ForeignDomain(String, String),
}

/// A SPIFFE trust domain such as `bank.internal`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name.
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdentityError::TrustDomain(s.to_owned()))
        }
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identity of `service` in this domain.
    pub fn id(&self, service: &str) -> Result<SpiffeId, IdentityError> {
        validate_service(service)?;
        Ok(SpiffeId(format!("spiffe://{}/{}", self.0, service)))
    }

    /// Normalises an audience: a bare service name of this domain, or a full
    /// SPIFFE ID (of any domain, since foreign audiences are legitimate targets).
    pub fn audience(&self, text: &str) -> Result<SpiffeId, IdentityError> {
        if text.starts_with("spiffe://") {
            SpiffeId::parse(text)
        } else {
            self.id(text)
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn validate_service(s: &str) -> Result<(), IdentityError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && s != "."
        && s != "..";
    if ok {
        Ok(())
    } else {
        Err(IdentityError::ServiceName(s.to_owned()))
    }
}

/// A workload identity `spiffe://<trust-domain>/<service>`: `iss`, `sub` and `aud` of tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// Parses and validates `spiffe://td/service`.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::SpiffeId(text.to_owned());
        let rest = text.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, service) = rest.split_once('/').ok_or_else(bad)?;
        TrustDomain::new(td).map_err(|_| bad())?;
        validate_service(service).map_err(|_| bad())?;
        Ok(Self(text.to_owned()))
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map(|(td, _)| td).unwrap_or(rest)
    }

    /// The service name part.
    pub fn service(&self) -> &str {
        self.0.rsplit_once('/').map(|(_, s)| s).unwrap_or("")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare name and a full ID of the same service normalise to the same audience.
    #[test]
    fn audience_forms_are_equivalent() {
        let td = TrustDomain::new("bank.internal").expect("td");
        let a = td.audience("ledger").expect("bare");
        let b = td.audience("spiffe://bank.internal/ledger").expect("full");
        assert_eq!(a, b);
        assert_eq!(a.service(), "ledger");
        assert_eq!(a.trust_domain(), "bank.internal");
    }

    /// Path tricks, empty parts and uppercase domains are refused with the right variant.
    #[test]
    fn refuses_bad_identities() {
        assert!(matches!(
            TrustDomain::new("Bank"),
            Err(IdentityError::TrustDomain(_))
        ));
        let td = TrustDomain::new("td").expect("td");
        for bad in ["", "a/b", "..", "a b", "ü"] {
            assert!(
                matches!(td.id(bad), Err(IdentityError::ServiceName(_))),
                "{bad}"
            );
        }
        for bad in [
            "spiffe://td",
            "spiffe:///x",
            "https://td/x",
            "spiffe://td/a/b",
            "spiffe://TD/x",
        ] {
            assert!(
                matches!(SpiffeId::parse(bad), Err(IdentityError::SpiffeId(_))),
                "{bad}"
            );
        }
    }
}
