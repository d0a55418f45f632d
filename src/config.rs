//! Configuration: TOML (every key optional) plus `serve` flag overrides,
//! validated once into a typed `Config`. Unknown keys, bad durations and
//! unreadable files are errors that name the key or file. Relative paths in
//! a config file are resolved against that file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub(crate) use self::ext_authz::ExtAuthzConfig;
use crate::identity::{SpiffeId, TrustDomain};

mod ext_authz;

/// A configuration problem, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a wrong type, a bad duration.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("invalid config value {key}: {message}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// A duration written as `90s`, `5m`, `24h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses `90s`, `5m`, `24h`, `1h30m`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write it like 90s, 5m or 24h"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    trust_domain: Option<String>,
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    allowed_uids: Option<Vec<u32>>,
    admin_uids: Option<Vec<u32>>,
    keys_dir: Option<PathBuf>,
    #[serde(default)]
    tokens: TokensFile,
    #[serde(default)]
    rotation: RotationFile,
    peer_api: Option<PeerApiFile>,
    #[serde(default)]
    peers: Vec<PeerFile>,
    metrics: Option<MetricsFile>,
    #[serde(default)]
    limits: LimitsFile,
    directory: Option<DirectoryFile>,
    #[serde(default)]
    ext_authz: ext_authz::ExtAuthzFile,
    audit: Option<AuditFile>,
    bans: Option<BansSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    file: Option<PathBuf>,
    max_bytes: Option<u64>,
    keep: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BansSection {
    document: PathBuf,
    signer: PathBuf,
}

/// The fleet-wide ban document (`[bans]`): where it arrives and whose
/// signature counts.
#[derive(Clone, Debug)]
pub struct BansConfig {
    /// The signed document, polled every second.
    pub document: PathBuf,
    /// The certificate of the key the trust domain designates to sign it.
    pub signer: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    default_ttl: Option<HumanDuration>,
    max_ttl: Option<HumanDuration>,
    clock_skew: Option<HumanDuration>,
    verify_cache: Option<usize>,
    proof_window: Option<HumanDuration>,
    proof_nonce: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationFile {
    interval: Option<HumanDuration>,
    publish_ahead: Option<HumanDuration>,
    key_bits: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerApiFile {
    listen: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    document_lifetime: Option<HumanDuration>,
    advertise: Option<String>,
    warn_at: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerFile {
    name: String,
    address: Option<String>,
    addresses: Option<Vec<String>>,
    jwks_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    local_connections: Option<usize>,
    peer_connections: Option<usize>,
    handshake_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    request_timeout: Option<HumanDuration>,
    max_streams_per_connection: Option<u32>,
    max_request_bytes: Option<usize>,
    peer_watches_per_caller: Option<usize>,
}

/// Token lifetimes.
#[derive(Clone, Copy, Debug)]
pub struct TokensConfig {
    /// Lifetime of a token when none is asked for.
    pub default_ttl: Duration,
    /// Longest lifetime minted or accepted.
    pub max_ttl: Duration,
    /// Tolerated clock difference.
    pub clock_skew: Duration,
    /// Verified tokens remembered at most (0: no verify cache).
    pub verify_cache: usize,
    /// How far a DPoP proof's `iat` may lie from now, either way; its `jti`
    /// is remembered that long.
    pub proof_window: Duration,
    /// `proof_nonce = "required"`: every DPoP proof must carry a nonce this
    /// replica issued within `proof_window` (RFC 9449 §9), so a proof is
    /// usable once across all replicas of the service. Default `"off"`.
    pub proof_nonce_required: bool,
}

/// Key rotation.
#[derive(Clone, Copy, Debug)]
pub struct RotationConfig {
    /// Time between rotations.
    pub interval: Duration,
    /// Time a new key is published before it signs.
    pub publish_ahead: Duration,
    /// RSA modulus size of new keys.
    pub key_bits: u32,
}

/// Where and how this sidecar serves its keys to peers.
#[derive(Clone, Debug)]
pub struct PeerApiConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Trust anchor for peers.
    pub ca: PathBuf,
    /// This sidecar's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// How long each signed key-set document of this instance is valid
    /// (re-signed at half of it, and on every key change): the bound on how
    /// long a relay can withhold a revocation.
    pub document_lifetime: Duration,
    /// The peer API address written into the documents for a direct fetch
    /// (`https://host:port`); when not set, the daemon uses
    /// `https://<bound listen address>` unless that is an unspecified
    /// address (0.0.0.0, ::), and then none (no direct fetch of it).
    pub advertise: Option<String>,
    /// The fraction of a certificate's lifetime (own or CA) after which a
    /// warning is logged: 0.8 warns in the last fifth.
    pub warn_at: f64,
}

/// The shortest `[peer_api] document_lifetime`.
pub(crate) const MIN_DOCUMENT_LIFETIME: Duration = Duration::from_secs(10);
/// Addresses of one peer at most.
pub(crate) const MAX_PEER_ADDRESSES: usize = 64;
/// `[peer_api] warn_at` when not set.
pub(crate) const DEFAULT_WARN_AT: f64 = 0.8;

/// The smallest `limits.max_request_bytes`: a largest token (8 KiB) with an
/// audience and framing must still fit.
pub(crate) const MIN_REQUEST_BYTES: usize = 10 * 1024;

/// Resource limits of the two listeners, so that neither a local caller nor
/// anyone who can reach the peer port can exhaust file descriptors, memory or
/// tasks (`[limits]`; see the README's security section for the ceilings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Open connections on the Unix socket; more wait in the kernel's queue.
    pub local_connections: usize,
    /// Open connections (handshaking included) on the peer port.
    pub peer_connections: usize,
    /// Time from accept to the first request (TLS handshake included).
    pub handshake_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Longest a unary call (or a stream's opening) may take.
    pub request_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Largest request message on the Unix socket, in bytes.
    pub max_request_bytes: usize,
    /// Concurrent `WatchKeys` streams per peer identity.
    pub peer_watches_per_caller: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            local_connections: 128,
            peer_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            max_streams_per_connection: 8,
            max_request_bytes: 16 * 1024,
            peer_watches_per_caller: 16,
        }
    }
}

