//! The etcd connection built from `[directory]`: endpoints, TLS with an
//! optional client certificate, an optional user whose password is read
//! from its file here (and never logged), and the per-request timeout. The
//! client connects lazily, so a sidecar starts while etcd is down and its
//! requests fail (closed) until etcd answers. The user logs in once at
//! start; if etcd is down or refuses the password, the sidecar still
//! starts (its requests, sent without a token, are refused: fail closed)
//! and `Login` keeps trying with backoff.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

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
    // The user is not given here: etcd-client would log in inside
    // `connect` and fail it while etcd is down (see `connect`).
    Ok(o.with_auto_token_refresh(true))
}

/// The configured user and its password, read from its file.
fn credentials(config: &DirectoryConfig) -> Result<Option<(String, String)>, EtcdSetupError> {
    let Some(user) = &config.user else {
        return Ok(None);
    };
    let text = read("directory.password_file", &user.password_file)?;
    let password = String::from_utf8_lossy(&text)
        .trim_end_matches(['\r', '\n'])
        .to_owned();
    if password.is_empty() {
        return Err(EtcdSetupError::EmptyPassword(user.password_file.clone()));
    }
    Ok(Some((user.name.clone(), password)))
}

/// The log-in of `[directory] user` still to be done: it failed at start
/// (etcd down, or the password refused), and is retried with backoff
/// until it succeeds or the daemon stops.
pub(crate) struct Login {
    client: etcd_client::Client,
    credentials: (String, String),
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Login")
            .field("user", &self.credentials.0)
            .finish_non_exhaustive()
    }
}

/// The longest wait between two log-in attempts.
const LOGIN_RETRY_MAX: Duration = Duration::from_secs(5);

impl Login {
    /// Logs in, retrying with backoff, until it succeeds or `cancel`.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let delay = super::watch::backoff(failures.min(16), &mut rand::thread_rng())
                .min(LOGIN_RETRY_MAX);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match self
                .client
                .update_user(Some(self.credentials.clone()))
                .await
            {
                Ok(()) => {
                    tracing::info!(user = %self.credentials.0, "directory: logged in to etcd");
                    return;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        user = %self.credentials.0,
                        error = %e,
                        "directory: etcd log-in failed; requests fail closed until it succeeds"
                    );
                }
            }
        }
    }
}

/// A client of the configured etcd (connects lazily), logged in as the
/// configured user if etcd accepted it now; otherwise the `Login` to run.
pub(crate) async fn connect(
    config: &DirectoryConfig,
) -> Result<(etcd_client::Client, Option<Login>), EtcdSetupError> {
    let options = options(config)?;
    let credentials = credentials(config)?;
    let mut client = etcd_client::Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| EtcdSetupError::Client(e.to_string()))?;
    let Some(credentials) = credentials else {
        return Ok((client, None));
    };
    match client.update_user(Some(credentials.clone())).await {
        Ok(()) => Ok((client, None)),
        Err(e) => {
            tracing::warn!(
                user = %credentials.0,
                error = %e,
                "directory: etcd log-in failed at start; requests fail closed until it succeeds"
            );
            Ok((
                client.clone(),
                Some(Login {
                    client,
                    credentials,
                }),
            ))
        }
    }
}
