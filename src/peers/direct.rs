//! The direct fetch: the fallback that keeps a relay from withholding a
//! document (a revocation) for longer than a document's lifetime, and keeps
//! an instance's keys usable when only its relay failed. For every instance
//! whose keys came from a signed document — whichever source relayed it,
//! the mesh, the directory or anything later — once that document is in
//! the last `1 / REFRESH_DIVISOR` of its life and no newer one has
//! arrived, this task asks the instance itself, at the address its own
//! document names, over mTLS: the connection must prove the document's
//! identity, and the answer is verified and installed like any document.
//! Only if that fails too do the keys stop being usable at the document's
//! `exp` (the trust lookup enforces that on its own).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::connect::{ANSWER_TIMEOUT, authority_of, connect, proven, status};
use super::{DocumentSink, PeerError};
use crate::engine::TrustSet;
use crate::identity::{SpiffeId, TrustDomain};
use crate::proto::tokend::v1 as pb;
use crate::time::UnixTime;

/// A document is due for a direct fetch in the last fifth of its life.
pub(crate) const REFRESH_DIVISOR: u32 = 5;
/// How soon a failed direct fetch of one instance is tried again.
const RETRY: Duration = Duration::from_secs(2);
/// Direct fetches running at once at most.
const MAX_IN_FLIGHT: usize = 32;

/// One instance to fetch directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Due {
    /// The identity.
    pub(crate) issuer: String,
    /// The instance.
    pub(crate) instance: String,
    /// The sequence of the document that is running out.
    pub(crate) seq: u64,
    /// Its own peer API address.
    pub(crate) address: String,
}

/// When a document of life `iat..exp` is due for a direct fetch.
pub(crate) fn refresh_at(iat: UnixTime, exp: UnixTime) -> UnixTime {
    exp - exp.since(iat) / REFRESH_DIVISOR
}