/// Where a peer's keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerSource {
    /// A live peer over mTLS, at one or more addresses (`https://host:port`);
    /// a host name stands for every address it resolves to.
    Addresses(Vec<String>),
    /// An offline JWKS file.
    JwksFile(PathBuf),
}

/// One peer whose tokens this sidecar accepts.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Service name.
    pub name: String,
    /// Its identity.
    pub id: SpiffeId,
    /// Where its keys come from.
    pub source: PeerSource,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Service name.
    pub name: String,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// `spiffe://trust_domain/name`.
    pub id: SpiffeId,
    /// Local API socket.
    pub socket: PathBuf,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Callers allowed on the socket (None: anyone who can open it).
    pub allowed_uids: Option<Vec<u32>>,
    /// Callers allowed to use the admin API (None: the daemon's own uid only).
    pub admin_uids: Option<Vec<u32>>,
    /// Key store directory.
    pub keys_dir: PathBuf,
    /// Token lifetimes.
    pub tokens: TokensConfig,
    /// Rotation.
    pub rotation: RotationConfig,
    /// Peer API, if served.
    pub peer_api: Option<PeerApiConfig>,
    /// Peers.
    pub peers: Vec<PeerConfig>,
    /// Prometheus listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Connection, stream, size and time limits of the listeners.
    pub limits: LimitsConfig,
    /// The etcd directory and shared replay store, if configured.
    pub directory: Option<DirectoryConfig>,
    /// Envoy external authorization defaults.
    pub ext_authz: ExtAuthzConfig,
    /// Where the audit trail goes.
    pub audit: AuditConfig,
    /// The fleet-wide ban document, if one is distributed.
    pub bans: Option<BansConfig>,
}

