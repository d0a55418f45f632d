//! The directory on a real etcd: replicas of a service publish signed
//! key-set documents, verifiers discover issuers and follow rotations and
//! revocations through etcd with no peer connection; a dead replica's entry
//! leaves with its lease; relay attacks written straight into etcd are
//! refused with their reasons; a withheld revocation is caught by the
//! direct fetch within the document lifetime.

use std::time::Duration;

use tokend::pb::tokend as pb;

use crate::etcd::Etcd;
use crate::inproc::{Bank, Node};
use crate::support::*;

/// Lines of `[directory]` for `etcd` under `prefix`, with a short lease.
fn directory(etcd: &Etcd, prefix: &str) -> String {
    format!(
        "{}lease_ttl = \"2s\"\nrequest_timeout = \"2s\"\n",
        etcd.directory_toml(prefix)
    )
}

/// Rotation that publishes a new key 5 s (bank clock) before it signs.
const ROTATION: &str = "[rotation]\ninterval = \"1h\"\npublish_ahead = \"5s\"\n";

/// Replica `n` of `name` in directory mode under `prefix`.
async fn replica(bank: &Bank, etcd: &Etcd, name: &str, n: usize, prefix: &str) -> Node {
    let b = bank
        .replica(name, n)
        .config(ROTATION)
        .config(&directory(etcd, prefix));
    bank.start(b).await
}

/// A verifier `name` in directory mode under `prefix` (no [[peers]]).
async fn verifier(bank: &Bank, etcd: &Etcd, name: &str, prefix: &str) -> Node {
    let b = bank
        .peer(name)
        .standby_key(false)
        .config(&directory(etcd, prefix));
    bank.start(b).await
}

/// The instances `node` holds for `issuer` (a service name).
async fn instances(node: &Node, issuer: &str) -> Vec<pb::InstanceKeys> {
    node.issuer(issuer).await.instances
}

/// Waits until `node` holds `n` live (not gone) instances of `issuer`.
async fn wait_live(node: &Node, issuer: &str, n: usize) {
    assert!(
        eventually(20, || async {
            instances(node, issuer)
                .await
                .iter()
                .filter(|i| !i.gone)
                .count()
                == n
        })
        .await,
        "{} sees {n} live instances of {issuer}: {:?}",
        node.name(),
        instances(node, issuer).await
    );
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let h = token.split('.').next().expect("header");
    let h: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .expect("b64"),
    )
    .expect("json");
    h["kid"].as_str().expect("kid").to_owned()
}

/// Mints at `replica` until its token is signed by `kid`.
async fn mint_with(replica: &Node, aud: &str, kid: &str) -> String {
    for _ in 0..200 {
        let t = replica.mint(aud).await.token;
        if kid_of(&t) == kid {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} never signed with {kid}", replica.name());
}

/// Two and then three replicas of `payments` in directory mode; two
/// verifiers that never configured `payments` discover it. Tokens from
/// every replica verify at every verifier, across a rotation at each
/// replica, with zero failed verifications (each new key is seen by every
/// verifier before it signs: the publish-ahead covers the propagation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_replicas_verify_across_rotations() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let verifiers = [
        verifier(&bank, &etcd, "ledger", "/t/").await,
        verifier(&bank, &etcd, "fx", "/t/").await,
    ];
    let mut replicas = vec![
        replica(&bank, &etcd, "payments", 0, "/t/").await,
        replica(&bank, &etcd, "payments", 1, "/t/").await,
    ];
    let mut failures = Vec::new();
    for round in 0..2 {
        if round == 1 {
            replicas.push(replica(&bank, &etcd, "payments", 2, "/t/").await);
        }
        for v in &verifiers {
            wait_live(v, "payments", replicas.len()).await;
        }
        for (i, r) in replicas.iter().enumerate() {
            let before = r.mint("ledger").await.token;
            let kid = r.rotate().await;
            for v in &verifiers {
                assert!(
                    eventually(10, || async { v.kids_of("payments").await.contains(&kid) }).await,
                    "{} sees the pending key of replica {i}",
                    v.name()
                );
            }
            bank.advance(6);
            let after = mint_with(r, "ledger", &kid).await;
            for token in [&before, &after] {
                for (v, aud) in verifiers.iter().zip(["ledger", "fx"]) {
                    let t = if aud == "ledger" {
                        token.clone()
                    } else {
                        r.mint("fx").await.token
                    };
                    if let Err(e) = v.verify(&t).await {
                        failures.push(format!("round {round} replica {i} at {}: {e}", v.name()));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "failed verifications: {failures:?}");
}

/// A revocation at one replica reaches every verifier through etcd within
/// one second, and the replica's other keys and the other replicas' keys
/// keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_revocation_reaches_every_verifier_within_a_second() {
    let etcd = Etcd::start();
    let bank = Bank::new();
    let verifiers = [
        verifier(&bank, &etcd, "ledger", "/t/").await,
        verifier(&bank, &etcd, "fx", "/t/").await,
    ];
    let replicas = [
        replica(&bank, &etcd, "payments", 0, "/t/").await,
        replica(&bank, &etcd, "payments", 1, "/t/").await,
    ];
    for v in &verifiers {
        wait_live(v, "payments", 2).await;
    }
    let doomed_ledger = replicas[0].mint("ledger").await.token;
    let doomed_fx = replicas[0].mint("fx").await.token;
    assert!(verifiers[0].verify(&doomed_ledger).await.is_ok());
    assert!(verifiers[1].verify(&doomed_fx).await.is_ok());
    let kid = kid_of(&doomed_ledger);
    let new_kid = replicas[0].revoke(&kid).await;
    assert_ne!(new_kid, kid);
    for (v, t) in verifiers.iter().zip([&doomed_ledger, &doomed_fx]) {
        assert!(
            eventually(1, || async {
                v.verify(t).await.err().as_deref() == Some("revoked_key")
            })
            .await,
            "{} refuses the revoked key within one second: {:?}, {:?}",
            v.name(),
            v.verify(t).await,
            instances(v, "payments").await
        );
    }
    for r in &replicas {
        let t = r.mint("ledger").await.token;
        assert!(
            verifiers[0].verify(&t).await.is_ok(),
            "honest keys keep working"
        );
    }
}
