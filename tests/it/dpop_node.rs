//! Interop with an independent DPoP implementation in JavaScript: panva's
//! npm packages `dpop` (RFC 9449 proofs for JavaScript runtimes) makes
//! proofs with the sidecar's proof key imported into WebCrypto, and `jose`
//! verifies tokend's (tests/interop/node/dpop_interop.mjs). Node and the
//! modules come from `.ci/deps/node.sh` (apt `nodejs`/`npm`, then `npm ci`
//! in tests/interop/node); without them the test fails, naming them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::dpop::{mint_bound, prove, verify_proven};
use crate::support::{Sidecar, tmp};

/// The URI a caller of ledger's `Pay` method proves for.
const PAY: &str = "https://ledger.bank.internal/bank.v1.Ledger/Pay";

/// The Node.js binary (`$TOKEND_NODE`, else `node` on PATH) and the
/// interop directory, or a failure naming what to install.
fn node() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/node");
    let bin = std::env::var_os("TOKEND_NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let version = Command::new(&bin).arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "Node.js is missing: install the Debian packages nodejs and npm (.ci/deps/node.sh), \
         or set TOKEND_NODE ({version:?})"
    );
    for package in ["dpop", "jose"] {
        assert!(
            dir.join("node_modules")
                .join(package)
                .join("package.json")
                .exists(),
            "the npm package {package} is missing: run `npm ci` in {} (.ci/deps/node.sh)",
            dir.display()
        );
    }
    (bin, dir)
}

/// Runs the interop script with `args`: its output, or its failure.
async fn script(args: &[&str]) -> Result<String, String> {
    let (bin, dir) = node();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(bin)
            .arg(dir.join("dpop_interop.mjs"))
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("run node");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    })
    .await
    .expect("node task")
}

/// The PEM file of the proof key `jkt` of the sidecar `name` under `root`.
fn proof_key(root: &Path, name: &str, jkt: &str) -> String {
    std::fs::read_dir(root.join(name).join("keys/proof"))
        .expect("proof dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().contains(jkt))
        .expect("the proof key file")
        .to_string_lossy()
        .into_owned()
}

/// tokend's proof verifies in `jose` (EmbeddedJWK, typ, htm/htu/iat/jti/
/// ath) and jose's RFC 7638 thumbprint of its key is the token's cnf.jkt;
/// `dpop`'s proof (UUID jti, with the sidecar's key in WebCrypto) verifies
/// at tokend without a nonce and with one (any nonce is accepted as usual
/// while nonces are off), and one for another URI is refused `bad_proof`.
/// With nonces required, `dpop`'s proof carrying the nonce tokend handed
/// out verifies, and one without is `use_dpop_nonce`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_interoperate_with_panva_dpop_and_jose() {
    let root = tmp();
    let s = Sidecar::start(root.path(), "ledger", "");
    let minted = mint_bound(s.tokens().await, "ledger", "").await;
    let ours = prove(s.tokens().await, &minted.token, "POST", PAY)
        .await
        .expect("prove");
    let jkt = script(&["check", &ours, &minted.token, "POST", PAY])
        .await
        .expect("jose verifies tokend's proof");
    assert_eq!(jkt, minted.jkt, "jose's thumbprint is tokend's cnf.jkt");
    // One character inside the signature (never the last, whose low bits
    // are padding a lenient decoder may ignore).
    let mut tampered = ours.clone().into_bytes();
    let at = tampered.len() - 10;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let why = script(&["check", &tampered, &minted.token, "POST", PAY])
        .await
        .expect_err("jose refuses a tampered signature");
    assert!(why.contains("signature"), "{why}");

    let key = proof_key(root.path(), "ledger", &minted.jkt);
    let theirs = script(&["make", &key, &minted.token, "POST", PAY])
        .await
        .expect("dpop makes a proof");
    verify_proven(s.tokens().await, &minted.token, &theirs, "POST", PAY)
        .await
        .expect("a dpop proof verifies at tokend");
    let with_nonce = script(&["make", &key, &minted.token, "POST", PAY, "server-nonce-1"])
        .await
        .expect("dpop makes a proof with a nonce");
    verify_proven(s.tokens().await, &minted.token, &with_nonce, "POST", PAY)
        .await
        .expect("with nonces off, a dpop proof with a nonce verifies as usual");
    let other = script(&[
        "make",
        &key,
        &minted.token,
        "POST",
        "https://evil.example/x",
    ])
    .await
    .expect("dpop makes a proof");
    let refused = verify_proven(s.tokens().await, &minted.token, &other, "POST", PAY)
        .await
        .expect_err("another URI");
    assert!(refused.starts_with("bad_proof: "), "{refused}");

    // A verifier requiring nonces: the nonce it hands out goes into dpop's proof.
    let strict = Sidecar::start(root.path(), "fx", "[tokens]\nproof_nonce = \"required\"\n");
    let minted = mint_bound(strict.tokens().await, "fx", "").await;
    let key = proof_key(root.path(), "fx", &minted.jkt);
    let plain = script(&["make", &key, &minted.token, "POST", PAY])
        .await
        .expect("dpop makes a proof");
    let status = strict
        .tokens()
        .await
        .verify(tokend::pb::tokend::VerifyRequest {
            token: minted.token.clone(),
            proof: plain,
            method: "POST".into(),
            uri: PAY.into(),
            ..Default::default()
        })
        .await
        .expect_err("no nonce");
    assert_eq!(
        tokend::reason_of(&status),
        Some(tokend::Reason::UseDpopNonce)
    );
    let nonce = status
        .metadata()
        .get(tokend::DPOP_NONCE_KEY)
        .and_then(|v| v.to_str().ok())
        .expect("dpop-nonce")
        .to_owned();
    let proven = script(&["make", &key, &minted.token, "POST", PAY, &nonce])
        .await
        .expect("dpop makes a proof with tokend's nonce");
    verify_proven(strict.tokens().await, &minted.token, &proven, "POST", PAY)
        .await
        .expect("a dpop proof with tokend's nonce verifies");
}
