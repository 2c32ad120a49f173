//! `baton status [--watch] [--json]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use baton_protocol::{ReexecResult, Status, UpgradeResult};

use super::conn::status as status_of;

/// `status --watch`: the status, redrawn every second until interrupted.
pub fn watch(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    loop {
        let s = status_of(path.clone(), Duration::from_secs(10))?;
        if tty {
            // Clear the screen and go home: redraw in place.
            print!("\x1b[2J\x1b[H");
        }
        print_status(&s);
        if !tty {
            println!();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn status(path: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let s = status_of(path, Duration::from_secs(10))?;
    if json {
        println!("{}", serde_json::to_string(&s).context("encoding status")?);
    } else {
        print_status(&s);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &Status) {
    match s.pid {
        Some(pid) => println!("active: generation {} (pid {pid})", s.generation),
        None => println!("active: none"),
    }
    let nice = s
        .supervisor
        .as_ref()
        .and_then(|me| me.nice)
        .map(|n| format!(", nice {n}"))
        .unwrap_or_default();
    println!(
        "supervisor: pid {}{nice}, rss {} KiB, crashes {}",
        s.supervisor_pid, s.rss_kb, s.crashes
    );
    if let Some(me) = &s.supervisor {
        let last = match &me.last_reexec {
            Some(r) if r.result == ReexecResult::Failed => format!(
                ", last reexec failed: {}",
                r.reason.as_deref().unwrap_or("?")
            ),
            _ => String::new(),
        };
        println!(
            "baton: {} (build {}), {} reexecs{last}",
            me.build.version,
            short(&me.build.build_id),
            me.reexecs
        );
    }
    if !s.containment.is_empty() {
        let strays = if s.strays_killed > 0 {
            format!(", {} stray processes killed", s.strays_killed)
        } else {
            String::new()
        };
        println!("containment: {}{strays}", s.containment);
        if !s.strays.is_empty() {
            println!(
                "strays: pids {:?} outlived their generation and hold a listener (not contained: stop them)",
                s.strays
            );
        }
    }
    if s.upgrading {
        println!(
            "upgrade: in progress{}",
            if s.queued_upgrades > 0 {
                " (another queued)"
            } else {
                ""
            }
        );
    }
    println!(
        "  {:>4}  {:<8} {:<10} {:>8} {:>6}  release",
        "gen", "pid", "phase", "uptime", "conns"
    );
    let now = crate::text::now_ms();
    for g in &s.generations {
        let conns = g
            .connections
            .map_or_else(|| "-".to_string(), |c| c.to_string());
        let uptime = humantime::format_duration(std::time::Duration::from_secs(
            now.saturating_sub(g.started_at) / 1000,
        ))
        .to_string();
        println!(
            "  {:>4}  {:<8} {:<10} {:>8} {:>6}  {}",
            g.generation,
            g.pid,
            format!("{:?}", g.phase).to_lowercase(),
            uptime,
            conns,
            g.release.as_deref().unwrap_or("-")
        );
    }
    if let Some(u) = &s.last_upgrade {
        let what = match u.result {
            UpgradeResult::Promoted => "promoted",
            UpgradeResult::RolledBack => "rolled back",
        };
        let why = u
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        println!(
            "last upgrade: generation {} {what} in {} ms{why}",
            u.generation, u.duration_ms
        );
        if let Some(gap) = u.accept_gap_ms {
            println!(
                "  accept gap {gap:.1} ms, snapshot {}",
                crate::text::size(u.snapshot_bytes.unwrap_or(0))
            );
        }
        if let Some(rounds) = u.precopy_rounds {
            println!(
                "  pre-copy: {rounds} rounds, {} while serving, last delta {} ({})",
                crate::text::size(u.precopy_bytes.unwrap_or(0)),
                crate::text::size(u.final_delta_bytes.unwrap_or(0)),
                u.precopy_stop.as_deref().unwrap_or("?")
            );
        }
        if let (Some(old), Some(new)) = (u.old_peak_rss_bytes, u.new_peak_rss_bytes) {
            println!(
                "  peak RSS: old {}, new {}",
                crate::text::size(old),
                crate::text::size(new)
            );
        }
        if u.handed_over_connections > 0 {
            let lost = if u.lost_connections > 0 {
                format!(", LOST {}", u.lost_connections)
            } else {
                String::new()
            };
            println!(
                "  connections: {} handed over, {} migrated{lost}",
                u.handed_over_connections, u.migrated_connections
            );
        }
    }
    if let Some(r) = &s.releases {
        println!(
            "releases: {} (permanent: {})",
            r.store,
            r.permanent.as_deref().unwrap_or("none")
        );
        if let Some(why) = &r.store_error {
            println!("  store: OUT OF SYNC with what runs: {why}");
        }
        if let Some(p) = &r.probation {
            let left = p
                .seconds_left
                .map(|s| format!("{s} s left"))
                .unwrap_or_else(|| "until made permanent".into());
            println!(
                "  {} on probation ({left}, {} failed health checks in a row)",
                p.version, p.health_failures
            );
        }
        println!("  booted: {}", r.boot);
    }
    println!("listeners:");
    for l in &s.listeners {
        println!(
            "  {} {}{}",
            l.name,
            l.addr,
            if l.inherited { " (from systemd)" } else { "" }
        );
    }
}

/// Build ids are long; 12 hex digits identify one.
pub(super) fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
