//! The fleet-wide ban document as a file (`[bans] document`), delivered by
//! whatever the fleet already uses for files (config management, a shared
//! volume, an object store sync): it is signed, so the channel need not be
//! trusted. Polled every second; a new content is checked against the
//! designated signer (`[bans] signer`) and offered to the `BanStore`,
//! which takes it only if its sequence number is higher than any seen. A
//! refused document is logged once and counted; the bans in force stay.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::document::{MAX_DOCUMENT_BYTES, verify};
use super::{BanError, BanStore, Offered};

/// How often the file is read.
const POLL: Duration = Duration::from_secs(1);

/// Where the document comes from and whose signature counts.
#[derive(Debug)]
pub(crate) struct DocumentSource {
    path: PathBuf,
    signer: Vec<u8>,
    td: String,
}

impl DocumentSource {
    /// Reads the designated signer's certificate (`signer`, which no other
    /// user may be able to write) for documents of trust domain `td` at `path`.
    pub(crate) fn new(path: &Path, signer: &Path, td: &str) -> Result<Self, BanError> {
        let err = |detail: String| BanError::File {
            path: signer.to_owned(),
            detail,
        };
        let resolved = crate::keys::check_file(signer, "bans.signer", false)
            .map_err(|e| err(e.to_string()))?;
        let pem = std::fs::read(&resolved).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            path: path.to_owned(),
            signer: super::signer_key(&pem).map_err(err)?,
            td: td.to_owned(),
        })
    }
}

fn count(result: &'static str) {
    metrics::counter!("tokend_ban_document_total", "result" => result).increment(1);
}

/// Polls `source` until `cancel`, offering each new valid document to `store`.
pub(crate) async fn watch(source: DocumentSource, store: Arc<BanStore>, cancel: CancellationToken) {
    let mut seen: Option<Vec<u8>> = None;
    loop {
        poll(&source, &store, &mut seen).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn poll(source: &DocumentSource, store: &BanStore, seen: &mut Option<Vec<u8>>) {
    let file = source.path.display();
    let bytes = match std::fs::read(&source.path) {
        Ok(b) if b.len() > MAX_DOCUMENT_BYTES => format!("<{} bytes>", b.len()).into_bytes(),
        Ok(b) => b,
        Err(e) => format!("<{e}>").into_bytes(),
    };
    if seen.as_deref() == Some(bytes.as_slice()) {
        return;
    }
    *seen = Some(bytes.clone());
    let text = match String::from_utf8(bytes) {
        Ok(t) if !t.starts_with('<') => t,
        Ok(t) => {
            tracing::info!(file = %file, detail = %t, "no readable ban document; the bans in force stay");
            return;
        }
        Err(_) => {
            count("refused");
            tracing::warn!(file = %file, "ban document is not text; refused");
            return;
        }
    };
    let doc = match verify(&text, &source.signer, &source.td) {
        Ok(doc) => doc,
        Err(e) => {
            count("refused");
            tracing::warn!(file = %file, error = %e, "ban document refused; the bans in force stay");
            return;
        }
    };
    let (seq, n) = (doc.seq, doc.bans.len());
    match store.offer(doc.seq, doc.bans).await {
        Ok(Offered::Taken) => {
            count("taken");
            metrics::gauge!("tokend_ban_document_seq").set(seq as f64);
            tracing::warn!(file = %file, seq, bans = n, "ban document taken: its bans are in force");
        }
        Ok(Offered::Stale { current }) if seq < current => {
            count("stale");
            tracing::warn!(file = %file, seq, current, "ban document older than the one in force; refused (no rollback)");
        }
        Ok(Offered::Stale { .. }) => {}
        Err(e) => {
            *seen = None; // try again next poll
            tracing::error!(file = %file, error = %e, "cannot persist the ban document; not in force yet");
        }
    }
}
