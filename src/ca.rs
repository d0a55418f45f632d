//! The trust domain's CA and peer certificates (rcgen). `ca init` makes a
//! self-signed CA carrying `spiffe://TD` as URI SAN; `ca issue` makes a peer
//! certificate carrying `spiffe://TD/NAME` plus DNS names, usable as both TLS
//! server and client, or (`--intermediate`) an intermediate CA whose
//! directory `ca issue --ca` accepts in turn: a leaf issued from it is
//! written as leaf + intermediate chain, so it chains to the root.
//! Lifetimes are a duration (`--ttl 12h`) or days. Keys are ECDSA P-256
//! (ring). Files are written through `keys::atomic_write` (mode 0600); an
//! existing CA key is never overwritten.

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
    // One level of intermediate CAs below it (`ca issue --intermediate`).
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
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

/// What `ca issue` makes: a peer certificate or an intermediate CA, valid
/// over an explicit window.
#[derive(Clone, Debug)]
pub struct IssueSpec {
    /// The issuing CA's directory (`ca.pem`, `ca.key`): a root or an intermediate.
    pub ca_dir: PathBuf,
    /// The service name (peer certificate) or the intermediate's name (its CN).
    pub name: String,
    /// Where to write `cert.pem`/`key.pem` (or `ca.pem`/`ca.key` for an intermediate).
    pub out: PathBuf,
    /// DNS names of a peer certificate (empty: `localhost` and the name).
    pub dns: Vec<String>,
    /// Start of validity, seconds since the epoch.
    pub not_before: i64,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
    /// Make an intermediate CA instead of a peer certificate.
    pub intermediate: bool,
}

impl IssueSpec {
    /// A peer certificate for `name`, valid from five minutes ago (clock
    /// skew) for `ttl`.
    pub fn peer(ca_dir: &Path, name: &str, out: &Path, ttl: std::time::Duration) -> Self {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        Self {
            ca_dir: ca_dir.to_owned(),
            name: name.to_owned(),
            out: out.to_owned(),
            dns: Vec::new(),
            not_before: now - 300,
            not_after: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            intermediate: false,
        }
    }

    /// A peer certificate for `name` valid for `days` (at least one), from
    /// an hour ago: the `--days` lifetimes tokend always issued.
    pub fn days(ca_dir: &Path, name: &str, out: &Path, days: i64) -> Self {
        let days = u64::try_from(days.max(1)).unwrap_or(1);
        let mut spec = Self::peer(
            ca_dir,
            name,
            out,
            std::time::Duration::from_secs(days * 86_400),
        );
        spec.not_before -= 3300;
        spec
    }
}

/// Issues `out/cert.pem` and `out/key.pem` for service `name`, signed by the
/// CA in `ca_dir`, valid for `days`.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    dns: &[String],
    days: i64,
) -> Result<SpiffeId, CaError> {
    let mut spec = IssueSpec::days(ca_dir, name, out, days);
    spec.dns = dns.to_vec();
    issue_with(&spec)
}

/// The issuing CA of a directory: its certificate (the first of `ca.pem`),
/// the chain a leaf must carry (`ca.pem` whole if it is an intermediate,
/// nothing for a self-signed root), and the trust domain.
struct IssuingCa {
    issuer: Issuer<'static, KeyPair>,
    chain_pem: String,
    td: TrustDomain,
    path_len_zero: bool,
}

fn issuing_ca(ca_dir: &Path) -> Result<IssuingCa, CaError> {
    let read = |f: &str| {
        let path = ca_dir.join(f);
        std::fs::read(&path).map_err(|source| CaError::Read { path, source })
    };
    let ca_pem = read(CA_CERT)?;
    let ca_key_pem = String::from_utf8(read(CA_KEY)?)
        .map_err(|_| CaError::Cert("CA key is not PEM text".into()))?;
    let td = trust_domain_of(&ca_pem)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err("CA key"))?;
    let ca_text = String::from_utf8(ca_pem)
        .map_err(|_| CaError::Cert("CA certificate is not PEM text".into()))?;
    let first = pem::parse(&ca_text)
        .map_err(|e| CaError::Cert(format!("CA certificate is not PEM: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(first.contents())
        .map_err(|e| CaError::Cert(format!("CA certificate does not parse: {e}")))?;
    let self_signed = cert.subject() == cert.issuer();
    let path_len_zero = matches!(
        cert.basic_constraints(),
        Ok(Some(bc)) if bc.value.path_len_constraint == Some(0)
    );
    let issuer = Issuer::from_ca_cert_pem(&ca_text, ca_key).map_err(cert_err("CA certificate"))?;
    Ok(IssuingCa {
        issuer,
        chain_pem: if self_signed { String::new() } else { ca_text },
        td,
        path_len_zero,
    })
}

/// Issues what `spec` asks for; returns the identity a peer certificate
/// carries (for an intermediate, the trust domain's `spiffe://TD/NAME` it
/// was named with, which it does not carry).
pub fn issue_with(spec: &IssueSpec) -> Result<SpiffeId, CaError> {
    let ca = issuing_ca(&spec.ca_dir)?;
    let id = ca
        .td
        .id(&spec.name)
        .map_err(|e| CaError::Cert(e.to_string()))?;
    if spec.not_after <= spec.not_before {
        return Err(CaError::Cert("the validity window is empty".into()));
    }
    let at = |secs: i64| {
        time::OffsetDateTime::from_unix_timestamp(secs)
            .map_err(|e| CaError::Cert(format!("validity: {e}")))
    };
    let mut params = if spec.intermediate {
        if ca.path_len_zero {
            return Err(CaError::Cert(format!(
                "the CA in {} allows no intermediate below it (path length 0; made by an older tokend ca init): make a new CA with tokend ca init",
                spec.ca_dir.display()
            )));
        }
        let mut p =
            CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.distinguished_name.push(DnType::CommonName, &spec.name);
        p.distinguished_name
            .push(DnType::OrganizationName, ca.td.as_str());
        let uri = format!("spiffe://{}", ca.td)
            .try_into()
            .map_err(cert_err("CA URI"))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p
    } else {
        let dns: Vec<String> = if spec.dns.is_empty() {
            vec!["localhost".into(), spec.name.clone()]
        } else {
            spec.dns.clone()
        };
        let mut p = CertificateParams::new(dns).map_err(cert_err("DNS names"))?;
        p.distinguished_name.push(DnType::CommonName, &spec.name);
        p.subject_alt_names.push(SanType::URI(
            id.as_str().try_into().map_err(cert_err("URI"))?,
        ));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = at(spec.not_before)?;
    params.not_after = at(spec.not_after)?;
    let key = KeyPair::generate().map_err(cert_err("key"))?;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(cert_err("certificate"))?;
    ensure_dir(&spec.out)?;
    let (cert_file, key_file) = if spec.intermediate {
        if spec.out.join(CA_KEY).exists() {
            return Err(CaError::Exists(spec.out.join(CA_KEY)));
        }
        (CA_CERT, CA_KEY)
    } else {
        (PEER_CERT, PEER_KEY)
    };
    let mut chain = cert.pem();
    chain.push_str(&ca.chain_pem);
    atomic_write(&spec.out, key_file, key.serialize_pem().as_bytes())?;
    atomic_write(&spec.out, cert_file, chain.as_bytes())?;
    Ok(id)
}
