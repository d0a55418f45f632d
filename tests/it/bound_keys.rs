//! The bound-token key class: bound tokens are signed by keys kept in
//! `keys_dir/bound/` and published only to tokend verifiers (the peer key
//! exchange and the signed documents relayed through etcd). A token a bound
//! key signed without `cnf` is refused, and so is a `cnf` token over a
//! signing key named by its plain kid, both simulated with the keys on disk
//! as a compromised minter would hold them; the form an earlier release
//! minted (`<kid>.dpop` over a signing key) keeps verifying with its proof.
//! Bound keys rotate without a failed call, are revoked and banned like any
//! key, survive a restart, and a corrupt bound key file stops the start with
//! the same error as a signing key file. (`dpop::` covers what a third-party
//! bearer verifier makes of a bound token.)

use std::path::Path;

use tokend::pb::tokend as pb;

use crate::dpop::{mint_bound, prove, verify_proven};
use crate::inproc::{Bank, Node};
use crate::support::{Sidecar, eventually, forge, signing_key_in, tmp};

/// The URI a caller of ledger's `Pay` method proves for.
const PAY: &str = "https://ledger.bank.internal/bank.v1.Ledger/Pay";

/// A new key is published 5 s (bank clock) before it signs.
const ROTATION: &str = "[rotation]\ninterval = \"1h\"\npublish_ahead = \"5s\"\n";

