//! `baton`: zero-downtime binary upgrades for native services.

mod access;
mod cgroup;
mod cli;
mod client;
mod config;
mod control;
mod exe;
mod generation;
mod health;
mod lifecycle;
mod listeners;
mod notify;
mod release_cmd;
mod spawn;
mod store;
mod supervise;
mod sys;
mod upgrade;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, RunArgs};

/// Bad usage or configuration.
const EXIT_USAGE: u8 = 2;

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
        Command::Status { json, control } => client::run(|| client::status(control.control, json)),
        Command::Upgrade { wait, control } => {
            client::run(|| client::upgrade(control.control, wait))
        }
        Command::Stop { control } => client::run(|| client::stop(control.control)),
        Command::Release(args) => client::run(|| release_cmd::run(args)),
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
    let mut cfg = match config::RunConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baton: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    cfg.child_nofile = sys::raise_nofile();
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
                    eprintln!("baton: error: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            }
        }
        None => None,
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
    match rt.block_on(supervise::run(cfg, listeners, sd, boot)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("baton: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