/// `[audit]`: the audit trail goes to `file` (rotated by size) or, with no
/// file, to the log on target `audit`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditConfig {
    /// The file records are appended to (0600); `None`: the log.
    pub file: Option<PathBuf>,
    /// Rotate before a record would take the file past this size.
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` … `FILE.<keep>`).
    pub keep: usize,
}

/// Default `[audit] max_bytes`: 16 MiB.
const AUDIT_MAX_BYTES: u64 = 16 << 20;
/// Default `[audit] keep`.
const AUDIT_KEEP: usize = 5;

fn audit(
    f: Option<AuditFile>,
    rel: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<AuditConfig, ConfigError> {
    let f = f.unwrap_or_default();
    Ok(AuditConfig {
        file: f.file.map(rel),
        max_bytes: within(
            "audit.max_bytes",
            f.max_bytes.unwrap_or(AUDIT_MAX_BYTES),
            4096,
            1 << 40,
        )?,
        keep: within("audit.keep", f.keep.unwrap_or(AUDIT_KEEP), 1, 1000)?,
    })
}

/// `serve` flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// --name
    pub name: Option<String>,
    /// --trust-domain
    pub trust_domain: Option<String>,
    /// --socket
    pub socket: Option<PathBuf>,
    /// --keys-dir
    pub keys_dir: Option<PathBuf>,
    /// --peer-listen
    pub peer_listen: Option<String>,
    /// --metrics-listen
    pub metrics_listen: Option<String>,
    /// `$STATE_DIRECTORY` (set by systemd's `StateDirectory=`): when neither
    /// `--keys-dir` nor `keys_dir` is given, keys go to its `keys`
    /// subdirectory instead of `./keys`, so a service does not depend on its
    /// working directory.
    pub state_directory: Option<std::ffi::OsString>,
}

/// `$STATE_DIRECTORY/keys`, if systemd set it: the first of its
/// colon-separated paths, which must be absolute (systemd's always are).
fn state_keys_dir(state: Option<&std::ffi::OsStr>) -> Result<Option<PathBuf>, ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    let Some(state) = state.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let first = state
        .as_bytes()
        .split(|&b| b == b':')
        .next()
        .unwrap_or_default();
    let first = Path::new(std::ffi::OsStr::from_bytes(first));
    if !first.is_absolute() {
        return Err(invalid(
            "STATE_DIRECTORY",
            format!(
                "{:?} is not an absolute path; set keys_dir or unset STATE_DIRECTORY",
                first.display()
            ),
        ));
    }
    Ok(Some(first.join("keys")))
}

// === impl Config ===

impl Config {
    /// Loads `path` (if any) and applies the overrides.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        match path {
            None => Self::from_toml("", Path::new("."), Path::new("<defaults>"), overrides),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                let base = p
                    .parent()
                    .filter(|b| !b.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                Self::from_toml(&text, base, p, overrides)
            }
        }
    }

    /// Parses TOML text; relative paths are resolved against `base`.
    pub fn from_toml(
        text: &str,
        base: &Path,
        origin: &Path,
        ov: &Overrides,
    ) -> Result<Self, ConfigError> {
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim().to_owned(),
        })?;
        let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let who = identity(f.name, f.trust_domain, ov)?;
        let local = local_socket(f.socket, f.socket_mode, f.keys_dir, ov, &rel)?;
        let peer_api = peer_api(f.peer_api, ov, &rel)?;
        let have_peer_api = peer_api.is_some();
        let peers = peers(f.peers, &who, have_peer_api, &rel)?;
        let directory = directory(f.directory, &who, have_peer_api, &rel)?;
        let ext_authz = f.ext_authz.build(&who.trust_domain)?;
        Ok(Self {
            name: who.name,
            trust_domain: who.trust_domain,
            id: who.id,
            socket: local.socket,
            socket_mode: local.socket_mode,
            allowed_uids: f.allowed_uids,
            admin_uids: f.admin_uids,
            keys_dir: local.keys_dir,
            tokens: tokens(f.tokens)?,
            rotation: rotation(f.rotation)?,
            peer_api,
            peers,
            metrics_listen: metrics(f.metrics, ov)?,
            limits: limits(f.limits)?,
            directory,
            ext_authz,
            audit: audit(f.audit, &rel)?,
            bans: f.bans.map(|b| BansConfig {
                document: rel(b.document),
                signer: rel(b.signer),
            }),
        })
    }
}

/// Who this sidecar is: `name` in `trust_domain`.
struct Identity {
    name: String,
    trust_domain: TrustDomain,
    id: SpiffeId,
}

fn identity(
    name: Option<String>,
    trust_domain: Option<String>,
    ov: &Overrides,
) -> Result<Identity, ConfigError> {
    let name = ov.name.clone().or(name).unwrap_or_else(|| "default".into());
    let td_text = ov
        .trust_domain
        .clone()
        .or(trust_domain)
        .unwrap_or_else(|| "local".into());
    let trust_domain =
        TrustDomain::new(&td_text).map_err(|e| invalid("trust_domain", e.to_string()))?;
    let id = trust_domain
        .id(&name)
        .map_err(|e| invalid("name", e.to_string()))?;
    Ok(Identity {
        name,
        trust_domain,
        id,
    })
}

/// Where the local API listens and where the keys live.
struct LocalSocket {
    socket: PathBuf,
    socket_mode: u32,
    keys_dir: PathBuf,
}

fn local_socket(
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    keys_dir: Option<PathBuf>,
    ov: &Overrides,
    rel: &impl Fn(PathBuf) -> PathBuf,
) -> Result<LocalSocket, ConfigError> {
    let socket = ov
        .socket
        .clone()
        .or(socket.map(rel))
        .unwrap_or_else(|| PathBuf::from("tokend.sock"));
    let socket_mode = match socket_mode.as_deref() {
        None => 0o600,
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(v @ (0o600 | 0o660)) => v,
            _ => {
                return Err(invalid(
                    "socket_mode",
                    format!("{m:?} must be \"0600\" or \"0660\""),
                ));
            }
        },
    };
    let keys_dir = match ov.keys_dir.clone().or(keys_dir.map(rel)) {
        Some(dir) => dir,
        None => match state_keys_dir(ov.state_directory.as_deref())? {
            Some(dir) => dir,
            None => PathBuf::from("keys"),
        },
    };
    Ok(LocalSocket {
        socket,
        socket_mode,
        keys_dir,
    })
}

fn or_secs(d: Option<HumanDuration>, default: u64) -> Duration {
    d.map(|d| d.0).unwrap_or(Duration::from_secs(default))
}

fn tokens(f: TokensFile) -> Result<TokensConfig, ConfigError> {
    let tokens = TokensConfig {
        default_ttl: or_secs(f.default_ttl, 300),
        max_ttl: or_secs(f.max_ttl, 3600),
        clock_skew: or_secs(f.clock_skew, 30),
        verify_cache: f
            .verify_cache
            .unwrap_or(crate::engine::DEFAULT_VERIFY_CACHE),
        proof_window: f
            .proof_window
            .map_or(crate::engine::DEFAULT_PROOF_WINDOW, |d| d.0),
        proof_nonce_required: match f.proof_nonce.as_deref() {
            None | Some("off") => false,
            Some("required") => true,
            Some(other) => {
                return Err(invalid(
                    "tokens.proof_nonce",
                    format!("{other:?} must be \"off\" or \"required\""),
                ));
            }
        },
    };
    if tokens.proof_window.as_secs() == 0 || tokens.proof_window > Duration::from_secs(600) {
        return Err(invalid("tokens.proof_window", "must be 1s to 10m"));
    }
    if tokens.default_ttl.as_secs() == 0 {
        return Err(invalid("tokens.default_ttl", "must be at least 1s"));
    }
    if tokens.default_ttl > tokens.max_ttl {
        return Err(invalid(
            "tokens.default_ttl",
            format!(
                "{} exceeds tokens.max_ttl {}",
                humantime::format_duration(tokens.default_ttl),
                humantime::format_duration(tokens.max_ttl)
            ),
        ));
    }
    if tokens.max_ttl > Duration::from_secs(86_400) {
        return Err(invalid(
            "tokens.max_ttl",
            "must be at most 24h: tokens are short-lived",
        ));
    }
    if tokens.clock_skew > Duration::from_secs(600) {
        return Err(invalid("tokens.clock_skew", "must be at most 10m"));
    }
    if tokens.verify_cache > 1_000_000 {
        return Err(invalid("tokens.verify_cache", "must be at most 1000000"));
    }
    Ok(tokens)
}

fn rotation(f: RotationFile) -> Result<RotationConfig, ConfigError> {
    let rotation = RotationConfig {
        interval: or_secs(f.interval, 86_400),
        publish_ahead: or_secs(f.publish_ahead, 600),
        key_bits: f.key_bits.unwrap_or(2048),
    };
    if !matches!(rotation.key_bits, 2048 | 3072 | 4096) {
        return Err(invalid(
            "rotation.key_bits",
            format!("{} must be 2048, 3072 or 4096", rotation.key_bits),
        ));
    }
    if rotation.interval.as_secs() == 0 || rotation.interval > Duration::from_secs(366 * 86_400) {
        return Err(invalid("rotation.interval", "must be between 1s and 366d"));
    }
    if rotation.publish_ahead >= rotation.interval {
        return Err(invalid(
            "rotation.publish_ahead",
            "must be shorter than rotation.interval",
        ));
    }
    Ok(rotation)
}

fn peer_api(
    f: Option<PeerApiFile>,
    ov: &Overrides,
    rel: &impl Fn(PathBuf) -> PathBuf,
) -> Result<Option<PeerApiConfig>, ConfigError> {
    match (f, &ov.peer_listen) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(invalid(
            "peer_api",
            "--peer-listen needs a [peer_api] section with ca, cert and key",
        )),
        (Some(p), listen_ov) => {
            let listen_text = listen_ov.clone().unwrap_or(p.listen);
            let listen = listen_text.parse().map_err(|_| {
                invalid(
                    "peer_api.listen",
                    format!("{listen_text:?} is not an address like 127.0.0.1:7443"),
                )
            })?;
            let document_lifetime = within_duration(
                "peer_api.document_lifetime",
                p.document_lifetime,
                crate::engine::DEFAULT_DOCUMENT_LIFETIME,
                MIN_DOCUMENT_LIFETIME,
                crate::engine::MAX_DOCUMENT_LIFETIME,
            )?;
            let advertise = match p.advertise {
                Some(a) => Some(https_url("peer_api.advertise", a)?),
                None => None,
            };
            let warn_at = p.warn_at.unwrap_or(DEFAULT_WARN_AT);
            if !(warn_at > 0.0 && warn_at < 1.0) {
                return Err(invalid(
                    "peer_api.warn_at",
                    format!(
                        "{warn_at} is not a fraction of a lifetime between 0 and 1 (such as 0.8)"
                    ),
                ));
            }
            Ok(Some(PeerApiConfig {
                listen,
                ca: rel(p.ca),
                cert: rel(p.cert),
                key: rel(p.key),
                document_lifetime,
                advertise,
                warn_at,
            }))
        }
    }
}

/// Checks `a` is an `https://host:port` URL, naming `key` otherwise.
fn https_url(key: &str, a: String) -> Result<String, ConfigError> {
    let ok = a
        .strip_prefix("https://")
        .and_then(|rest| rest.parse::<http::uri::Authority>().ok())
        .is_some_and(|auth| auth.port_u16().is_some() && !auth.host().is_empty());
    if !ok || a.len() > 256 {
        return Err(invalid(
            key,
            format!("{a:?} must be an https://host:port URL"),
        ));
    }
    Ok(a)
}