/// The first message of FetchJWTBundles on `socket`, every bundle as text.
pub async fn spiffe_bundles(socket: &Path) -> String {
    use tokend::pb::spiffe as spb;
    use tokio_stream::StreamExt;
    let channel = tokend::connect(socket).await.expect("connect");
    let mut client = spb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut req = tonic::Request::new(spb::JwtBundlesRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("value"));
    let mut stream = client
        .fetch_jwt_bundles(req)
        .await
        .expect("bundles")
        .into_inner();
    let first = stream.next().await.expect("a message").expect("ok");
    assert!(!first.bundles.is_empty(), "no bundle at all");
    first
        .bundles
        .values()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The bound key that signs now, read from `keys_dir/bound`.
fn bound_key_in(keys_dir: &Path) -> tokend::SigningKey {
    signing_key_in(&keys_dir.join("bound"))
}

/// Verifies `token` at `verifier` with a fresh proof from `holder`.
async fn verify_with_proof(holder: &Node, verifier: &Node, token: &str) -> Result<(), String> {
    let proof = prove(holder.tokens().await, token, "POST", PAY).await?;
    verify_proven(verifier.tokens().await, token, &proof, "POST", PAY)
        .await
        .map(|_| ())
}

/// Asserts `r` is a refusal with `code` whose detail says `says`.
#[track_caller]
fn assert_refused(r: Result<(), String>, code: &str, says: &str) {
    let e = r.expect_err("refused");
    assert!(
        e.starts_with(&format!("{code}: ")) && e.contains(says),
        "expected {code} saying {says:?}, got {e}"
    );
}

/// The compromised-minter forgeries, checked at `verifier` for tokens of
/// `holder` (service `iss`, whose keys directory the test reads; claims at
/// the bank's time): a bound key without
/// `cnf` (plain and suffixed kid) is `malformed`; a `cnf` token over the
/// signing key by its plain kid is `malformed`; the same by `<kid>.dpop`
/// (the legacy form) and a `cnf` token over the bound key verify with a
/// proof, and the legacy one is `missing_proof` without.
async fn forgeries_are_judged(bank: &Bank, holder: &Node, iss: &str, verifier: &Node, jkt: &str) {
    let bound = bound_key_in(&holder.keys_dir());
    let signing = holder.signing_key();
    let plain = bank.claims(iss, "ledger", 60);
    let mut cnf = plain.clone();
    cnf["cnf"] = serde_json::json!({ "jkt": jkt });

    let t = forge(&bound, bound.kid(), &plain);
    let (r, detail) = verifier.refusal(&t).await;
    assert_eq!(r, Some(tokend::Reason::Malformed), "{detail}");
    assert!(detail.contains("signs bound tokens only"), "{detail}");
    let t = forge(&bound, &format!("{}.dpop", bound.kid()), &plain);
    let (r, detail) = verifier.refusal(&t).await;
    assert_eq!(r, Some(tokend::Reason::Malformed), "{detail}");
    assert!(detail.contains("no cnf.jkt"), "{detail}");

    let t = forge(&signing, signing.kid(), &cnf);
    let (r, detail) = verifier.refusal(&t).await;
    assert_eq!(r, Some(tokend::Reason::Malformed), "{detail}");
    assert!(detail.contains("bearer signing key"), "{detail}");
    assert_refused(
        verify_with_proof(holder, verifier, &t).await,
        "malformed",
        "bearer signing key",
    );

    let legacy = forge(&signing, &format!("{}.dpop", signing.kid()), &cnf);
    let (r, detail) = verifier.refusal(&legacy).await;
    assert_eq!(r, Some(tokend::Reason::MissingProof), "{detail}");
    verify_with_proof(holder, verifier, &legacy)
        .await
        .expect("the legacy form verifies with its proof");

    let t = forge(&bound, &format!("{}.dpop", bound.kid()), &cnf);
    verify_with_proof(holder, verifier, &t)
        .await
        .expect("a cnf token over the bound key verifies with its proof");
}

/// Between two sidecars over the peer key exchange: payments' bound key
/// reaches ledger as a bound key (in `bound_kids`, never in a JWKS nor in
/// ledger's SPIFFE bundle of payments' trust domain),
/// its bound tokens verify there with their proof, the forgeries are
/// refused, a ban of the bound kid refuses its tokens, the bound keys
/// rotate with no failed bound call, and a revoked bound key's tokens are
/// `revoked_key` at ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_keys_over_the_peer_exchange() {
    let bank = Bank::new();
    let payments = bank
        .start(bank.lean_peer("payments").config(ROTATION))
        .await;
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", payments.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    let bound = bound_key_in(&payments.keys_dir());
    let held = ledger.issuer("payments").await;
    assert!(
        held.bound_kids.contains(&bound.kid().to_owned()),
        "{held:?}"
    );
    assert!(!held.jwks_json.contains(bound.kid()), "{held:?}");
    assert!(
        !ledger.jwks().await.contains(bound.kid()),
        "nor in ledger's own JWKS"
    );
    let bundles = spiffe_bundles(&ledger.socket()).await;
    assert!(
        bundles.contains(payments.signing_key().kid()) && !bundles.contains(bound.kid()),
        "ledger's SPIFFE bundle holds payments' signing key, not its bound key: {bundles}"
    );

    let minted = mint_bound(payments.tokens().await, "ledger", "").await;
    assert_eq!(minted.kid, bound.kid());
    verify_with_proof(&payments, &ledger, &minted.token)
        .await
        .expect("a bound token verifies at the peer with its proof");
    forgeries_are_judged(&bank, &payments, "payments", &ledger, &minted.jkt).await;

    // A ban of the bound kid at ledger reaches its tokens (and the
    // remembered results); lifted, they verify again.
    let mut admin = ledger.admin().await;
    admin
        .ban(pb::BanRequest {
            kind: "kid".into(),
            value: bound.kid().into(),
            reason: "test".into(),
        })
        .await
        .expect("ban");
    assert_refused(
        verify_with_proof(&payments, &ledger, &minted.token).await,
        "revoked_key",
        "banned",
    );
    admin
        .unban(pb::UnbanRequest {
            kind: "kid".into(),
            value: bound.kid().into(),
        })
        .await
        .expect("unban");

    // Rotation of the bound keys: published ahead, then signing; every
    // bound call verifies, before, across and after the switch.
    let mut failures = Vec::new();
    let next = payments
        .admin()
        .await
        .rotate_key(pb::RotateKeyRequest { bound: true })
        .await
        .expect("rotate bound")
        .into_inner()
        .key
        .expect("key")
        .kid;
    assert_ne!(next, bound.kid());
    assert!(
        eventually(10, || async {
            ledger.issuer("payments").await.bound_kids.contains(&next)
        })
        .await,
        "ledger holds the pending bound key before it signs"
    );
    let mut tokens = vec![minted.token.clone()];
    for _ in 0..7 {
        bank.advance(1);
        tokens.push(
            mint_bound(payments.tokens().await, "ledger", "")
                .await
                .token,
        );
        for t in &tokens {
            if let Err(e) = verify_with_proof(&payments, &ledger, t).await {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "failed bound calls: {failures:?}");
    let after = mint_bound(payments.tokens().await, "ledger", "").await;
    assert_eq!(after.kid, next, "the new bound key signs");
    verify_with_proof(&payments, &ledger, &after.token)
        .await
        .expect("verifies before the revocation");
    let signing_keys = payments.keys().await;
    assert!(
        signing_keys.iter().all(|k| k.kid != next),
        "the signing keys did not rotate: {signing_keys:?}"
    );

    // Revoking the bound key that signs: its successor signs at once, and
    // ledger refuses the revoked key's tokens (remembered by its verify
    // cache a moment before).
    let revoked = payments
        .admin()
        .await
        .revoke_key(pb::RevokeKeyRequest { kid: next.clone() })
        .await
        .expect("revoke")
        .into_inner();
    assert!(revoked.bound, "the revoked key was a bound key");
    assert_ne!(revoked.active_kid, next);
    assert!(
        eventually(10, || async {
            verify_with_proof(&payments, &ledger, &after.token)
                .await
                .is_err_and(|e| e.starts_with("revoked_key: "))
        })
        .await,
        "ledger refuses the revoked bound key's token"
    );
    let fresh = mint_bound(payments.tokens().await, "ledger", "").await;
    assert_eq!(fresh.kid, revoked.active_kid);
    assert!(
        eventually(10, || async {
            verify_with_proof(&payments, &ledger, &fresh.token)
                .await
                .is_ok()
        })
        .await,
        "the successor's tokens verify"
    );
}

/// Through the directory (etcd) only: the bound key travels in the signed
/// document's `bound_jwks`, a bound token verifies at a verifier with no
/// peer connection, and the forgeries are refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_keys_through_the_directory() {
    let etcd = crate::etcd::Etcd::start();
    let bank = Bank::new();
    let dir = format!(
        "{}lease_ttl = \"2s\"\nrequest_timeout = \"2s\"\n",
        etcd.directory_toml("/b/")
    );
    let payments = bank
        .start(bank.replica("payments", 0).config(ROTATION).config(&dir))
        .await;
    let ledger = bank
        .start(bank.peer("ledger").standby_key(false).config(&dir))
        .await;
    let bound = bound_key_in(&payments.keys_dir());
    assert!(
        eventually(20, || async {
            ledger
                .issuer("payments")
                .await
                .bound_kids
                .contains(&bound.kid().to_owned())
        })
        .await,
        "ledger learns payments' bound key through etcd: {:?}",
        ledger.issuer("payments").await
    );
    let held = ledger.issuer("payments").await;
    assert!(held.instances.iter().all(|i| i.seq > 0), "from documents");
    assert!(!held.jwks_json.contains(bound.kid()), "{held:?}");
    let minted = mint_bound(payments.tokens().await, "ledger", "").await;
    verify_with_proof(&payments, &ledger, &minted.token)
        .await
        .expect("verifies through the directory");
    forgeries_are_judged(&bank, &payments, "payments", &ledger, &minted.jkt).await;
}

/// A keys directory written by tokend 0.1.0 (no `bound/`) loads: the
/// sidecar adds `bound/` with a key of its own, distinct from the old
/// signing keys, and its bound tokens verify at a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_dir_of_0_1_0_gains_bound_keys() {
    use std::os::unix::fs::PermissionsExt;
    let bank = Bank::new();
    let builder = bank.lean_peer("payments").replica(1);
    let keys = builder.dir().join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys-v0.1.0");
    let mut old = Vec::new();
    for e in std::fs::read_dir(fixture).expect("fixture") {
        let e = e.expect("entry");
        let to = keys.join(e.file_name());
        std::fs::copy(e.path(), &to).expect("copy");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        old.push(e.file_name().to_string_lossy().into_owned());
    }
    assert!(!keys.join("bound").exists());
    let payments = bank.start(builder).await;
    let bound = bound_key_in(&keys);
    assert!(
        old.iter().all(|f| !f.starts_with(bound.kid())),
        "a new key, not an old one"
    );
    let ledger = bank
        .start(
            bank.lean_peer("ledger")
                .peer("payments", payments.peer_addr()),
        )
        .await;
    ledger.learns(&["payments"]).await;
    let minted = mint_bound(payments.tokens().await, "ledger", "").await;
    assert_eq!(minted.kid, bound.kid());
    assert!(
        eventually(10, || async {
            verify_with_proof(&payments, &ledger, &minted.token)
                .await
                .is_ok()
        })
        .await,
        "the bound token verifies at the peer"
    );
}

