//! Logs (tracing; human by default, JSON by flag) and the Prometheus
//! listener. Every metric family is described here (`# HELP`, `# TYPE`,
//! base units: seconds and bytes), latencies are histograms with buckets
//! from 50 µs to 1 s (so a fleet's sidecars aggregate), and the exporter
//! adds `tokend_build_info` and the `process_*` families.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber, filtered by `TOKEND_LOG` (default `info`), on stderr.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKEND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Histogram buckets for local latencies, in seconds: 50 µs (a cached
/// verify) to 1 s (a verify waiting for a peer's keys).
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// How often the `process_*` families are refreshed.
const PROCESS_INTERVAL: Duration = Duration::from_secs(5);

/// Serves metrics in Prometheus text format at `http://addr/metrics`.
/// Must run inside the tokio runtime (it spawns the process collector).
pub(crate) fn serve_metrics(addr: SocketAddr) -> Result<(), String> {
    let latencies = ["tokend_verify_seconds", "tokend_mint_seconds"];
    latencies
        .iter()
        .try_fold(
            PrometheusBuilder::new().with_http_listener(addr),
            |b, name| b.set_buckets_for_metric(Matcher::Full((*name).into()), &LATENCY_BUCKETS),
        )
        .and_then(|b| b.install())
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    describe_families();
    metrics::gauge!("tokend_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let process = metrics_process::Collector::default();
    process.describe();
    process.collect();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PROCESS_INTERVAL).await;
            process.collect();
        }
    });
    Ok(())
}

/// `# HELP` for the `[directory]` families (etcd relay and shared replay store).
fn describe_directory() {
    describe_gauge!(
        "tokend_signing_queued",
        "Signatures (uncached mints, exchanges) waiting for a signing thread; beyond 4096 a mint is refused unavailable."
    );
    describe_gauge!(
        "tokend_directory_connected",
        "1 while the directory watch is live; 0 while stale (changes are not arriving)."
    );
    describe_gauge!(
        "tokend_directory_documents",
        "Directory entries present under the watched prefixes."
    );
    describe_gauge!(
        "tokend_directory_last_sync_timestamp_seconds",
        Unit::Seconds,
        "When the directory watch last caught up with etcd (unix time)."
    );
    describe_counter!(
        "tokend_directory_installed_total",
        "Directory entries verified and installed."
    );
    describe_counter!(
        "tokend_directory_refusals_total",
        "Directory entries refused, by reason (bad_chain, path_mismatch, rollback, expired, ...)."
    );
    describe_counter!(
        "tokend_directory_reconnects_total",
        "Directory watch reconnects after an error."
    );
    describe_counter!(
        "tokend_directory_full_reads_total",
        "Full reads of the watched prefixes (start, compaction)."
    );
    describe_counter!(
        "tokend_directory_puts_total",
        "This instance's documents put into etcd."
    );
    describe_gauge!(
        "tokend_directory_published",
        "1 while this instance's current document is in etcd under a live lease."
    );
    describe_counter!(
        "tokend_replay_claims_total",
        "One-time claims in the shared replay store, by store and result (claimed, replayed, unavailable)."
    );
    describe_counter!(
        "tokend_replay_unknown_outcomes_total",
        "Shared replay claims whose outcome was unknown (resolved by reading the claimant back)."
    );
}

