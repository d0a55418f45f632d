//! The chain: each record is one JSON line ending in `"prev"`, the SHA-256
//! (hex) of the previous record's line as written (without its newline);
//! the first record ever carries 64 zeros. `seq` grows by one per record,
//! across rotated files. `check` walks files oldest first and names the
//! first record that breaks the chain.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The `prev` of the first record ever written.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 of a record line, lower-case hex.
pub(crate) fn hash(line: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, line.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the chain stands: the last record's `seq` and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    /// The last record's sequence number (0 before any).
    pub(crate) seq: u64,
    /// Its hash (`GENESIS` before any).
    pub(crate) hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

impl Head {
    /// The head after `line` (a whole record), or `None` if it is not one.
    pub(crate) fn after(line: &str) -> Option<Head> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(Head {
            seq: v.get("seq")?.as_u64()?,
            hash: hash(line),
        })
    }

    /// Encodes `event` as the next record (`seq`, `time`, the event's
    /// fields, `prev`) and advances; returns the line, without newline.
    pub(crate) fn append<E: Serialize>(&mut self, time: i64, event: &E) -> String {
        #[derive(Serialize)]
        struct Record<'a, E> {
            seq: u64,
            time: String,
            #[serde(flatten)]
            event: &'a E,
            prev: &'a str,
        }
        let seq = self.seq + 1;
        let record = Record {
            seq,
            time: rfc3339(time),
            event,
            prev: &self.hash,
        };
        // A struct of strings and numbers always serializes; the fallback
        // still chains, so a verifier would show it.
        let line = serde_json::to_string(&record)
            .unwrap_or_else(|e| format!(r#"{{"seq":{seq},"error":"{e}","prev":"{}"}}"#, self.hash));
        self.seq = seq;
        self.hash = hash(&line);
        line
    }
}

fn rfc3339(secs: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The first record that breaks the chain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}:{line}: {why}", file.display())]
pub(crate) struct Broken {
    /// The file.
    pub(crate) file: PathBuf,
    /// Its line number (from 1).
    pub(crate) line: usize,
    /// What is wrong.
    pub(crate) why: String,
}

/// What an intact chain holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Intact {
    /// Records checked.
    pub(crate) records: u64,
    /// The first and last `seq`.
    pub(crate) seqs: (u64, u64),
    /// The last record's hash: compare with the head the sidecar logs.
    pub(crate) head: String,
}

/// A record line as read, with where it came from.
struct Read<'a> {
    file: &'a Path,
    line: usize,
    text: &'a str,
    seq: u64,
    prev: String,
}

/// Checks `files` (oldest first: `audit.log.2 audit.log.1 audit.log`) as one
/// chain. The first record's `prev` is trusted unless its `seq` is 1
/// (then it must be the genesis hash): an older file may have been rotated
/// away.
pub(crate) fn check(files: &[(PathBuf, String)]) -> Result<Intact, Broken> {
    let mut before: Option<Read<'_>> = None;
    let mut first = None;
    let mut records = 0;
    for (file, text) in files {
        let broken = |line: usize, why: String| Broken {
            file: file.clone(),
            line,
            why,
        };
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (i, raw) in lines.iter().enumerate() {
            let n = i + 1;
            let Some(line) = raw.strip_suffix('\n') else {
                return Err(broken(
                    n,
                    "truncated record: the last line has no line end (the writer stopped mid-record, or the file was cut)".into(),
                ));
            };
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| broken(n, format!("not a JSON record: {e}")))?;
            let seq = v
                .get("seq")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| broken(n, "no seq".into()))?;
            let prev = v
                .get("prev")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| broken(n, "no prev".into()))?
                .to_owned();
            let read = Read {
                file,
                line: n,
                text: line,
                seq,
                prev,
            };
            match &before {
                None if seq == 1 && read.prev != GENESIS => {
                    return Err(broken(
                        n,
                        "the first record (seq 1) does not start from the genesis hash".into(),
                    ));
                }
                None => first = Some(seq),
                Some(b) => link(b, &read)?,
            }
            records += 1;
            before = Some(read);
        }
    }
    let last = before.ok_or_else(|| Broken {
        file: files.first().map(|f| f.0.clone()).unwrap_or_default(),
        line: 0,
        why: "no records".into(),
    })?;
    Ok(Intact {
        records,
        seqs: (first.unwrap_or(last.seq), last.seq),
        head: hash(last.text),
    })
}

