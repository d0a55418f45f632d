//! One mTLS connection to a peer API, as the peer client and the direct
//! document fetch both make it: TCP under a deadline, the TLS handshake
//! under a deadline (the server's chain to the CA and one SPIFFE ID of the
//! trust domain, never its DNS name), and the identity and serial the
//! server's certificate proved, recorded for the caller to bind keys to
//! and to check against the operator's bans.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use super::PeerError;
use super::tls::{serial_of, svid_id};
use crate::engine::BanList;
use crate::identity::{SpiffeId, TrustDomain};
use crate::proto::tokend::v1 as pb;

/// The largest peer message accepted.
pub(super) const MAX_PEER_MESSAGE: usize = super::MAX_JWKS_BYTES + 16 * 1024;
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server's certificate proved on one connection.
#[derive(Clone, Debug)]
pub(super) struct Proven {
    /// Its SPIFFE ID.
    pub(super) identity: SpiffeId,
    /// Its serial (lowercase hex).
    pub(super) serial: String,
}

// === impl Proven ===

impl Proven {
    /// Refuses a connection presenting a banned certificate (its serial or
    /// its identity) or dialled at a banned instance address (`host:port`):
    /// nothing it delivers is installed.
    pub(super) fn check_bans(&self, bans: &BanList, authority: &str) -> Result<(), PeerError> {
        match bans
            .of_certificate(self.identity.as_str(), &self.serial)
            .or_else(|| bans.of_instance(authority))
        {
            Some(ban) => Err(PeerError::Banned {
                serial: self.serial.clone(),
                ban: format!("{} {}", ban.kind.as_str(), ban.value),
            }),
            None => Ok(()),
        }
    }
}

/// Where the connector records what the server's certificate proved.
pub(super) type Slot = Arc<Mutex<Option<Proven>>>;

/// A peer API client over one mTLS connection.
pub(super) type PeerApi = pb::peer_service_client::PeerServiceClient<Channel>;

/// What the server's certificate proved on this channel's connection.
pub(super) fn proven(slot: &Slot) -> Result<Proven, PeerError> {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or(PeerError::NoIdentity)
}

/// Maps a status of `rpc` to a `PeerError`.
pub(super) fn status(rpc: &'static str) -> impl FnOnce(tonic::Status) -> PeerError {
    move |s| PeerError::Status {
        rpc,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// Connects to `authority` (`host:port`), presenting `server_name` in SNI.
pub(super) async fn connect(
    authority: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    td: &TrustDomain,
) -> Result<(PeerApi, Slot), PeerError> {
    let slot: Slot = Arc::default();
    let (authority_c, td, seen) = (authority.to_owned(), td.clone(), slot.clone());
    let server_name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| PeerError::Connect(format!("server name {server_name}: {e}")))?;
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, authority, td, seen, server_name) = (
            tls.clone(),
            authority_c.clone(),
            td.clone(),
            seen.clone(),
            server_name.clone(),
        );
        async move {
            let tcp =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&authority))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                    })??;
            let stream = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
            let leaf = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .cloned();
            let der = leaf.ok_or_else(|| std::io::Error::other("no server certificate"))?;
            let identity = svid_id(&der, &td).map_err(std::io::Error::other)?;
            let serial = serial_of(&der).map_err(std::io::Error::other)?;
            *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(Proven { identity, serial });
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = Endpoint::try_from(format!("http://{authority}"))
        .map_err(|e| PeerError::Connect(e.to_string()))?
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|e| PeerError::Connect(error_chain(&e)))?;
    let client = pb::peer_service_client::PeerServiceClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE);
    Ok((client, slot))
}

/// `host:port` of an `https://host:port` URL.
pub(super) fn authority_of(address: &str) -> Result<String, String> {
    let uri: Uri = address.parse().map_err(|e| format!("{e}"))?;
    uri.authority()
        .filter(|a| a.port_u16().is_some())
        .map(|a| a.to_string())
        .ok_or_else(|| "needs host:port".into())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
