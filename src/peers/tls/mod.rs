//! mTLS material for the peer API: the `[peer_api]` PEM files (a CA
//! bundle, a certificate chain, a key) behind one swappable handle, the
//! rustls server and client configs that read the handle on every
//! handshake, and the SPIFFE ID a peer certificate proves. A peer is
//! authenticated by its certificate chaining to a CA of the bundle and by
//! the one `spiffe://TD/NAME` URI SAN it carries, never by DNS names and
//! never by anything it says in a message. `watch` polls the files and
//! swaps in a new set only once it passed every check. No networking here.

mod material;
mod verify;
mod watch;

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime as TlsTime};
use x509_parser::prelude::{GeneralName, X509Certificate};

pub(crate) use self::material::CertInfo;
use self::material::{Files, Material, Paths};
pub(crate) use self::watch::{ExpiryPolicy, PEER_SERVICE, watch};

use crate::config::PeerApiConfig;
use crate::identity::{SpiffeId, TrustDomain};
use crate::time::UnixTime;

/// Why the peer TLS material cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("peer_api.{what} {path}: {detail}")]
    File {
        /// Which setting: `ca`, `cert` or `key`.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// A file (or a directory above it) that another user could have written.
    #[error("peer_api.{what}: {source}")]
    Unsafe {
        /// Which setting: `ca`, `cert` or `key`.
        what: &'static str,
        /// The check that failed, naming the path.
        source: crate::keys::DiskError,
    },
    /// The certificate proves another identity than this sidecar's.
    #[error("peer_api.cert {path} proves {proven}, but this sidecar is {expected}")]
    WrongIdentity {
        /// The certificate file.
        path: std::path::PathBuf,
        /// What it proves.
        proven: SpiffeId,
        /// What this sidecar is.
        expected: SpiffeId,
    },
    /// The certificate is not valid at this instant.
    #[error(
        "peer_api.cert {path} (serial {serial}) is valid from {not_before} to {not_after}, not now ({now})"
    )]
    Validity {
        /// The certificate file.
        path: std::path::PathBuf,
        /// Its serial, hex.
        serial: String,
        /// Start of validity, RFC 3339.
        not_before: String,
        /// End of validity, RFC 3339.
        not_after: String,
        /// Now, RFC 3339.
        now: String,
    },
    /// The private key is not the certificate's.
    #[error("peer_api.key {key} does not match peer_api.cert {cert}: {detail}")]
    KeyMismatch {
        /// The certificate file.
        cert: std::path::PathBuf,
        /// The key file.
        key: std::path::PathBuf,
        /// rustls' reason.
        detail: String,
    },
    /// The certificate does not chain to the CA bundle.
    #[error("peer_api.cert {cert} does not chain to a CA of peer_api.ca {ca}: {detail}")]
    Chain {
        /// The certificate file.
        cert: std::path::PathBuf,
        /// The CA file.
        ca: std::path::PathBuf,
        /// rustls' reason.
        detail: String,
    },
    /// rustls refused to build a configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Every URI SAN of a certificate.
pub(crate) fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// The SPIFFE ID a DER certificate proves, as the X.509-SVID standard has
/// it: exactly one URI SAN, a `spiffe://` ID of `td`. A certificate with
/// none or with several (whoever issued it) proves nothing.
pub(crate) fn svid_id(der: &[u8], td: &TrustDomain) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let uris = uri_sans(&cert);
    let [only] = uris.as_slice() else {
        return Err(format!(
            "certificate carries {} URI SANs; an X.509-SVID carries exactly one, spiffe://{td}/<name>",
            uris.len()
        ));
    };
    if !only.starts_with("spiffe://") {
        return Err(format!(
            "certificate's URI SAN {only:?} is not a SPIFFE ID (spiffe://{td}/<name>)"
        ));
    }
    let id = SpiffeId::parse(only).map_err(|e| e.to_string())?;
    if id.trust_domain() != td.as_str() {
        return Err(format!("peer identity {id} is not in trust domain {td}"));
    }
    Ok(id)
}

