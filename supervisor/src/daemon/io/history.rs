//! The last [`KEEP`] upgrades, persisted as JSON lines in `--state-dir` so that
//! they survive a restart (even a SIGKILL) of baton.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use baton_protocol::HistoryEntry;

/// Upgrades kept.
pub const KEEP: usize = 100;
/// A history file larger than this is set aside, not read (200 lines are a few
/// hundred KiB).
const HISTORY_LIMIT: u64 = 8 << 20;
/// The file is compacted back to [`KEEP`] lines once it holds this many.
const COMPACT_AT: usize = 2 * KEEP;

/// The history, and where it is kept.
#[derive(Debug, Default)]
pub struct History {
    entries: VecDeque<HistoryEntry>,
    file: Option<PathBuf>,
    lines: usize,
    /// The file ends in a torn line: start the next one on a line of its own.
    torn: bool,
}

impl History {
    /// Loads `dir/history.jsonl` (created 0700 if missing); `None`: in memory only.
    /// A line that does not parse (a torn write, an edit) is skipped with a warning.
    ///
    /// # Errors
    /// The directory cannot be created or the file cannot be read.
    pub fn open(dir: Option<&Path>) -> Result<History, String> {
        let Some(dir) = dir else {
            return Ok(History::default());
        };
        crate::access::create_private_dir(dir)
            .map_err(|e| format!("state directory {}: {e}", dir.display()))?;
        let file = dir.join("history.jsonl");
        // Never hang on a FIFO, nor read a huge file: a bad one is set aside.
        let text = match crate::access::read_small_file(&file, HISTORY_LIMIT) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                let aside = dir.join("history.jsonl.bad");
                let moved = fs::rename(&file, &aside).is_ok();
                tracing::warn!(
                    file = %file.display(),
                    error = %e,
                    set_aside = moved,
                    "history unreadable; starting a new one"
                );
                String::new()
            }
        };
        let mut h = History {
            entries: VecDeque::with_capacity(KEEP),
            file: Some(file.clone()),
            lines: 0,
            torn: !text.is_empty() && !text.ends_with('\n'),
        };
        let mut bad = 0usize;
        let mut first_bad = None;
        for (i, line) in text.lines().enumerate() {
            h.lines += 1;
            match serde_json::from_str::<HistoryEntry>(line) {
                Ok(e) => h.keep(e),
                Err(e) => {
                    bad += 1;
                    first_bad.get_or_insert((i + 1, e.to_string()));
                }
            }
        }
        if let Some((line, error)) = first_bad {
            // One line, whatever the number.
            tracing::warn!(
                file = %file.display(),
                skipped = bad,
                first_line = line,
                error,
                "skipping malformed history lines"
            );
        }
        Ok(h)
    }

    /// Where it is persisted.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn keep(&mut self, e: HistoryEntry) {
        if self.entries.len() == KEEP {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }

    /// Adds an upgrade, appending it to the file (a failure to write is logged:
    /// the upgrade itself is done).
    pub fn push(&mut self, e: HistoryEntry) {
        let line = serde_json::to_string(&e).unwrap_or_default();
        self.keep(e);
        let Some(file) = self.file.clone() else {
            return;
        };
        let line = if std::mem::take(&mut self.torn) {
            format!("\n{line}")
        } else {
            line
        };
        if let Err(err) = append(&file, &line) {
            tracing::warn!(file = %file.display(), error = %err, "cannot write the history");
            return;
        }
        self.lines += 1;
        if self.lines >= COMPACT_AT {
            match self.rewrite(&file) {
                Ok(()) => self.lines = self.entries.len(),
                Err(err) => {
                    tracing::warn!(file = %file.display(), error = %err, "cannot compact the history")
                }
            }
        }
    }

    /// The last `n` (all with `None`), oldest first.
    pub fn last(&self, n: Option<usize>) -> Vec<HistoryEntry> {
        let n = n.unwrap_or(KEEP).min(self.entries.len());
        self.entries
            .iter()
            .skip(self.entries.len() - n)
            .cloned()
            .collect()
    }

    /// Every entry, for a reexec.
    pub fn entries(&self) -> Vec<HistoryEntry> {
        self.entries.iter().cloned().collect()
    }

    /// Takes over a reexec's entries (the file, if any, has them already).
    pub fn adopt(&mut self, entries: Vec<HistoryEntry>) {
        if self.file.is_none() {
            for e in entries {
                self.keep(e);
            }
        }
    }

    /// Replaces the file with the kept entries (temp file + rename).
    fn rewrite(&self, file: &Path) -> std::io::Result<()> {
        let tmp = file.with_extension("jsonl.tmp");
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        for e in &self.entries {
            writeln!(f, "{}", serde_json::to_string(e).unwrap_or_default())?;
        }
        f.sync_data()?;
        fs::rename(&tmp, file)
    }
}

fn append(file: &Path, line: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(file)?;
    // One write per line: a crash leaves at most one torn line, which `open` skips.
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::{StartReason, UpgradeReport, UpgradeResult};

    fn entry(generation: u64) -> HistoryEntry {
        HistoryEntry {
            at_ms: generation,
            why: StartReason::Upgrade,
            release: "v".into(),
            report: UpgradeReport {
                duration_ms: 3,
                ..UpgradeReport::new(UpgradeResult::Promoted, generation, Some(1))
            },
        }
    }

    #[test]
    fn persists_keeps_the_last_hundred_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut h = History::open(Some(&state)).unwrap();
        for g in 1..=250 {
            h.push(entry(g));
        }
        let lines = fs::read_to_string(state.join("history.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= COMPACT_AT, "{lines} lines");
        let again = History::open(Some(&state)).unwrap();
        let gens: Vec<u64> = again
            .last(None)
            .iter()
            .map(|e| e.report.generation)
            .collect();
        assert_eq!(gens, (151..=250).collect::<Vec<_>>());
        assert_eq!(again.last(Some(2)).len(), 2);
        assert_eq!(again.last(Some(2))[1].report.generation, 250);
    }

    #[test]
    fn a_torn_or_garbage_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(Some(dir.path())).unwrap();
        h.push(entry(1));
        let file = dir.path().join("history.jsonl");
        let mut text = fs::read_to_string(&file).unwrap();
        text.push_str("not json at all\n{\"at_ms\":12,\"why\":\"upg");
        fs::write(&file, text).unwrap();
        let mut h = History::open(Some(dir.path())).unwrap();
        h.push(entry(2));
        let gens: Vec<u64> = h.last(None).iter().map(|e| e.report.generation).collect();
        assert_eq!(gens, vec![1, 2]);
    }
}
