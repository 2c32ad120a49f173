//! `baton`: zero-downtime binary upgrades for native services.

mod access;
mod cgroup;
mod cli;
mod config;
mod control;
mod generation;
mod listeners;
mod notify;
mod spawn;
mod supervise;
mod sys;
mod upgrade;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use baton_protocol::{ControlReply, ControlRequest, Status, UpgradeResult};
use clap::Parser;

use crate::cli::{Cli, Command, RunArgs};

/// Bad usage or configuration.
const EXIT_USAGE: u8 = 2;
/// `upgrade --wait`: promoted, but the old generation's state was lost.
const EXIT_PROMOTED_WITH_LOSS: u8 = 3;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, naming the culprit; the full usage is one `--help` away.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("baton: error: {first} (see 'baton --help')");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Status { json, control } => client(|| status(control.control, json)),
        Command::Upgrade { wait, control } => client(|| upgrade(control.control, wait)),
        Command::Stop { control } => client(|| stop(control.control)),
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // journald stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.without_time().init();
    } else {
        b.init();
    }
}

fn run(args: RunArgs) -> ExitCode {
    init_tracing();
    let cfg = match config::RunConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baton: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Still single-threaded here: listeners::open_all edits the environment.
    let sd = notify::SystemdOut::from_env();
    let opts = listeners::BindOptions {
        backlog: cfg.backlog,
        unix_mode: Some(cfg.unix_mode),
    };
    let listeners = match listeners::open_all(&cfg.listen, opts) {
        Ok(l) if l.is_empty() => {
            // Without sockets held by baton, each generation would bind its own and
            // upgrades could not be seamless.
            eprintln!(
                "baton: error: no listeners: give --listen NAME=ADDR, or start baton with socket activation (LISTEN_FDS)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        Ok(l) => l,
        Err(e) => {
            eprintln!("baton: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // One thread: children are forked from it, so PR_SET_PDEATHSIG tracks baton's life.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(supervise::run(cfg, listeners, sd)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("baton: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn client(f: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    sys::default_sigpipe();
    match f() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baton: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn control_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(control::default_path)
}

fn ask(
    path: Option<PathBuf>,
    req: ControlRequest,
    timeout: Option<Duration>,
) -> anyhow::Result<ControlReply> {
    let path = control_path(path);
    let reply = control::request(&path, &req, timeout)?;
    if let ControlReply::Error { message } = &reply {
        anyhow::bail!("baton at {}: {message}", path.display());
    }
    Ok(reply)
}

fn status(path: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let ControlReply::Status(s) = ask(path, ControlRequest::Status, Some(Duration::from_secs(10)))?
    else {
        anyhow::bail!("unexpected reply to status");
    };
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
    println!(
        "supervisor: pid {}, rss {} KiB, crashes {}",
        s.supervisor_pid, s.rss_kb, s.crashes
    );
    if !s.containment.is_empty() {
        let strays = if s.strays_killed > 0 {
            format!(", {} stray processes killed", s.strays_killed)
        } else {
            String::new()
        };
        println!("containment: {}{strays}", s.containment);
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
    println!("generations:");
    for g in &s.generations {
        let conns = g
            .connections
            .map(|c| format!(", {c} connections"))
            .unwrap_or_default();
        println!(
            "  {:>4}  pid {:<8} {:?}{conns}",
            g.generation, g.pid, g.phase
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
                "  accept gap {gap:.1} ms, snapshot {} bytes",
                u.snapshot_bytes.unwrap_or(0)
            );
        }
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

fn upgrade(path: Option<PathBuf>, wait: bool) -> anyhow::Result<ExitCode> {
    match ask(path, ControlRequest::Upgrade { wait }, None)? {
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

fn stop(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    ask(path, ControlRequest::Stop, Some(Duration::from_secs(10)))?;
    println!("stopping");
    Ok(ExitCode::SUCCESS)
}
