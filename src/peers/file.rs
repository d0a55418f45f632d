//! A peer whose keys come from a JWKS file. Read at start (a missing or bad
//! file stops the start, naming the file), re-read when it changes (so a key
//! removed from the file stops being accepted) and when a token names a kid
//! the set lacks. A bad rewrite is refused with a logged reason and the
//! previous set stays.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::verify::{Refresh, TrustStore};

/// The largest JWKS document accepted from a file or a peer.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Reads one issuer's keys from a JWKS file.
pub struct JwksFileSource {
    issuer: String,
    path: PathBuf,
    trust: Arc<TrustStore>,
    clock: SharedClock,
    /// What the file looked like when last read (taken before reading).
    loaded: std::sync::Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for JwksFileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksFileSource")
            .field("issuer", &self.issuer)
            .field("path", &self.path)
            .finish()
    }
}

impl JwksFileSource {
    /// Registers `issuer` in `trust` with this file as its source and loads it.
    pub fn install(
        issuer: &str,
        path: PathBuf,
        trust: Arc<TrustStore>,
        clock: SharedClock,
    ) -> Result<Arc<Self>, String> {
        let src = Arc::new(Self {
            issuer: issuer.to_owned(),
            path: path.clone(),
            trust: trust.clone(),
            clock,
            loaded: std::sync::Mutex::default(),
        });
        trust.register(
            issuer,
            format!("file:{}", path.display()),
            Some(src.clone()),
        );
        src.load()?;
        Ok(src)
    }

    fn load(&self) -> Result<(), String> {
        let p = &self.path;
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = stamp(p);
        let meta = std::fs::metadata(p)
            .map_err(|e| format!("JWKS file {} for peer {}: {e}", p.display(), self.issuer))?;
        if meta.len() > MAX_JWKS_BYTES as u64 {
            return Err(format!(
                "JWKS file {} is {} bytes, over the {MAX_JWKS_BYTES}-byte limit",
                p.display(),
                meta.len()
            ));
        }
        let text = std::fs::read(p).map_err(|e| format!("JWKS file {}: {e}", p.display()))?;
        let keys = crate::jwk::parse_jwks(&text, crate::verify::MAX_KEYS_PER_ISSUER)
            .map_err(|e| format!("JWKS file {}: {e}", p.display()))?;
        self.trust
            .replace(
                &self.issuer,
                keys,
                Vec::new(),
                Default::default(),
                self.clock.now(),
            )
            .map_err(|e| format!("JWKS file {}: {e}", p.display()))
    }
}

/// Identity and version of a file: inode, size, modification and change
/// times (an atomic rename to a same-size file still changes inode and ctime).
type Stamp = (u64, u64, i64, i64, i64, i64);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| {
        (
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    })
}

impl JwksFileSource {
    /// Re-reads the file whenever it differs from what was last read, until cancelled.
    pub async fn watch(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
            let last = *self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            if stamp(&self.path) == last {
                continue;
            }
            match self.load() {
                Ok(()) => {
                    tracing::info!(issuer = %self.issuer, file = %self.path.display(), "reloaded JWKS file")
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.issuer, error = %e, "refused JWKS file; previous set stays");
                    self.trust.note_error(&self.issuer, e);
                }
            }
        }
    }
}

impl Refresh for JwksFileSource {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move { self.load() })
    }
}
