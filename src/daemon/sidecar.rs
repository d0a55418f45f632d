//! `Sidecar`: a whole daemon built in-process, for tests and the demo. It
//! writes a config under its own directory (TOML, exactly as an operator
//! would), issues its peer certificate from a given CA, listens on port 0,
//! runs on an injected clock, and hands back the socket path and the peer
//! address directly: nothing is scraped from logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Daemon, DaemonError};
use crate::config::{Config, ConfigError, Overrides};
use crate::time::{SharedClock, SystemClock};

/// Why an in-process sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Its directory or certificate could not be prepared.
    #[error("sidecar {name}: {detail}")]
    Setup {
        /// The sidecar.
        name: String,
        /// Why.
        detail: String,
    },
    /// The config it was given is refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The daemon refused to build.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// Builds one sidecar named `name` in `root/name`.
#[derive(Debug, Clone)]
pub struct Sidecar {
    root: PathBuf,
    name: String,
    /// The directory name under `root` (the name, or `name-N` for a replica).
    dir_name: String,
    trust_domain: String,
    extra: String,
    ca: Option<PathBuf>,
    listen: Option<SocketAddr>,
    peers: Vec<(String, Vec<SocketAddr>)>,
    /// Peers given by URL (a host name to resolve).
    named_peers: Vec<(String, String)>,
    clock: Option<SharedClock>,
    standby: bool,
    /// `[peer_api] document_lifetime`, if set.
    document_lifetime: Option<String>,
}

/// A sidecar running in this process.
#[derive(Debug)]
pub struct RunningSidecar {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    peer_addr: Option<SocketAddr>,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), DaemonError>>>,
}

// === impl Sidecar ===

impl Sidecar {
    /// A sidecar `name` of trust domain `bank.internal` under `root/name`,
    /// with its socket and keys there.
    pub fn new(root: &Path, name: &str) -> Self {
        Self {
            root: root.to_owned(),
            name: name.to_owned(),
            dir_name: name.to_owned(),
            trust_domain: "bank.internal".into(),
            extra: String::new(),
            ca: None,
            listen: None,
            peers: Vec::new(),
            named_peers: Vec::new(),
            clock: None,
            standby: true,
            document_lifetime: None,
        }
    }

    /// Replica `n` of its service: the same name (and identity), its own
    /// directory `root/name-n`, so its own keys, instance id and peer port.
    pub fn replica(mut self, n: u32) -> Self {
        self.dir_name = format!("{}-{n}", self.name);
        self
    }

    /// Another trust domain.
    pub fn trust_domain(mut self, td: &str) -> Self {
        self.trust_domain = td.to_owned();
        self
    }

    /// TOML appended to the config (sections such as `[rotation]`).
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Serve the peer API on 127.0.0.1:0 with a certificate from the CA in `ca_dir`.
    pub fn peer_api(mut self, ca_dir: &Path) -> Self {
        self.ca = Some(ca_dir.to_owned());
        self
    }

    /// Listen for peers on `addr` instead of 127.0.0.1:0 (to restart on the
    /// port peers already know).
    pub fn peer_listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Trust the peer `name` served at `addr`.
    pub fn peer(mut self, name: &str, addr: SocketAddr) -> Self {
        self.peers.push((name.to_owned(), vec![addr]));
        self
    }

    /// Trust the peer `name` at `url` (`https://host:port`; a host name
    /// stands for every address it resolves to).
    pub fn peer_named(mut self, name: &str, url: &str) -> Self {
        self.named_peers.push((name.to_owned(), url.to_owned()));
        self
    }

    /// Trust the peer `name` served by replicas at each of `addrs` (one
    /// `[[peers]]` entry with `addresses = [...]`).
    pub fn peer_replicas(mut self, name: &str, addrs: &[SocketAddr]) -> Self {
        self.peers.push((name.to_owned(), addrs.to_vec()));
        self
    }

    /// Sign key-set documents valid for `lifetime` (`[peer_api]
    /// document_lifetime`, like `"60s"`).
    pub fn document_lifetime(mut self, lifetime: &str) -> Self {
        self.document_lifetime = Some(lifetime.to_owned());
        self
    }

