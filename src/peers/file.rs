//! A peer whose keys come from a JWKS file. Read at start (a missing or bad
//! file stops the start, naming the file), re-read when it changes (so a key
//! removed from the file stops being accepted) and when a token names a kid
//! the set lacks. A bad rewrite is refused with a logged reason and the
//! previous set stays.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use super::refresh::KeySource;
use super::{PeerError, TrustFeed};
use crate::engine::{MAX_KEYS_PER_ISSUER, TrustUpdate};
use crate::time::SharedClock;

/// The largest JWKS document accepted from a file or a peer.
pub(crate) const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Reads one issuer's keys from a JWKS file.
pub(crate) struct JwksFileSource {
    issuer: String,
    path: PathBuf,
    feed: TrustFeed,
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
    /// A source of `issuer`'s keys read from `path`, feeding `feed`.
    pub(crate) fn new(
        issuer: &str,
        path: PathBuf,
        feed: TrustFeed,
        clock: SharedClock,
    ) -> Arc<Self> {
        Arc::new(Self {
            issuer: issuer.to_owned(),
            path,
            feed,
            clock,
            loaded: std::sync::Mutex::default(),
        })
    }

    /// How the issuer is registered: its source is this file.
    pub(crate) fn registration(&self) -> TrustUpdate {
        TrustUpdate::Register {
            issuer: self.issuer.clone(),
            source: format!("file:{}", self.path.display()),
        }
    }

    fn file_error(&self, detail: impl std::fmt::Display) -> PeerError {
        PeerError::File {
            path: self.path.clone(),
            detail: format!("(peer {}) {detail}", self.issuer),
        }
    }

    /// Reads and checks the file: the update that installs its keys.
    pub(crate) fn read(&self) -> Result<TrustUpdate, PeerError> {
        let p = &self.path;
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = stamp(p);
        let meta = std::fs::metadata(p).map_err(|e| self.file_error(e))?;
        if meta.len() > MAX_JWKS_BYTES as u64 {
            return Err(self.file_error(format!(
                "{} bytes, over the {MAX_JWKS_BYTES}-byte limit",
                meta.len()
            )));
        }
        let text = std::fs::read(p).map_err(|e| self.file_error(e))?;
        let keys =
            crate::jose::parse_jwks(&text, MAX_KEYS_PER_ISSUER).map_err(|e| self.file_error(e))?;
        Ok(TrustUpdate::Replace {
            issuer: self.issuer.clone(),
            keys,
            revoked: Vec::new(),
            expires: Default::default(),
            at: self.clock.now(),
        })
    }

    async fn load(&self) -> Result<(), PeerError> {
        let update = self.read()?;
        self.feed.apply(update).await
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
    pub(crate) async fn watch(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
            let last = *self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            if stamp(&self.path) == last {
                continue;
            }
            match self.load().await {
                Ok(()) => {
                    tracing::info!(issuer = %self.issuer, file = %self.path.display(), "reloaded JWKS file")
                }
                Err(PeerError::WriterGone) => return,
                Err(e) => {
                    tracing::warn!(issuer = %self.issuer, error = %e, "refused JWKS file; previous set stays");
                    self.feed.note(TrustUpdate::Error {
                        issuer: self.issuer.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }
}

impl KeySource for JwksFileSource {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<(), PeerError>> + Send + '_>> {
        Box::pin(self.load())
    }
}