/// The instances due at `now`, and the next instant another one becomes
/// due. Pure.
pub(crate) fn plan(set: &TrustSet, now: UnixTime) -> (Vec<Due>, Option<UnixTime>) {
    let mut due = Vec::new();
    let mut next: Option<UnixTime> = None;
    for (issuer, keys) in set.issuers() {
        for (instance, inst) in keys.instances() {
            let Some(doc) = inst.document() else {
                continue;
            };
            let Some(address) = &doc.address else {
                continue;
            };
            let at = refresh_at(doc.issued_at, doc.expires_at);
            if at <= now {
                due.push(Due {
                    issuer: issuer.to_owned(),
                    instance: instance.to_owned(),
                    seq: doc.seq,
                    address: address.clone(),
                });
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
    }
    (due, next)
}

/// The task that fetches documents from their instances directly.
#[derive(Debug)]
pub struct DirectFetcher {
    inner: Arc<Fetch>,
    /// (issuer, instance, seq) → when it was last tried.
    tried: HashMap<Key, UnixTime>,
}

type Key = (String, String, u64);

/// What one fetch needs.
#[derive(Debug)]
struct Fetch {
    sink: DocumentSink,
    tls: Arc<rustls::ClientConfig>,
    td: TrustDomain,
}

// === impl DirectFetcher ===

impl DirectFetcher {
    /// A fetcher installing through `sink`, connecting with `tls`.
    pub(crate) fn new(sink: DocumentSink, tls: Arc<rustls::ClientConfig>, td: TrustDomain) -> Self {
        Self {
            inner: Arc::new(Fetch { sink, tls, td }),
            tried: HashMap::new(),
        }
    }

    /// Runs until cancelled: wakes when a document becomes due, when trust
    /// changes, when a fetch ends, and to retry a failed fetch. At most
    /// `MAX_IN_FLIGHT` fetches run at once, so one unreachable instance
    /// never holds up the others.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let view = self.inner.sink.view().clone();
        let clock = self.inner.sink.clock().clone();
        let mut changes = view.subscribe();
        let mut running: JoinSet<()> = JoinSet::new();
        let mut in_flight: HashSet<Key> = HashSet::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Key>();
        loop {
            let now = clock.now();
            let (due, next) = plan(&view.current(), now);
            self.tried.retain(|(i, n, s), _| {
                due.iter()
                    .any(|d| (&d.issuer, &d.instance, &d.seq) == (i, n, s))
            });
            let mut wake = next;
            let mut sooner = |t: UnixTime| wake = Some(wake.map_or(t, |w: UnixTime| w.min(t)));
            for d in due {
                let key = (d.issuer.clone(), d.instance.clone(), d.seq);
                if in_flight.contains(&key) {
                    continue;
                }
                if let Some(&last) = self.tried.get(&key)
                    && now < last + RETRY
                {
                    sooner(last + RETRY);
                    continue;
                }
                if in_flight.len() >= MAX_IN_FLIGHT {
                    break;
                }
                self.tried.insert(key.clone(), now);
                sooner(now + RETRY);
                in_flight.insert(key.clone());
                let (fetch, done) = (self.inner.clone(), done_tx.clone());
                running.spawn(async move {
                    fetch.run(&d).await;
                    let _ = done.send(key);
                });
            }
            let sleep = async {
                match wake {
                    Some(w) => clock.sleep_until(w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {
                    running.abort_all();
                    return;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some(key) = done_rx.recv() => {
                    in_flight.remove(&key);
                }
                Some(_) = running.join_next() => {}
                _ = sleep => {}
            }
        }
    }
}

// === impl Fetch ===

impl Fetch {
    /// Fetches and installs `due`'s current document, logging the outcome.
    async fn run(&self, d: &Due) {
        metrics::counter!("tokend_direct_fetch_total").increment(1);
        match self.fetch(d).await {
            Ok(()) => {
                tracing::info!(issuer = %d.issuer, instance = %d.instance, address = %d.address, "document fetched directly from its instance");
            }
            Err(e) => {
                metrics::counter!("tokend_direct_fetch_failures_total").increment(1);
                tracing::warn!(issuer = %d.issuer, instance = %d.instance, address = %d.address, error = %e, "direct fetch of a running-out document failed; its keys stop at its expiry unless a newer one arrives");
            }
        }
    }

    /// Fetches `due`'s current document from the instance and installs it.
    async fn fetch(&self, due: &Due) -> Result<(), PeerError> {
        let issuer = SpiffeId::parse(&due.issuer).map_err(|e| PeerError::Connect(e.to_string()))?;
        let authority = authority_of(&due.address).map_err(|detail| PeerError::Address {
            name: issuer.service().to_owned(),
            address: due.address.clone(),
            detail,
        })?;
        let timeout = |what| PeerError::Timeout {
            what,
            after: ANSWER_TIMEOUT,
        };
        let (mut client, slot) = tokio::time::timeout(
            ANSWER_TIMEOUT,
            connect(&authority, issuer.service(), self.tls.clone(), &self.td),
        )
        .await
        .map_err(|_| timeout("connect"))??;
        let doc = tokio::time::timeout(
            ANSWER_TIMEOUT,
            client.get_document(pb::GetDocumentRequest {}),
        )
        .await
        .map_err(|_| timeout("GetDocument"))?
        .map_err(status("GetDocument"))?
        .into_inner();
        let proven = proven(&slot)?;
        proven.check_bans(&self.sink.bans().current(), &authority)?;
        self.sink
            .install(
                doc.jws.as_bytes(),
                Some(&proven.identity),
                &format!("direct:{}", due.address),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DocumentClaims, TrustUpdate, VerifiedDocument};

    fn doc(instance: &str, seq: u64, iat: i64, exp: i64, address: Option<&str>) -> TrustUpdate {
        TrustUpdate::Document {
            document: Arc::new(VerifiedDocument {
                claims: DocumentClaims {
                    identity: SpiffeId::parse("spiffe://td/payments").expect("id"),
                    instance: instance.into(),
                    seq,
                    issued_at: UnixTime::from_secs(iat),
                    expires_at: UnixTime::from_secs(exp),
                    address: address.map(str::to_owned),
                    keys: vec![],
                    bound_keys: Vec::new(),
                    revoked: vec![],
                    key_expires: Default::default(),
                },
                usable_until: UnixTime::from_secs(exp + 30),
                jws: Arc::from("x"),
                serial: "01".into(),
            }),
            source: "directory:test".into(),
            at: UnixTime::from_secs(iat),
        }
    }

    /// A document is due in the last fifth of its life (whatever relayed
    /// it), not before; one with no address never is; the next wake-up is
    /// the earliest instant another becomes due.
    #[test]
    fn due_in_the_last_fifth() {
        let t = UnixTime::from_secs;
        assert_eq!(refresh_at(t(1000), t(1300)), t(1240));
        let mut set = TrustSet::default();
        for u in [
            TrustUpdate::Register {
                issuer: "spiffe://td/payments".into(),
                source: "t".into(),
            },
            doc("a", 1, 1000, 1300, Some("https://127.0.0.1:1")),
            doc("b", 1, 1100, 1400, Some("https://127.0.0.1:2")),
            doc("c", 1, 1000, 1300, None),
        ] {
            let (next, r) = set.apply(u);
            r.expect("apply");
            set = next;
        }
        assert_eq!(plan(&set, t(1239)), (vec![], Some(t(1240))));
        let (due, next) = plan(&set, t(1240));
        assert_eq!(
            due,
            vec![Due {
                issuer: "spiffe://td/payments".into(),
                instance: "a".into(),
                seq: 1,
                address: "https://127.0.0.1:1".into(),
            }]
        );
        assert_eq!(next, Some(t(1340)));
    }
}
