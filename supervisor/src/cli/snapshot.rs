//! `baton snapshot --dump FILE`: a dry-run snapshot of the active generation's state,
//! for debugging, backups and `baton rehearse`. The app pauses as for an upgrade
//! (milliseconds), then serves on; nothing is committed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use baton_protocol::{ControlReply, ControlRequest};

use super::conn;

/// What a dry-run snapshot was.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Taken {
    /// The generation that took it.
    pub generation: u64,
    /// Its schema version.
    pub version: u32,
    /// Its size in bytes.
    pub size: u64,
    /// What the app declared its down-migration loses.
    pub dropped: Vec<String>,
}

/// Asks the baton at `control` for a dry-run snapshot (in schema `schema`, else the
/// app's own) and copies it into `out`.
///
/// # Errors
/// baton cannot be reached, refuses (no state, an upgrade under way), the app could
/// not snapshot, or the connection ends before the whole snapshot came.
pub fn take(
    control: &Path,
    schema: Option<u32>,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<Taken> {
    let s = conn::connect(control, &ControlRequest::Snapshot { schema })?;
    s.set_read_timeout(Some(timeout))?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head)
        .with_context(|| format!("control socket {}", control.display()))?;
    if head.is_empty() {
        anyhow::bail!(
            "baton at {} closed the connection without answering",
            control.display()
        );
    }
    let (generation, version, size, dropped) = match serde_json::from_str(&head)
        .with_context(|| format!("control socket {}: bad reply", control.display()))?
    {
        ControlReply::Snapshot {
            generation,
            version,
            size,
            dropped,
        } => (generation, version, size, dropped),
        ControlReply::Error { message } => {
            anyhow::bail!("baton at {}: {message}", control.display())
        }
        other => anyhow::bail!("unexpected reply to snapshot: {other:?}"),
    };
    let copied = io::copy(&mut r.by_ref().take(size), out).context("copying the snapshot")?;
    if copied != size {
        anyhow::bail!("the snapshot was cut short: {copied} of {size} bytes came");
    }
    Ok(Taken {
        generation,
        version,
        size,
        dropped,
    })
}

/// `baton snapshot --dump FILE` (`-`: stdout).
///
/// # Errors
/// As [`take`], or FILE cannot be written (a partial file is never left).
pub fn dump(
    control: Option<PathBuf>,
    file: &Path,
    schema: Option<u32>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let control = conn::control_path(control);
    // Long enough for any snapshot_timeout baton enforces itself.
    let timeout = Duration::from_secs(3600);
    let taken = if file == Path::new("-") {
        let stdout = io::stdout();
        let mut lock = stdout.lock();
        let t = take(&control, schema, timeout, &mut lock)?;
        lock.flush()?;
        t
    } else {
        let dir = file.parent().filter(|p| !p.as_os_str().is_empty());
        let tmp = tempfile::Builder::new()
            .prefix(".baton-snapshot")
            .tempfile_in(dir.unwrap_or(Path::new(".")))
            .with_context(|| format!("cannot write {}", file.display()))?;
        let mut w = io::BufWriter::new(tmp);
        let t = take(&control, schema, timeout, &mut w)?;
        let tmp = w.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        tmp.persist(file)
            .with_context(|| format!("cannot write {}", file.display()))?;
        t
    };
    if json {
        let mut v = serde_json::to_value(&taken)?;
        v["file"] = file.display().to_string().into();
        println!("{v}");
    } else if file != Path::new("-") {
        println!(
            "generation {}: schema {}, {} written to {}",
            taken.generation,
            taken.version,
            crate::text::size(taken.size),
            file.display()
        );
        if !taken.dropped.is_empty() {
            println!(
                "the app declares that this schema loses: {}",
                taken.dropped.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
