//! Containment (issue 13, item 4): an operator bans a certificate serial,
//! an instance, a kid or a SPIFFE ID at a verifier, without the banned
//! side's cooperation. Written over two distinct peers (payments, the
//! compromised one, and archive, a healthy one) verified at ledger; with
//! replicas, `Peers::start` grows a second payments instance and the same
//! assertions hold per instance.

use tokend::Reason;
use tokend::pb::tokend as pb;

use crate::inproc::{Bank, Node};
use crate::pki::serial_of;
use crate::support::{eventually, id};

/// ledger verifying payments (compromised) and archive (healthy).
struct Peers {
    bank: Bank,
    payments: Node,
    archive: Node,
    ledger: Node,
}

impl Peers {
    async fn start() -> Peers {
        let bank = Bank::new();
        let payments = bank.start(bank.peer("payments")).await;
        let archive = bank.start(bank.lean_peer("archive")).await;
        let ledger = bank
            .start(
                bank.lean_peer("ledger")
                    .peer("payments", payments.peer_addr())
                    .peer("archive", archive.peer_addr()),
            )
            .await;
        ledger.learns(&["payments", "archive"]).await;
        Peers {
            bank,
            payments,
            archive,
            ledger,
        }
    }

    /// The reason ledger refuses a fresh token from `from` (None: accepted).
    async fn verdict(&self, from: &Node) -> Option<Reason> {
        let token = from.mint("ledger").await.token;
        self.ledger.refusal(&token).await.0
    }

    async fn ban(&self, kind: &str, value: &str) -> pb::BanResponse {
        self.ledger
            .admin()
            .await
            .ban(pb::BanRequest {
                kind: kind.into(),
                value: value.into(),
                reason: "compromised".into(),
            })
            .await
            .expect("ban")
            .into_inner()
    }
}

/// payments's certificate is banned at ledger while payments keeps
/// publishing: its tokens (even one already verified and cached) are
/// refused as `revoked_key` from the next call on, a key it publishes
/// afterwards never reaches ledger, archive's tokens keep verifying, the
/// ban survives a restart of ledger (which then learns nothing from the
/// banned certificate), and lifting it restores payments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_certificate_can_neither_sign_nor_publish() {
    let mut p = Peers::start().await;
    let cached = p.payments.mint("ledger").await.token;
    assert!(p.ledger.verify(&cached).await.is_ok());
    let serial = serial_of(&p.bank.root().join("payments/peer/cert.pem"));
    // As openssl prints it: upper case with colons.
    let typed: Vec<String> = serial
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    let r = p.ban("serial", &typed.join(":")).await;
    assert!(r.added);
    assert_eq!(r.ban.expect("ban").value, serial);

    let (reason, detail) = p.ledger.refusal(&cached).await;
    assert_eq!(reason, Some(Reason::RevokedKey), "{detail}");
    assert!(detail.contains(&serial), "{detail}");
    assert_eq!(p.verdict(&p.payments).await, Some(Reason::RevokedKey));
    assert_eq!(p.verdict(&p.archive).await, None);

    // payments keeps publishing: a new key is refused at the door.
    let kid = p.payments.rotate().await;
    assert!(
        eventually(10, || async {
            p.ledger
                .issuer("payments")
                .await
                .last_error
                .contains("banned certificate")
        })
        .await,
        "ledger never refused payments's set: {:?}",
        p.ledger.issuer("payments").await
    );
    assert!(!p.ledger.kids_of("payments").await.contains(&kid));

    // After a restart the ban is still in force: the banned certificate
    // delivers nothing, so payments's kids are not even known.
    p.ledger.restart().await;
    p.ledger.learns(&["archive"]).await;
    assert_eq!(p.verdict(&p.payments).await, Some(Reason::UnknownKid));
    assert_eq!(p.verdict(&p.archive).await, None);
    let listed = p
        .ledger
        .admin()
        .await
        .list_bans(pb::ListBansRequest {})
        .await
        .expect("list")
        .into_inner()
        .bans;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].value, serial);

    let lifted = p
        .ledger
        .admin()
        .await
        .unban(pb::UnbanRequest {
            kind: "serial".into(),
            value: serial.clone(),
        })
        .await
        .expect("unban")
        .into_inner();
    assert!(lifted.removed);
    p.ledger.learns(&["payments"]).await;
    assert_eq!(p.verdict(&p.payments).await, None);
}

