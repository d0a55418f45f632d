//! The etcd connection built from `[directory]`: endpoints, TLS with an
//! optional client certificate, an optional user whose password is read
//! from its file here (and never logged), and the per-request timeout. The
//! client connects lazily, so a sidecar starts while etcd is down and its
//! requests fail (closed) until etcd answers.

use crate::config::DirectoryConfig;

/// Why the etcd client could not be set up (a config problem: exit 64).
#[derive(Debug, thiserror::Error)]
pub enum EtcdSetupError {
    /// A TLS or password file could not be read.
    #[error("directory: cannot read {what} {path}: {source}")]
    Read {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The password file is empty.
    #[error("directory.password_file {0}: the file is empty")]
    EmptyPassword(std::path::PathBuf),
    /// The client refused the endpoints or options.
    #[error("directory.etcd: {0}")]
    Client(String),
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, EtcdSetupError> {
    std::fs::read(path).map_err(|source| EtcdSetupError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The connect options `config` asks for.
fn options(config: &DirectoryConfig) -> Result<etcd_client::ConnectOptions, EtcdSetupError> {
    let mut o = etcd_client::ConnectOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_timeout(config.request_timeout)
        .with_keep_alive(config.request_timeout, config.request_timeout)
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let ca = read("directory.ca", &tls.ca)?;
        let mut t =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca));
        if let Some((cert, key)) = &tls.client {
            let cert = read("directory.cert", cert)?;
            let key = read("directory.key", key)?;
            t = t.identity(etcd_client::Identity::from_pem(cert, key));
        }
        o = o.with_tls(t);
    }
    if let Some(user) = &config.user {
        let text = read("directory.password_file", &user.password_file)?;
        let password = String::from_utf8_lossy(&text)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        if password.is_empty() {
            return Err(EtcdSetupError::EmptyPassword(user.password_file.clone()));
        }
        o = o
            .with_user(user.name.clone(), password)
            .with_auto_token_refresh(true);
    }
    Ok(o)
}

/// A client of the configured etcd (connects lazily).
pub(crate) async fn connect(
    config: &DirectoryConfig,
) -> Result<etcd_client::Client, EtcdSetupError> {
    let options = options(config)?;
    etcd_client::Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| EtcdSetupError::Client(e.to_string()))
}
