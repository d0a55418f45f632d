//! One configured live peer: every address it is reachable at, one
//! `PeerClient` (so one instance) per address. An address whose host is an
//! IP literal is one client; a host NAME stands for every address it
//! resolves to (as a headless service gives), re-resolved every
//! `RESOLVE_INTERVAL`: a new address gets a client, an address that left
//! the answer has its client stopped and its instances marked gone (their
//! keys stay until their documents expire or their hints pass). A failed
//! resolution keeps the clients it had. The unknown-kid refresh asks every
//! current address at once.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::PeerError;
use super::client::{PeerClient, PeerContext};
use super::connect::authority_of;
use super::refresh::KeySource;
use crate::identity::SpiffeId;

/// How often host names are resolved again.
pub(crate) const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// One address to dial: the configured address, and the resolved socket
/// address when the host was a name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Target {
    /// As configured.
    pub(crate) address: String,
    /// The resolved address of a name; None for an IP literal.
    pub(crate) dial: Option<SocketAddr>,
}

struct Running {
    client: Arc<PeerClient>,
    stop: CancellationToken,
    retired: CancellationToken,
}

/// A configured live peer and its per-address clients.
pub(crate) struct PeerGroup {
    name: String,
    expected: SpiffeId,
    addresses: Vec<String>,
    cx: PeerContext,
    running: Mutex<HashMap<Target, Running>>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for PeerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGroup")
            .field("name", &self.name)
            .field("addresses", &self.addresses)
            .finish()
    }
}

/// Whether `address`'s host is an IP literal (no resolution needed).
fn is_literal(address: &str) -> bool {
    authority_of(address).is_ok_and(|a| {
        let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
    })
}

/// The targets for `addresses` given each name's resolution (`None`: it
/// failed, keep what `current` has for it). Pure.
pub(crate) fn targets(
    addresses: &[String],
    resolved: &HashMap<String, Option<Vec<SocketAddr>>>,
    current: &BTreeSet<Target>,
) -> BTreeSet<Target> {
    let mut out = BTreeSet::new();
    for a in addresses {
        if is_literal(a) {
            out.insert(Target {
                address: a.clone(),
                dial: None,
            });
            continue;
        }
        match resolved.get(a) {
            Some(Some(addrs)) => out.extend(addrs.iter().map(|s| Target {
                address: a.clone(),
                dial: Some(*s),
            })),
            _ => out.extend(current.iter().filter(|t| &t.address == a).cloned()),
        }
    }
    out
}

// === impl PeerGroup ===

impl PeerGroup {
    /// The group for peer `name` (identity `expected`) at `addresses`.
    pub(crate) fn new(
        name: &str,
        expected: SpiffeId,
        addresses: Vec<String>,
        cx: PeerContext,
    ) -> Result<Arc<Self>, PeerError> {
        for a in &addresses {
            authority_of(a).map_err(|detail| PeerError::Address {
                name: name.to_owned(),
                address: a.clone(),
                detail,
            })?;
        }
        Ok(Arc::new(Self {
            name: name.to_owned(),
            expected,
            addresses,
            cx,
            running: Mutex::default(),
            tasks: TaskTracker::new(),
        }))
    }