/// The current material, shared by every rustls hook and swapped whole.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    current: Arc<RwLock<Arc<Material>>>,
    provider: Arc<CryptoProvider>,
    /// Counts swaps, so a signer of key-set documents re-signs with the
    /// new certificate at once.
    swaps: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Handle {
    /// The material in use now.
    fn current(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn swap(&self, next: Material) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        self.swaps.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// This sidecar's peer TLS material (CA bundle, certificate, key), loaded
/// from `[peer_api]` and reloadable while it runs. Cheap to clone: every
/// clone sees the same current material.
#[derive(Clone)]
pub(crate) struct PeerTls {
    handle: Handle,
    paths: Paths,
    td: TrustDomain,
    own: SpiffeId,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("own", &self.own)
            .field("key", &"...")
            .finish()
    }
}

// === impl PeerTls ===

impl PeerTls {
    /// Loads and checks the files named in `[peer_api]` at `now`: the
    /// certificate must match the key, chain to a CA of the bundle, be
    /// valid, and prove `expected` (this sidecar's identity).
    pub(crate) fn load(
        cfg: &PeerApiConfig,
        td: &TrustDomain,
        expected: &SpiffeId,
        now: UnixTime,
    ) -> Result<Self, TlsError> {
        let paths = Paths {
            ca: cfg.ca.clone(),
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let files = read_files(&paths)?;
        let material = Material::check(&files, &paths, td, expected, &provider, now)?;
        Ok(Self {
            handle: Handle {
                current: Arc::new(RwLock::new(Arc::new(material))),
                provider,
                swaps: Arc::new(tokio::sync::watch::channel(0).0),
            },
            paths,
            td: td.clone(),
            own: expected.clone(),
        })
    }

    /// Reads the three files as they are now (no checks beyond file safety).
    fn read(&self) -> Result<Files, TlsError> {
        read_files(&self.paths)
    }

    /// Checks `files` at `now` and, if they pass, makes them current for
    /// every later handshake. A refusal leaves the current set in place.
    fn install(&self, files: &Files, now: UnixTime) -> Result<CertInfo, TlsError> {
        let next = Material::check(
            files,
            &self.paths,
            &self.td,
            &self.own,
            &self.handle.provider,
            now,
        )?;
        let leaf = next.leaf.clone();
        self.handle.swap(next);
        Ok(leaf)
    }

    /// The certificate this sidecar presents now.
    pub(crate) fn leaf(&self) -> CertInfo {
        self.handle.current().leaf.clone()
    }

    /// The CAs it trusts now, in bundle order.
    pub(crate) fn anchors(&self) -> Vec<CertInfo> {
        self.handle.current().anchors.clone()
    }

    /// The current certificate chain (leaf first, then intermediates) and
    /// its private key: what documents this sidecar signs must be signed
    /// with, read afresh for each signature so a renewal is picked up.
    pub(crate) fn cert_and_key(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.handle.current().cert_and_key()
    }

    /// The key that signs this instance's next key-set document: the
    /// CURRENT peer certificate's private key and chain (a PKCS#8 key,
    /// ECDSA P-256 as `tokend ca issue` makes it, or RSA). Built afresh at
    /// each call, so the document after a reload carries the new
    /// certificate.
    pub(crate) fn document_key(&self) -> Result<crate::engine::DocumentKey, TlsError> {
        let config = |e: String| TlsError::Config(format!("peer_api.key for documents: {e}"));
        let (chain, key) = self.cert_and_key();
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(config("not a PKCS#8 \"PRIVATE KEY\"".into()));
        };
        let chain: Vec<Vec<u8>> = chain.iter().map(|c| c.as_ref().to_vec()).collect();
        crate::engine::DocumentKey::from_pkcs8(pkcs8.secret_pkcs8_der(), &chain)
            .map_err(|e| config(e.to_string()))
    }

    /// Changes whenever a new set is swapped in (a reload): the document
    /// publisher re-signs on it.
    pub(crate) fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.handle.swaps.subscribe()
    }

    /// What a key-set document must chain to: this trust domain and the CA
    /// bundle IN USE AT EACH VERIFICATION, so a CA added to (or removed
    /// from) the bundle is followed for documents as for handshakes.
    pub(crate) fn document_anchors(&self) -> crate::engine::DocumentAnchors {
        let handle = self.handle.clone();
        crate::engine::DocumentAnchors::live(self.td.clone(), move || {
            handle.current().roots.clone()
        })
    }

    /// The server side as a rustls config, for the peer listener that runs
    /// the handshake itself (under a deadline): the current chain, a client
    /// certificate from a current CA required, ALPN h2.
    pub(crate) fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        verify::server_config(&self.handle).map_err(|e| TlsError::Config(e.to_string()))
    }

    /// The client side: verify the server's chain to a current CA and its
    /// SPIFFE ID (not its DNS name), and present the current certificate.
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        verify::client_config(&self.handle, &self.td).map_err(|e| TlsError::Config(e.to_string()))
    }

    /// The trust domain.
    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }
}

fn read_files(paths: &Paths) -> Result<Files, TlsError> {
    Ok(Files {
        ca: read(&paths.ca, "ca")?,
        cert: read(&paths.cert, "cert")?,
        key: read(&paths.key, "key")?,
    })
}

/// The serial (hex) of a DER certificate.
pub(crate) fn serial_of(der: &[u8]) -> Result<String, String> {
    CertInfo::of(der).map(|c| c.serial)
}

/// Reads a `[peer_api]` file after checking that no other user could have
/// written it (nor, for the key, read it): see `keys::check_file`. The path
/// is resolved afresh on every read, so a swapped symlink is followed.
fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let role = format!("peer_api.{what}");
    let resolved = crate::keys::check_file(path, &role, what == "key")
        .map_err(|source| TlsError::Unsafe { what, source })?;
    std::fs::read(&resolved).map_err(|e| TlsError::File {
        what,
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// An instant as rustls wants it.
pub(crate) fn tls_time(t: UnixTime) -> TlsTime {
    TlsTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(t.as_secs()).unwrap_or(0),
    ))
}
