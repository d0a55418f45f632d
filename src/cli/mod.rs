//! The `tokend` command line (DESIGN.md "CLI contract"): the clap tree, value
//! parsers and dispatch. Opens no sockets or files itself.

/// `println!` for command output: a reader that went away (`tokend verify
/// … | head -1`) ends the output, not the process with a panic (Rust
/// ignores SIGPIPE, and `println!` panics on a closed pipe).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod demo;
mod demo_directory;
mod endpoint;
mod offline;
mod remote;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

/// Exit code for a usage or configuration error (BSD EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// tokend: service-to-service token sidecar.
#[derive(Debug, Parser)]
#[command(name = "tokend", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "human")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the local socket is.
#[derive(Debug, Clone, Args)]
pub struct SocketArg {
    /// The sidecar's Unix socket [default: TOKEND_SOCKET, then
    /// SPIFFE_ENDPOINT_SOCKET (unix:///path or unix:/path), then ./tokend.sock].
    #[arg(long, env = "TOKEND_SOCKET")]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    /// The socket to dial, or why `SPIFFE_ENDPOINT_SOCKET` cannot name one.
    fn path(self) -> Result<PathBuf, String> {
        endpoint::resolve(
            self.socket,
            std::env::var(endpoint::SPIFFE_ENDPOINT_SOCKET).ok(),
        )
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar (with no config: working defaults, keys generated on first start).
    Serve(ServeArgs),
    /// Mint a token for AUDIENCE; prints the compact JWT.
    Mint {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// Target service: a name of the trust domain (`ledger`) or a SPIFFE ID.
        #[arg(long)]
        audience: String,
        /// Lifetime, like 90s or 5m (default: the sidecar's default_ttl).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// A caller claim KEY=VALUE; VALUE is JSON if it parses as JSON, else a string. Repeatable.
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, serde_json::Value)>,
        /// A token verifiers accept only once.
        #[arg(long)]
        one_time: bool,
        /// A bound token (RFC 9449 DPoP): every use needs a proof from `tokend prove`.
        #[arg(long)]
        bind: bool,
    },
    /// Verify TOKEN (or `-` for stdin); prints the claims as JSON, or `rejected: <reason>: <detail>` and exits 1.
    Verify {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// The audience the token must name (default: this sidecar).
        #[arg(long)]
        audience: Option<String>,
        /// The DPoP proof a bound token came with.
        #[command(flatten)]
        proof: ProofArgs,
        /// The token, or `-` to read it from stdin.
        token: String,
    },
    /// Exchange a received TOKEN (or `-`) for a delegated token to AUDIENCE.
    Exchange {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// The next service.
        #[arg(long)]
        audience: String,
        /// The DPoP proof a bound token was received with.
        #[command(flatten)]
        proof: ProofArgs,
        /// Bind the delegated token to this sidecar's proof key (always, for a bound TOKEN).
        #[arg(long)]
        bind: bool,
        /// The token, or `-`.
        token: String,
    },
    /// A DPoP proof (RFC 9449) for one request carrying the bound TOKEN (or `-`); prints it.
    Prove {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// The request's HTTP method (`POST` for gRPC).
        #[arg(long)]
        method: String,
        /// The request's target URI, e.g. https://ledger.bank.internal/pkg.Service/Method.
        #[arg(long)]
        uri: String,
        /// The verifier's nonce (RFC 9449 §9: the `dpop-nonce` its refusal
        /// or last answer carried), put in the proof's `nonce` claim.
        #[arg(long)]
        nonce: Option<String>,
        /// The bound token, or `-`.
        token: String,
    },
    /// Key administration.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The sidecar's public JWKS (with --all, every key set it trusts).
    Jwks {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// Every issuer's set and its source.
        #[arg(long)]
        all: bool,
    },
    /// The sidecar's health (grpc.health.v1 Check): prints the status and
    /// exits 0 when SERVING, 1 otherwise (for exec probes).
    Health {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// One service's status (e.g. tokend.v1.TokenService) instead of the sidecar's.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Show a token's header and claims, UNVERIFIED.
    Decode {
        /// The token, or `-`.
        token: String,
    },
    /// The trust domain's CA and peer certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Bans at this verifier: a certificate serial, an instance, a kid or a
    /// SPIFFE ID whose tokens are refused (revoked_key) and whose key sets
    /// are not accepted, without the banned side's cooperation.
    #[command(subcommand)]
    Ban(BanCommand),
    /// Start a small bank of sidecars in this process and show minting,
    /// verification, a refused impersonation and a rotation.
    Demo {
        /// Instead: two replicas each of payments and ledger sharing a
        /// throwaway etcd directory (needs `etcd` on PATH).
        #[arg(long)]
        directory: bool,
    },
}

/// The DPoP proof presented with a bound token, and its request.
#[derive(Debug, Clone, clap::Args)]
pub struct ProofArgs {
    /// The proof (the request's `DPoP` header).
    #[arg(long, requires_all = ["method", "uri"])]
    pub proof: Option<String>,
    /// The HTTP method of the request the proof is for.
    #[arg(long, requires = "proof")]
    pub method: Option<String>,
    /// The URI of the request the proof is for (query and fragment ignored).
    #[arg(long, requires = "proof")]
    pub uri: Option<String>,
}

/// `tokend ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA: writes OUT/ca.pem and OUT/ca.key (0600).
    Init {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Trust domain, e.g. bank.internal.
        #[arg(long)]
        trust_domain: String,
    },
    /// Issue a peer certificate for service NAME: writes OUT/cert.pem and
    /// OUT/key.pem (0600). With --intermediate, an intermediate CA named
    /// NAME instead: OUT/ca.pem and OUT/ca.key, usable as --ca in turn (its
    /// leaves' cert.pem then holds leaf + intermediate).
    Issue {
        /// Directory holding ca.pem and ca.key (a root or an intermediate).
        #[arg(long)]
        ca: PathBuf,
        /// Service name; the certificate carries spiffe://TD/NAME.
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// DNS names (repeatable; default: localhost and NAME).
        #[arg(long)]
        dns: Vec<String>,
        /// Validity in days (default 365).
        #[arg(long, conflicts_with = "ttl")]
        days: Option<i64>,
        /// Validity as a duration, such as 12h (short-lived certificates).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Issue an intermediate CA instead of a peer certificate.
        #[arg(long)]
        intermediate: bool,
    },
}

