//! Certificate helpers for the certs tests: issue with tokend or with the
//! `openssl` CLI, publish files as renewers do (atomic rename; a
//! Kubernetes-style `..data` symlink swap), probe which certificate a peer
//! API presents on a fresh connection, and keep a mint/verify loop running
//! while certificates change.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokend::pb::tokend as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Issues a peer certificate for `name` from the CA in `ca` into `out`, valid for a day.
pub fn issue(ca: &Path, name: &str, out: &Path) -> PathBuf {
    tokend::ca_issue(ca, name, out, &[], 1).expect("ca issue");
    out.to_owned()
}

/// Issues a peer certificate for `name` valid from `not_before` to `not_after` (seconds).
pub fn issue_window(ca: &Path, name: &str, out: &Path, not_before: i64, not_after: i64) -> PathBuf {
    let mut spec = tokend::IssueSpec::peer(ca, name, out, Duration::from_secs(60));
    spec.not_before = not_before;
    spec.not_after = not_after;
    tokend::ca_issue_with(&spec).expect("ca issue");
    out.to_owned()
}

fn hex(bytes: &[u8]) -> String {
    let i = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[i..].iter().map(|b| format!("{b:02x}")).collect()
}

/// The serial (hex) of a DER certificate.
pub fn serial_of_der(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate");
    hex(cert.raw_serial())
}

/// The serial (hex) of the first certificate of a PEM file.
pub fn serial_of(pem_file: &Path) -> String {
    let der = CertificateDer::pem_file_iter(pem_file)
        .expect("pem")
        .next()
        .expect("a certificate")
        .expect("certificate");
    serial_of_der(&der)
}

/// Writes `bytes` to `dir/name` as a renewer does: a 0600 temp file in the
/// same directory, renamed over the old one.
pub fn rename_into(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .expect("temp file");
    f.write_all(bytes).expect("write");
    f.sync_all().expect("fsync");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// Replaces `dir/cert.pem` and `dir/key.pem` with those in `src`, each by an atomic rename.
pub fn renew_by_rename(src: &Path, dir: &Path) {
    for f in ["cert.pem", "key.pem"] {
        rename_into(dir, f, &std::fs::read(src.join(f)).expect("read"));
    }
}

/// Publishes `src`'s cert.pem and key.pem in `dir` as the kubelet updates a
/// secret volume: the files in a new `..version` directory, a `..data`
/// symlink swapped to it by one rename, and `cert.pem`/`key.pem` links
/// through `..data` (made on first use).
pub fn k8s_publish(dir: &Path, version: &str, src: &Path) {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.join(version))
        .expect("mkdir");
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(src.join(f), dir.join(version).join(f)).expect("copy");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(version, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for f in ["cert.pem", "key.pem"] {
        if std::fs::symlink_metadata(dir.join(f)).is_err() {
            symlink(format!("..data/{f}"), dir.join(f)).expect("link");
        }
    }
}

/// Opens a fresh mTLS connection to the peer API at `addr` as `client` (a
/// directory with cert.pem and key.pem), trusting the CAs in `ca_pem`.
/// Returns the serial of the certificate the server presented, once the
/// server has accepted ours (its HTTP/2 SETTINGS arrived), or why not.
pub async fn served_serial(
    addr: std::net::SocketAddr,
    ca_pem: &Path,
    client: &Path,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(client.join("cert.pem"))
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(client.join("key.pem")).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|d| serial_of_der(d))
        .ok_or("no server certificate")?;
    // The HTTP/2 preface and an empty SETTINGS frame; a server that refused
    // our certificate answers with an alert instead of its SETTINGS.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    tls.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut frame))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| format!("refused: {e}"))?;
    Ok(serial)
}

