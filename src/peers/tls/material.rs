//! One set of peer TLS material (CA bundle, certificate chain, private key)
//! as read from the three `[peer_api]` files, checked as a whole before it
//! is ever used: every CA of the bundle parses, the key matches the leaf,
//! the leaf carries exactly one URI SAN, this sidecar's SPIFFE ID, is valid
//! at `now` and chains (through the intermediates after it in the file) to
//! one CA of the bundle, both as a TLS server and as a TLS client
//! certificate (it is presented in both roles). Pure: bytes and `now` in, a `Material` or the
//! reason out.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

use super::{TlsError, svid_id, tls_time};
use crate::identity::{SpiffeId, TrustDomain};
use crate::time::UnixTime;

/// The three files' contents, read together.
#[derive(Clone)]
pub(crate) struct Files {
    pub(crate) ca: Vec<u8>,
    pub(crate) cert: Vec<u8>,
    pub(crate) key: Vec<u8>,
}

impl Files {
    /// A digest of all three, to notice any change (the key included).
    pub(crate) fn digest(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&self.ca, &self.cert, &self.key] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// Where the files are, for error messages.
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// What an operator needs to know of one certificate: which one, and when
/// it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// The serial number, lowercase hex without separators.
    pub(crate) serial: String,
    /// The subject, as text.
    pub(crate) subject: String,
    /// Start of validity.
    pub(crate) not_before: UnixTime,
    /// End of validity.
    pub(crate) not_after: UnixTime,
}

impl CertInfo {
    /// Reads the serial, subject and validity of a DER certificate.
    pub(crate) fn of(der: &[u8]) -> Result<CertInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate does not parse: {e}"))?;
        Ok(CertInfo {
            serial: hex(cert.raw_serial()),
            subject: cert.subject().to_string(),
            not_before: UnixTime::from_secs(cert.validity().not_before.timestamp()),
            not_after: UnixTime::from_secs(cert.validity().not_after.timestamp()),
        })
    }

    /// Seconds of validity left at `now` (negative once expired).
    pub(crate) fn remaining(&self, now: UnixTime) -> i64 {
        self.not_after.as_secs().saturating_sub(now.as_secs())
    }

    /// Whether `now` is past `fraction` of the lifetime (0.8: the last fifth).
    pub(crate) fn past_fraction(&self, now: UnixTime, fraction: f64) -> bool {
        let life = self
            .not_after
            .as_secs()
            .saturating_sub(self.not_before.as_secs());
        let point = self.not_before.as_secs() as f64 + life as f64 * fraction;
        now.as_secs() as f64 >= point
    }
}

/// Lowercase hex of `bytes` (a serial number), leading zero bytes dropped.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let trimmed = match bytes.iter().position(|&b| b != 0) {
        Some(i) => &bytes[i..],
        None => &bytes[bytes.len().saturating_sub(1)..],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// An instant as RFC 3339, for messages.
pub(crate) fn date(t: UnixTime) -> String {
    let st = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(t.as_secs()).unwrap_or(0));
    humantime::format_rfc3339_seconds(st).to_string()
}

/// One checked set of peer TLS material, ready for handshakes.
pub(crate) struct Material {
    pub(crate) certified: Arc<CertifiedKey>,
    key: PrivateKeyDer<'static>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) client_verifier: Arc<dyn ClientCertVerifier>,
    /// The leaf certificate.
    pub(crate) leaf: CertInfo,
    /// Every CA of the bundle, in file order.
    pub(crate) anchors: Vec<CertInfo>,
    pub(crate) digest: [u8; 32],
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("leaf", &self.leaf)
            .field("anchors", &self.anchors)
            .field("key", &"...")
            .finish()
    }
}

// === impl Material ===