    /// How the issuer is registered: `peer:<address>[, <address>…]`.
    pub(crate) fn source(&self) -> String {
        format!("peer:{}", self.addresses.join(", "))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn resolve(&self) -> HashMap<String, Option<Vec<SocketAddr>>> {
        let mut out = HashMap::new();
        for a in self.addresses.iter().filter(|a| !is_literal(a)) {
            let Ok(authority) = authority_of(a) else {
                continue;
            };
            let answer = match tokio::net::lookup_host(&authority).await {
                Ok(addrs) => {
                    let mut v: Vec<SocketAddr> = addrs.collect();
                    v.sort();
                    v.dedup();
                    Some(v).filter(|v| !v.is_empty())
                }
                Err(e) => {
                    tracing::warn!(peer = %self.name, address = %a, error = %e, "cannot resolve peer address; keeping the addresses it had");
                    None
                }
            };
            out.insert(a.clone(), answer);
        }
        out
    }

    /// Starts clients for new targets and stops those that left.
    fn reconcile(&self, want: &BTreeSet<Target>, cancel: &CancellationToken) {
        let mut running = self.running();
        running.retain(|t, r| {
            let keep = want.contains(t);
            if !keep {
                tracing::info!(peer = %self.name, address = %r.client.address(), "address left the peer's answer; its instances are gone");
                r.retired.cancel();
                r.stop.cancel();
            }
            keep
        });
        for t in want {
            if running.contains_key(t) {
                continue;
            }
            let client = match PeerClient::new(
                &self.name,
                self.expected.clone(),
                &t.address,
                t.dial,
                &self.cx,
            ) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(peer = %self.name, error = %e, "cannot make a client for this address");
                    continue;
                }
            };
            let (stop, retired) = (cancel.child_token(), CancellationToken::new());
            let span = tracing::info_span!("peer", peer = ?client);
            self.tasks.spawn(
                client
                    .clone()
                    .run(stop.clone(), retired.clone())
                    .instrument(span),
            );
            running.insert(
                t.clone(),
                Running {
                    client,
                    stop,
                    retired,
                },
            );
        }
    }

    /// Runs every address's client until cancelled, resolving names again
    /// every `RESOLVE_INTERVAL`.
    pub(crate) async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let needs_dns = self.addresses.iter().any(|a| !is_literal(a));
        loop {
            let resolved = if needs_dns {
                self.resolve().await
            } else {
                HashMap::new()
            };
            let current: BTreeSet<Target> = self.running().keys().cloned().collect();
            let want = targets(&self.addresses, &resolved, &current);
            self.reconcile(&want, &cancel);
            if !needs_dns {
                cancel.cancelled().await;
                break;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(RESOLVE_INTERVAL) => {}
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn fetch_all(&self) -> Result<(), PeerError> {
        let clients: Vec<Arc<PeerClient>> =
            self.running().values().map(|r| r.client.clone()).collect();
        let mut set = tokio::task::JoinSet::new();
        for c in clients {
            set.spawn(async move { c.fetch_once().await });
        }
        let mut result = Err(PeerError::Connect("no address to fetch from".into()));
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => result = Ok(()),
                Ok(Err(e)) if result.is_err() => result = Err(e),
                _ => {}
            }
        }
        result
    }
}

impl KeySource for PeerGroup {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<(), PeerError>> + Send + '_>> {
        Box::pin(self.fetch_all())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IP literals are one target each; a name is every address it
    /// resolved to; a failed resolution keeps the targets the name had; an
    /// address that left the answer is no longer a target.
    #[test]
    fn targets_follow_resolution() {
        let addrs = vec![
            "https://127.0.0.1:7443".to_owned(),
            "https://payments.svc:7443".to_owned(),
        ];
        let ip = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let t = |a: &str, d: Option<&str>| Target {
            address: a.to_owned(),
            dial: d.map(ip),
        };
        let mut resolved = HashMap::new();
        resolved.insert(
            addrs[1].clone(),
            Some(vec![ip("10.0.0.1:7443"), ip("10.0.0.2:7443")]),
        );
        let first = targets(&addrs, &resolved, &BTreeSet::new());
        assert_eq!(
            first,
            BTreeSet::from([
                t(&addrs[0], None),
                t(&addrs[1], Some("10.0.0.1:7443")),
                t(&addrs[1], Some("10.0.0.2:7443")),
            ])
        );
        resolved.insert(addrs[1].clone(), None);
        assert_eq!(targets(&addrs, &resolved, &first), first, "failure keeps");
        resolved.insert(addrs[1].clone(), Some(vec![ip("10.0.0.2:7443")]));
        assert_eq!(
            targets(&addrs, &resolved, &first),
            BTreeSet::from([t(&addrs[0], None), t(&addrs[1], Some("10.0.0.2:7443"))])
        );
        assert!(is_literal("https://[::1]:7443"));
        assert!(!is_literal("https://localhost:7443"));
    }
}
