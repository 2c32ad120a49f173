//! `baton`: zero-downtime binary upgrades for native services.

mod access;
mod cli;
mod clock;
mod config;
mod daemon;
mod logsink;
mod reexec;
mod rehearse;
mod release;
mod sys;
mod text;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::args::{Cli, Command, RunArgs};
use crate::cli::{conn, generate, observe, status};
use crate::daemon::io::{listeners, notify};
use crate::daemon::process::cgroup;
use crate::release::lifecycle;

/// Bad usage or configuration.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // A baton re-executing itself runs this executable: first to ask what it is,
    // then to take over.
    if std::env::var_os(reexec::ENV_PROBE).is_some() {
        return reexec::answer_probe();
    }
    if let Some(fd) = std::env::var_os(reexec::ENV_STATE) {
        init_tracing();
        return take_over(&fd);
    }
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
            crate::say_err!("baton: error: {first} (see 'baton --help')");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Status {
            json,
            watch,
            control,
        } => conn::run(|| {
            if watch {
                status::watch(control.control)
            } else {
                status::status(control.control, json)
            }
        }),
        Command::Upgrade { wait, control } => {
            conn::run(|| cli::upgrade::upgrade(control.control, wait))
        }
        Command::Reexec {
            wait,
            json,
            control,
        } => conn::run(|| cli::upgrade::reexec(control.control, wait, json)),
        Command::Stop { control } => conn::run(|| cli::upgrade::stop(control.control)),
        Command::Events {
            follow,
            json,
            control,
        } => conn::run(|| observe::events(control.control, follow, json)),
        Command::History { json, n, control } => {
            conn::run(|| observe::history(control.control, n, json))
        }
        Command::Snapshot {
            dump,
            schema,
            json,
            control,
        } => conn::run(|| cli::snapshot::dump(control.control, &dump, schema, json)),
        Command::Rehearse(args) => conn::run(|| rehearse::run(*args)),
        Command::Release(args) => conn::run(|| cli::release::run(args)),
        Command::Generate { what } => conn::run(|| {
            match what {
                cli::args::Generate::Man { dir } => generate::man(&dir)?,
                cli::args::Generate::Completions { shell } => generate::completions(shell),
                cli::args::Generate::Settings => print!("{}", config::settings::markdown()),
            }
            Ok(ExitCode::SUCCESS)
        }),
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd, straight to journald with the fields as journal fields
    // (GENERATION=, PID=, RELEASE=, ...), so `journalctl GENERATION=3` works; plain
    // lines on stderr when there is no journald to talk to.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            use tracing_journald::{Priority, PriorityMappings};
            // As syslog means them: routine information is 6, not a notice (5).
            let priorities = PriorityMappings {
                info: Priority::Informational,
                debug: Priority::Debug,
                ..PriorityMappings::new()
            };
            let journald = journald
                .with_field_prefix(None)
                .with_syslog_identifier("baton".into())
                .with_priority_mappings(priorities);
            tracing_subscriber::registry()
                .with(filter())
                .with(journald)
                .init();
            return;
        }
    }
    let filter = filter();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Never `eprintln!` (which panics) when a line cannot be written.
        .log_internal_errors(false)
        .with_writer(logsink::Stderr)
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
    let mut cfg = match config::RunConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            crate::say_err!("baton: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    cfg.child_nofile = sys::raise_nofile();
    // Still one thread: the nice value is per thread, and later threads inherit it.
    if let Some(want) = cfg.nice {
        match sys::set_own_nice(want) {
            Ok(sys::NiceChange::From(n)) => cfg.child_nice = Some(n),
            Ok(sys::NiceChange::Unchanged) => {}
            Err(why) => tracing::info!(reason = %why, "baton keeps the nice value it started with"),
        }
    }
    sys::set_child_nice(cfg.child_nice);
    let boot = match &cfg.release.store {
        Some(dir) => {
            let program = cfg.program.to_string_lossy();
            match lifecycle::Lifecycle::open(
                dir,
                &program,
                cfg.release.preflight.clone(),
                cfg.release.preflight_timeout,
                cfg.release.keep,
            ) {
                Ok(b) => Some(b),
                Err(e) => {
                    crate::say_err!("baton: error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        None => None,
    };
    // Before binding: what a baton SIGKILLed with its guardian left may hold our ports.
    cgroup::reclaim_stale();
    if cgroup::guardian_needed() {
        // Still one thread, as fork_guardian requires.
        let drain = cfg.drain_timeout;
        match sys::fork_guardian(c"baton-guard", |pid| {
            // The generations' main processes drain first, as on a stop.
            let killed = cgroup::reclaim_of(pid, drain);
            if killed > 0 {
                tracing::warn!(
                    baton = pid,
                    killed,
                    "baton died: killed what its generations left"
                );
            }
        }) {
            Ok(guard) => tracing::debug!(guard, "a guardian kills the generations if baton dies"),
            Err(e) => {
                tracing::warn!(error = %e, "no guardian: generations outlive a SIGKILLed baton")
            }
        }
    }
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
            crate::say_err!(
                "baton: error: no listeners: give --listen NAME=ADDR, or start baton with socket activation (LISTEN_FDS)"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        Ok(l) => l,
        Err(e) => {
            crate::say_err!("baton: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let me = reexec::state::SelfOver {
        exe_path: std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| "/proc/self/exe".into()),
        argv: std::env::args_os().collect(),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        reexecs: 0,
        last_reexec: None,
    };
    let metrics = match &cfg.metrics {
        Some(spec) => match listeners::bind_own(spec, opts) {
            Ok(l) => Some(l),
            Err(e) => {
                crate::say_err!("baton: error: --metrics: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => None,
    };
    match rt.block_on(daemon::run(cfg, listeners, sd, boot, me, metrics)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            crate::say_err!("baton: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// This image was exec'd by a baton handing itself over: take over, or exec the
/// previous executable back when this one cannot.
fn take_over(fd: &std::ffi::OsStr) -> ExitCode {
    let fd: i32 = match fd.to_str().and_then(|s| s.parse().ok()) {
        Some(fd) => fd,
        None => {
            crate::say_err!("baton: error: {} is not an fd number", reexec::ENV_STATE);
            return ExitCode::FAILURE;
        }
    };
    let (memfd, data) = match sys::take_sealed_memfd(fd) {
        Ok(x) => x,
        Err(e) => {
            crate::say_err!("baton: error: cannot read the hand-over: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failed = std::env::var(reexec::ENV_FAILED).ok();
    let prev = std::env::var(reexec::ENV_PREV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
        .and_then(|p| sys::take_handed_fd(p).ok());
    if let (Some(p), None) = (&prev, &failed) {
        if let Err(e) = reexec::arm_crash_fallback(p, &memfd) {
            tracing::warn!(error = %e, "a crash while taking over would not be recovered");
        }
        if std::env::var("BATON_FAULT").as_deref() == Ok("reexec-crash") {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        }
    }
    let checked = reexec::HandOver::decode(&data).and_then(|state| {
        if failed.is_none() && std::env::var("BATON_FAULT").as_deref() == Ok("reexec-takeover") {
            return Err("fault injected (BATON_FAULT=reexec-takeover)".into());
        }
        reexec::check_takeover(&state)?;
        Ok(state)
    });
    let state = match checked {
        Ok(s) => s,
        Err(why) => {
            tracing::error!(reason = %why, "cannot take over from the previous baton");
            let Some(prev) = prev.filter(|_| failed.is_none()) else {
                crate::say_err!("baton: error: cannot take over: {why}");
                return ExitCode::FAILURE;
            };
            let fds = reexec::HandOver::decode(&data)
                .map(|s| s.fds())
                .unwrap_or_default();
            let argv: Vec<_> = std::env::args_os().collect();
            let err = reexec::exec_back(prev, &memfd, &fds, &argv, &why);
            crate::say_err!("baton: error: cannot take over ({why}), and {err}");
            return ExitCode::FAILURE;
        }
    };
    // The nice value came with the exec; children still get back the one the first
    // baton started with.
    sys::set_child_nice(state.config.child_nice);
    // As at start: another baton may have died with its guardian since.
    cgroup::reclaim_stale();
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let inherited = daemon::Inherited {
        state,
        memfd,
        failed,
        prev,
    };
    match rt.block_on(daemon::resume(inherited)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            crate::say_err!("baton: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// baton's runtime. One thread: children are forked from it, so PR_SET_PDEATHSIG
/// tracks baton's life (and a reexec, made from it, keeps them).
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            crate::say_err!("baton: error: cannot start the runtime: {e}");
            None
        }
    }
}
