//! `kv-server`: an in-memory key-value server speaking the Redis protocol (RESP2), built to
//! run under baton. It serves the listener named `kv`, TCP or Unix (or binds
//! `--listen-fallback` standalone), drains at command boundaries, and hands its keyspace to
//! the next version in a stateful upgrade (see `state.rs` for the snapshot schemas).

mod baton_glue;
mod cmd;
mod db;
mod fault;
mod precopy;
mod resp;
mod server;
mod state;

use std::io::IsTerminal as _;

use anyhow::Context as _;
use clap::Parser;

use crate::state::Schema;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(name = "kv-server", version, about)]
pub struct Options {
    /// Address to bind when no listener named `kv` is inherited (standalone): HOST:PORT or
    /// unix:PATH. An inherited `kv` listener is served as whatever kind it is.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6379")]
    listen_fallback: String,

    /// State schema version this build writes in snapshots (1 or 2). A schema-2 server
    /// migrates schema-1 snapshots; a schema-1 server rejects schema-2 ones.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    schema: u32,

    /// How long a drain started by a signal (no supervisor deadline) may take before the
    /// process exits anyway.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,

    /// Behave like a build without connection migration: neither adopt connections from the
    /// previous generation nor hand them to the next (they close at a command boundary).
    #[arg(long, hide = true)]
    no_adopt: bool,

    /// Behave like a build without pre-copy: the state goes in one snapshot while quiesced.
    #[arg(long, hide = true)]
    no_precopy: bool,

    /// Test only: break one step of the stateful upgrade on purpose (see README).
    #[arg(long, value_enum, hide = true)]
    fault: Option<fault::Fault>,

    /// Test only: exit with status 3 this long after READY (a release that fails after
    /// it went live, its state lost with it).
    #[arg(long, value_name = "DUR", hide = true, value_parser = humantime::parse_duration)]
    exit_after: Option<std::time::Duration>,
}

impl Options {
    fn schema(&self) -> anyhow::Result<Schema> {
        Schema::from_version(self.schema).context("unsupported --schema")
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Options::parse();
    tracing_subscriber::fmt()
        // A closed or full stderr loses a line; it must not panic the app.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    fault::arm(opts.fault);
    // Take the inherited fds and remove the contract variables while this is the only
    // thread: changing the environment once runtime threads exist is unsound.
    #[allow(unsafe_code)] // Env::take is unsafe by contract (no other thread).
    // SAFETY: still single-threaded (see above).
    let env = unsafe { baton_child::Env::take() }.context("reading the baton environment")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(baton_glue::run(opts, env))
}
