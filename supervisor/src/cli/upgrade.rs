//! `baton upgrade|reexec|stop`: ask a running baton to act, and wait for the outcome.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use baton_protocol::{BatonBuild, ControlReply, ControlRequest, ReexecResult, UpgradeResult};

use super::conn::{ask, control_path};
use super::status::short;

/// `upgrade --wait`: promoted, but the old generation's state was lost.
const EXIT_PROMOTED_WITH_LOSS: u8 = 3;

/// `baton upgrade [--wait]`. With `--wait`, it says first whether an upgrade was in flight
/// or queued already (this one then follows it, or joins the queued one), and it shows
/// and reports only the upgrade it asked for.
pub fn upgrade(path: Option<PathBuf>, wait: bool) -> anyhow::Result<ExitCode> {
    let mut after = 0;
    if wait {
        let s = super::conn::status(path.clone(), Duration::from_secs(10))?;
        after = s
            .generations
            .iter()
            .map(|g| g.generation)
            .max()
            .unwrap_or(0);
        if s.queued_upgrades > 0 {
            println!(
                "an upgrade (to generation {after}) is in flight and another is queued: this request joins the queued one"
            );
        } else if s.upgrading {
            println!(
                "an upgrade (to generation {after}) is in flight: this one is queued after it, and its outcome is what follows"
            );
        }
    }
    let progress =
        wait.then(|| super::observe::Progress::start(&control_path(path.clone()), after));
    let reply = ask(path, ControlRequest::Upgrade { wait }, None)?;
    if let Some(p) = progress {
        p.finish();
    }
    match reply {
        ControlReply::Queued => {
            println!("upgrade requested");
            Ok(ExitCode::SUCCESS)
        }
        ControlReply::Upgrade(r) if r.result == UpgradeResult::Promoted => {
            println!(
                "promoted generation {} (pid {}) in {} ms",
                r.generation,
                r.pid.unwrap_or(0),
                r.duration_ms
            );
            match &r.reason {
                // Promoted, but the old generation died with its state: say so loudly,
                // and fail the command an operator (or `systemctl reload`) watches.
                Some(why) => {
                    eprintln!("baton: warning: {why}");
                    Ok(ExitCode::from(EXIT_PROMOTED_WITH_LOSS))
                }
                None => Ok(ExitCode::SUCCESS),
            }
        }
        ControlReply::Upgrade(r) => {
            eprintln!(
                "baton: upgrade to generation {} rolled back: {}",
                r.generation,
                r.reason.as_deref().unwrap_or("unknown reason")
            );
            Ok(ExitCode::FAILURE)
        }
        other => anyhow::bail!("unexpected reply: {other:?}"),
    }
}

pub fn reexec(path: Option<PathBuf>, wait: bool, json: bool) -> anyhow::Result<ExitCode> {
    let ControlReply::Reexec(r) = ask(path, ControlRequest::Reexec { wait }, None)? else {
        anyhow::bail!("unexpected reply to reexec");
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&r).context("encoding the report")?
        );
    }
    let build = |b: &BatonBuild| format!("{} (build {}, {})", b.version, short(&b.build_id), b.exe);
    match r.result {
        ReexecResult::Accepted => {
            if !json {
                println!("reexec requested");
            }
            Ok(ExitCode::SUCCESS)
        }
        ReexecResult::Done => {
            if !json {
                println!("re-executed in {:.0} ms", r.duration_ms);
                println!("  old: {}", build(&r.old));
                if let Some(n) = &r.new {
                    println!("  new: {}", build(n));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ReexecResult::Failed => {
            eprintln!(
                "baton: reexec failed, {} carries on: {}",
                build(&r.old),
                r.reason.as_deref().unwrap_or("unknown reason")
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `baton stop`: asks baton to stop its generations and exit.
pub fn stop(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    ask(path, ControlRequest::Stop, Some(Duration::from_secs(10)))?;
    println!("stopping");
    Ok(ExitCode::SUCCESS)
}
