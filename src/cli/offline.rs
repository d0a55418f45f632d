//! Commands that never talk to a daemon: `decode`, `ca init`, `ca issue`,
//! `audit verify`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

/// Prints a token's header and claims, clearly marked UNVERIFIED.
pub(super) fn decode(token: &str) -> u8 {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        eprintln!("tokend: not a compact JWS (expected three dot-separated parts)");
        return 1;
    };
    let part = |name: &str, text: &str| -> Result<serde_json::Value, String> {
        let bytes = B64
            .decode(text)
            .map_err(|_| format!("{name} is not base64url"))?;
        Ok(serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }))
    };
    match (part("header", h), part("payload", p)) {
        (Ok(header), Ok(claims)) => {
            eprintln!("UNVERIFIED: the signature was not checked; do not trust these claims");
            let out = serde_json::json!({ "unverified": true, "header": header, "claims": claims });
            out!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            0
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("tokend: {e}");
            1
        }
    }
}

/// `tokend ca init`.
pub(super) fn ca_init(out: &std::path::Path, td: &str) -> u8 {
    let td = match crate::identity::TrustDomain::new(td) {
        Ok(td) => td,
        Err(e) => {
            eprintln!("tokend: {e}");
            return super::EXIT_USAGE;
        }
    };
    match crate::ca::init(out, &td) {
        Ok(()) => {
            out!(
                "CA for spiffe://{td} written to {}/{{ca.pem,ca.key}}",
                out.display()
            );
            0
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            1
        }
    }
}

/// `tokend ca issue`.
pub(super) fn ca_issue(spec: &crate::ca::IssueSpec) -> u8 {
    match crate::ca::issue_with(spec) {
        Ok(id) if spec.intermediate => {
            out!(
                "intermediate CA {} of {} written to {}/{{ca.pem,ca.key}}",
                spec.name,
                id.trust_domain(),
                spec.out.display()
            );
            0
        }
        Ok(id) => {
            out!(
                "certificate for {id} written to {}/{{cert.pem,key.pem}}",
                spec.out.display()
            );
            0
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            1
        }
    }
}

/// `tokend audit verify FILE...`: 0 and a summary when the chain is whole;
/// 1 and `FILE:LINE: why` for the first broken record.
pub(super) fn audit_verify(files: &[std::path::PathBuf]) -> u8 {
    match crate::audit::verify_files(files) {
        Ok(ok) => {
            out!(
                "ok: {} records, seq {}..{}, head {}",
                ok.records,
                ok.seqs.0,
                ok.seqs.1,
                ok.head
            );
            0
        }
        Err(broken) => {
            eprintln!("broken: {broken}");
            1
        }
    }
}

/// `tokend ban sign`.
pub(super) fn ban_sign(key: &std::path::Path, td: &str, seq: u64, bans: &std::path::Path) -> u8 {
    let fail = |msg: String| {
        eprintln!("tokend: {msg}");
        super::EXIT_USAGE
    };
    let list = if bans == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text.into_bytes())
    } else {
        std::fs::read(bans)
    };
    let list = match list {
        Ok(l) => l,
        Err(e) => return fail(format!("{}: {e}", bans.display())),
    };
    let entries: Vec<crate::bans::Entry> = match serde_json::from_slice(&list) {
        Ok(e) => e,
        Err(e) => {
            return fail(format!(
                "{}: not a JSON array of {{\"kind\", \"value\", \"reason\"}}: {e}",
                bans.display()
            ));
        }
    };
    let pem = match std::fs::read(key) {
        Ok(p) => p,
        Err(e) => return fail(format!("{}: {e}", key.display())),
    };
    let der = match pem::parse(&pem) {
        Ok(block) => block.into_contents(),
        Err(e) => return fail(format!("{}: not PEM: {e}", key.display())),
    };
    let now = crate::time::Clock::now(&crate::time::SystemClock);
    match crate::bans::sign(&der, td, seq, now, entries) {
        Ok(jws) => {
            out!("{jws}");
            0
        }
        Err(e) => fail(e),
    }
}
