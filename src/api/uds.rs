//! The Unix socket: bind (refusing a live socket, replacing a stale one,
//! never reachable with umask permissions), connect (clients, CLI, tests),
//! and the peer-credential uid checks. No gRPC services here.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::reason::{Reason, Refusal};

/// Why the socket could not be bound or reached, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process serves on the path.
    #[error("socket {0} is in use by a running process (another tokend?)")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The client could not reach the sidecar.
    #[error("cannot connect to tokend at {path}: {detail}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Binds the socket at `path` with `mode`.
pub(crate) fn bind(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io("remove stale socket", path))?;
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("create socket directory", dir))?;
    }
    // Bind under a temporary name, chmod, then rename into place, so the
    // socket is never reachable at `path` with umask permissions.
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tokend.sock"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io("bind socket", path))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io("chmod socket", path))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io("move socket into place at", path)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Opens a gRPC channel to the sidecar listening on `socket`.
pub async fn connect(socket: &Path) -> Result<tonic::transport::Channel, SocketError> {
    let path = socket.to_owned();
    let err = |detail: String| SocketError::Connect {
        path: socket.to_owned(),
        detail,
    };
    // The URI is required by the API but unused: the connector dials the socket.
    tonic::transport::Endpoint::try_from("http://tokend.local")
        .map_err(|e| err(e.to_string()))?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| err(e.to_string()))
}

/// The uid of the calling process, from the socket's peer credentials.
fn caller_uid<T>(req: &tonic::Request<T>) -> Option<u32> {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
}

/// The calling process (uid, pid) for the audit trail.
pub(crate) fn caller_of<T>(req: &tonic::Request<T>) -> crate::audit::Caller {
    let cred = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred);
    crate::audit::Caller {
        uid: cred.map(|c| c.uid()),
        pid: cred.and_then(|c| c.pid()),
    }
}

/// Who may call: every caller that can open the socket, or a list of uids.
#[derive(Clone, Debug, Default)]
pub(crate) struct Callers(Option<Vec<u32>>);

impl Callers {
    /// `None` admits everyone who can open the socket.
    pub(crate) fn new(allowed: Option<Vec<u32>>) -> Self {
        Self(allowed)
    }

    /// Refuses a caller whose uid is not listed (`permission_denied`).
    pub(crate) fn check<T>(&self, req: &tonic::Request<T>) -> Result<(), Refusal> {
        let Some(allowed) = &self.0 else {
            return Ok(());
        };
        match caller_uid(req) {
            Some(uid) if allowed.contains(&uid) => Ok(()),
            Some(uid) => Err(Refusal::new(
                Reason::PermissionDenied,
                format!("uid {uid} is not allowed on this socket"),
            )),
            None => Err(Refusal::new(
                Reason::PermissionDenied,
                "caller credentials unavailable",
            )),
        }
    }
}
