//! External tools the ecosystem tests run (grpcurl, promtool, …): found on
//! PATH (CI puts the tests' venv there, `.ci/deps/*.sh` install them), else
//! in the worktree's `.venv/bin`. A missing tool fails the test naming the
//! package that provides it; it never passes silently.
#![allow(dead_code)]

use std::path::PathBuf;

/// The path of `cmd`, or a panic naming `package` and its install script.
pub fn tool(cmd: &str, package: &str) -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([venv])
        .map(|dir| dir.join(cmd))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{cmd}` not found on PATH: install {package} (see .ci/deps/)"))
}

/// Runs `cmd args` to completion (bounded at 30 s); stdout, stderr and success.
pub fn run(cmd: &std::path::Path, args: &[&str]) -> (String, String, bool) {
    let out = crate::support::run_to_exit(std::process::Command::new(cmd).args(args));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}