fn peers(
    f: Vec<PeerFile>,
    who: &Identity,
    have_peer_api: bool,
    rel: &impl Fn(PathBuf) -> PathBuf,
) -> Result<Vec<PeerConfig>, ConfigError> {
    let mut peers = Vec::new();
    for (i, p) in f.into_iter().enumerate() {
        let peer = one_peer(&format!("peers[{i}]"), p, who, &peers, rel)?;
        peers.push(peer);
    }
    if peers
        .iter()
        .any(|p| matches!(p.source, PeerSource::Addresses(_)))
        && !have_peer_api
    {
        return Err(invalid(
            "peer_api",
            "peers with an address need [peer_api] (ca, cert, key) for mTLS",
        ));
    }
    Ok(peers)
}

fn one_peer(
    key: &str,
    p: PeerFile,
    who: &Identity,
    earlier: &[PeerConfig],
    rel: &impl Fn(PathBuf) -> PathBuf,
) -> Result<PeerConfig, ConfigError> {
    let pid = who
        .trust_domain
        .id(&p.name)
        .map_err(|e| invalid(&format!("{key}.name"), e.to_string()))?;
    if pid == who.id {
        return Err(invalid(
            &format!("{key}.name"),
            "a sidecar cannot list itself as a peer",
        ));
    }
    if earlier.iter().any(|q| q.id == pid) {
        return Err(invalid(
            &format!("{key}.name"),
            format!(
                "peer {:?} is listed twice; give a service's replicas as addresses = [...] in one entry",
                p.name
            ),
        ));
    }
    let source = match (p.address, p.addresses, p.jwks_file) {
        (Some(a), None, None) => {
            PeerSource::Addresses(vec![https_url(&format!("{key}.address"), a)?])
        }
        (None, Some(list), None) => {
            let k = format!("{key}.addresses");
            if list.is_empty() || list.len() > MAX_PEER_ADDRESSES {
                return Err(invalid(
                    &k,
                    format!("must list 1 to {MAX_PEER_ADDRESSES} addresses"),
                ));
            }
            let mut out: Vec<String> = Vec::with_capacity(list.len());
            for a in list {
                let a = https_url(&k, a)?;
                if out.contains(&a) {
                    return Err(invalid(&k, format!("{a:?} is listed twice")));
                }
                out.push(a);
            }
            PeerSource::Addresses(out)
        }
        (None, None, Some(f)) => PeerSource::JwksFile(rel(f)),
        _ => {
            return Err(invalid(
                key,
                "give exactly one of address, addresses or jwks_file",
            ));
        }
    };
    Ok(PeerConfig {
        name: p.name,
        id: pid,
        source,
    })
}

fn metrics(f: Option<MetricsFile>, ov: &Overrides) -> Result<Option<SocketAddr>, ConfigError> {
    match ov.metrics_listen.clone().or(f.map(|m| m.listen)) {
        None => Ok(None),
        Some(t) => Ok(Some(t.parse().map_err(|_| {
            invalid(
                "metrics.listen",
                format!("{t:?} is not an address like 127.0.0.1:9464"),
            )
        })?)),
    }
}

/// Checks `value` is within `lo..=hi`, naming `key` otherwise.
fn within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if value < lo || value > hi {
        return Err(invalid(
            key,
            format!("{value} must be between {lo} and {hi}"),
        ));
    }
    Ok(value)
}

/// Checks a duration is within `lo..=hi`, naming `key` otherwise.
fn within_duration(
    key: &str,
    value: Option<HumanDuration>,
    default: Duration,
    lo: Duration,
    hi: Duration,
) -> Result<Duration, ConfigError> {
    let d = value.map(|d| d.0).unwrap_or(default);
    if d < lo || d > hi {
        return Err(invalid(
            key,
            format!(
                "{} must be between {} and {}",
                humantime::format_duration(d),
                humantime::format_duration(lo),
                humantime::format_duration(hi)
            ),
        ));
    }
    Ok(d)
}