/// `# HELP` (and so `# TYPE`) for every tokend family; the one list of
/// what tokend exports (README "Integrations: Prometheus").
fn describe_families() {
    describe_gauge!(
        "tokend_build_info",
        "Always 1; the version label is this sidecar's release."
    );
    describe_counter!(
        "tokend_mint_total",
        "Tokens handed out, by whether the mint cache answered (cached)."
    );
    describe_histogram!(
        "tokend_mint_seconds",
        Unit::Seconds,
        "Time to answer a mint, signing queue included."
    );
    describe_counter!(
        "tokend_verify_total",
        "Verifications by result: ok or the refusal's reason code."
    );
    describe_histogram!(
        "tokend_verify_seconds",
        Unit::Seconds,
        "Time to answer a verification, any peer key refresh included."
    );
    describe_counter!(
        "tokend_verify_cache_total",
        "Verify cache lookups by result (hit, miss)."
    );
    describe_counter!(
        "tokend_exchange_total",
        "Delegated tokens issued by token exchange (RFC 8693)."
    );
    describe_gauge!(
        "tokend_peer_instances",
        "Instances (replicas) of a peer issuer whose keys this sidecar holds."
    );
    describe_counter!(
        "tokend_documents_signed_total",
        "Key-set documents this instance signed (every key change and re-sign)."
    );
    describe_counter!(
        "tokend_documents_installed_total",
        "Verified key-set documents installed into trust, from any source."
    );
    describe_counter!(
        "tokend_direct_fetch_total",
        "Direct fetches of a running-out document from its own instance."
    );
    describe_counter!(
        "tokend_direct_fetch_failures_total",
        "Direct document fetches that failed (the keys stop at the document's exp)."
    );
    describe_directory();
    describe_counter!(
        "tokend_prove_total",
        "DPoP proofs (RFC 9449) signed for bound tokens."
    );
    describe_histogram!(
        "tokend_prove_seconds",
        Unit::Seconds,
        "Time to sign a DPoP proof."
    );
    describe_counter!(
        "tokend_ext_authz_total",
        "Envoy ext_authz decisions by mode (inbound, outbound) and outcome."
    );
    describe_gauge!(
        "tokend_signing_key_age_seconds",
        Unit::Seconds,
        "Age of the key that signs now."
    );
    describe_gauge!("tokend_keys", "Own keys by lifecycle state.");
    describe_counter!("tokend_keys_generated_total", "Own signing keys generated.");
    describe_counter!("tokend_keys_revoked_total", "Own signing keys revoked.");
    describe_gauge!(
        "tokend_bound_signing_key_age_seconds",
        Unit::Seconds,
        "Age of the key that signs bound tokens now."
    );
    describe_gauge!(
        "tokend_bound_keys",
        "Own bound-token signing keys (keys_dir/bound) by lifecycle state."
    );
    describe_counter!(
        "tokend_bound_keys_generated_total",
        "Own bound-token signing keys generated."
    );
    describe_counter!(
        "tokend_bound_keys_revoked_total",
        "Own bound-token signing keys revoked."
    );
    describe_gauge!(
        "tokend_peer_connected",
        "1 while the peer's key watch is connected, else 0."
    );
    describe_gauge!("tokend_peer_keys", "Keys trusted for an issuer.");
    describe_counter!(
        "tokend_peer_updates_total",
        "Key sets accepted from a peer."
    );
    describe_counter!(
        "tokend_peer_refusals_total",
        "Key sets refused from a peer (the previous set stays)."
    );
    describe_counter!(
        "tokend_key_refresh_total",
        "On-demand refreshes of an issuer's keys (unknown kid or bad signature)."
    );
    describe_gauge!(
        "tokend_connections",
        "Open connections by listener (local, peer)."
    );
    describe_counter!(
        "tokend_connections_idle_closed_total",
        "Connections closed for idling, by listener."
    );
    describe_counter!(
        "tokend_handshake_failures_total",
        "Connections that failed or timed out before their first call, by listener and why."
    );
    describe_counter!(
        "tokend_accept_errors_total",
        "Errors accepting connections, by listener."
    );
    describe_counter!("tokend_audit_records_total", "Audit records written.");
    describe_counter!(
        "tokend_audit_dropped_total",
        "Audit records dropped because the audit writer fell behind (a gap record follows)."
    );
    describe_counter!(
        "tokend_peer_tls_reload_total",
        "Changed peer TLS material sets seen, by result (ok: swapped in; refused: the previous set stays)."
    );
    describe_gauge!(
        "tokend_peer_cert_expires_in_seconds",
        Unit::Seconds,
        "Remaining validity of the peer certificate in use (negative once expired)."
    );
    describe_gauge!(
        "tokend_peer_ca_expires_in_seconds",
        Unit::Seconds,
        "Remaining validity of each CA of the peer bundle, by serial (NaN once it left the bundle)."
    );
    describe_gauge!("tokend_bans", "Bans in force at this verifier.");
    describe_counter!(
        "tokend_ban_document_total",
        "Fleet ban documents read, by result."
    );
    describe_gauge!(
        "tokend_ban_document_seq",
        "Sequence number of the fleet ban document in force."
    );
}