/// Bans by kid, by SPIFFE ID (a bare service name) and by instance, set and
/// lifted with `tokend ban`: each refuses exactly what it names, and
/// `tokend ban list` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bans_by_kid_identity_and_instance_through_the_cli() {
    let p = Peers::start().await;
    let kid = p.payments.mint("ledger").await.kid;
    let instance = p.payments.peer_addr().to_string();
    for (kind, value, shown) in [
        ("kid", kid.as_str(), kid.clone()),
        ("spiffe-id", "payments", id("payments")),
        ("instance", instance.as_str(), instance.clone()),
    ] {
        let out = p
            .ledger
            .cli(&["ban", "add", kind, value, "--reason", "incident 42"])
            .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            p.verdict(&p.payments).await,
            Some(Reason::RevokedKey),
            "{kind}"
        );
        assert_eq!(p.verdict(&p.archive).await, None, "{kind}");
        let list = p.ledger.cli(&["ban", "list"]).await;
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
        assert_eq!(list[0]["value"], shown.as_str(), "{list}");
        assert_eq!(list[0]["reason"], "incident 42");
        let out = p.ledger.cli(&["ban", "remove", kind, value]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(p.verdict(&p.payments).await, None, "{kind} lifted");
    }
    let bad = p.ledger.cli(&["ban", "add", "color", "red"]).await;
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("serial, instance, kid or spiffe_id"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Issue 13's containment test over replicas (issue 10): two replicas of
/// payments, each with its own certificate and instance id, behind one
/// `[[peers]]` entry. payments-1's certificate is banned at ledger while it
/// keeps publishing: its tokens are refused `revoked_key`, a key it
/// publishes afterwards never reaches ledger, and payments-2's tokens keep
/// verifying, across a rotation of payments-2 too; lifting the ban lets
/// payments-1's key in. A ban by instance — payments-2's instance id as
/// `jwks --all` lists it, or the peer address its document advertises —
/// reaches payments-2 alone and refuses the documents it publishes while
/// banned (the document sink's check, as for a relayed document).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_replica_leaves_the_other_replicas_working() {
    let bank = Bank::new();
    let mut reps = Vec::new();
    for i in 1..=2 {
        let b = bank
            .peer("payments")
            .replica(i)
            .config("[rotation]\npublish_ahead = \"60s\"");
        reps.push(bank.start(b).await);
    }
    let addrs: Vec<_> = reps.iter().map(Node::peer_addr).collect();
    let ledger = bank
        .start(bank.lean_peer("ledger").peer_replicas("payments", &addrs))
        .await;
    let documented = || async {
        ledger
            .issuer("payments")
            .await
            .instances
            .iter()
            .filter(|i| i.seq > 0 && !i.gone)
            .count()
            == 2
    };
    assert!(eventually(10, documented).await, "two documented instances");
    let (two, one) = (reps.pop().expect("2"), reps.pop().expect("1"));
    let p = Peers {
        bank,
        payments: one,
        archive: two,
        ledger,
    };
    let (one, two) = (&p.payments, &p.archive);
    assert_eq!(p.verdict(one).await, None);
    assert_eq!(p.verdict(two).await, None);

    let serial = serial_of(&p.bank.root().join("payments-1/peer/cert.pem"));
    assert_ne!(
        serial,
        serial_of(&p.bank.root().join("payments-2/peer/cert.pem"))
    );
    assert!(p.ban("serial", &serial).await.added);
    let (reason, detail) = p.ledger.refusal(&one.mint("ledger").await.token).await;
    assert_eq!(reason, Some(Reason::RevokedKey), "{detail}");
    assert!(detail.contains(&serial), "{detail}");
    assert_eq!(p.verdict(two).await, None);

    // Both keep publishing: payments-2's new key arrives, payments-1's never.
    let banned_kid = one.rotate().await;
    let kid = two.rotate().await;
    assert!(
        eventually(10, || async {
            p.ledger.kids_of("payments").await.contains(&kid)
        })
        .await,
        "payments-2's rotation never reached ledger"
    );
    assert!(!p.ledger.kids_of("payments").await.contains(&banned_kid));
    assert_eq!(p.verdict(two).await, None);
    assert!(
        p.verdict(one).await.is_some(),
        "payments-1 after its rotation"
    );

    // Lifted: payments-1 reconnects and its key comes in.
    let lifted = p
        .ledger
        .admin()
        .await
        .unban(pb::UnbanRequest {
            kind: "serial".into(),
            value: serial.clone(),
        })
        .await
        .expect("unban")
        .into_inner();
    assert!(lifted.removed);
    assert_eq!(p.verdict(one).await, None);
    assert!(
        eventually(25, || async {
            p.ledger.kids_of("payments").await.contains(&banned_kid)
        })
        .await,
        "payments-1 never came back"
    );

    // A ban by instance: payments-2's instance id, then its address.
    let addr2 = format!("https://{}", two.peer_addr());
    let instance = p
        .ledger
        .issuer("payments")
        .await
        .instances
        .into_iter()
        .find(|i| i.address == addr2)
        .expect("payments-2's instance")
        .instance;
    for value in [instance, two.peer_addr().to_string()] {
        // The pending key signs from now on, so the next rotation is new.
        p.bank.advance(61);
        assert!(p.ban("instance", &value).await.added, "{value}");
        assert_eq!(p.verdict(two).await, Some(Reason::RevokedKey), "{value}");
        assert_eq!(p.verdict(one).await, None, "{value}");
        let blocked = two.rotate().await;
        assert!(
            eventually(10, || async {
                p.ledger
                    .issuer("payments")
                    .await
                    .last_error
                    .contains(&format!("instance {value}"))
            })
            .await,
            "ledger never refused payments-2's document under the ban of {value}: {:?}",
            p.ledger.issuer("payments").await
        );
        assert!(!p.ledger.kids_of("payments").await.contains(&blocked));
        let lifted = p
            .ledger
            .admin()
            .await
            .unban(pb::UnbanRequest {
                kind: "instance".into(),
                value: value.clone(),
            })
            .await
            .expect("unban")
            .into_inner();
        assert!(lifted.removed);
        assert!(
            eventually(25, || async {
                p.ledger.kids_of("payments").await.contains(&blocked)
            })
            .await,
            "payments-2 never came back after lifting the ban of {value}"
        );
        assert_eq!(p.verdict(two).await, None, "{value} lifted");
    }
}

