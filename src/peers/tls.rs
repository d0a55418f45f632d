//! mTLS material for the peer API: PEM files → tonic server config and a
//! rustls client config, and the SPIFFE ID a peer certificate proves. A peer
//! is authenticated by its certificate chaining to the trust domain's CA and
//! by the `spiffe://TD/NAME` URI SAN it carries, never by DNS names and never
//! by anything it says in a message. No networking here.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime as TlsTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::prelude::{GeneralName, X509Certificate};

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
    /// The certificate does not chain to the CA (or is not valid now).
    #[error("peer_api.cert {cert} does not chain to peer_api.ca {ca}: {detail}")]
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

/// The SPIFFE ID a DER certificate proves: exactly one `spiffe://` URI SAN, in `td`.
pub(crate) fn spiffe_id_of(der: &[u8], td: &TrustDomain) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("peer certificate does not parse: {e}"))?;
    let ids: Vec<String> = uri_sans(&cert)
        .into_iter()
        .filter(|u| u.starts_with("spiffe://"))
        .collect();
    let [only] = ids.as_slice() else {
        return Err(format!(
            "peer certificate carries {} SPIFFE IDs; exactly one is required",
            ids.len()
        ));
    };
    let id = SpiffeId::parse(only).map_err(|e| e.to_string())?;
    if id.trust_domain() != td.as_str() {
        return Err(format!("peer identity {id} is not in trust domain {td}"));
    }
    Ok(id)
}

/// The loaded CA, certificate and key of this sidecar.
#[derive(Clone)]
pub(crate) struct PeerTls {
    key_pem: Vec<u8>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
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

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(String) -> TlsError + 'a {
    move |detail| TlsError::File {
        what,
        path: path.to_owned(),
        detail,
    }
}

/// Reads a `[peer_api]` file after checking that no other user could have
/// written it (nor, for the key, read it): see `keys::check_file`.
fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let role = format!("peer_api.{what}");
    let resolved = crate::keys::check_file(path, &role, what == "key")
        .map_err(|source| TlsError::Unsafe { what, source })?;
    std::fs::read(&resolved).map_err(|e| file_err(what, path)(e.to_string()))
}

fn tls_time(t: UnixTime) -> TlsTime {
    TlsTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(t.as_secs()).unwrap_or(0),
    ))
}

// === impl PeerTls ===

impl PeerTls {
    /// Loads and checks the files named in `[peer_api]` at `now`: the
    /// certificate must chain to the CA and prove `expected` (this
    /// sidecar's identity).
    pub(crate) fn load(
        cfg: &PeerApiConfig,
        td: &TrustDomain,
        expected: &SpiffeId,
        now: UnixTime,
    ) -> Result<Self, TlsError> {
        let ca_pem = read(&cfg.ca, "ca")?;
        let cert_pem = read(&cfg.cert, "cert")?;
        let key_pem = read(&cfg.key, "key")?;
        let ca_err = file_err("ca", &cfg.ca);
        let cert_err = file_err("cert", &cfg.cert);
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| ca_err(e.to_string()))?;
            roots.add(c).map_err(|e| ca_err(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ca_err("no certificate found".into()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| cert_err(e.to_string()))?;
        let leaf = chain
            .first()
            .cloned()
            .ok_or_else(|| cert_err("no certificate found".into()))?;
        PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| file_err("key", &cfg.key)(e.to_string()))?;
        let own = spiffe_id_of(&leaf, td).map_err(cert_err)?;
        if &own != expected {
            return Err(TlsError::WrongIdentity {
                path: cfg.cert.clone(),
                proven: own,
                expected: expected.clone(),
            });
        }
        let tls = Self {
            key_pem,
            roots: Arc::new(roots),
            chain,
            td: td.clone(),
            own,
        };
        let verifier = tls.verifier();
        verifier
            .check_chain(&leaf, &tls.chain[1..], tls_time(now))
            .map_err(|e| TlsError::Chain {
                cert: cfg.cert.clone(),
                ca: cfg.ca.clone(),
                detail: e.to_string(),
            })?;
        Ok(tls)
    }

    /// The server side as a rustls config, for the peer listener that runs
    /// the handshake itself (under a deadline): our chain, a client
    /// certificate from the CA required, ALPN h2.
    pub(crate) fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |e: String| TlsError::Config(e);
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| config(format!("peer_api.ca: {e}")))?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| config(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config(e.to_string()))?
            .with_client_cert_verifier(clients)
            .with_single_cert(self.chain.clone(), key)
            .map_err(|e| config(format!("peer_api.cert: {e}")))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn verifier(&self) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            roots: self.roots.clone(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            td: self.td.clone(),
        }
    }

    /// The client side: verify the server's chain to the CA and its SPIFFE ID
    /// (not its DNS name), and present our certificate.
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self.verifier()))
            .with_client_auth_cert(self.chain.clone(), key)
            .map_err(config)?;
        let mut cfg = cfg;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The key that signs this instance's key-set documents: the peer
    /// certificate's private key and chain (a PKCS#8 key, ECDSA P-256 as
    /// `tokend ca issue` makes it, or RSA). Read through this accessor only,
    /// so the certificate may be swapped underneath (hot reload).
    pub(crate) fn document_key(&self) -> Result<crate::engine::DocumentKey, TlsError> {
        let config = |e: String| TlsError::Config(format!("peer_api.key for documents: {e}"));
        let key =
            PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| config(e.to_string()))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(config("not a PKCS#8 \"PRIVATE KEY\"".into()));
        };
        let chain: Vec<Vec<u8>> = self.chain.iter().map(|c| c.as_ref().to_vec()).collect();
        crate::engine::DocumentKey::from_pkcs8(pkcs8.secret_pkcs8_der(), &chain)
            .map_err(|e| config(e.to_string()))
    }

    /// What a key-set document must chain to: this trust domain and the
    /// peer CA roots.
    pub(crate) fn document_anchors(&self) -> crate::engine::DocumentAnchors {
        crate::engine::DocumentAnchors::new(self.td.clone(), self.roots.clone())
    }

    /// The trust domain.
    pub(crate) fn trust_domain(&self) -> &TrustDomain {
        &self.td
    }
}

/// Verifies a peer server: chain to the trust domain's CA, validity, EKU, and
/// one SPIFFE ID of the trust domain. The DNS name is deliberately not
/// checked: identity is the SPIFFE ID, bound by the caller to the keys it serves.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    td: TrustDomain,
}

impl SpiffeServerVerifier {
    fn check_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: TlsTime,
    ) -> Result<(), rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: TlsTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_chain(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity, &self.td).map_err(rustls::Error::General)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
