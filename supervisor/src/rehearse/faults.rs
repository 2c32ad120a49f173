//! `--faults`: A → B upgrades in which B is killed at a given phase. Each must roll
//! back with A still the active process, its state as it was, and serving.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_protocol::{ControlRequest, Event, EventKind, UpgradeResult};
use nix::sys::signal::Signal;

use super::private::PrivateBaton;
use super::report::{Outcome, Report, took};
use super::{Probe, diff};
use crate::cli::conn;
use crate::sys;

/// Where B dies.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// As soon as it was spawned, before it is ready.
    Spawned,
    /// After A's snapshot (or pre-copy's first round) was handed to it, while it
    /// restores.
    Restoring,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Spawned => "fault: B killed before it is ready",
            Fault::Restoring => "fault: B killed while it restores",
        }
    }
}

/// What a trial works on.
pub struct Ctx<'a> {
    /// The private baton, running A.
    pub baton: &'a PrivateBaton,
    /// A's executable.
    pub a: &'a Path,
    /// B's.
    pub b: &'a Path,
    /// Whether A's state is checked.
    pub stateful: bool,
    /// How to tell that A serves.
    pub probe: &'a Probe,
    /// Bound on each upgrade and snapshot.
    pub timeout: Duration,
    /// The rehearsal's directory (for the wrapper that holds B at its start).
    pub dir: &'a Path,
}

/// How a trial ended when it did not fail.
enum Struck {
    /// The fault struck and A came through.
    Yes(String, Figures),
    /// B was faster than the fault (it restored and was promoted first); A runs again.
    Missed(String),
}

/// Runs `fault` and adds its step to `report`.
pub fn trial(ctx: &Ctx<'_>, fault: Fault, report: &mut Report) {
    let name = fault.name();
    match run(ctx, fault) {
        Ok(Struck::Yes(detail, figures)) => report.step(name, Outcome::Pass, detail, &figures),
        Ok(Struck::Missed(why)) => report.step(name, Outcome::Skip, why, &[]),
        Err(why) => report.step(name, Outcome::Fail, why, &[]),
    };
}