fn limits(f: LimitsFile) -> Result<LimitsConfig, ConfigError> {
    let d = LimitsConfig::default();
    let ms = Duration::from_millis;
    let s = Duration::from_secs;
    Ok(LimitsConfig {
        local_connections: within(
            "limits.local_connections",
            f.local_connections.unwrap_or(d.local_connections),
            1,
            1_000_000,
        )?,
        peer_connections: within(
            "limits.peer_connections",
            f.peer_connections.unwrap_or(d.peer_connections),
            1,
            1_000_000,
        )?,
        handshake_timeout: within_duration(
            "limits.handshake_timeout",
            f.handshake_timeout,
            d.handshake_timeout,
            ms(100),
            s(300),
        )?,
        idle_timeout: within_duration(
            "limits.idle_timeout",
            f.idle_timeout,
            d.idle_timeout,
            s(1),
            s(86_400),
        )?,
        request_timeout: within_duration(
            "limits.request_timeout",
            f.request_timeout,
            d.request_timeout,
            ms(100),
            s(600),
        )?,
        max_streams_per_connection: within(
            "limits.max_streams_per_connection",
            f.max_streams_per_connection
                .unwrap_or(d.max_streams_per_connection),
            1,
            1024,
        )?,
        max_request_bytes: within(
            "limits.max_request_bytes",
            f.max_request_bytes.unwrap_or(d.max_request_bytes),
            MIN_REQUEST_BYTES,
            4 << 20,
        )?,
        peer_watches_per_caller: within(
            "limits.peer_watches_per_caller",
            f.peer_watches_per_caller
                .unwrap_or(d.peer_watches_per_caller),
            1,
            1024,
        )?,
    })
}

/// Parses and validates config text exactly as `tokend serve --config`
/// would (no flags; relative paths against `.`), touching no file: `Ok` or
/// the message `serve` would exit 64 with. On the crate's face for tooling
/// and the fuzz harness (`fuzz/`); the daemon uses `Config` itself.
pub fn check_config(text: &str) -> Result<(), String> {
    Config::from_toml(
        text,
        Path::new("."),
        Path::new("<text>"),
        &Overrides::default(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

// === the policies each section builds ===

impl TokensConfig {
    /// The minter's lifetime limits.
    pub fn mint_policy(&self) -> crate::engine::MintPolicy {
        crate::engine::MintPolicy {
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
        }
    }

    /// The verifier's limits.
    pub fn verify_policy(&self) -> crate::engine::VerifyPolicy {
        crate::engine::VerifyPolicy {
            max_ttl: self.max_ttl,
            clock_skew: self.clock_skew,
        }
    }
}

impl Config {
    /// The key lifecycle: rotation timings, and a grace that outlives every
    /// token a retired key signed.
    pub fn lifecycle(&self) -> crate::keys::Lifecycle {
        crate::keys::Lifecycle {
            interval: self.rotation.interval,
            publish_ahead: self.rotation.publish_ahead,
            grace: self.tokens.max_ttl + self.tokens.clock_skew,
        }
    }
}

// === [directory]: the etcd directory and shared replay store ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    etcd: Vec<String>,
    prefix: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    accept: Option<Vec<String>>,
    connect_timeout: Option<HumanDuration>,
    request_timeout: Option<HumanDuration>,
    lease_ttl: Option<HumanDuration>,
}

/// The key prefix every tokend key lives under when none is configured.
pub(crate) const DEFAULT_DIRECTORY_PREFIX: &str = "/tokend/";

/// TLS to etcd: the CA that signs etcd's certificate, and an optional
/// client certificate (etcd's `--client-cert-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA bundle etcd's server certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate and key, when etcd asks for one.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// An etcd user; the password stays in its file until the daemon starts
/// and is never logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUser {
    /// The etcd user name.
    pub name: String,
    /// The file holding its password (one line).
    pub password_file: PathBuf,
}

/// Where the directory lives and what it may bring in (`[directory]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryConfig {
    /// etcd client endpoints, all `http://` or all `https://`.
    pub endpoints: Vec<String>,
    /// The key prefix (ends with `/`).
    pub prefix: String,
    /// TLS to etcd, with `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// etcd authentication, if etcd has it on.
    pub user: Option<EtcdUser>,
    /// Only these issuers are discoverable (None: the whole trust domain).
    pub accept: Option<Vec<SpiffeId>>,
    /// Longest wait for a connection to etcd.
    pub connect_timeout: Duration,
    /// Longest wait for one etcd request (a claim, a put, a get).
    pub request_timeout: Duration,
    /// The lease of this instance's entry: how long a dead instance's entry
    /// stays listed (its keys stay usable until its document expires).
    pub lease_ttl: Duration,
}