/// On disk (real processes): `keys_dir/bound/` is 0700 with a 0600 key and
/// its manifest; `keys list --bound` shows it, `jwks --all` names it as a
/// bound kid outside the JWKS; a restart loads it (the same
/// bound key signs, a token minted before verifies with a new proof); a
/// corrupt bound key file stops the start with exit 64 and the same
/// error, naming the file, as a corrupt signing key file, and is left as it
/// was.
#[test]
fn bound_keys_on_disk() {
    use std::os::unix::fs::PermissionsExt;
    let root = tmp();
    let mut s = Sidecar::start(root.path(), "ledger", "");
    let dir = s.keys_dir.join("bound");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let key = bound_key_in(&s.keys_dir);
    let file = dir.join(format!("{}.pk8.pem", key.kid()));
    assert_eq!(mode(&file), 0o600);
    assert!(dir.join("keys.json").is_file());
    let out = s.cli(&["keys", "list", "--bound"]);
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(key.kid()) && l.contains("active")),
        "{listed}"
    );
    let out = s.cli(&["keys", "list"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(key.kid()),
        "the signing keys' list does not show it"
    );
    let all: serde_json::Value =
        serde_json::from_slice(&s.cli(&["jwks", "--all"]).stdout).expect("jwks --all");
    assert_eq!(all[0]["bound_kids"][0], key.kid(), "{all}");
    assert!(!all[0]["jwks"].to_string().contains(key.kid()), "{all}");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let minted = rt.block_on(async { mint_bound(s.tokens().await, "ledger", "").await });
    assert_eq!(minted.kid, key.kid());
    s.restart();
    assert_eq!(
        bound_key_in(&s.keys_dir).kid(),
        key.kid(),
        "loaded, not replaced"
    );
    rt.block_on(async {
        let proof = prove(s.tokens().await, &minted.token, "POST", PAY)
            .await
            .expect("prove after restart");
        verify_proven(s.tokens().await, &minted.token, &proof, "POST", PAY)
            .await
            .expect("verifies after restart");
        let again = mint_bound(s.tokens().await, "ledger", "").await;
        assert_eq!(again.kid, key.kid());
    });
    s.stop();

    let signing = std::fs::read_dir(&s.keys_dir)
        .expect("keys dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".pk8.pem"))
        .expect("a signing key file");
    let garbage = b"\x00\x01garbage that is not PEM at all\n";
    let mut errors = Vec::new();
    for corrupt in [&file, &signing] {
        let good = std::fs::read(corrupt).expect("read");
        std::fs::write(corrupt, garbage).expect("write");
        let err = Sidecar::start_with(root.path(), "ledger", &s.config)
            .err()
            .expect("start must fail");
        let stderr = String::from_utf8_lossy(&err.stderr).into_owned();
        assert_eq!(err.status.code(), Some(64), "{stderr}");
        let named = format!("key file {} is not a PEM document", corrupt.display());
        assert!(stderr.contains(&named), "says {named:?}: {stderr}");
        assert_eq!(std::fs::read(corrupt).expect("read"), garbage, "untouched");
        std::fs::write(corrupt, good).expect("restore");
        let line = stderr
            .lines()
            .find(|l| l.contains("cannot start"))
            .map(|l| l.replace(&corrupt.display().to_string(), "<file>"));
        errors.push(line);
    }
    assert!(errors[0].is_some(), "{errors:?}");
    assert_eq!(errors[0], errors[1], "the same error for both classes");
}
