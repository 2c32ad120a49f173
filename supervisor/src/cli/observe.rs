//! `baton events` and `baton history`: what happened, for people and scripts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use baton_protocol::{ControlReply, ControlRequest, Event, EventKind, HistoryEntry, UpgradeResult};

use super::conn::{self, ask, control_path};

/// `baton events [--follow] [--json]`.
pub fn events(path: Option<PathBuf>, follow: bool, json: bool) -> anyhow::Result<ExitCode> {
    let path = control_path(path);
    conn::stream(&path, &ControlRequest::Events { follow }, |line| {
        if json {
            println!("{line}");
        } else {
            match serde_json::from_str::<Event>(line) {
                Ok(e) => println!("{}", describe(&e)),
                Err(_) => println!("{line}"),
            }
        }
        true
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `2026-12-02T01:02:03.456Z`.
fn when(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn why_name(why: baton_protocol::StartReason) -> &'static str {
    use baton_protocol::StartReason as R;
    match why {
        R::Initial => "initial",
        R::Upgrade => "upgrade",
        R::Replace => "replacement",
        R::Revert => "revert",
        R::Rollback => "rollback",
    }
}

/// One line for an event.
pub fn describe(e: &Event) -> String {
    let who = match (e.generation, e.pid) {
        (0, _) => "baton".to_string(),
        (g, Some(p)) => format!("generation {g} (pid {p})"),
        (g, None) => format!("generation {g}"),
    };
    let what = match &e.kind {
        EventKind::Spawned { why, image } => format!("spawned ({}, {image})", why_name(*why)),
        EventKind::Ready => "ready".into(),
        EventKind::Snapshot { bytes, ms } => {
            format!("snapshot: {} in {ms:.1} ms", crate::text::size(*bytes))
        }
        EventKind::Restored { ms } => format!("restored in {ms:.1} ms"),
        EventKind::Precopy { .. } => precopy_line(&e.kind),
        EventKind::Promoted { why, report, .. } => {
            let gap = report
                .accept_gap_ms
                .map(|g| format!(", accept gap {g:.1} ms"))
                .unwrap_or_default();
            format!(
                "promoted ({}) in {} ms{gap}",
                why_name(*why),
                report.duration_ms
            )
        }
        EventKind::RolledBack { report, .. } => format!(
            "rolled back: {}",
            report.reason.as_deref().unwrap_or("unknown reason")
        ),
        EventKind::Draining { connections } => match connections {
            Some(n) => format!("draining {n} connections"),
            None => "draining".into(),
        },
        EventKind::Exited { how } => format!("exited ({how})"),
        EventKind::Crashed { how } => format!("CRASHED ({how})"),
        EventKind::Permanent { release } => format!("release {release} is permanent"),
        EventKind::ReleaseFailed { release, reason } => {
            format!("release {release} failed: {reason}")
        }
        EventKind::Settled { report } => {
            let lost = if report.lost_connections > 0 {
                format!(", LOST {}", report.lost_connections)
            } else {
                String::new()
            };
            format!(
                "settled: {} connections handed over, {} migrated{lost}",
                report.handed_over_connections, report.migrated_connections
            )
        }
        EventKind::Reexec { report } => match &report.reason {
            None => format!(
                "re-executed {} (build {}) in {:.0} ms",
                report.new.as_ref().map_or("?", |b| b.version.as_str()),
                report
                    .new
                    .as_ref()
                    .map_or("?", |b| b.build_id.get(..12).unwrap_or(&b.build_id)),
                report.duration_ms
            ),
            Some(why) => format!("reexec failed: {why}"),
        },
    };
    format!("{} {who}: {what}", when(e.at_ms))
}

/// One pre-copy round, as `baton events` and `upgrade --wait` show it. The last round
/// says how much of it was a pause: its time also covers waiting for the candidate to
/// catch up, while the old generation still served.
fn precopy_line(kind: &EventKind) -> String {
    let EventKind::Precopy {
        round,
        bytes,
        chunks,
        ms,
        quiesced,
        paused_ms,
    } = kind
    else {
        return String::new();
    };
    let size = crate::text::size(*bytes);
    match (*quiesced, paused_ms) {
        (true, Some(paused)) => format!(
            "pre-copy round {round} (last round): {size} in {chunks} chunks, {ms:.1} ms, of which {paused:.1} ms paused"
        ),
        (true, None) => {
            format!(
                "pre-copy round {round} (last round, paused): {size} in {chunks} chunks, {ms:.1} ms"
            )
        }
        (false, _) => {
            let when = if *round == 0 {
                "full copy, serving"
            } else {
                "delta, serving"
            };
            format!("pre-copy round {round} ({when}): {size} in {chunks} chunks, {ms:.1} ms")
        }
    }
}

/// `baton history [--json] [-n N]`.
pub fn history(path: Option<PathBuf>, n: Option<usize>, json: bool) -> anyhow::Result<ExitCode> {
    let reply = ask(
        path,
        ControlRequest::History { n },
        Some(Duration::from_secs(10)),
    )?;
    let ControlReply::History { entries, file } = reply else {
        anyhow::bail!("unexpected reply to history");
    };
    if json {
        for e in &entries {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:>4} {:<11} {:<14} {:<11} {:>8} {:>9} {:>12} {:>6} {:>8} {:>6}  reason",
        "when",
        "gen",
        "why",
        "release",
        "result",
        "ms",
        "gap ms",
        "snapshot",
        "rounds",
        "migrated",
        "lost"
    );
    for e in &entries {
        println!("{}", row(e));
    }
    // The first start is a line of its own, not an upgrade.
    let starts = entries
        .iter()
        .filter(|e| e.why == baton_protocol::StartReason::Initial)
        .count();
    let upgrades = entries.len() - starts;
    let counted = match (upgrades, starts) {
        (1, 0) => "1 upgrade".to_owned(),
        (n, 0) => format!("{n} upgrades"),
        (n, s) => format!(
            "{n} upgrade{}, {s} first start{}",
            if n == 1 { "" } else { "s" },
            if s == 1 { "" } else { "s" }
        ),
    };
    match file {
        Some(f) => println!("({counted}; kept in {f})"),
        None => println!("({counted}; in memory only: start baton with --state-dir to keep them)"),
    }
    Ok(ExitCode::SUCCESS)
}

fn row(e: &HistoryEntry) -> String {
    let r = &e.report;
    let result = match r.result {
        UpgradeResult::Promoted => "promoted",
        UpgradeResult::RolledBack => "rolled back",
    };
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "{:<24} {:>4} {:<11} {:<14} {:<11} {:>8} {:>9} {:>12} {:>6} {:>8} {:>6}  {}",
        when(e.at_ms),
        r.generation,
        why_name(e.why),
        e.release,
        result,
        r.duration_ms,
        opt(r.accept_gap_ms.map(|g| format!("{g:.1}"))),
        opt(r.snapshot_bytes.map(crate::text::size)),
        opt(r.precopy_rounds.map(|n| n.to_string())),
        r.migrated_connections,
        r.lost_connections,
        r.reason.as_deref().unwrap_or("")
    )
}

/// Follows the events of an upgrade asked for now, printing each phase with its
/// time since the request: a spinner on a terminal, plain lines otherwise. Returns
/// a handle that waits (briefly) until the outcome was shown.
pub struct Progress {
    done: std::sync::mpsc::Receiver<()>,
}

impl Progress {
    /// Starts following `path`'s events (best effort: no progress if that fails), from
    /// the spawn of a generation after `after` on: an upgrade in flight before ours is
    /// not shown as ours.
    pub fn start(path: &std::path::Path, after: u64) -> Progress {
        let (tx, done) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        let since = crate::text::now_ms();
        let started = std::time::Instant::now();
        std::thread::spawn(move || {
            use std::io::IsTerminal;
            let bar = if std::io::stderr().is_terminal() {
                let b = indicatif::ProgressBar::new_spinner();
                b.enable_steady_tick(Duration::from_millis(100));
                b.set_message("upgrade requested");
                b
            } else {
                indicatif::ProgressBar::hidden()
            };
            let say = |line: String| {
                let line = format!("  +{:>6} ms  {line}", started.elapsed().as_millis());
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
            };
            let mut ours = false;
            let _ = conn::stream(&path, &ControlRequest::Events { follow: true }, |l| {
                let Ok(e) = serde_json::from_str::<Event>(l) else {
                    return true;
                };
                if e.at_ms < since {
                    return true;
                }
                let g = e.generation;
                if !ours {
                    ours = matches!(e.kind, EventKind::Spawned { .. }) && g > after;
                    if !ours {
                        return true;
                    }
                }
                let (line, end) = match &e.kind {
                    EventKind::Spawned { image, .. } => (
                        format!(
                            "spawned generation {g} (pid {}, {image})",
                            e.pid.unwrap_or(0)
                        ),
                        false,
                    ),
                    EventKind::Ready => (format!("generation {g} ready"), false),
                    EventKind::Snapshot { bytes, ms } => (
                        format!("snapshot: {} in {ms:.1} ms", crate::text::size(*bytes)),
                        false,
                    ),
                    EventKind::Restored { ms } => (format!("restored in {ms:.1} ms"), false),
                    EventKind::Precopy { .. } => (precopy_line(&e.kind), false),
                    EventKind::Draining { connections } => (
                        match connections {
                            Some(n) => format!("generation {g} draining {n} connections"),
                            None => format!("generation {g} draining"),
                        },
                        false,
                    ),
                    EventKind::Promoted { .. } => (format!("generation {g} promoted"), true),
                    EventKind::RolledBack { report, .. } => (
                        format!(
                            "generation {g} rolled back: {}",
                            report.reason.as_deref().unwrap_or("?")
                        ),
                        true,
                    ),
                    _ => return true,
                };
                bar.set_message(line.clone());
                say(line);
                if end {
                    bar.finish_and_clear();
                    let _ = tx.send(());
                }
                !end
            });
        });
        Progress { done }
    }

    /// Waits until the outcome was shown (at most 500 ms: the reply is what counts).
    pub fn finish(self) {
        let _ = self.done.recv_timeout(Duration::from_millis(500));
    }
}

/// While `release install|rollback --wait` waits for a probation to end, shows
/// the seconds left: a spinner on a terminal, a plain line every 5 s otherwise.
pub struct ProbationProgress {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProbationProgress {
    /// Starts polling `path`'s status once a second (best effort).
    pub fn start(path: Option<std::path::PathBuf>) -> ProbationProgress {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            use std::io::IsTerminal;
            let bar = if std::io::stderr().is_terminal() {
                let b = indicatif::ProgressBar::new_spinner();
                b.enable_steady_tick(Duration::from_millis(100));
                b
            } else {
                indicatif::ProgressBar::hidden()
            };
            let mut last_said: Option<(String, u64)> = None;
            loop {
                if let Ok(s) = conn::status(path.clone(), Duration::from_secs(2)) {
                    if let Some(p) = s.releases.and_then(|r| r.probation) {
                        let line = match p.seconds_left {
                            Some(n) => format!("{} on probation: {n} s left", p.version),
                            None => format!("{} on probation until made permanent", p.version),
                        };
                        if bar.is_hidden() {
                            let step = p.seconds_left.map_or(0, |n| n / 5);
                            let due = last_said
                                .as_ref()
                                .is_none_or(|(v, st)| *v != p.version || *st != step);
                            if due {
                                println!("  {line}");
                                last_said = Some((p.version.clone(), step));
                            }
                        } else {
                            bar.set_message(line);
                        }
                    }
                }
                if stopped.recv_timeout(Duration::from_secs(1)).is_ok() {
                    break;
                }
            }
            bar.finish_and_clear();
        });
        ProbationProgress {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops showing it.
    pub fn finish(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
