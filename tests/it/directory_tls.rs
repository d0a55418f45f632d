//! The directory and shared replay store on a real etcd that serves its
//! clients over TLS only and requires client certificates
//! (`--client-cert-auth`): sidecars holding etcd's CA and a client
//! certificate of it publish, discover and claim one-time tokens through
//! it; a sidecar without a client certificate, or with one from a foreign
//! CA, starts but reports the directory NOT_SERVING and refuses one-time
//! tokens `unavailable` (fail closed).

use crate::etcd::Etcd;
use crate::inproc::Bank;
use crate::support::*;

/// `[directory]` for the TLS etcd under `/tls/` with client certificate
/// `client` (`client`, `foreign`, or None), short lease and timeouts.
fn directory(etcd: &Etcd, client: Option<&str>) -> String {
    format!(
        "{}lease_ttl = \"2s\"\nrequest_timeout = \"2s\"\nconnect_timeout = \"2s\"\n",
        etcd.tls_directory_toml("/tls/", client)
    )
}

/// Two replicas of `ledger` (no [[peers]]) discover `payments` through a
/// TLS etcd with client certificates and verify its tokens; a one-time
/// token is accepted at one replica and refused `replayed` at the other;
/// the directory is SERVING. A sidecar with no client certificate and one
/// with a foreign CA's certificate (both knowing `payments` over the
/// mesh) start, report the directory NOT_SERVING, still verify plain
/// tokens, and refuse one-time tokens `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_over_tls_with_client_certificates() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let etcd = Etcd::start_tls();
    let bank = Bank::new();
    let payments = bank
        .start(
            bank.peer("payments")
                .standby_key(false)
                .config(&directory(&etcd, Some("client"))),
        )
        .await;
    let mut ledgers = Vec::new();
    for i in 0..2 {
        let b = bank
            .replica("ledger", i)
            .standby_key(false)
            .config(&directory(&etcd, Some("client")));
        ledgers.push(bank.start(b).await);
    }
    for l in &ledgers {
        assert!(
            eventually(20, || async { !l.kids_of("payments").await.is_empty() }).await,
            "{} discovered payments through the TLS etcd",
            l.name()
        );
        assert!(
            eventually(10, || async {
                l.health_status("tokend.directory").await == ServingStatus::Serving as i32
            })
            .await,
            "{}: directory SERVING over TLS",
            l.name()
        );
    }
    let plain = payments.mint("ledger").await.token;
    for l in &ledgers {
        assert_eq!(l.verify(&plain).await.err(), None, "{}", l.name());
    }
    let once = payments.mint_one_time("ledger").await;
    assert_eq!(ledgers[0].verify(&once).await.err(), None, "first claim");
    assert_eq!(
        ledgers[1].verify(&once).await.err().as_deref(),
        Some("replayed"),
        "claimed once across replicas"
    );
    // Every instance published its document through TLS.
    let mut c = etcd.client().await;
    let docs = c
        .get(
            "/tls/keys/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("get");
    assert_eq!(docs.kvs().len(), 3, "payments and two ledger replicas");

    for (name, client) in [("anonymous", None), ("foreign", Some("foreign"))] {
        let node = bank
            .start(
                bank.peer(name)
                    .standby_key(false)
                    .peer("payments", payments.peer_addr())
                    .config(&directory(&etcd, client)),
            )
            .await;
        assert!(
            eventually(10, || async { !node.kids_of("payments").await.is_empty() }).await,
            "{name}: mesh peers still work"
        );
        let plain = payments.mint(name).await.token;
        assert_eq!(node.verify(&plain).await.err(), None, "{name}: plain");
        let once = payments.mint_one_time(name).await;
        assert_eq!(
            node.verify(&once).await.err().as_deref(),
            Some("unavailable"),
            "{name}: one-time tokens fail closed"
        );
        assert_eq!(
            node.health_status("tokend.directory").await,
            ServingStatus::NotServing as i32,
            "{name}: directory NOT_SERVING"
        );
    }
}
