//! A peer whose keys come from a JWKS file. Read at start (a missing or bad
//! file stops the start, naming the file) and re-read when a token names a kid
//! the set lacks, so an updated file is picked up without a restart.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use crate::clock::SharedClock;
use crate::verify::{Refresh, TrustStore};

/// The largest JWKS document accepted from a file or a peer.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Reads one issuer's keys from a JWKS file.
#[derive(Clone)]
pub struct JwksFileSource {
    issuer: String,
    path: PathBuf,
    trust: Arc<TrustStore>,
    clock: SharedClock,
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

impl Refresh for JwksFileSource {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move { self.load() })
    }
}