/// Waits (up to 15 s) until fresh connections to `addr` see `serial`.
pub async fn wait_served(addr: std::net::SocketAddr, ca_pem: &Path, client: &Path, serial: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let last = served_serial(addr, ca_pem, client).await;
        if last.as_deref() == Ok(serial) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never presented {serial}: last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `openssl` CLI, or a failure naming the package to install.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("openssl CLI not found ({e}); install the Debian package openssl (.ci/deps/openssl.sh)")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An external PKI made by openssl in `dir`: `root.pem` (self-signed),
/// `int.pem` (an intermediate CA it signed), each with its key.
pub fn openssl_ca(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("ca.ext"),
        "[root]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n\
         [int]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .expect("ext");
    let key = |name: &str| {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                name,
            ],
        )
    };
    key("root.key");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-subj",
            "/O=Bank/CN=Bank Root CA",
            "-days",
            "30",
            "-extensions",
            "root",
            "-config",
            "ca.ext",
            "-out",
            "root.pem",
        ],
    );
    key("int.key");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "int.key",
            "-subj",
            "/O=Bank/CN=Bank Issuing CA",
            "-out",
            "int.csr",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "20",
            "-extfile",
            "ca.ext",
            "-extensions",
            "int",
            "-out",
            "int.pem",
        ],
    );
}

/// A leaf from the openssl intermediate in `ca` with the SANs `sans`
/// (`URI:spiffe://…,DNS:localhost`), written as `out/cert.pem` (leaf +
/// intermediate, as cert-manager's tls.crt) and `out/key.pem`.
pub fn openssl_leaf(ca: &Path, cn: &str, sans: &str, out: &Path) -> PathBuf {
    openssl_leaf_eku(ca, cn, sans, "serverAuth,clientAuth", out)
}

/// `openssl_leaf` with the extended key usages `eku`.
pub fn openssl_leaf_eku(ca: &Path, cn: &str, sans: &str, eku: &str, out: &Path) -> PathBuf {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .expect("mkdir");
    let ext = ca.join(format!("{cn}.ext"));
    let mut text = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={eku}\n"
    );
    if !sans.is_empty() {
        text.push_str(&format!("subjectAltName={sans}\n"));
    }
    std::fs::write(&ext, text).expect("ext");
    let key = out.join("key.pem");
    let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    openssl(
        ca,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &s(&key),
        ],
    );
    crate::support::chmod(&key, 0o600);
    let csr = ca.join(format!("{cn}.csr"));
    let leaf = ca.join(format!("{cn}.pem"));
    openssl(
        ca,
        &[
            "req",
            "-new",
            "-key",
            &s(&key),
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &s(&csr),
        ],
    );
    openssl(
        ca,
        &[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            "int.pem",
            "-CAkey",
            "int.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &s(&ext),
            "-out",
            &s(&leaf),
        ],
    );
    let mut chain = std::fs::read(&leaf).expect("leaf");
    chain.extend(std::fs::read(ca.join("int.pem")).expect("int"));
    rename_into(out, "cert.pem", &chain);
    out.to_owned()
}

/// Mint at one sidecar, verify at another, over and over, each token with a
/// claim of its own (no cache answers), until stopped: every failure is kept.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl Traffic {
    /// Runs the loop over `pairs` of (minter socket, audience, verifier socket).
    pub fn start(pairs: Vec<(PathBuf, String, PathBuf)>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failures) = (0u64, Vec::new());
            let mut i = 0u64;
            while !until.load(Ordering::Relaxed) {
                for (minter, audience, verifier) in &pairs {
                    i += 1;
                    let mut m = pb::token_service_client::TokenServiceClient::new(
                        tokend::connect(minter).await.expect("connect"),
                    );
                    let minted = m
                        .mint(pb::MintRequest {
                            audience: audience.clone(),
                            claims_json: format!("{{\"n\":{i}}}"),
                            ..Default::default()
                        })
                        .await;
                    let token = match minted {
                        Ok(r) => r.into_inner().token,
                        Err(s) => {
                            failures.push(format!("mint at {}: {s:?}", minter.display()));
                            continue;
                        }
                    };
                    let v = pb::token_service_client::TokenServiceClient::new(
                        tokend::connect(verifier).await.expect("connect"),
                    );
                    match crate::support::verify_with(v, &token).await {
                        Ok(_) => ok += 1,
                        Err(r) => failures.push(format!("verify at {}: {r}", verifier.display())),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failures)
        });
        Traffic { stop, task }
    }

    /// Stops the loop: (verifications that passed, failures).
    pub async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("traffic task")
    }
}
