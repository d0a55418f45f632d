//! The reload loop: every second, read the three `[peer_api]` files (a
//! path is resolved afresh each time, so an atomic rename and a symlink
//! swap of the directory, as Kubernetes secret volumes do, are both seen)
//! and compare their digest with the material in use. A changed set is
//! tried once it has stayed the same for one more poll (a writer that
//! replaces the certificate and the key one after the other is not caught
//! half-way), then either swapped in or refused with its reason logged
//! once; the previous set stays. A set refused for its dates (or its
//! chain) is tried again each poll without more logging, so a certificate
//! issued a little ahead of this host's clock is taken once it is valid. The same loop keeps the expiry metrics,
//! warns at a fraction of the lifetime, and turns the peer API's health
//! to NOT_SERVING once the certificate in use has expired.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::material::date;
use super::{CertInfo, PeerTls, TlsError};
use crate::time::{SharedClock, UnixTime};

/// How often the files are read.
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// The health service name of the peer API.
pub(crate) const PEER_SERVICE: &str = crate::proto::tokend::v1::peer_service_server::SERVICE_NAME;

/// When to warn about a certificate's coming expiry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ExpiryPolicy {
    /// The fraction of a certificate's lifetime after which it is warned
    /// about (`[peer_api] warn_at`, default 0.8).
    pub(crate) warn_at: f64,
}

/// What the loop remembers between polls.
#[derive(Default)]
struct State {
    /// A changed set seen once, tried if the next poll sees it again.
    pending: Option<[u8; 32]>,
    /// The last refused set, not logged again until it changes.
    refused: Option<[u8; 32]>,
    /// Whether that refusal was about time (a certificate not yet valid,
    /// say from a CA whose clock runs ahead): such a set is tried again
    /// every poll, silently, and swapped in once it passes.
    retry: bool,
    /// Serials already warned about.
    warned: std::collections::HashSet<String>,
    /// Whether the peer API was last reported serving.
    serving: Option<bool>,
    /// The CAs whose remaining validity is exported.
    reported: std::collections::HashSet<String>,
}

/// Polls until `cancel`: reloads, refuses, measures and warns as above.
pub(crate) async fn watch(
    tls: PeerTls,
    clock: SharedClock,
    policy: ExpiryPolicy,
    health: HealthReporter,
    cancel: CancellationToken,
) {
    let mut state = State::default();
    loop {
        let now = clock.now();
        poll_files(&tls, now, &mut state);
        observe(&tls, now, policy, &health, &mut state).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

fn digest_of_error(e: &TlsError) -> [u8; 32] {
    let mut out = [0u8; 32];
    let d = ring::digest::digest(&ring::digest::SHA256, e.to_string().as_bytes());
    out.copy_from_slice(d.as_ref());
    out
}

/// One look at the files.
fn poll_files(tls: &PeerTls, now: UnixTime, state: &mut State) {
    let candidate = tls.read();
    let digest = match &candidate {
        Ok(files) => files.digest(),
        Err(e) => digest_of_error(e),
    };
    if digest == tls.handle.current().digest {
        state.pending = None;
        state.refused = None;
        return;
    }
    let again = state.refused == Some(digest);
    if again && !state.retry {
        return;
    }
    if !again && state.pending != Some(digest) {
        state.pending = Some(digest);
        return;
    }
    state.pending = None;
    let installed = candidate.and_then(|files| tls.install(&files, now));
    match installed {
        Err(_) if again => {}
        Ok(leaf) => {
            state.refused = None;
            metrics::counter!("tokend_peer_tls_reload_total", "result" => "ok").increment(1);
            tracing::info!(
                serial = %leaf.serial,
                not_after = %date(leaf.not_after),
                anchors = tls.anchors().len(),
                "peer TLS material reloaded; new handshakes use it"
            );
        }
        Err(e) => {
            state.refused = Some(digest);
            state.retry = matches!(e, TlsError::Validity { .. } | TlsError::Chain { .. });
            metrics::counter!("tokend_peer_tls_reload_total", "result" => "refused").increment(1);
            tracing::warn!(
                error = %e,
                serial = %tls.leaf().serial,
                "new peer TLS material refused; the previous set stays in use"
            );
        }
    }
}

/// Expiry metrics, warnings and the peer API's health at `now`.
async fn observe(
    tls: &PeerTls,
    now: UnixTime,
    policy: ExpiryPolicy,
    health: &HealthReporter,
    state: &mut State,
) {
    let leaf = tls.leaf();
    metrics::gauge!("tokend_peer_cert_expires_in_seconds").set(leaf.remaining(now) as f64);
    warn_once(&leaf, "peer certificate", now, policy, state);
    let anchors = tls.anchors();
    for ca in &anchors {
        metrics::gauge!("tokend_peer_ca_expires_in_seconds", "serial" => ca.serial.clone())
            .set(ca.remaining(now) as f64);
        warn_once(ca, "peer CA certificate", now, policy, state);
    }
    // A CA that left the bundle reports NaN (no value), so an alert on a
    // CA about to expire stops once the rollover removed it.
    let current: std::collections::HashSet<String> =
        anchors.iter().map(|a| a.serial.clone()).collect();
    for gone in state.reported.difference(&current) {
        metrics::gauge!("tokend_peer_ca_expires_in_seconds", "serial" => gone.clone())
            .set(f64::NAN);
    }
    state.reported = current;
    let serving = now <= leaf.not_after;
    if state.serving != Some(serving) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            tracing::error!(
                serial = %leaf.serial,
                not_after = %date(leaf.not_after),
                "peer certificate has expired; peers will refuse it until it is renewed (peer API health: NOT_SERVING)"
            );
            ServingStatus::NotServing
        };
        health.set_service_status(PEER_SERVICE, status).await;
        state.serving = Some(serving);
    }
}

fn warn_once(cert: &CertInfo, what: &str, now: UnixTime, policy: ExpiryPolicy, state: &mut State) {
    if cert.past_fraction(now, policy.warn_at) && state.warned.insert(cert.serial.clone()) {
        tracing::warn!(
            serial = %cert.serial,
            subject = %cert.subject,
            not_after = %date(cert.not_after),
            remaining_secs = cert.remaining(now),
            warn_at = policy.warn_at,
            "{what} is past peer_api.warn_at of its lifetime; renew it"
        );
    }
}
