//! mTLS material for the peer API: PEM files → tonic server config and a
//! rustls client config, and the SPIFFE ID a peer certificate proves. A peer
//! is authenticated by its certificate chaining to the trust domain's CA and
//! by the `spiffe://TD/NAME` URI SAN it carries, never by DNS names and never
//! by anything it says in a message. No networking here.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_parser::prelude::{GeneralName, X509Certificate};

use crate::config::PeerApiConfig;
use crate::identity::{SpiffeId, TrustDomain};

/// Every URI SAN of a certificate.
pub fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
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
pub fn spiffe_id_of(der: &[u8], td: &TrustDomain) -> Result<SpiffeId, String> {
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
pub struct PeerTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    td: TrustDomain,
    /// The identity our own certificate proves.
    pub own: SpiffeId,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("own", &self.own)
            .field("key", &"...")
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("peer_api.{what} {}: {e}", path.display()))
}

// === impl PeerTls ===

impl PeerTls {
    /// Loads and checks the files named in `[peer_api]`: the certificate must
    /// chain to the CA and prove `expected` (this sidecar's identity).
    pub fn load(
        cfg: &PeerApiConfig,
        td: &TrustDomain,
        expected: &SpiffeId,
    ) -> Result<Self, String> {
        let ca_pem = read(&cfg.ca, "ca")?;
        let cert_pem = read(&cfg.cert, "cert")?;
        let key_pem = read(&cfg.key, "key")?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| format!("peer_api.ca {}: {e}", cfg.ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("peer_api.ca {}: {e}", cfg.ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "peer_api.ca {}: no certificate found",
                cfg.ca.display()
            ));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("peer_api.cert {}: {e}", cfg.cert.display()))?;
        let leaf = chain
            .first()
            .cloned()
            .ok_or_else(|| format!("peer_api.cert {}: no certificate found", cfg.cert.display()))?;
        PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("peer_api.key {}: {e}", cfg.key.display()))?;
        let own = spiffe_id_of(&leaf, td)
            .map_err(|e| format!("peer_api.cert {}: {e}", cfg.cert.display()))?;
        if &own != expected {
            return Err(format!(
                "peer_api.cert {} proves {own}, but this sidecar is {expected}",
                cfg.cert.display()
            ));
        }
        let tls = Self {
            ca_pem,
            cert_pem,
            key_pem,
            roots: Arc::new(roots),
            chain,
            td: td.clone(),
            own,
        };
        let verifier = tls.verifier();
        verifier.check_chain(&leaf, &tls.chain[1..]).map_err(|e| {
            format!(
                "peer_api.cert {} does not chain to peer_api.ca {}: {e}",
                cfg.cert.display(),
                cfg.ca.display()
            )
        })?;
        Ok(tls)
    }

    /// The server side: present our certificate, require a client certificate from the CA.
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// The server side as a rustls config, for the peer listener that runs
    /// the handshake itself (under a deadline): our chain, a client
    /// certificate from the CA required, ALPN h2.
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("peer_api.ca: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| e.to_string())?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(clients)
            .with_single_cert(self.chain.clone(), key)
            .map_err(|e| format!("peer_api.cert: {e}"))?;
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
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| e.to_string())?;
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self.verifier()))
            .with_client_auth_cert(self.chain.clone(), key)
            .map_err(|e| e.to_string())?;
        let mut cfg = cfg;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
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
    ) -> Result<(), rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            UnixTime::now(),
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
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_chain(end_entity, intermediates)?;
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
