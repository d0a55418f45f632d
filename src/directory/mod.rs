//! The directory on etcd (`[directory]`): the replay store shared by every
//! replica of a service (`replay`), and the transport of signed key-set
//! documents: each instance publishes its own (`publish`), every verifier
//! follows the prefix (`watch`) and hands each value to the verifier of
//! documents before anything is trusted. etcd is only a relay: it can
//! delay or withhold documents, never forge or roll them back; and its
//! absence fails one-time claims closed. `state` tells health and metrics
//! whether the directory is stale.

mod etcd;
mod install;
mod publish;
mod replay;
mod state;
mod watch;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use self::etcd::{EtcdSetupError, Login, connect};
use self::install::DirectoryInstaller;
pub(crate) use self::publish::{Documents, Publisher};
pub(crate) use self::replay::EtcdReplay;
pub(crate) use self::state::DirectoryState;
use self::watch::Watcher;
use crate::config::DirectoryConfig;
use crate::identity::TrustDomain;
use crate::peers::DocumentSink;

/// The directory's two loops, built and not yet running.
#[derive(Debug)]
pub(crate) struct Directory {
    watcher: Watcher,
    /// None when this instance's certificate key cannot sign documents: it
    /// then only reads the directory.
    publisher: Option<Publisher>,
    state: DirectoryState,
}

// === impl Directory ===

impl Directory {
    /// Publishes `docs` (this instance of `service`), if it signs any, and
    /// installs what the watched prefixes hold through `sink` (discovering
    /// issuers of `td`, narrowed by `accept`).
    pub(crate) fn new(
        client: etcd_client::Client,
        config: &DirectoryConfig,
        td: &TrustDomain,
        service: &str,
        sink: DocumentSink,
        docs: Option<Documents>,
    ) -> Self {
        let publisher = match docs {
            Some(docs) => {
                let instance = docs.borrow().instance.clone();
                let key = format!("{}keys/{}/{service}/{instance}", config.prefix, td.as_str());
                Some(Publisher::new(client.clone(), key, config.lease_ttl, docs))
            }
            None => {
                tracing::warn!(
                    "[directory]: this instance's peer certificate key cannot sign key-set \
                     documents; it reads the directory but does not publish its keys there"
                );
                None
            }
        };
        let installer = DirectoryInstaller::new(
            sink.discovering(),
            &config.prefix,
            td.clone(),
            config.accept.clone(),
        );
        let state = DirectoryState::new();
        Self {
            watcher: Watcher::new(
                client.clone(),
                installer.prefixes(),
                Arc::new(installer),
                state.clone(),
            ),
            publisher,
            state,
        }
    }

    /// Whether the watch is live, for the health service.
    pub(crate) fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.state.subscribe()
    }

    /// Runs both loops on `tracker` until `cancel`.
    pub(crate) fn spawn(self, tracker: &TaskTracker, cancel: &CancellationToken) {
        if let Some(publisher) = self.publisher {
            let key = publisher.key().to_owned();
            tracker.spawn(tracing::Instrument::instrument(
                publisher.run(cancel.clone()),
                tracing::info_span!("directory_publisher", key = %key),
            ));
        }
        tracker.spawn(tracing::Instrument::instrument(
            self.watcher.run(cancel.clone()),
            tracing::info_span!("directory_watcher"),
        ));
    }
}
