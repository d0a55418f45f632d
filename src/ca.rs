//! The trust domain's CA and peer certificates (rcgen). `ca init` makes a
//! self-signed CA carrying `spiffe://TD` as URI SAN; `ca issue` makes a peer
//! certificate carrying `spiffe://TD/NAME` plus DNS names, usable as both TLS
//! server and client. Keys are ECDSA P-256 (ring). Files are written through
//! `keys::atomic_write` (mode 0600); an existing CA key is never overwritten.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::identity::{SpiffeId, TrustDomain};
use crate::keys::atomic_write;

/// CA certificate file name.
pub(crate) const CA_CERT: &str = "ca.pem";
/// CA private key file name.
pub(crate) const CA_KEY: &str = "ca.key";
/// Peer certificate file name.
pub(crate) const PEER_CERT: &str = "cert.pem";
/// Peer private key file name.
pub(crate) const PEER_KEY: &str = "key.pem";

/// A CA operation failure, naming the file or value.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Refusing to overwrite.
    #[error("{0} already exists; refusing to overwrite a CA key")]
    Exists(PathBuf),
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("{0}")]
    Cert(String),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] crate::keys::DiskError),
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |e| CaError::Cert(format!("{what}: {e}"))
}

fn ensure_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Read {
            path: dir.to_owned(),
            source,
        })
}

/// Creates `out/ca.pem` and `out/ca.key` for `td`, valid for ten years.
pub fn init(out: &Path, td: &TrustDomain) -> Result<(), CaError> {
    ensure_dir(out)?;
    let key_path = out.join(CA_KEY);
    if key_path.exists() {
        return Err(CaError::Exists(key_path));
    }
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("tokend CA {td}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, td.as_str());
    let uri = format!("spiffe://{td}")
        .try_into()
        .map_err(cert_err("CA URI"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let key = KeyPair::generate().map_err(cert_err("CA key"))?;
    let cert = params
        .self_signed(&key)
        .map_err(cert_err("CA certificate"))?;
    atomic_write(out, CA_CERT, cert.pem().as_bytes())?;
    atomic_write(out, CA_KEY, key.serialize_pem().as_bytes())?;
    Ok(())
}

/// The trust domain a CA certificate (PEM) was made for, from its `spiffe://TD` URI SAN.
pub(crate) fn trust_domain_of(ca_pem: &[u8]) -> Result<TrustDomain, CaError> {
    let block =
        pem::parse(ca_pem).map_err(|e| CaError::Cert(format!("CA certificate is not PEM: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(block.contents())
        .map_err(|e| CaError::Cert(format!("CA certificate does not parse: {e}")))?;
    let uris = crate::peers::uri_sans(&cert);
    let td = uris
        .iter()
        .find_map(|u| {
            u.strip_prefix("spiffe://")
                .filter(|rest| !rest.contains('/'))
        })
        .ok_or_else(|| {
            CaError::Cert("CA certificate has no spiffe://<trust-domain> URI SAN".into())
        })?;
    TrustDomain::new(td).map_err(|e| CaError::Cert(e.to_string()))
}

/// Issues `out/cert.pem` and `out/key.pem` for service `name`, signed by the CA in `ca_dir`.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    dns: &[String],
    days: i64,
) -> Result<SpiffeId, CaError> {
    let read = |f: &str| {
        let path = ca_dir.join(f);
        std::fs::read(&path).map_err(|source| CaError::Read { path, source })
    };
    let ca_pem = read(CA_CERT)?;
    let ca_key_pem = String::from_utf8(read(CA_KEY)?)
        .map_err(|_| CaError::Cert("CA key is not PEM text".into()))?;
    let td = trust_domain_of(&ca_pem)?;
    let id = td.id(name).map_err(|e| CaError::Cert(e.to_string()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err("CA key"))?;
    let ca_text = String::from_utf8(ca_pem)
        .map_err(|_| CaError::Cert("CA certificate is not PEM text".into()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_text, ca_key).map_err(cert_err("CA certificate"))?;

    let dns: Vec<String> = if dns.is_empty() {
        vec!["localhost".into(), name.into()]
    } else {
        dns.to_vec()
    };
    let mut params = CertificateParams::new(dns).map_err(cert_err("DNS names"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names.push(SanType::URI(
        id.as_str().try_into().map_err(cert_err("URI"))?,
    ));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days.max(1));
    let key = KeyPair::generate().map_err(cert_err("peer key"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(cert_err("peer certificate"))?;
    ensure_dir(out)?;
    atomic_write(out, PEER_KEY, key.serialize_pem().as_bytes())?;
    atomic_write(out, PEER_CERT, cert.pem().as_bytes())?;
    Ok(id)
}