impl Material {
    /// Checks `files` as a whole at `now`; the leaf must prove `expected`.
    pub(crate) fn check(
        files: &Files,
        paths: &Paths,
        td: &TrustDomain,
        expected: &SpiffeId,
        provider: &Arc<CryptoProvider>,
        now: UnixTime,
    ) -> Result<Material, TlsError> {
        let file = |what: &'static str, path: &PathBuf| {
            let path = path.clone();
            move |detail: String| TlsError::File {
                what,
                path: path.clone(),
                detail,
            }
        };
        let ca_err = file("ca", &paths.ca);
        let cert_err = file("cert", &paths.cert);
        let key_err = file("key", &paths.key);

        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for (i, c) in CertificateDer::pem_slice_iter(&files.ca).enumerate() {
            let c = c.map_err(|e| ca_err(format!("certificate {}: {e}", i + 1)))?;
            anchors
                .push(CertInfo::of(&c).map_err(|e| ca_err(format!("certificate {}: {e}", i + 1)))?);
            roots
                .add(c)
                .map_err(|e| ca_err(format!("certificate {}: {e}", i + 1)))?;
        }
        if roots.is_empty() {
            return Err(ca_err("no CA certificate found".into()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
            .collect::<Result<_, _>>()
            .map_err(|e| cert_err(e.to_string()))?;
        let leaf_der = chain
            .first()
            .cloned()
            .ok_or_else(|| cert_err("no certificate found".into()))?;
        let leaf = CertInfo::of(&leaf_der).map_err(&cert_err)?;
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| key_err(e.to_string()))?;

        let own = svid_id(&leaf_der, td).map_err(&cert_err)?;
        if &own != expected {
            return Err(TlsError::WrongIdentity {
                path: paths.cert.clone(),
                proven: own,
                expected: expected.clone(),
            });
        }
        if now < leaf.not_before || now > leaf.not_after {
            return Err(TlsError::Validity {
                path: paths.cert.clone(),
                serial: leaf.serial.clone(),
                not_before: date(leaf.not_before),
                not_after: date(leaf.not_after),
                now: date(now),
            });
        }
        let signer = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| key_err(format!("cannot load the private key: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signer);
        certified.keys_match().map_err(|e| TlsError::KeyMismatch {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            detail: e.to_string(),
        })?;
        let roots = Arc::new(roots);
        super::verify::check_chain(&roots, provider, &leaf_der, &chain[1..], tls_time(now))
            .map_err(|e| TlsError::Chain {
                cert: paths.cert.clone(),
                ca: paths.ca.clone(),
                detail: e.to_string(),
            })?;
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| ca_err(e.to_string()))?;
        // The same certificate is presented as a client: peers check it
        // with the client rules (clientAuth usage), so check it here too.
        client_verifier
            .verify_client_cert(&leaf_der, &chain[1..], tls_time(now))
            .map_err(|e| TlsError::Chain {
                cert: paths.cert.clone(),
                ca: paths.ca.clone(),
                detail: format!("as a client certificate: {e}"),
            })?;
        Ok(Material {
            certified: Arc::new(certified),
            key,
            roots,
            client_verifier,
            leaf,
            anchors,
            digest: files.digest(),
        })
    }

    /// The certificate chain (leaf first) and its private key.
    pub(crate) fn cert_and_key(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.certified.cert.clone(), self.key.clone_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serials print as hex without leading zero bytes; a lifetime fraction
    /// point is where it should be.
    #[test]
    fn serial_hex_and_fraction() {
        assert_eq!(hex(&[0, 0x1a, 0x02]), "1a02");
        assert_eq!(hex(&[0]), "00");
        let info = CertInfo {
            serial: "1".into(),
            subject: String::new(),
            not_before: UnixTime::from_secs(1000),
            not_after: UnixTime::from_secs(2000),
        };
        assert!(!info.past_fraction(UnixTime::from_secs(1799), 0.8));
        assert!(info.past_fraction(UnixTime::from_secs(1800), 0.8));
        assert_eq!(info.remaining(UnixTime::from_secs(2500)), -500);
    }
}