type Figures = Vec<(&'static str, serde_json::Value)>;

fn run(ctx: &Ctx<'_>, fault: Fault) -> Result<Struck, String> {
    let (b, stateful, timeout) = (ctx.baton, ctx.stateful, ctx.timeout);
    let e = |e: anyhow::Error| format!("{e:#}");
    let before = b.status().map_err(e)?;
    let a_pid = before.pid.ok_or("no active generation")?;
    let state_before = if stateful {
        Some(b.snapshot(None, timeout).map_err(e)?.bytes)
    } else {
        None
    };
    let (killed_tx, killed_rx) = mpsc::channel();
    let control = b.control().to_path_buf();
    let active = before.generation;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // Follows the events and kills B at the phase asked for.
    std::thread::spawn(move || {
        let mut b_pid = None;
        let _ = conn::stream(&control, &ControlRequest::Events { follow: true }, |line| {
            let Ok(ev) = serde_json::from_str::<Event>(line) else {
                return true;
            };
            // The stream starts with the recent past; only this trial's events count.
            let from_a = matches!(
                ev.kind,
                EventKind::Snapshot { .. } | EventKind::Precopy { .. }
            );
            if ev.at_ms < since || (ev.generation <= active && !from_a) {
                return true;
            }
            let due = match (&ev.kind, fault) {
                (EventKind::Spawned { .. }, _) => {
                    b_pid = ev.pid;
                    matches!(fault, Fault::Spawned)
                }
                // A's snapshot, or its first pre-copy round, reached B: B is restoring.
                (EventKind::Snapshot { .. } | EventKind::Precopy { .. }, Fault::Restoring) => {
                    ev.generation == active
                }
                _ => false,
            };
            if due {
                if let Some(p) = b_pid {
                    if still_a_candidate(&control, p) {
                        let _ = sys::kill(p, Signal::SIGKILL);
                        let _ = killed_tx.send(p);
                    }
                }
                return false;
            }
            true
        });
    });
    // Killed before it is ready: B starts held (SIGSTOP by a wrapper before it execs B),
    // so the kill always comes first however fast B is.
    let exe = match fault {
        Fault::Spawned => held_at_start(ctx.dir, ctx.b).map_err(|e| e.to_string())?,
        Fault::Restoring => ctx.b.to_path_buf(),
    };
    let started = Instant::now();
    let report = b.upgrade_to(&exe, timeout).map_err(e);
    // Back to A for whatever comes next, whatever happened.
    b.point_at(ctx.a).map_err(e)?;
    let report = report?;
    let killed = killed_rx.recv_timeout(Duration::from_secs(1)).ok();
    if killed.is_none() && report.result == UpgradeResult::Promoted {
        // Mid-restore is a window as long as B's restore: a small state closes it first.
        let back = b.upgrade_to(ctx.a, timeout).map_err(e)?;
        if back.result != UpgradeResult::Promoted {
            return Err(format!(
                "the fault missed B (it was promoted), and B did not go back to A: {}",
                back.reason.unwrap_or_default()
            ));
        }
        return Ok(Struck::Missed(format!(
            "B restored and was promoted in {} ms, before the kill; A runs again",
            report.duration_ms
        )));
    }
    if killed.is_none() {
        return Err(format!(
            "the fault never struck: the upgrade ended {:?} first",
            report.result
        ));
    }
    if report.result != UpgradeResult::RolledBack {
        return Err(format!(
            "the upgrade was {:?}, not rolled back",
            report.result
        ));
    }
    let after = b.status().map_err(e)?;
    if after.pid != Some(a_pid) {
        return Err(format!(
            "A (pid {a_pid}) is no longer the active process: {:?}",
            after.pid
        ));
    }
    if let Some(s) = state_before {
        let now = b.snapshot(None, timeout).map_err(e)?.bytes;
        if now != s {
            let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
            let why = match (parse(&s), parse(&now)) {
                (Some(x), Some(y)) => {
                    diff::first_difference(&x, &y, &diff::Rules::default()).map(|d| d.to_string())
                }
                _ => Some("its bytes differ".to_string()),
            };
            if let Some(why) = why {
                return Err(format!("A's state changed: {why}"));
            }
        }
    }
    ctx.probe
        .check()
        .map_err(|why| format!("A does not serve: {why}"))?;
    let reason = report.reason.clone().unwrap_or_default();
    Ok(Struck::Yes(
        format!(
            "rolled back in {} ({reason}); A (pid {a_pid}) serves{}",
            took(started.elapsed()),
            if stateful {
                " with its state intact"
            } else {
                ""
            }
        ),
        vec![
            ("rolled_back_ms", (report.duration_ms).into()),
            ("reason", reason.into()),
        ],
    ))
}

/// A script that stops itself, then runs `b`: B held at its start until the trial kills it.
fn held_at_start(dir: &Path, b: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("b-held-at-start");
    let quoted = b.display().to_string().replace('\'', "'\\''");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nkill -STOP $$\nexec '{quoted}' \"$@\"\n"),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Freezes `pid` (SIGSTOP) and tells whether it is still a candidate, not promoted; a
/// promoted one is let go (SIGCONT): the fault missed it, and killing the active
/// generation would be another trial altogether.
fn still_a_candidate(control: &Path, pid: u32) -> bool {
    let _ = sys::kill(pid, Signal::SIGSTOP);
    let candidate = conn::status(Some(control.to_path_buf()), Duration::from_secs(10))
        .is_ok_and(|s| s.pid != Some(pid) && s.generations.iter().any(|g| g.pid == pid));
    if !candidate {
        let _ = sys::kill(pid, Signal::SIGCONT);
    }
    candidate
}
