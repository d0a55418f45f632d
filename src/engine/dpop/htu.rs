//! The `htu` comparison form (RFC 9449 §4.3 point 9, with the syntax- and
//! scheme-based normalisation of RFC 3986 §6.2.2–6.2.3): query and fragment
//! dropped, scheme and host lowercased, the scheme's default port removed,
//! an empty path made `/`. Only `http` and `https` URIs are targets.

/// An authority a service is addressed by (`https://host[:port]`, no path,
/// query or fragment), in comparison form; a request's URI is this plus
/// its path. What is wrong with it, otherwise.
pub(crate) fn check_authority(authority: &str) -> Result<String, String> {
    let n = normalise(authority)?;
    let bare = n.strip_suffix('/').unwrap_or(&n);
    let after_scheme = bare.split_once("://").map_or("", |(_, r)| r);
    if after_scheme.contains('/') || authority.contains(['?', '#']) {
        return Err(format!(
            "authority {authority:?} must be scheme://host[:port] with no path, query or fragment"
        ));
    }
    Ok(bare.to_owned())
}

/// The comparison form of `uri`, or what is wrong with it.
pub(crate) fn normalise(uri: &str) -> Result<String, String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(format!("uri {uri:?} is not absolute (no scheme://)"));
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => "443",
        "http" => "80",
        _ => return Err(format!("uri {uri:?} is not http or https")),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!(
            "uri {uri:?} has no host, or carries user information"
        ));
    }
    if uri.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("uri {uri:?} contains spaces or control characters"));
    }
    let authority = authority.to_ascii_lowercase();
    let authority = match authority.rsplit_once(':') {
        // Not an IPv6 literal's colon: the port follows the last `]`.
        Some((host, port)) if port == default_port && !port.contains(']') => host.to_owned(),
        _ => authority,
    };
    Ok(format!("{scheme}://{authority}{path}"))
}

#[cfg(test)]
mod tests {
    use super::{check_authority, normalise};

    /// Query and fragment go, scheme and host fold, the default port goes,
    /// the path stays as it is (case and all).
    #[test]
    fn comparison_form() {
        let n = |u: &str| normalise(u).expect(u);
        assert_eq!(
            n("https://server.example.com/token"),
            "https://server.example.com/token"
        );
        assert_eq!(
            n("HTTPS://Server.Example.COM:443/token?x=1#frag"),
            "https://server.example.com/token"
        );
        assert_eq!(n("http://a.example:80"), "http://a.example/");
        assert_eq!(n("https://a.example:8443/P"), "https://a.example:8443/P");
        assert_eq!(n("https://[::1]:443/x"), "https://[::1]/x");
        assert_ne!(n("https://a.example/P"), n("https://a.example/p"));
        assert!(normalise("/relative").is_err());
        assert!(normalise("ftp://a.example/").is_err());
        assert!(normalise("https://user@a.example/").is_err());
        assert!(normalise("https:///x").is_err());
        assert_eq!(
            check_authority("HTTPS://Ledger.bank.internal:443").as_deref(),
            Ok("https://ledger.bank.internal")
        );
        assert_eq!(
            check_authority("https://ledger:8443/").as_deref(),
            Ok("https://ledger:8443")
        );
        for bad in [
            "https://ledger/api",
            "https://ledger?x",
            "ledger",
            "ftp://x",
        ] {
            assert!(check_authority(bad).is_err(), "{bad}");
        }
    }
}
