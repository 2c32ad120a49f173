//! Command-line interface.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Zero-downtime binary upgrades for native services.
///
/// baton holds your service's listening sockets and runs it as a child. On
/// `kill -HUP`, `systemctl reload` or `baton upgrade` it starts the new binary beside
/// the old one, waits until it is ready, then drains the old one. A candidate that
/// fails is rolled back and nobody notices.
#[derive(Debug, Parser)]
#[command(name = "baton", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Supervise PROGRAM: bind the listeners, start it, upgrade it on SIGHUP.
    Run(Box<RunArgs>),
    /// Show the generations, the last upgrade and the listeners.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Keep it current: redraw every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Start an upgrade (same as `kill -HUP`).
    Upgrade {
        /// Wait for the outcome: exit 0 when promoted, 1 (reason on stderr) on rollback,
        /// 3 when promoted but the old generation's state was lost.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Re-execute baton's own executable in place (same as `kill -USR2`): after a
    /// package upgrade, the new baton takes over the sockets and the running
    /// generations, which notice nothing.
    Reexec {
        /// Wait for the outcome: exit 0 when the new executable supervises, 1 (reason
        /// on stderr) when the old one carries on.
        #[arg(long)]
        wait: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show every state change: spawned, ready, promoted, rolled back, draining,
    /// exited, crashed, snapshot and restore figures (the recent ones, then with
    /// --follow each new one as it happens).
    Events {
        /// Keep streaming new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Take a dry-run snapshot of the app's state: it pauses as for an upgrade
    /// (milliseconds), then serves on; nothing is committed. Needs `baton run --state`
    /// and an app that takes part in state hand-over.
    Snapshot {
        /// Write the snapshot (`{"version": V, "state": ...}`) to FILE (`-`: stdout).
        #[arg(long, value_name = "FILE")]
        dump: PathBuf,
        /// Ask for schema version N (the app's down-migration) instead of its own.
        #[arg(long, value_name = "N")]
        schema: Option<u32>,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Rehearse the upgrade from A to B (and back) on a private baton, under load, and
    /// check that the state survives the round trip: for an app's CI. Exit 0 only when
    /// every step passed.
    Rehearse(Box<RehearseArgs>),
    /// Show the last upgrades (kept across restarts with --state-dir): result,
    /// reason, durations, accept gap, snapshot bytes, migrated connections, release.
    History {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Only the last N.
        #[arg(short = 'n', value_name = "N")]
        n: Option<usize>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Drain every generation and stop baton.
    Stop {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Manage releases: add, check, install, make permanent, roll back, list, remove.
    Release(ReleaseArgs),
    /// Write the man pages or print shell completions (for packagers).
    #[command(hide = true)]
    Generate {
        /// What to generate.
        #[command(subcommand)]
        what: Generate,
    },
}

/// `baton generate` subcommands.
#[derive(Debug, Subcommand)]
pub enum Generate {
    /// Man pages (`baton.1`, `baton-run.1`, ...) into DIR.
    Man {
        /// The directory to write them to.
        dir: PathBuf,
    },
    /// The README's table of `baton run` settings, in Markdown, on stdout (from the
    /// same definitions as the flags and the config keys).
    Settings,
    /// The completion script for SHELL, on stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `baton release`: on a running baton (the control socket), or with
/// `--releases DIR` on the store itself, before any baton runs.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// What to do.
    #[command(subcommand)]
    pub op: ReleaseOp,
    /// Work on the store at DIR directly instead of asking a running baton.
    #[arg(long, value_name = "DIR", global = true)]
    pub releases: Option<PathBuf>,
    /// Control socket of the running baton [default: as for `baton status`].
    #[arg(long, value_name = "PATH", env = "BATON_CONTROL", global = true)]
    pub control: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `baton release` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReleaseOp {
    /// Copy (or move) a file or directory into the store as VERSION (unpack).
    Add {
        /// The new release's version (its directory name).
        #[arg(id = "release", value_name = "VERSION")]
        version: String,
        /// A binary (it lands at PROGRAM inside the release) or a directory (the release).
        path: PathBuf,
        /// Move PATH instead of copying it (same filesystem only).
        #[arg(long = "move")]
        mv: bool,
        /// PROGRAM inside every release, e.g. bin/app (recorded by the first add or `baton run`).
        #[arg(long, value_name = "PATH")]
        program: Option<String>,
    },
    /// Check VERSION without starting it: executable, for this machine, sha256, preflight.
    Check {
        /// The release.
        #[arg(id = "release", value_name = "VERSION")]
        version: String,
        /// With --releases: the preflight command ({exe}, {version}, {dir} are replaced).
        #[arg(long, value_name = "CMD")]
        preflight: Option<String>,
    },
    /// Check, then upgrade to VERSION; it is permanent after its probation.
    Install {
        /// The release.
        #[arg(
            id = "release",
            value_name = "VERSION",
            required_unless_present = "newest"
        )]
        version: Option<String>,
        /// Install the newest release in the store (nothing to do if it runs already;
        /// for `ExecReload=`).
        #[arg(long, conflicts_with = "release")]
        newest: bool,
        /// Wait until it is permanent: exit 0 then, 1 (reason on stderr) on rollback or revert.
        #[arg(long)]
        wait: bool,
        /// Wait only until it is promoted (probation has started).
        #[arg(long, conflicts_with = "wait")]
        promoted: bool,
    },
    /// Make VERSION permanent now (it must be the one on probation).
    Permanent {
        /// The release.
        #[arg(id = "release", value_name = "VERSION")]
        version: String,
    },
    /// Revert the release on probation, else install the previous permanent one.
    Rollback {
        /// Wait until the outcome is known.
        #[arg(long)]
        wait: bool,
    },
    /// List the releases, newest first.
    List,
    /// Delete VERSION (never the permanent or current one, nor one in use).
    Remove {
        /// The release.
        #[arg(id = "release", value_name = "VERSION")]
        version: String,
    },
}

/// `baton rehearse` options.
#[derive(Debug, Args)]
pub struct RehearseArgs {
    /// The release running first: an executable, or a directory with --program.
    #[arg(long, value_name = "A")]
    pub from: PathBuf,
    /// The release to upgrade to: an executable, or a directory with --program.
    #[arg(long, value_name = "B")]
    pub to: PathBuf,
    /// The executable inside A and B when they are directories (e.g. bin/app).
    #[arg(long, value_name = "PATH")]
    pub program: Option<PathBuf>,
    /// A listening socket NAME=ADDR, as for `baton run` (repeatable); port 0 takes a free
    /// port [default: http=127.0.0.1:0].
    #[arg(long, value_name = "NAME=ADDR")]
    pub listen: Vec<String>,
    /// Stateful upgrades (as `baton run --state`), with the state round trip checked.
    #[arg(long)]
    pub state: bool,
    /// A command (sh -c) that fills A before anything else, e.g. with redis-cli; it gets
    /// REHEARSE_<NAME>=ADDR (and _HOST, _PORT) per listener and BATON_CONTROL.
    #[arg(long, value_name = "CMD")]
    pub setup: Option<String>,
    /// A command (sh -c) that loads the app through the upgrades, any protocol (the same
    /// environment as --setup). It should run until stopped (SIGTERM after the last
    /// upgrade); one that exits by itself must exit 0 [default: built-in HTTP load].
    #[arg(long, value_name = "CMD")]
    pub load: Option<String>,
    /// The path the built-in HTTP load asks for.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub http_path: String,
    /// Built-in HTTP load: N keep-alive clients and N with a connection per request.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub clients: usize,
    /// Load time before, between and after the upgrades under load.
    #[arg(long, value_name = "DUR", default_value = "1s")]
    pub settle: humantime::Duration,
    /// A JSON pointer into the state (e.g. /stats) left out of the state comparison
    /// (repeatable), besides what the app declares its down-migration drops.
    #[arg(long, value_name = "POINTER")]
    pub dropped: Vec<String>,
    /// A JSON pointer into the state of an array compared as a set (repeatable).
    #[arg(long, value_name = "POINTER")]
    pub unordered: Vec<String>,
    /// Compare states with `CMD BEFORE AFTER` (exit 0: the same) instead of as JSON.
    #[arg(long, value_name = "CMD")]
    pub compare: Option<String>,
    /// B need not go back to A: skip B → A (and the round trip), and say so.
    #[arg(long)]
    pub no_downgrade: bool,
    /// Also kill B at each phase of A → B: A must serve on with its state intact.
    #[arg(long)]
    pub faults: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// One more `baton run` option for the private baton (repeatable), e.g.
    /// --baton-arg=--drain-timeout=5s.
    #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
    pub baton_arg: Vec<String>,
    /// Bound on each step (start, setup, an upgrade, a snapshot).
    #[arg(long, value_name = "DUR", default_value = "60s")]
    pub timeout: humantime::Duration,
    /// Keep the private baton's directory (its log, the load's output) and say where.
    #[arg(long)]
    pub keep: bool,
    /// The app's arguments (after `--`), for A and B alike.
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<OsString>,
}

pub use crate::config::flags::{ControlArg, RunArgs};

#[cfg(test)]
mod tests {
    /// clap checks a command's definitions only when it parses one (and only in debug
    /// builds): every subcommand is checked here, once.
    #[test]
    fn every_command_is_well_defined() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
