//! The Unix socket: bind (refusing a live socket, replacing a stale one),
//! chmod, and the peer-credential uid checks. No gRPC here.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::reason::Reason;

/// Binds the socket at `path` with `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "socket {} is in use by a running process (another tokend?)",
                    path.display()
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create socket directory {}: {e}", dir.display()))?;
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
    let listener = UnixListener::bind(&tmp)
        .map_err(|e| format!("cannot bind socket {}: {e}", path.display()))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod socket {}: {e}", path.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .map_err(|e| format!("cannot move socket into place at {}: {e}", path.display()))
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// The uid of the calling process, from the socket's peer credentials.
pub fn caller_uid<T>(req: &tonic::Request<T>) -> Option<u32> {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
}

/// The uid this daemon runs as.
pub fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Refuses callers not in `allowed` (None allows every caller that can open the socket).
pub fn check_uid<T>(req: &tonic::Request<T>, allowed: Option<&[u32]>) -> Result<(), tonic::Status> {
    let Some(allowed) = allowed else {
        return Ok(());
    };
    match caller_uid(req) {
        Some(uid) if allowed.contains(&uid) => Ok(()),
        Some(uid) => Err(super::status::reject(
            Reason::PermissionDenied,
            format!("uid {uid} is not allowed on this socket"),
        )),
        None => Err(super::status::reject(
            Reason::PermissionDenied,
            "caller credentials unavailable",
        )),
    }
}