/// `tokend ban ...`
#[derive(Debug, Subcommand)]
pub enum BanCommand {
    /// Put a ban in force (persisted in the keys directory).
    Add {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// serial | instance | kid | spiffe-id
        kind: String,
        /// A serial in hex (colons allowed), an instance (peer address), a
        /// kid, or a SPIFFE ID (a bare service name means this trust domain).
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// Why (kept with the ban, shown in refusals).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a ban.
    Remove {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// serial | instance | kid | spiffe-id
        kind: String,
        /// The banned value.
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// The bans in force, as JSON.
    List {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Sign a fleet-wide ban document (prints a compact JWS): every sidecar
    /// whose `[bans] signer` is this key's certificate takes it from its
    /// `[bans] document` file if SEQ is higher than any it has seen.
    Sign {
        /// The designated signer's private key (PKCS#8 P-256, as `tokend ca issue` writes key.pem).
        #[arg(long)]
        key: PathBuf,
        /// The trust domain the document is for.
        #[arg(long)]
        trust_domain: String,
        /// Sequence number: higher than the last document's.
        #[arg(long)]
        seq: u64,
        /// A JSON array of {"kind", "value", "reason"} (`-`: stdin).
        #[arg(long)]
        bans: PathBuf,
    },
}

/// `tokend audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files (oldest first, e.g. audit.log.2
    /// audit.log.1 audit.log); names the first broken record and exits 1.
    Verify {
        /// The files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// `tokend keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List keys with their lifecycle times.
    List {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// The keys bound tokens are signed with (keys_dir/bound/) instead.
        #[arg(long)]
        bound: bool,
    },
    /// Start a rotation now.
    Rotate {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// Rotate the keys bound tokens are signed with instead.
        #[arg(long)]
        bound: bool,
    },
    /// Revoke KID at once.
    Revoke {
        /// The sidecar's socket.
        #[command(flatten)]
        socket: SocketArg,
        /// The key id (a base64url thumbprint: it may start with `-`).
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

/// `tokend serve` flags; each overrides the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Service name this sidecar speaks for.
    #[arg(long)]
    pub name: Option<String>,
    /// Trust domain.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Socket path (default: TOKEND_SOCKET, then ./tokend.sock).
    #[arg(long, env = "TOKEND_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Keys directory.
    #[arg(long)]
    pub keys_dir: Option<PathBuf>,
    /// Peer API listen address.
    #[arg(long)]
    pub peer_listen: Option<String>,
    /// Prometheus listen address.
    #[arg(long)]
    pub metrics_listen: Option<String>,
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let d = crate::config::parse_duration(s)?;
    if d.as_secs() == 0 {
        return Err("ttl must be at least 1s".into());
    }
    Ok(d.as_secs())
}

fn parse_claim(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty KEY"));
    }
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()));
    Ok((k.to_owned(), value))
}

/// Reads TOKEN as given, or stdin (at most 64 KiB) when it is `-`, less the
/// one line ending `echo` or a file adds. Nothing else is stripped: the
/// sidecar verifies exactly the bytes it is sent.
fn token_arg(t: &str) -> Result<String, String> {
    use std::io::Read;
    if t != "-" {
        return Ok(t.to_owned());
    }
    let mut s = String::new();
    std::io::stdin()
        .lock()
        .take(64 * 1024)
        .read_to_string(&mut s)
        .map_err(|e| format!("cannot read token from stdin: {e}"))?;
    let line = s.strip_suffix('\n').unwrap_or(&s);
    Ok(line.strip_suffix('\r').unwrap_or(line).to_owned())
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Serve(args) => remote::serve(args).await,
        Command::Mint {
            socket,
            audience,
            ttl,
            claims,
            one_time,
            bind,
        } => match socket.path() {
            Ok(s) => remote::mint(&s, audience, ttl, claims, one_time, bind).await,
            Err(e) => fail_usage(&e),
        },
        Command::Verify {
            socket,
            audience,
            proof,
            token,
        } => match (socket.path(), token_arg(&token)) {
            (Ok(s), Ok(t)) => remote::verify(&s, t, audience, proof).await,
            (Err(e), _) | (_, Err(e)) => fail_usage(&e),
        },
        Command::Exchange {
            socket,
            audience,
            proof,
            bind,
            token,
        } => match (socket.path(), token_arg(&token)) {
            (Ok(s), Ok(t)) => remote::exchange(&s, t, audience, proof, bind).await,
            (Err(e), _) | (_, Err(e)) => fail_usage(&e),
        },
        Command::Prove {
            socket,
            method,
            uri,
            nonce,
            token,
        } => match (socket.path(), token_arg(&token)) {
            (Ok(s), Ok(t)) => remote::prove(&s, t, method, uri, nonce).await,
            (Err(e), _) | (_, Err(e)) => fail_usage(&e),
        },
        Command::Keys(KeysCommand::List { socket, bound }) => match socket.path() {
            Ok(s) => remote::keys_list(&s, bound).await,
            Err(e) => fail_usage(&e),
        },
        Command::Keys(KeysCommand::Rotate { socket, bound }) => match socket.path() {
            Ok(s) => remote::keys_rotate(&s, bound).await,
            Err(e) => fail_usage(&e),
        },
        Command::Keys(KeysCommand::Revoke { socket, kid }) => match socket.path() {
            Ok(s) => remote::keys_revoke(&s, kid).await,
            Err(e) => fail_usage(&e),
        },
        Command::Jwks { socket, all } => match socket.path() {
            Ok(s) => remote::jwks(&s, all).await,
            Err(e) => fail_usage(&e),
        },
        Command::Health { socket, service } => match socket.path() {
            Ok(s) => remote::health(&s, service).await,
            Err(e) => fail_usage(&e),
        },
        Command::Audit(AuditCommand::Verify { files }) => offline::audit_verify(&files),
        Command::Ban(BanCommand::Add {
            socket,
            kind,
            value,
            reason,
        }) => match socket.path() {
            Ok(s) => remote::ban(&s, kind, value, reason).await,
            Err(e) => fail_usage(&e),
        },
        Command::Ban(BanCommand::Remove {
            socket,
            kind,
            value,
        }) => match socket.path() {
            Ok(s) => remote::unban(&s, kind, value).await,
            Err(e) => fail_usage(&e),
        },
        Command::Ban(BanCommand::List { socket }) => match socket.path() {
            Ok(s) => remote::bans(&s).await,
            Err(e) => fail_usage(&e),
        },
        Command::Ban(BanCommand::Sign {
            key,
            trust_domain,
            seq,
            bans,
        }) => offline::ban_sign(&key, &trust_domain, seq, &bans),
        Command::Decode { token } => match token_arg(&token) {
            Ok(t) => offline::decode(&t),
            Err(e) => fail_usage(&e),
        },
        Command::Ca(CaCommand::Init { out, trust_domain }) => offline::ca_init(&out, &trust_domain),
        Command::Ca(CaCommand::Issue {
            ca,
            name,
            out,
            dns,
            days,
            ttl,
            intermediate,
        }) => {
            let mut spec = match ttl {
                Some(secs) => {
                    crate::ca::IssueSpec::peer(&ca, &name, &out, Duration::from_secs(secs))
                }
                None => crate::ca::IssueSpec::days(&ca, &name, &out, days.unwrap_or(365)),
            };
            spec.dns = dns;
            spec.intermediate = intermediate;
            offline::ca_issue(&spec)
        }
        Command::Demo { directory } => demo::run(directory).await,
    }
}

fn fail_usage(msg: &str) -> u8 {
    eprintln!("tokend: {msg}");
    EXIT_USAGE
}
