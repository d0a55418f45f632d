//! Prometheus conventions on a real scrape: `promtool check metrics` finds
//! no problem, every family has `# HELP` and `# TYPE`, latencies are
//! histograms, `tokend_build_info` and the `process_*` families are there.

use std::io::{Read, Write};

use crate::support::*;
use crate::tools::tool;

/// The body of `GET /metrics` (HTTP/1.1, headers stripped).
fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// A scrape after mints, verifications and a refusal passes `promtool check
/// metrics` with no problem, and carries HELP/TYPE for every family.
#[tokio::test]
async fn scrape_passes_promtool_and_has_help_for_every_family() {
    let promtool = tool("promtool", "Debian prometheus (.ci/deps/promtool.sh)");
    let root = tmp();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let a = Sidecar::start(
        root.path(),
        "payments",
        &format!("[metrics]\nlisten = \"{port}\""),
    );
    let m = a.mint("payments").await;
    assert!(a.verify(&m.token).await.is_ok());
    assert_eq!(a.verify("abc").await.err().as_deref(), Some("malformed"));
    let ok = eventually(10, || async {
        scrape(port).contains("tokend_keys{state=\"active\"} 1")
    })
    .await;
    let text = scrape(port);
    assert!(ok, "{text}");

    let mut check = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool output");
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "promtool check metrics: {problems}\n{text}"
    );

    for (family, kind) in [
        ("tokend_build_info", "gauge"),
        ("tokend_mint_total", "counter"),
        ("tokend_mint_seconds", "histogram"),
        ("tokend_verify_total", "counter"),
        ("tokend_verify_seconds", "histogram"),
        ("tokend_signing_key_age_seconds", "gauge"),
        ("tokend_keys", "gauge"),
        ("tokend_keys_generated_total", "counter"),
        ("tokend_connections", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
    ] {
        assert!(
            text.contains(&format!("\n# HELP {family} "))
                || text.starts_with(&format!("# HELP {family} ")),
            "no HELP for {family}:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "no TYPE {kind} for {family}:\n{text}"
        );
    }
    // Every family that has a TYPE has a HELP.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split_whitespace().nth(2).expect("name");
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        text.contains(&format!("tokend_build_info{{version=\"{version}\"}} 1")),
        "{text}"
    );
    // Histograms with µs–ms buckets, not summaries.
    assert!(
        text.contains("tokend_verify_seconds_bucket{le=\"0.00005\"}"),
        "{text}"
    );
    assert!(
        text.contains("tokend_verify_seconds_bucket{le=\"+Inf\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tokend_mint_seconds_bucket{le=\"1\"}"),
        "{text}"
    );
    assert!(!text.contains("quantile="), "no summaries: {text}");
}

/// A sidecar with a peer API and a ban in force: the certificate expiry
/// and ban families are exported with HELP and TYPE, and the scrape still
/// passes `promtool check metrics` with no problem.
#[tokio::test]
async fn peer_certificate_and_ban_families_have_help() {
    let promtool = tool("promtool", "Debian prometheus (.ci/deps/promtool.sh)");
    let root = tmp();
    ca_init(root.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let a = Sidecar::start_peer(
        root.path(),
        "payments",
        &[],
        &format!("[metrics]\nlisten = \"{port}\""),
    );
    let out = a.cli(&["ban", "add", "kid", "compromised-kid"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = eventually(10, || async {
        let t = scrape(port);
        t.contains("tokend_peer_ca_expires_in_seconds{serial=") && t.contains("tokend_bans 1")
    })
    .await;
    let text = scrape(port);
    assert!(ok, "{text}");

    let mut check = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool output");
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "promtool check metrics: {problems}\n{text}"
    );
    for family in [
        "tokend_peer_cert_expires_in_seconds",
        "tokend_peer_ca_expires_in_seconds",
        "tokend_bans",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {family}:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} gauge\n")),
            "no TYPE gauge for {family}:\n{text}"
        );
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split_whitespace().nth(2).expect("name");
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }
}