/// Checks that `next` follows `before`; names `before` when its bytes no
/// longer match the hash `next` carries (it was edited after writing).
fn link(before: &Read<'_>, next: &Read<'_>) -> Result<(), Broken> {
    if next.seq != before.seq + 1 {
        return Err(Broken {
            file: next.file.to_owned(),
            line: next.line,
            why: format!(
                "seq {} follows seq {}: records are missing or out of order",
                next.seq, before.seq
            ),
        });
    }
    if hash(before.text) != next.prev {
        return Err(Broken {
            file: before.file.to_owned(),
            line: before.line,
            why: format!(
                "record seq {} was changed after it was written: its SHA-256 is not the prev of the next record ({}:{})",
                before.seq,
                next.file.display(),
                next.line
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> String {
        let mut head = Head::default();
        (0..n)
            .map(|i| {
                format!(
                    "{}\n",
                    head.append(1_700_000_000, &serde_json::json!({"event": "t", "i": i}))
                )
            })
            .collect()
    }

    fn one(text: String) -> Vec<(PathBuf, String)> {
        vec![(PathBuf::from("a.log"), text)]
    }

    /// An intact chain checks; its head is the last line's hash.
    #[test]
    fn intact_chain() {
        let text = chain(3);
        let ok = check(&one(text.clone())).expect("intact");
        assert_eq!((ok.records, ok.seqs), (3, (1, 3)));
        assert_eq!(ok.head, hash(text.lines().last().expect("line")));
        assert!(text.starts_with(
            r#"{"seq":1,"time":"2023-11-14T22:13:20Z","event":"t","i":0,"prev":"000"#
        ));
    }

    /// An edited record is named by its own line; a removed one by the gap
    /// in seq; a cut last line as truncated.
    #[test]
    fn breaks_are_named() {
        let text = chain(4);
        let edited = text.replacen(r#""i":1"#, r#""i":7"#, 1);
        let e = check(&one(edited)).expect_err("edited");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.why.contains("changed after it was written"), "{e}");
        let lines: Vec<&str> = text.lines().collect();
        let removed = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        let e = check(&one(removed)).expect_err("removed");
        assert_eq!(e.line, 2);
        assert!(e.why.contains("seq 3 follows seq 1"), "{e}");
        let cut = &text[..text.len() - 10];
        let e = check(&one(cut.to_owned())).expect_err("cut");
        assert_eq!(e.line, 4);
        assert!(e.why.starts_with("truncated record"), "{e}");
        let e = check(&one(text.replacen('{', "[", 1))).expect_err("not json");
        assert_eq!(e.line, 1);
    }

    /// Files given oldest first form one chain; a later file alone checks
    /// from its first record; the first record ever must be genesis.
    #[test]
    fn across_files() {
        let text = chain(4);
        let split = text
            .match_indices('\n')
            .nth(1)
            .map(|(i, _)| i + 1)
            .expect("split");
        let (old, new) = text.split_at(split);
        let files = vec![
            (PathBuf::from("a.log.1"), old.to_owned()),
            (PathBuf::from("a.log"), new.to_owned()),
        ];
        assert_eq!(check(&files).expect("chain").seqs, (1, 4));
        assert_eq!(check(&files[1..]).expect("tail").seqs, (3, 4));
        let reversed = vec![files[1].clone(), files[0].clone()];
        let e = check(&reversed).expect_err("wrong order");
        assert!(e.why.contains("seq 1 follows seq 4"), "{e}");
    }
}
