//! From etcd's bytes to trusted keys. A value under
//! `prefix + keys/<trust-domain>/<service>/<instance>` is a claim by an
//! untrusted relay; it is installed only if the document verifies
//! (`verify_document`: chain to the CA, signature, limits, times), its
//! certificate's identity is the one the key path names, its instance is
//! the path's, the identity is accepted (`[directory] accept`), and its
//! sequence is not lower than one already seen (the writer's rollback
//! check). Anything else is refused with its reason: counted in
//! `tokend_directory_refusals_total{reason}` and logged (at most once a
//! second per reason), naming the key. A delete marks the instance gone: its keys
//! stay until its document's `exp` or their expiry hints.

use super::watch::{DirectorySink, SinkFuture};
use crate::engine::SetError;
use crate::identity::{SpiffeId, TrustDomain};
use crate::peers::{DocumentSink, LogLimit, PeerError};

/// Installs the directory's documents into the trust writer.
pub(crate) struct DirectoryInstaller {
    sink: DocumentSink,
    /// `prefix + "keys/"`.
    keys: String,
    td: TrustDomain,
    accept: Option<Vec<SpiffeId>>,
    /// One warning a second per refusal reason: a flood of one kind does
    /// not hide another kind.
    logs: std::sync::Mutex<std::collections::HashMap<&'static str, std::sync::Arc<LogLimit>>>,
}

impl std::fmt::Debug for DirectoryInstaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryInstaller")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Why a directory value was not installed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// The key is not `keys/<td>/<service>/<instance>` of this trust domain.
    #[error("key is not keys/<trust-domain>/<service>/<instance> of this trust domain")]
    BadKey,
    /// The identity is not in `[directory] accept`.
    #[error("{0} is not in [directory] accept")]
    NotAccepted(SpiffeId),
    /// The document's certificate proves another identity than the key names.
    #[error("its key names {path_identity} but the document's certificate is {document}")]
    IdentityMismatch {
        /// The key's identity.
        path_identity: SpiffeId,
        /// The certificate's identity.
        document: SpiffeId,
    },
    /// The document's instance is not the one the key names.
    #[error(
        "the document is of instance {instance:?} but its key names {path_identity} instance {path_instance:?}"
    )]
    PathMismatch {
        /// The document's instance.
        instance: String,
        /// The key's identity.
        path_identity: SpiffeId,
        /// The key's instance.
        path_instance: String,
    },
    /// Verification or installation refused it.
    #[error(transparent)]
    Peer(#[from] PeerError),
}

impl Refused {
    /// A stable short code for metrics and logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Refused::BadKey => "bad_key",
            Refused::NotAccepted(_) => "not_accepted",
            Refused::PathMismatch { .. } | Refused::IdentityMismatch { .. } => "path_mismatch",
            Refused::Peer(PeerError::Document(d)) => d.kind(),
            Refused::Peer(PeerError::Set(SetError::Rollback { .. })) => "rollback",
            Refused::Peer(_) => "refused",
        }
    }
}

/// The identity and instance `key` names under `keys` (`prefix + "keys/"`):
/// `<td>/<service>/<instance>` of trust domain `td`, nothing more.
fn parse_key(keys: &str, td: &TrustDomain, key: &str) -> Option<(SpiffeId, String)> {
    let rest = key.strip_prefix(keys)?;
    let mut it = rest.split('/');
    let (domain, service, instance) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || domain != td.as_str() || instance.is_empty() {
        return None;
    }
    let id = td.id(service).ok()?;
    Some((id, instance.to_owned()))
}

// === impl DirectoryInstaller ===

impl DirectoryInstaller {
    /// Installs values under `prefix + "keys/<td>/…"` through `sink`
    /// (which must be `discovering`), narrowed to `accept` if given.
    pub(crate) fn new(
        sink: DocumentSink,
        prefix: &str,
        td: TrustDomain,
        accept: Option<Vec<SpiffeId>>,
    ) -> Self {
        Self {
            sink,
            keys: format!("{prefix}keys/"),
            td,
            accept,
            logs: std::sync::Mutex::default(),
        }
    }

    /// The prefixes to watch: every service, or only the accepted ones.
    pub(crate) fn prefixes(&self) -> Vec<String> {
        let td = format!("{}{}/", self.keys, self.td.as_str());
        match &self.accept {
            None => vec![td],
            Some(ids) => ids
                .iter()
                .map(|id| format!("{td}{}/", id.service()))
                .collect(),
        }
    }

    /// The identity and instance a key names.
    fn parse_key(&self, key: &str) -> Option<(SpiffeId, String)> {
        parse_key(&self.keys, &self.td, key)
    }

    async fn install(&self, key: &str, value: &[u8]) -> Result<(), Refused> {
        let (path_identity, path_instance) = self.parse_key(key).ok_or(Refused::BadKey)?;
        if let Some(accept) = &self.accept
            && !accept.contains(&path_identity)
        {
            return Err(Refused::NotAccepted(path_identity));
        }
        // Verified first (chain, signature, limits, times); then the
        // certificate's identity and the document's instance must be the
        // ones the key names, before anything is installed.
        let doc = self.sink.verify(value)?;
        if doc.claims.identity != path_identity {
            return Err(Refused::IdentityMismatch {
                path_identity,
                document: doc.claims.identity.clone(),
            });
        }
        if doc.claims.instance != path_instance {
            return Err(Refused::PathMismatch {
                instance: doc.claims.instance.clone(),
                path_identity,
                path_instance,
            });
        }
        self.sink
            .install_verified(doc, &format!("directory:{key}"))
            .await?;
        Ok(())
    }

    fn refused(&self, key: &str, why: &Refused) {
        metrics::counter!("tokend_directory_refusals_total", "reason" => why.kind()).increment(1);
        let limit = {
            let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            logs.entry(why.kind()).or_default().clone()
        };
        if let Some(suppressed) = limit.allow() {
            tracing::warn!(key = ?key, reason = why.kind(), error = %why, suppressed, "directory entry refused; what was installed before stays");
        }
    }
}

impl DirectorySink for DirectoryInstaller {
    fn put<'a>(&'a self, key: &'a str, value: &'a [u8]) -> SinkFuture<'a> {
        Box::pin(async move {
            match self.install(key, value).await {
                Ok(()) => {
                    metrics::counter!("tokend_directory_installed_total").increment(1);
                }
                Err(why) => self.refused(key, &why),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> SinkFuture<'a> {
        Box::pin(async move {
            let Some((identity, instance)) = self.parse_key(key) else {
                return;
            };
            // An instance never installed (refused, or never seen) is
            // simply not there: nothing to mark.
            let _ = self.sink.gone(identity.as_str(), &instance).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `keys/<this td>/<service>/<instance>` names an instance.
    #[test]
    fn keys_name_identity_and_instance() {
        let td = TrustDomain::new("bank.internal").expect("td");
        let k = "/t/keys/";
        let (id, inst) = parse_key(k, &td, "/t/keys/bank.internal/payments/ab12").expect("ok");
        assert_eq!(id.as_str(), "spiffe://bank.internal/payments");
        assert_eq!(inst, "ab12");
        for bad in [
            "/t/keys/other.td/payments/ab12",
            "/t/keys/bank.internal/payments/",
            "/t/keys/bank.internal/payments",
            "/t/keys/bank.internal/payments/ab/extra",
            "/u/keys/bank.internal/payments/ab12",
            "/t/keys/bank.internal/pay ments/ab12",
        ] {
            assert!(parse_key(k, &td, bad).is_none(), "{bad}");
        }
    }
}
