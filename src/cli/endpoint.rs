//! Where the client commands find the sidecar: `--socket`, then
//! `TOKEND_SOCKET`, then `SPIFFE_ENDPOINT_SOCKET` (the variable every SPIFFE
//! workload is given, a `unix:` URI), then `./tokend.sock`.

use std::path::PathBuf;

/// The SPIFFE Workload API's endpoint variable.
pub(super) const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

/// The socket path when neither the flag nor any variable names one.
const DEFAULT_SOCKET: &str = "./tokend.sock";

/// The socket to dial: `given` (the flag or `TOKEND_SOCKET`, which clap
/// reads), else `spiffe_endpoint` parsed, else the default.
pub(super) fn resolve(
    given: Option<PathBuf>,
    spiffe_endpoint: Option<String>,
) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path);
    }
    match spiffe_endpoint.filter(|v| !v.is_empty()) {
        Some(uri) => unix_path(&uri).map_err(|e| format!("{SPIFFE_ENDPOINT_SOCKET}={uri:?}: {e}")),
        None => Ok(PathBuf::from(DEFAULT_SOCKET)),
    }
}

/// The path of a SPIFFE `unix:` endpoint URI: `unix:///run/s.sock` or
/// `unix:/run/s.sock`. Another scheme, an authority (`unix://host/…`), a
/// relative path, a query or a fragment is refused, as the SPIFFE Workload
/// Endpoint spec and go-spiffe refuse them.
fn unix_path(uri: &str) -> Result<PathBuf, String> {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Err("not a URI; expected unix:///path/to/socket".into());
    };
    if !scheme.eq_ignore_ascii_case("unix") {
        return Err(format!(
            "scheme {scheme:?} is not supported; tokend listens on a Unix socket (unix:///path/to/socket)"
        ));
    }
    if rest.contains(['?', '#']) {
        return Err("a unix: endpoint has no query or fragment".into());
    }
    let path = match rest.strip_prefix("//") {
        Some(after) if after.starts_with('/') => after,
        Some(_) => return Err("a unix: endpoint has no authority; use unix:///path".into()),
        None => rest,
    };
    if !path.starts_with('/') || path.len() < 2 {
        return Err("the socket path must be absolute (unix:///path/to/socket)".into());
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both unix forms give the path; the flag or TOKEND_SOCKET wins over
    /// the SPIFFE variable; anything else is refused naming the variable.
    #[test]
    fn spiffe_endpoint_forms() {
        let r = |e: &str| resolve(None, Some(e.to_owned()));
        assert_eq!(r("unix:///run/t.sock"), Ok("/run/t.sock".into()));
        assert_eq!(r("unix:/run/t.sock"), Ok("/run/t.sock".into()));
        assert_eq!(
            resolve(Some("/a.sock".into()), Some("unix:///b.sock".into())),
            Ok("/a.sock".into())
        );
        assert_eq!(resolve(None, None), Ok(DEFAULT_SOCKET.into()));
        assert_eq!(
            resolve(None, Some(String::new())),
            Ok(DEFAULT_SOCKET.into())
        );
        for bad in [
            "tcp://127.0.0.1:8081",
            "unix://host/run/t.sock",
            "unix:run/t.sock",
            "unix:///run/t.sock?x=1",
            "unix://",
            "unix:/",
            "/run/t.sock",
        ] {
            let e = r(bad).expect_err(bad);
            assert!(e.starts_with("SPIFFE_ENDPOINT_SOCKET="), "{e}");
        }
        assert!(
            r("tcp://127.0.0.1:8081")
                .expect_err("tcp")
                .contains("scheme \"tcp\"")
        );
    }
}