/// Signs a ban document with `tokend ban sign` (`key_dir/key.pem`).
fn sign_document(key_dir: &std::path::Path, seq: u64, bans: serde_json::Value) -> String {
    let list = key_dir.join(format!("bans-{seq}.json"));
    std::fs::write(&list, bans.to_string()).expect("write list");
    let out = std::process::Command::new(crate::support::bin())
        .args(["ban", "sign", "--trust-domain", crate::support::TD, "--seq"])
        .arg(seq.to_string())
        .arg("--key")
        .arg(key_dir.join("key.pem"))
        .arg("--bans")
        .arg(&list)
        .output()
        .expect("tokend ban sign");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A fleet-wide ban document, signed with `tokend ban sign` by the key the
/// trust domain designates (`[bans] signer`) and delivered as a file, bans
/// payments at two verifiers at once; a later document lifts it; an older
/// document (a rollback), one signed by another key and an altered one are
/// refused and the bans in force stay; the document's bans survive a
/// restart with the file gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_fleet_ban_document_bans_at_every_verifier() {
    use crate::pki::{issue, rename_into};
    let bank = Bank::new();
    let signer = issue(&bank.ca(), "tokend-bans", &bank.root().join("signer"));
    let mallory = issue(&bank.ca(), "mallory", &bank.root().join("mallory"));
    let fleet = bank.root().join("fleet");
    std::fs::create_dir_all(&fleet).expect("mkdir");
    let section = format!(
        "[bans]\ndocument = \"{}\"\nsigner = \"{}\"\n",
        fleet.join("bans.jws").display(),
        signer.join("cert.pem").display()
    );
    let payments = bank.start(bank.lean_peer("payments")).await;
    let archive = bank.start(bank.lean_peer("archive")).await;
    let verifier = |name: &str| {
        bank.lean_peer(name)
            .config(&section)
            .peer("payments", payments.peer_addr())
            .peer("archive", archive.peer_addr())
    };
    let mut ledger = bank.start(verifier("ledger")).await;
    let vault = bank.start(verifier("vault")).await;
    for v in [&ledger, &vault] {
        v.learns(&["payments", "archive"]).await;
    }
    let publish = |doc: &str| rename_into(&fleet, "bans.jws", doc.as_bytes());
    let ban_payments =
        serde_json::json!([{"kind": "spiffe_id", "value": "payments", "reason": "incident 7"}]);

    let first = sign_document(&signer, 1, ban_payments.clone());
    publish(&first);
    for v in [&ledger, &vault] {
        assert!(
            eventually(10, || async {
                verdict(&payments, v).await == Some(Reason::RevokedKey)
            })
            .await,
            "{} never took the document",
            v.name()
        );
        assert_eq!(verdict(&archive, v).await, None);
    }

    publish(&sign_document(&signer, 2, serde_json::json!([])));
    for v in [&ledger, &vault] {
        assert!(
            eventually(10, || async { verdict(&payments, v).await.is_none() }).await,
            "{} never lifted the ban",
            v.name()
        );
    }

    // A rollback to document 1, another signer, an altered document: refused.
    let forged = sign_document(&mallory, 3, ban_payments.clone());
    let (h, rest) = first.split_once('.').expect("jws");
    let (_, sig) = rest.split_once('.').expect("jws");
    let altered = format!(
        "{h}.{}.{sig}",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"trust_domain":"bank.internal","seq":9,"iat":0,"bans":[{"kind":"spiffe_id","value":"spiffe://bank.internal/archive","reason":""}]}"#
        )
    );
    for doc in [first.as_str(), forged.as_str(), altered.as_str()] {
        publish(doc);
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        for v in [&ledger, &vault] {
            assert_eq!(verdict(&payments, v).await, None);
            assert_eq!(verdict(&archive, v).await, None);
        }
    }

    publish(&sign_document(&signer, 4, ban_payments));
    assert!(
        eventually(10, || async {
            verdict(&payments, &ledger).await == Some(Reason::RevokedKey)
        })
        .await
    );
    std::fs::remove_file(fleet.join("bans.jws")).expect("rm");
    ledger.restart().await;
    ledger.learns(&["archive"]).await;
    let token = payments.mint("ledger").await.token;
    // The ban held: payments's certificate publishes nothing to ledger.
    assert_eq!(ledger.refusal(&token).await.0, Some(Reason::UnknownKid));
    assert_eq!(verdict(&archive, &ledger).await, None);
}

/// The reason `at` refuses a fresh token from `from` for it (None: accepted).
async fn verdict(from: &Node, at: &Node) -> Option<Reason> {
    let token = from.mint(&at.name()).await.token;
    at.refusal(&token).await.0
}
