//! Peers: where other issuers' public keys come from, and how this sidecar
//! serves its own. Live peers speak `PeerService` over mTLS (`server`,
//! `client`, `tls`); offline peers are JWKS files (`file`). Every source fills
//! its issuer's set in the verifier's `TrustStore` and can be asked to refresh.

mod client;
mod file;
mod server;
mod tls;

pub use self::client::{MAX_PEER_MESSAGE, PeerClient, backoff};
pub use self::file::{JwksFileSource, MAX_JWKS_BYTES};
pub use self::server::{MAX_PEER_REQUEST, MAX_PEER_STREAMS, PeerKeysApi, key_set_message, serve};
pub use self::tls::{PeerTls, spiffe_id_of, uri_sans};