fn directory(
    f: Option<DirectoryFile>,
    who: &Identity,
    have_peer_api: bool,
    rel: &impl Fn(PathBuf) -> PathBuf,
) -> Result<Option<DirectoryConfig>, ConfigError> {
    let Some(f) = f else { return Ok(None) };
    if !have_peer_api {
        return Err(invalid(
            "directory",
            "needs [peer_api] (ca, cert, key): its certificate signs this sidecar's key-set documents",
        ));
    }
    let endpoints = etcd_endpoints(f.etcd)?;
    let https = endpoints[0].starts_with("https://");
    let prefix = f
        .prefix
        .unwrap_or_else(|| DEFAULT_DIRECTORY_PREFIX.to_owned());
    if !prefix.ends_with('/') || prefix.len() < 2 || prefix.contains(char::is_whitespace) {
        return Err(invalid(
            "directory.prefix",
            format!("{prefix:?} must be a key prefix ending with '/', like \"/tokend/\""),
        ));
    }
    let tls = match (f.ca, f.cert, f.key) {
        (None, None, None) => None,
        (Some(ca), cert, key) => {
            let client = match (cert, key) {
                (None, None) => None,
                (Some(c), Some(k)) => Some((rel(c), rel(k))),
                _ => {
                    return Err(invalid(
                        "directory.cert",
                        "give both directory.cert and directory.key, or neither",
                    ));
                }
            };
            Some(EtcdTls {
                ca: rel(ca),
                client,
            })
        }
        (None, _, _) => {
            return Err(invalid(
                "directory.ca",
                "a client certificate needs directory.ca (the CA of etcd's certificate)",
            ));
        }
    };
    if https && tls.is_none() {
        return Err(invalid(
            "directory.ca",
            "https:// endpoints need directory.ca (the CA of etcd's certificate)",
        ));
    }
    if !https && tls.is_some() {
        return Err(invalid(
            "directory.etcd",
            "directory.ca/cert/key are set but the endpoints are http://; use https://",
        ));
    }
    let user = match (f.user, f.password_file) {
        (None, None) => None,
        (Some(name), Some(file)) if !name.is_empty() => Some(EtcdUser {
            name,
            password_file: rel(file),
        }),
        (Some(_), Some(_)) => return Err(invalid("directory.user", "must not be empty")),
        (Some(_), None) => {
            return Err(invalid(
                "directory.password_file",
                "directory.user needs directory.password_file (the password is never inline)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "directory.user",
                "directory.password_file needs directory.user",
            ));
        }
    };
    let accept = match f.accept {
        None => None,
        Some(names) => {
            let mut ids = Vec::with_capacity(names.len());
            for (i, n) in names.iter().enumerate() {
                let id = who
                    .trust_domain
                    .id(n)
                    .map_err(|e| invalid(&format!("directory.accept[{i}]"), e.to_string()))?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Some(ids)
        }
    };
    let s = Duration::from_secs;
    Ok(Some(DirectoryConfig {
        endpoints,
        prefix,
        tls,
        user,
        accept,
        connect_timeout: within_duration(
            "directory.connect_timeout",
            f.connect_timeout,
            s(3),
            Duration::from_millis(100),
            s(60),
        )?,
        request_timeout: within_duration(
            "directory.request_timeout",
            f.request_timeout,
            s(3),
            Duration::from_millis(100),
            s(60),
        )?,
        lease_ttl: within_duration("directory.lease_ttl", f.lease_ttl, s(30), s(2), s(300))?,
    }))
}

fn etcd_endpoints(list: Vec<String>) -> Result<Vec<String>, ConfigError> {
    if list.is_empty() {
        return Err(invalid(
            "directory.etcd",
            "needs at least one endpoint, like [\"https://etcd-0:2379\"]",
        ));
    }
    let mut scheme = None;
    for (i, e) in list.iter().enumerate() {
        let key = format!("directory.etcd[{i}]");
        let this = if e.starts_with("https://") {
            "https"
        } else if e.starts_with("http://") {
            "http"
        } else {
            return Err(invalid(
                &key,
                format!("{e:?} must be an http:// or https:// URL"),
            ));
        };
        if e.parse::<http::Uri>().map_or(true, |u| u.host().is_none()) {
            return Err(invalid(&key, format!("{e:?} is not a URL with a host")));
        }
        if scheme.is_some_and(|s| s != this) {
            return Err(invalid(&key, "mixes http:// and https:// endpoints"));
        }
        scheme = Some(this);
    }
    Ok(list)
}

#[cfg(test)]
mod directory_tests {
    use super::*;

    const PEER_API: &str = "[peer_api]\nlisten = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";

    fn parse(directory: &str) -> Result<Config, ConfigError> {
        Config::from_toml(
            &format!("{PEER_API}[directory]\n{directory}"),
            Path::new("/etc/tokend"),
            Path::new("t.toml"),
            &Overrides::default(),
        )
    }

    fn refused(directory: &str) -> String {
        parse(directory).expect_err(directory).to_string()
    }

    /// A plain endpoint list gets the documented defaults; no section, no directory.
    #[test]
    fn directory_defaults() {
        let c = parse("etcd = [\"http://127.0.0.1:2379\"]").expect("ok");
        let d = c.directory.expect("directory");
        assert_eq!(d.prefix, DEFAULT_DIRECTORY_PREFIX);
        assert_eq!(d.tls, None);
        assert_eq!(d.user, None);
        assert_eq!(d.accept, None);
        assert_eq!(d.request_timeout, Duration::from_secs(3));
        assert_eq!(d.lease_ttl, Duration::from_secs(30));
        let none = Config::from_toml("", Path::new("."), Path::new("t"), &Overrides::default())
            .expect("ok");
        assert!(none.directory.is_none());
    }

    /// TLS, client certificate, user, accept list and timeouts parse, with
    /// paths against the config's directory.
    #[test]
    fn directory_full() {
        let d = parse(
            "etcd = [\"https://etcd-0:2379\", \"https://etcd-1:2379\"]\nprefix = \"/bank/\"\n\
             ca = \"etcd-ca.pem\"\ncert = \"etcd.pem\"\nkey = \"etcd.key\"\nuser = \"payments\"\n\
             password_file = \"etcd.pass\"\naccept = [\"ledger\", \"fx\", \"ledger\"]\n\
             request_timeout = \"500ms\"",
        )
        .expect("ok")
        .directory
        .expect("directory");
        assert_eq!(d.prefix, "/bank/");
        let tls = d.tls.expect("tls");
        assert_eq!(tls.ca, Path::new("/etc/tokend/etcd-ca.pem"));
        assert_eq!(
            tls.client,
            Some((
                PathBuf::from("/etc/tokend/etcd.pem"),
                PathBuf::from("/etc/tokend/etcd.key")
            ))
        );
        let user = d.user.expect("user");
        assert_eq!(user.password_file, Path::new("/etc/tokend/etcd.pass"));
        let accept: Vec<&str> = d.accept.iter().flatten().map(|i| i.as_str()).collect();
        assert_eq!(
            accept,
            ["spiffe://local/ledger", "spiffe://local/fx"],
            "deduplicated"
        );
        assert_eq!(d.request_timeout, Duration::from_millis(500));
    }

    /// Every bad value is refused naming its key.
    #[test]
    fn directory_bad_values_named() {
        for (text, key) in [
            ("etcd = []", "directory.etcd"),
            ("etcd = [\"127.0.0.1:2379\"]", "directory.etcd[0]"),
            (
                "etcd = [\"http://a:1\", \"https://b:1\"]\nca = \"x\"",
                "directory.etcd[1]",
            ),
            ("etcd = [\"https://a:1\"]", "directory.ca"),
            ("etcd = [\"http://a:1\"]\nca = \"x\"", "directory.etcd"),
            ("etcd = [\"https://a:1\"]\ncert = \"c\"", "directory.ca"),
            (
                "etcd = [\"https://a:1\"]\nca = \"x\"\ncert = \"c\"",
                "directory.cert",
            ),
            (
                "etcd = [\"http://a:1\"]\nprefix = \"tokend\"",
                "directory.prefix",
            ),
            (
                "etcd = [\"http://a:1\"]\nuser = \"u\"",
                "directory.password_file",
            ),
            ("etcd = [\"http://a:1\"]\npassword = \"p\"", "password"),
            (
                "etcd = [\"http://a:1\"]\naccept = [\"a/b\"]",
                "directory.accept[0]",
            ),
            (
                "etcd = [\"http://a:1\"]\nrequest_timeout = \"1h\"",
                "directory.request_timeout",
            ),
            (
                "etcd = [\"http://a:1\"]\nlease_ttl = \"1s\"",
                "directory.lease_ttl",
            ),
            ("prefix = \"/t/\"", "etcd"),
        ] {
            let e = refused(text);
            assert!(e.contains(key), "{text}: {e}");
        }
        let e = Config::from_toml(
            "[directory]\netcd = [\"http://a:1\"]",
            Path::new("."),
            Path::new("t"),
            &Overrides::default(),
        )
        .expect_err("no peer api")
        .to_string();
        assert!(e.contains("peer_api"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(
            text,
            Path::new("/etc/tokend"),
            Path::new("t.toml"),
            &Overrides::default(),
        )
    }

    /// No config at all gives the documented defaults.
    #[test]
    fn defaults() {
        let c = parse("").expect("defaults");
        assert_eq!(c.id.as_str(), "spiffe://local/default");
        assert_eq!(c.tokens.default_ttl, Duration::from_secs(300));
        assert_eq!(c.tokens.max_ttl, Duration::from_secs(3600));
        assert_eq!(c.socket_mode, 0o600);
        assert_eq!(c.rotation.key_bits, 2048);
        assert_eq!(c.tokens.verify_cache, crate::engine::DEFAULT_VERIFY_CACHE);
    }

    /// `[tokens] verify_cache` sizes the verify cache (0 turns it off); too
    /// large a value is refused, naming the key.
    #[test]
    fn verify_cache_size() {
        let c = parse("[tokens]\nverify_cache = 0").expect("off");
        assert_eq!(c.tokens.verify_cache, 0);
        let e = parse("[tokens]\nverify_cache = 1000001")
            .expect_err("too large")
            .to_string();
        assert!(e.contains("tokens.verify_cache"), "{e}");
    }

    /// `[tokens] proof_nonce` is off by default, `"required"` turns server
    /// nonces on, and any other value is refused, naming the key and both
    /// accepted values.
    #[test]
    fn proof_nonce_values() {
        assert!(!parse("").expect("default").tokens.proof_nonce_required);
        let off = parse("[tokens]\nproof_nonce = \"off\"").expect("off");
        assert!(!off.tokens.proof_nonce_required);
        let on = parse("[tokens]\nproof_nonce = \"required\"").expect("required");
        assert!(on.tokens.proof_nonce_required);
        let e = parse("[tokens]\nproof_nonce = \"yes\"")
            .expect_err("bad")
            .to_string();
        assert_eq!(
            e,
            "invalid config value tokens.proof_nonce: \"yes\" must be \"off\" or \"required\""
        );
        let e = parse("[tokens]\nproof_nonce = true").expect_err("not a string");
        assert!(e.to_string().contains("proof_nonce"), "{e}");
    }

    /// An unknown key is refused and named.
    #[test]
    fn unknown_key_named() {
        let e = parse("nmae = \"x\"").expect_err("unknown").to_string();
        assert!(e.contains("nmae"), "{e}");
        let e = parse("[tokens]\nmax_tll = \"1h\"")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("max_tll"), "{e}");
    }

    /// A bad duration is refused with the offending text and the key.
    #[test]
    fn bad_duration_named() {
        let e = parse("[tokens]\nmax_ttl = \"5 parsecs\"")
            .expect_err("bad")
            .to_string();
        assert!(e.contains("5 parsecs") && e.contains("max_ttl"), "{e}");
    }

    /// Relative paths resolve against the config file's directory; peers validated.
    #[test]
    fn paths_and_peers() {
        let c = parse("keys_dir = \"k\"\n[[peers]]\nname = \"archive\"\njwks_file = \"a.json\"")
            .expect("ok");
        assert_eq!(c.keys_dir, Path::new("/etc/tokend/k"));
        assert_eq!(
            c.peers[0].source,
            PeerSource::JwksFile("/etc/tokend/a.json".into())
        );
        let e = parse("[[peers]]\nname = \"x\"")
            .expect_err("no source")
            .to_string();
        assert!(e.contains("peers[0]"), "{e}");
        let e = parse("default_ttl = 1")
            .expect_err("wrong place")
            .to_string();
        assert!(e.contains("default_ttl"), "{e}");
    }

    /// `$STATE_DIRECTORY/keys` (its first path) is the keys directory only
    /// when neither the file nor a flag names one; a relative one is refused.
    #[test]
    fn state_directory_keys_dir() {
        let with = |state: &str, text: &str, flag: Option<&str>| {
            let ov = Overrides {
                state_directory: Some(state.into()),
                keys_dir: flag.map(PathBuf::from),
                ..Overrides::default()
            };
            Config::from_toml(text, Path::new("/etc/tokend"), Path::new("t.toml"), &ov)
        };
        let c = with("/var/lib/tokend:/var/lib/other", "", None).expect("ok");
        assert_eq!(c.keys_dir, Path::new("/var/lib/tokend/keys"));
        let c = with("/var/lib/tokend", "keys_dir = \"k\"", None).expect("ok");
        assert_eq!(c.keys_dir, Path::new("/etc/tokend/k"));
        let c = with("/var/lib/tokend", "", Some("/srv/keys")).expect("ok");
        assert_eq!(c.keys_dir, Path::new("/srv/keys"));
        let c = with("", "", None).expect("ok");
        assert_eq!(c.keys_dir, Path::new("keys"));
        assert_eq!(parse("").expect("ok").keys_dir, Path::new("keys"));
        let e = with("var/lib/tokend", "", None).expect_err("relative");
        assert_eq!(
            e.to_string(),
            "invalid config value STATE_DIRECTORY: \"var/lib/tokend\" is not an absolute path; \
             set keys_dir or unset STATE_DIRECTORY"
        );
    }

    /// Inconsistent values are named.
    #[test]
    fn inconsistent_values() {
        let e = parse("[tokens]\ndefault_ttl = \"2h\"")
            .expect_err("over max")
            .to_string();
        assert!(e.contains("tokens.default_ttl"), "{e}");
        let e = parse("socket_mode = \"0666\"")
            .expect_err("mode")
            .to_string();
        assert!(e.contains("socket_mode"), "{e}");
        let e = parse("[rotation]\nkey_bits = 1024")
            .expect_err("bits")
            .to_string();
        assert!(e.contains("rotation.key_bits"), "{e}");
    }

    /// `[limits]` is optional: every key has its documented default, and
    /// each can be set.
    #[test]
    fn limits_defaults_and_values() {
        let c = parse("").expect("defaults");
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.local_connections, 128);
        assert_eq!(c.limits.max_request_bytes, 16 * 1024);
        let c = parse(
            "[limits]\nlocal_connections = 8\npeer_connections = 4\nhandshake_timeout = \"500ms\"\n\
             idle_timeout = \"2m\"\nrequest_timeout = \"5s\"\nmax_streams_per_connection = 2\n\
             max_request_bytes = 20000\npeer_watches_per_caller = 3",
        )
        .expect("limits");
        assert_eq!(
            c.limits,
            LimitsConfig {
                local_connections: 8,
                peer_connections: 4,
                handshake_timeout: Duration::from_millis(500),
                idle_timeout: Duration::from_secs(120),
                request_timeout: Duration::from_secs(5),
                max_streams_per_connection: 2,
                max_request_bytes: 20_000,
                peer_watches_per_caller: 3,
            }
        );
    }

    /// A peer's replicas: `addresses` (each an https://host:port URL, no
    /// duplicates), exclusive with `address` and `jwks_file`; a second
    /// entry for one name is refused with the hint to use `addresses`.
    #[test]
    fn peer_addresses() {
        let api = "[peer_api]\nlisten = \"127.0.0.1:0\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = parse(&format!(
            "{api}[[peers]]\nname = \"payments\"\naddresses = [\"https://10.0.0.1:7443\", \"https://payments.svc:7443\"]"
        ))
        .expect("addresses");
        assert_eq!(
            c.peers[0].source,
            PeerSource::Addresses(vec![
                "https://10.0.0.1:7443".into(),
                "https://payments.svc:7443".into()
            ])
        );
        for (bad, key) in [
            ("addresses = []", "peers[0].addresses"),
            (
                "addresses = [\"https://a:1\", \"https://a:1\"]",
                "peers[0].addresses",
            ),
            ("addresses = [\"http://a:1\"]", "peers[0].addresses"),
            ("addresses = [\"https://a\"]", "peers[0].addresses"),
            (
                "address = \"https://a:1\"\naddresses = [\"https://b:1\"]",
                "peers[0]",
            ),
        ] {
            let e = parse(&format!("{api}[[peers]]\nname = \"p\"\n{bad}"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let e = parse(&format!(
            "{api}[[peers]]\nname = \"p\"\naddress = \"https://a:1\"\n[[peers]]\nname = \"p\"\naddress = \"https://b:1\""
        ))
        .expect_err("twice")
        .to_string();
        assert!(e.contains("addresses = [...]"), "{e}");
    }

    /// `[peer_api] document_lifetime` defaults to 5m and is bounded;
    /// `advertise` must be an https://host:port URL.
    #[test]
    fn document_lifetime_and_advertise() {
        let api = "[peer_api]\nlisten = \"0.0.0.0:7443\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = parse(api).expect("defaults");
        let p = c.peer_api.expect("peer api");
        assert_eq!(p.document_lifetime, Duration::from_secs(300));
        assert_eq!(p.advertise, None);
        let c = parse(&format!(
            "{api}document_lifetime = \"2m\"\nadvertise = \"https://payments-0.svc:7443\""
        ))
        .expect("set");
        let p = c.peer_api.expect("peer api");
        assert_eq!(p.document_lifetime, Duration::from_secs(120));
        assert_eq!(p.advertise.as_deref(), Some("https://payments-0.svc:7443"));
        for bad in ["document_lifetime = \"2s\"", "document_lifetime = \"2h\""] {
            let e = parse(&format!("{api}{bad}")).expect_err(bad).to_string();
            assert!(e.contains("peer_api.document_lifetime"), "{e}");
        }
        let e = parse(&format!("{api}advertise = \"payments:7443\""))
            .expect_err("not a url")
            .to_string();
        assert!(e.contains("peer_api.advertise"), "{e}");
    }

    /// An unknown key of `[limits]` is refused and named.
    #[test]
    fn limits_unknown_key_named() {
        let e = parse("[limits]\nlocal_conections = 3")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("local_conections"), "{e}");
    }

    /// A bad duration in `[limits]` is refused with its text and key.
    #[test]
    fn limits_bad_duration_named() {
        let e = parse("[limits]\nhandshake_timeout = \"soon\"")
            .expect_err("bad")
            .to_string();
        assert!(e.contains("soon") && e.contains("handshake_timeout"), "{e}");
    }

    /// Out-of-range limits are refused, naming the key and the range.
    #[test]
    fn limits_invalid_values_named() {
        for (text, key) in [
            ("local_connections = 0", "limits.local_connections"),
            ("peer_connections = 0", "limits.peer_connections"),
            ("handshake_timeout = \"10ms\"", "limits.handshake_timeout"),
            ("idle_timeout = \"2d\"", "limits.idle_timeout"),
            ("request_timeout = \"1h\"", "limits.request_timeout"),
            (
                "max_streams_per_connection = 0",
                "limits.max_streams_per_connection",
            ),
            ("max_request_bytes = 4096", "limits.max_request_bytes"),
            (
                "peer_watches_per_caller = 0",
                "limits.peer_watches_per_caller",
            ),
        ] {
            let e = parse(&format!("[limits]\n{text}"))
                .expect_err(text)
                .to_string();
            assert!(e.contains(key) && e.contains("between"), "{text}: {e}");
        }
        let e = parse("[limits]\nlocal_connections = -1")
            .expect_err("negative")
            .to_string();
        assert!(e.contains("local_connections"), "{e}");
    }
}
