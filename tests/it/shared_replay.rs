//! The replay store shared by a service's replicas through a real etcd:
//! a one-time token is accepted exactly once whichever replica receives
//! it, also while the etcd leader is killed, and never when etcd cannot
//! answer (`unavailable`).

use crate::etcd::Etcd;
use crate::inproc::{Bank, Node};
use crate::support::*;

/// `payments`, and `n` replicas of `ledger` trusting it, sharing `etcd`.
async fn replicas(bank: &Bank, etcd: &Etcd, n: usize) -> (Node, Vec<Node>) {
    let payments = bank.start(bank.peer("payments").standby_key(false)).await;
    let mut ledgers = Vec::new();
    for i in 0..n {
        let b = bank
            .replica("ledger", i)
            .standby_key(false)
            .peer("payments", payments.peer_addr())
            .config(&format!(
                "{}request_timeout = \"1s\"\nconnect_timeout = \"1s\"\n",
                etcd.directory_toml("/t/")
            ));
        ledgers.push(bank.start(b).await);
    }
    for l in &ledgers {
        assert!(
            eventually(10, || async { !l.kids_of("payments").await.is_empty() }).await,
            "a ledger replica learnt payments' keys"
        );
    }
    (payments, ledgers)
}

/// Sends `token` to every replica at once; the reasons (`ok` for an accept).
async fn race(ledgers: &[Node], token: &str) -> Vec<String> {
    let mut clients = Vec::new();
    for l in ledgers {
        clients.push(l.tokens().await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let t = token.to_owned();
            tokio::spawn(async move { verify_with(c, &t).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(match t.await.expect("task") {
            Ok(_) => "ok".to_owned(),
            Err(r) => r,
        });
    }
    out
}

fn count(outcomes: &[String], what: &str) -> usize {
    outcomes.iter().filter(|o| *o == what).count()
}

/// The same one-time token sent concurrently to three replicas is
/// accepted by exactly one and refused `replayed` by the two others, for
/// several tokens in a row; a plain token still verifies everywhere; with
/// etcd down a new one-time token is refused `unavailable` (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_replay_accepts_once_across_replicas() {
    let mut etcd = Etcd::start();
    let bank = Bank::new();
    let (payments, ledgers) = replicas(&bank, &etcd, 3).await;
    for round in 0..5 {
        let token = payments.mint_one_time("ledger").await;
        let outcomes = race(&ledgers, &token).await;
        assert_eq!(count(&outcomes, "ok"), 1, "round {round}: {outcomes:?}");
        assert_eq!(
            count(&outcomes, "replayed"),
            2,
            "round {round}: {outcomes:?}"
        );
        // Later attempts, at any replica, are replays too.
        for l in &ledgers {
            assert_eq!(l.verify(&token).await.err().as_deref(), Some("replayed"));
        }
    }
    let plain = payments.mint("ledger").await.token;
    for l in &ledgers {
        assert!(l.verify(&plain).await.is_ok(), "plain tokens need no claim");
    }
    // The claims are in etcd under the service's jti prefix.
    let mut c = etcd.client().await;
    let claims = c
        .get(
            "/t/jti/ledger/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("get");
    assert_eq!(claims.kvs().len(), 5, "one key per one-time token");
    assert!(
        claims.kvs().iter().all(|kv| kv.lease() != 0),
        "bound to a lease"
    );

    etcd.kill_all();
    let token = payments.mint_one_time("ledger").await;
    for l in &ledgers {
        assert_eq!(
            l.verify(&token).await.err().as_deref(),
            Some("unavailable"),
            "etcd down: fail closed"
        );
    }
    assert!(
        ledgers[0].verify(&plain).await.is_ok(),
        "plain tokens unaffected"
    );
}

/// While the leader of a 3-member etcd cluster is SIGKILLed mid-run, no
/// one-time token is ever accepted twice (some may be refused
/// `unavailable` during the election), and after the failover honest
/// distinct tokens are accepted again, exactly once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_replay_holds_through_leader_kill() {
    let mut etcd = Etcd::cluster();
    let bank = Bank::new();
    let (payments, ledgers) = replicas(&bank, &etcd, 3).await;
    let mut tokens = Vec::new();
    for _ in 0..40 {
        tokens.push(payments.mint_one_time("ledger").await);
    }
    let mut seen = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        if i == 10 {
            let killed = etcd.kill_leader();
            eprintln!("killed etcd leader {killed}");
        }
        let outcomes = race(&ledgers, token).await;
        assert!(
            count(&outcomes, "ok") <= 1,
            "token {i} double accept: {outcomes:?}"
        );
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o.as_str(), "ok" | "replayed" | "unavailable")),
            "token {i}: {outcomes:?}"
        );
        seen.push(outcomes);
    }
    // Each token, retried at every replica once the cluster has settled:
    // none that was accepted is accepted again.
    let settled = eventually(20, || async {
        let t = payments.mint_one_time("ledger").await;
        count(&race(&ledgers, &t).await, "ok") == 1
    })
    .await;
    assert!(
        settled,
        "honest tokens are accepted again after the failover"
    );
    for (i, token) in tokens.iter().enumerate() {
        let again = race(&ledgers, token).await;
        let before = count(&seen[i], "ok");
        assert!(
            before + count(&again, "ok") <= 1,
            "token {i} accepted twice: {:?} then {again:?}",
            seen[i]
        );
    }
    let accepted_after = seen[10..].iter().filter(|o| count(o, "ok") == 1).count();
    eprintln!(
        "accepted {} of 10 before the kill, {accepted_after} of 30 after",
        seen[..10].iter().filter(|o| count(o, "ok") == 1).count()
    );
    assert!(
        seen[..10].iter().all(|o| count(o, "ok") == 1),
        "before the kill every token is accepted once: {:?}",
        &seen[..10]
    );
}

/// A sidecar whose etcd is down from the start still starts and serves:
/// plain tokens verify, one-time tokens are refused `unavailable`, and the
/// directory's health is NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_replay_fails_closed_when_etcd_never_answered() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a port")
        .port();
    let bank = Bank::new();
    let payments = bank.start(bank.peer("payments").standby_key(false)).await;
    let ledger = bank
        .start(
            bank.peer("ledger")
                .standby_key(false)
                .peer("payments", payments.peer_addr())
                .config(&format!(
                    "[directory]\netcd = [\"http://127.0.0.1:{dead}\"]\nrequest_timeout = \"500ms\"\nconnect_timeout = \"500ms\"\n"
                )),
        )
        .await;
    assert!(
        eventually(10, || async {
            !ledger.kids_of("payments").await.is_empty()
        })
        .await,
        "mesh peers still work"
    );
    let plain = payments.mint("ledger").await.token;
    assert_eq!(ledger.verify(&plain).await.err(), None);
    let once = payments.mint_one_time("ledger").await;
    assert_eq!(
        ledger.verify(&once).await.err().as_deref(),
        Some("unavailable")
    );
    assert_eq!(
        ledger.health_status("tokend.directory").await,
        ServingStatus::NotServing as i32
    );
}
