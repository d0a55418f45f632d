//! Where records go: the log (tracing target `audit`) or a file (0600,
//! append, buffered, never fsynced per record) rotated by size into
//! `FILE.1` … `FILE.<keep>`, the oldest dropped. On open the chain resumes
//! from the last whole record of the file (or of `FILE.1` after a rotation).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::chain::Head;

/// The audit file's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileSink {
    /// The file records are appended to.
    pub(crate) path: PathBuf,
    /// Rotate before a record would take the file past this size.
    pub(crate) max_bytes: u64,
    /// Rotated files kept (`FILE.1` newest).
    pub(crate) keep: usize,
}

/// An open sink.
pub(super) enum Sink {
    /// The log, target `audit`.
    Log,
    /// A rotated file.
    File(Rotating),
}

impl Sink {
    pub(super) fn write(&mut self, line: &str) -> std::io::Result<()> {
        match self {
            Sink::Log => {
                tracing::info!(target: "audit", "{line}");
                Ok(())
            }
            Sink::File(f) => f.write(line),
        }
    }

    pub(super) fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Log => Ok(()),
            Sink::File(f) => f.out.flush(),
        }
    }
}

/// The open audit file.
pub(super) struct Rotating {
    cfg: FileSink,
    out: BufWriter<File>,
    size: u64,
}

fn open(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// The last whole line of `path` (at most its last 64 KiB are read), and
/// whether the file ends mid-line.
fn last_line(path: &Path) -> std::io::Result<(Option<String>, bool)> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, false)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let from = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    let torn = !text.is_empty() && !text.ends_with('\n');
    let whole = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => return Ok((None, torn)),
    };
    let line = whole.rsplit('\n').next().map(str::to_owned);
    Ok((line.filter(|l| !l.is_empty()), torn))
}

impl Rotating {
    /// Opens `cfg.path` for appending and finds where the chain stands. A
    /// torn last line (a crash mid-write) is left as evidence and closed
    /// with a line end; `tokend audit verify` reports it.
    pub(super) fn open(cfg: FileSink) -> std::io::Result<(Self, Head)> {
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let (mut line, torn) = last_line(&cfg.path)?;
        if line.is_none() && !torn {
            line = last_line(&rotated(&cfg.path, 1))?.0;
        }
        let head = line.as_deref().and_then(Head::after).unwrap_or_default();
        let mut file = open(&cfg.path)?;
        if torn {
            tracing::warn!(file = %cfg.path.display(), "audit file ends mid-record (a crash?); the chain continues after it");
            file.write_all(b"\n")?;
        }
        let size = file.metadata()?.len();
        Ok((
            Self {
                cfg,
                out: BufWriter::with_capacity(64 * 1024, file),
                size,
            },
            head,
        ))
    }

    fn write(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.cfg.max_bytes {
            self.rotate()?;
        }
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    /// FILE → FILE.1 → … → FILE.<keep>; the oldest is overwritten.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let path = &self.cfg.path;
        for n in (1..self.cfg.keep).rev() {
            match std::fs::rename(rotated(path, n), rotated(path, n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(path, rotated(path, 1))?;
        self.out = BufWriter::with_capacity(64 * 1024, open(path)?);
        self.size = 0;
        Ok(())
    }
}
