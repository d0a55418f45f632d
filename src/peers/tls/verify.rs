//! The rustls hooks that make peer TLS reloadable: each handshake, as
//! server and as client, asks the shared handle for the CURRENT material
//! (the certificate it presents, the CA bundle it trusts). A swap therefore
//! takes effect on the next handshake, and established connections keep
//! the material they were made with.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, ResolvesClientCert};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime as TlsTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::{Handle, svid_id};
use crate::identity::TrustDomain;

/// Verifies `end_entity` (with `intermediates`) up to one CA of `roots` at `now`.
pub(super) fn check_chain(
    roots: &RootCertStore,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: TlsTime,
) -> Result<(), rustls::Error> {
    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )
}

/// Presents the current certificate, as server and as client.
#[derive(Debug)]
pub(super) struct CurrentCert(pub(super) Handle);

impl CurrentCert {
    fn key(&self) -> Arc<CertifiedKey> {
        self.0.current().certified.clone()
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a peer client against the current CA bundle (a certificate is
/// required). The identity it proves is read by the service from the
/// connection, as before.
#[derive(Debug)]
pub(super) struct CurrentClientVerifier(pub(super) Handle);

impl ClientCertVerifier for CurrentClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can change under us; no hints (our clients hold one certificate).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: TlsTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
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
            &self.0.provider.signature_verification_algorithms,
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
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a peer server: chain to the current CA bundle, validity, EKU,
/// and exactly one URI SAN, a SPIFFE ID of the trust domain. The DNS name
/// is deliberately not checked: identity is the SPIFFE ID, bound by the
/// caller to the keys it serves.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    pub(super) handle: Handle,
    pub(super) td: TrustDomain,
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
        let current = self.handle.current();
        check_chain(
            &current.roots,
            &self.handle.provider,
            end_entity,
            intermediates,
            now,
        )?;
        svid_id(end_entity, &self.td).map_err(rustls::Error::General)?;
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
            &self.handle.provider.signature_verification_algorithms,
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
            &self.handle.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.handle
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that presents and trusts whatever is current.
pub(super) fn client_config(
    handle: &Handle,
    td: &TrustDomain,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut cfg = ClientConfig::builder_with_provider(handle.provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            handle: handle.clone(),
            td: td.clone(),
        }))
        .with_client_cert_resolver(Arc::new(CurrentCert(handle.clone())));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // Every connection runs a full handshake against the current material:
    // a resumed session would skip the checks a reload or a ban changed.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A server config that presents and trusts whatever is current; a client
/// certificate is required.
pub(super) fn server_config(handle: &Handle) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(handle.provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(CurrentClientVerifier(handle.clone())))
        .with_cert_resolver(Arc::new(CurrentCert(handle.clone())));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}
