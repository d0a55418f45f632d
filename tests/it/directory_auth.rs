//! The directory and shared replay store on a real etcd with
//! authentication enabled: sidecars log in as a user (`[directory] user`,
//! `password_file`) whose role may read and write the prefix only. The
//! right password works; a wrong one, or etcd down at start, leaves the
//! sidecar running but failing closed, and a sidecar started while etcd
//! was down logs in once it is back.

use etcd_client::{ConnectOptions, Permission};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::etcd::Etcd;
use crate::inproc::Bank;
use crate::support::*;

const ROOT_PASSWORD: &str = "root-pw-for-tests";
const PASSWORD: &str = "tokend-pw-for-tests";

/// Enables auth on `etcd`: a root user, and user `tokend` whose role
/// `tokend` may read and write keys under `/auth/` only.
async fn enable_auth(etcd: &Etcd) {
    let mut c = etcd.client().await;
    c.user_add("root", ROOT_PASSWORD, None)
        .await
        .expect("user root");
    // etcd 3.4 may create the root role implicitly; the grant is what counts.
    let _ = c.role_add("root").await;
    c.user_grant_role("root", "root").await.expect("root role");
    c.role_add("tokend").await.expect("role tokend");
    c.role_grant_permission("tokend", Permission::read_write("/auth/").with_prefix())
        .await
        .expect("grant the prefix");
    c.user_add("tokend", PASSWORD, None)
        .await
        .expect("user tokend");
    c.user_grant_role("tokend", "tokend")
        .await
        .expect("grant role");
    c.auth_enable().await.expect("auth enable");
}

/// `[directory]` under `/auth/` as user `tokend` with `password` (written
/// to a file in `dir`).
fn directory(etcd: &Etcd, dir: &std::path::Path, password: &str) -> String {
    let file = dir.join(format!("pw-{}", password.len()));
    std::fs::write(&file, format!("{password}\n")).expect("password file");
    format!(
        "{}user = \"tokend\"\npassword_file = \"{}\"\nlease_ttl = \"2s\"\n\
         request_timeout = \"1s\"\nconnect_timeout = \"1s\"\n",
        etcd.directory_toml("/auth/"),
        file.display()
    )
}

/// With etcd auth enabled: `payments` and two `ledger` replicas logged in
/// as `tokend` publish, discover (no [[peers]]) and claim a one-time token
/// once (`replayed` at the second replica); the documents are in etcd. A
/// sidecar with a wrong password starts, reports the directory
/// NOT_SERVING and refuses one-time tokens `unavailable`. A sidecar
/// started while etcd is down starts, refuses one-time tokens
/// `unavailable`, and once etcd is back logs in: SERVING, and a one-time
/// token is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_with_etcd_user_and_password() {
    let mut etcd = Etcd::start();
    enable_auth(&etcd).await;
    let files = tmp();
    let good = directory(&etcd, files.path(), PASSWORD);
    let bank = Bank::new();
    let payments = bank
        .start(bank.peer("payments").standby_key(false).config(&good))
        .await;
    let mut ledgers = Vec::new();
    for i in 0..2 {
        let b = bank.replica("ledger", i).standby_key(false).config(&good);
        ledgers.push(bank.start(b).await);
    }
    for l in &ledgers {
        assert!(
            eventually(20, || async { !l.kids_of("payments").await.is_empty() }).await,
            "{} discovered payments through etcd with auth",
            l.name()
        );
        // The watch turns the status SERVING once its first read is in,
        // which may come a moment after the keys under a loaded machine.
        assert!(
            eventually(20, || async {
                l.health_status("tokend.directory").await == ServingStatus::Serving as i32
            })
            .await,
            "{}: directory SERVING",
            l.name()
        );
    }
    let once = payments.mint_one_time("ledger").await;
    assert_eq!(ledgers[0].verify(&once).await.err(), None, "first claim");
    assert_eq!(
        ledgers[1].verify(&once).await.err().as_deref(),
        Some("replayed"),
        "claimed once across replicas"
    );
    let mut root = etcd
        .client_with(ConnectOptions::new().with_user("root", ROOT_PASSWORD))
        .await;
    let docs = root
        .get(
            "/auth/keys/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("get as root");
    assert_eq!(docs.kvs().len(), 3, "payments and two ledger replicas");

    let wrong = directory(&etcd, files.path(), "not-the-password");
    let intruder = bank
        .start(
            bank.peer("intruder")
                .standby_key(false)
                .peer("payments", payments.peer_addr())
                .config(&wrong),
        )
        .await;
    assert!(
        eventually(10, || async {
            !intruder.kids_of("payments").await.is_empty()
        })
        .await,
        "wrong password: the sidecar runs, mesh peers work"
    );
    let once = payments.mint_one_time("intruder").await;
    assert_eq!(
        intruder.verify(&once).await.err().as_deref(),
        Some("unavailable"),
        "wrong password: one-time tokens fail closed"
    );
    assert_eq!(
        intruder.health_status("tokend.directory").await,
        ServingStatus::NotServing as i32,
        "wrong password: directory NOT_SERVING"
    );

    etcd.kill_all();
    let late = bank
        .start(
            bank.peer("late")
                .standby_key(false)
                .peer("payments", payments.peer_addr())
                .config(&good),
        )
        .await;
    assert!(
        eventually(10, || async { !late.kids_of("payments").await.is_empty() }).await,
        "started with its etcd user while etcd is down"
    );
    let once = payments.mint_one_time("late").await;
    assert_eq!(
        late.verify(&once).await.err().as_deref(),
        Some("unavailable"),
        "etcd down: fail closed"
    );
    etcd.restart_single();
    assert!(
        eventually(30, || async {
            late.health_status("tokend.directory").await == ServingStatus::Serving as i32
        })
        .await,
        "logged in once etcd is back: SERVING"
    );
    assert!(
        eventually(10, || async {
            let once = payments.mint_one_time("late").await;
            late.verify(&once).await.is_ok()
        })
        .await,
        "a one-time token is claimed once logged in"
    );
}