    /// Run on `clock` (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Keep a standby key for revocations (default yes, as the daemon does);
    /// `false` for tests that never revoke: it saves an RSA key generation
    /// per start.
    pub fn standby_key(mut self, on: bool) -> Self {
        self.standby = on;
        self
    }

    /// The directory this sidecar lives in.
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.dir_name)
    }

    fn setup(&self, detail: impl std::fmt::Display) -> SidecarError {
        SidecarError::Setup {
            name: self.name.clone(),
            detail: detail.to_string(),
        }
    }

    /// The config file text this sidecar runs with.
    fn toml(&self) -> Result<String, SidecarError> {
        let dir = self.dir();
        let mut toml = format!(
            "name = \"{}\"\ntrust_domain = \"{}\"\nsocket = \"tokend.sock\"\nkeys_dir = \"keys\"\n",
            self.name, self.trust_domain
        );
        // The caller's TOML first, so its top-level keys (admin_uids...)
        // come before any table this builder adds.
        toml.push_str(&self.extra);
        if let Some(ca) = &self.ca {
            let peer_dir = dir.join("peer");
            if !peer_dir.join(crate::ca::PEER_CERT).exists() {
                crate::ca::issue(ca, &self.name, &peer_dir, &[], 1).map_err(|e| self.setup(e))?;
            }
            let listen = self
                .listen
                .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
            toml.push_str(&format!(
                "[peer_api]\nlisten = \"{listen}\"\nca = \"{}\"\ncert = \"peer/cert.pem\"\nkey = \"peer/key.pem\"\n",
                ca.join(crate::ca::CA_CERT).display()
            ));
            if let Some(l) = &self.document_lifetime {
                toml.push_str(&format!("document_lifetime = \"{l}\"\n"));
            }
        }
        for (peer, url) in &self.named_peers {
            toml.push_str(&format!(
                "[[peers]]\nname = \"{peer}\"\naddress = \"{url}\"\n"
            ));
        }
        for (peer, addrs) in &self.peers {
            match addrs.as_slice() {
                [addr] => toml.push_str(&format!(
                    "[[peers]]\nname = \"{peer}\"\naddress = \"https://{addr}\"\n"
                )),
                many => {
                    let list: Vec<String> =
                        many.iter().map(|a| format!("\"https://{a}\"")).collect();
                    toml.push_str(&format!(
                        "[[peers]]\nname = \"{peer}\"\naddresses = [{}]\n",
                        list.join(", ")
                    ));
                }
            }
        }
        Ok(toml)
    }

    /// Builds the daemon (keys loaded, sockets bound) without serving.
    pub async fn build(&self) -> Result<(Daemon, PathBuf), SidecarError> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(|e| self.setup(format!("{}: {e}", dir.display())))?;
        let toml = self.toml()?;
        let path = dir.join("tokend.toml");
        std::fs::write(&path, &toml).map_err(|e| self.setup(format!("{}: {e}", path.display())))?;
        let config = Config::from_toml(&toml, &dir, &path, &Overrides::default())?;
        let socket = config.socket.clone();
        let clock = self.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
        let daemon = Daemon::build(config, clock)
            .await?
            .standby_key(self.standby);
        Ok((daemon, socket))
    }

    /// Builds and starts serving on a task of its own.
    pub async fn start(&self) -> Result<RunningSidecar, SidecarError> {
        let (daemon, socket) = self.build().await?;
        let peer_addr = daemon.peer_addr();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move { daemon.run(until.cancelled_owned()).await });
        Ok(RunningSidecar {
            name: self.name.clone(),
            dir: self.dir(),
            socket,
            peer_addr,
            stop,
            task: Some(task),
        })
    }
}

// === impl RunningSidecar ===

impl RunningSidecar {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its directory (config, keys, peer certificate).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where its peer API listens, if it serves one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// Shuts it down as SIGTERM would, and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), DaemonError> {
        self.stop.cancel();
        match self.task.take() {
            Some(t) => t.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for RunningSidecar {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
