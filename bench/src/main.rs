//! `baton-bench`: drives the real release binaries (baton, hello-http, kv-server) through
//! the benchmark scenarios of BENCHMARKS.md and prints a table, or one JSON object per
//! scenario (per state size for `stateful`) per line with `--json`.
//!
//! ```text
//! cargo build --release --workspace
//! target/release/baton-bench --quick            # every scenario, < 90 s on 2 cores
//! target/release/baton-bench --json             # the full run
//! target/release/baton-bench --scenario overhead --scenario stateful
//! ```

mod chaos;
mod common;
mod migration;
mod overhead;
mod plot;
mod precopy;
mod reexec;
mod report;
mod restart;
mod soak;
mod stateful;
mod swap;
mod sys;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_tests::harness;
use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::report::Row;

/// Benchmarks for baton: upgrades under load, overhead, stateful hand-over, connection
/// migration, and a cold restart for contrast.
#[derive(Debug, Parser)]
#[command(name = "baton-bench", version)]
struct Args {
    /// The short run (every scenario in under 90 s on 2 cores); default: the full run.
    #[arg(long)]
    quick: bool,
    /// One JSON object per scenario per line on stdout, instead of the table.
    #[arg(long)]
    json: bool,
    /// Write SVG plots into DIR: timelines of swap-under-load (requests/s and p99 latency
    /// per 100 ms, upgrades shaded), and precopy's accept gap against state size.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Run only this scenario (repeatable); default: all, in the order listed here.
    #[arg(long = "scenario", value_enum, value_name = "NAME")]
    scenarios: Vec<Scenario>,
    /// swap-under-load and reexec: number of upgrades (reexecs) [quick: 10, full: 100]; soak [quick: 100, full: 1000].
    #[arg(long, value_name = "K")]
    upgrades: Option<usize>,
    /// baseline-restart: number of restarts [default: as many as swap-under-load upgrades].
    #[arg(long, value_name = "N")]
    restarts: Option<usize>,
    /// HTTP load: keep-alive clients.
    #[arg(long, default_value_t = 8)]
    keepalive: usize,
    /// HTTP load: connection-per-request clients.
    #[arg(long, default_value_t = 8)]
    fresh: usize,
    /// overhead: measured window per run [quick: 2s, full: 4s].
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    overhead_duration: Option<Duration>,
    /// overhead: rounds of interleaved runs (direct, socket-activated, baton) [quick: 3, full: 15].
    #[arg(long, value_name = "N")]
    overhead_rounds: Option<usize>,
    /// stateful: state size in MiB (repeatable) [quick: 10 100, full: 10 100 1000].
    #[arg(long = "state-mb", value_name = "MB")]
    state_mb: Vec<u64>,
    /// stateful: upgrades per size [quick: 1, full: 3].
    #[arg(long, value_name = "N")]
    state_upgrades: Option<usize>,
    /// migration: persistent connections [quick: 1000, full: 10000].
    #[arg(long, value_name = "P")]
    connections: Option<usize>,
    /// migration: upgrades [default: --upgrades, else quick: 2, full: 5].
    #[arg(long, value_name = "K")]
    migration_upgrades: Option<usize>,
    /// chaos: trials per app [quick: 10, full: 50].
    #[arg(long, value_name = "N")]
    chaos_trials: Option<usize>,
    /// Run N busy processes (a CPU hog) beside every scenario.
    #[arg(long, value_name = "N", default_value_t = 0)]
    hog: usize,
    /// migration: the app holding the connections.
    #[arg(long, value_enum, default_value = "http")]
    migration_app: migration::App,
}

/// The scenarios, in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    SwapUnderLoad,
    Overhead,
    Stateful,
    Migration,
    BaselineRestart,
    /// baton re-executing itself under load.
    Reexec,
    /// Pre-copy against the one-shot snapshot, by state size.
    Precopy,
    /// Not in the default run (it takes minutes): `--scenario soak`.
    Soak,
    /// Not in the default run either: `--scenario soak-stateful`.
    SoakStateful,
    /// Seeded fault trials (`BATON_CHAOS_SEED`); not in the default run: `--scenario chaos`.
    Chaos,
}

/// The release binaries under test, next to this executable.
pub struct Bins {
    /// `hello-http`.
    pub hello: PathBuf,
    /// `kv-server`.
    pub kv: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if cfg!(debug_assertions) {
        anyhow::bail!(
            "baton-bench measures the release binaries: build and run it with \
             `cargo build --release --workspace && target/release/baton-bench`"
        );
    }
    // baton and the apps are found next to this executable (target/release).
    harness::baton_bin()?;
    let bins = Bins {
        hello: harness::hello_http_bin()?,
        kv: harness::kv_server_bin()?,
    };
    let want = args.connections.map_or(0, |c| 2 * c as u64 + 4096);
    let nofile = sys::raise_nofile_limit(want).context("raising RLIMIT_NOFILE")?;
    // Contention as a dimension: busy processes beside every scenario.
    let _hog = match args.hog {
        0 => None,
        n => Some(baton_tests::hog::CpuHog::start(n).context("starting the CPU hog")?),
    };

    // Two workers: the load generator gets the machine's two cores like the server does;
    // the tables in BENCHMARKS.md say so.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let scenarios = if args.scenarios.is_empty() {
        Scenario::value_variants()
            .iter()
            .copied()
            .filter(|s| !matches!(s, Scenario::Soak | Scenario::SoakStateful | Scenario::Chaos))
            .collect()
    } else {
        args.scenarios.clone()
    };
    let started = Instant::now();
    let mut broken = 0;
    let mut missed = Vec::new();
    for scenario in scenarios {
        let name = scenario
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        tracing::info!(scenario = %name, quick = args.quick, "starting");
        let t = Instant::now();
        let cpu = common::CpuMeter::start();
        let mut rows = rt.block_on(run(scenario, &args, &bins, nofile));
        if let Some(pct) = cpu.foreign_pct() {
            for row in &mut rows {
                row.set("foreign_cpu_pct", pct);
            }
            if pct >= 10 {
                tracing::warn!(
                    scenario = %name,
                    foreign_cpu_pct = pct,
                    "other processes used the machine during this scenario: its figures are noisy"
                );
            }
        }
        tracing::info!(scenario = %name, secs = t.elapsed().as_secs_f64(), "finished");
        for row in rows {
            broken += usize::from(row.failed_to_run());
            let label = match row.get_f64("state_mb") {
                Some(mb) => format!("{name}[{mb} MB]"),
                None => name.clone(),
            };
            missed.extend(row.missed().into_iter().map(|k| format!("{label}.{k}")));
            if args.json {
                println!("{}", row.json_line());
            } else {
                println!("{}", row.table());
            }
        }
    }
    tracing::info!(secs = started.elapsed().as_secs_f64(), "all scenarios done");
    if !args.json {
        if missed.is_empty() {
            println!("every measured figure meets its target");
        } else {
            println!("targets MISSED: {}", missed.join(", "));
        }
    }
    if broken > 0 {
        anyhow::bail!("{broken} scenario(s) failed to run (see their `error`)");
    }
    Ok(())
}

async fn run(scenario: Scenario, a: &Args, bins: &Bins, nofile: u64) -> Vec<Row> {
    let q = a.quick;
    let load = common::http_load(a.keepalive, a.fresh);
    let upgrades = a.upgrades.unwrap_or(if q { 10 } else { 100 });
    let requests_between = 2000;
    let interval = Duration::from_millis(300);
    let one = |name: &'static str, r: anyhow::Result<Row>| {
        vec![r.unwrap_or_else(|e| Row::error(name, &e))]
    };
    match scenario {
        Scenario::SwapUnderLoad => one(
            "swap-under-load",
            swap::run(
                bins,
                &swap::Opts {
                    upgrades,
                    load,
                    requests_between,
                    interval,
                    plot: a.plot.clone(),
                },
            )
            .await,
        ),
        Scenario::Overhead => one(
            "overhead",
            overhead::run(
                bins,
                &overhead::Opts {
                    rounds: a.overhead_rounds.unwrap_or(if q { 3 } else { 15 }),
                    warmup: Duration::from_millis(if q { 500 } else { 1000 }),
                    duration: a.overhead_duration.unwrap_or(Duration::from_secs(if q {
                        2
                    } else {
                        4
                    })),
                    load,
                },
            )
            .await,
        ),
        Scenario::Stateful => {
            let sizes_mb = if !a.state_mb.is_empty() {
                a.state_mb.clone()
            } else if q {
                vec![10, 100]
            } else {
                vec![10, 100, 1000]
            };
            stateful::run(
                bins,
                &stateful::Opts {
                    sizes_mb,
                    upgrades: a.state_upgrades.unwrap_or(if q { 1 } else { 3 }),
                },
            )
            .await
        }
        Scenario::Precopy => {
            let sizes_mb = if !a.state_mb.is_empty() {
                a.state_mb.clone()
            } else if q {
                vec![10, 100]
            } else {
                vec![100, 1000]
            };
            let rows = precopy::run(
                bins,
                &precopy::Opts {
                    sizes_mb,
                    upgrades: a.state_upgrades.unwrap_or(if q { 1 } else { 3 }),
                },
            )
            .await;
            if let Some(dir) = &a.plot {
                match plot::by_size(
                    dir,
                    "precopy-gap",
                    "Accept gap against state size, 8 writers (kv-server, 2 cores)",
                    &precopy::series(&rows),
                ) {
                    Ok(p) => tracing::info!(path = %p.display(), "plot written"),
                    Err(e) => tracing::warn!(error = %e, "cannot write the plot"),
                }
            }
            rows
        }
        Scenario::Migration => {
            let connections = a.connections.unwrap_or(if q { 1000 } else { 10_000 });
            // Each connection costs an fd here and one in each generation holding it.
            if connections as u64 + 256 > nofile {
                return vec![Row::skipped(
                    "migration",
                    format!("RLIMIT_NOFILE is {nofile}: too low for {connections} connections"),
                )];
            }
            one(
                "migration",
                migration::run(
                    bins,
                    &migration::Opts {
                        connections,
                        upgrades: a.migration_upgrades.or(a.upgrades).unwrap_or(if q {
                            2
                        } else {
                            5
                        }),
                        app: a.migration_app,
                        drain_timeout: Duration::from_secs(if q { 5 } else { 20 }),
                    },
                )
                .await,
            )
        }
        Scenario::Soak => one(
            "soak",
            soak::run(
                bins,
                &swap::Opts {
                    upgrades: a.upgrades.unwrap_or(if q { 100 } else { 1000 }),
                    load,
                    requests_between,
                    interval: Duration::ZERO,
                    plot: None,
                },
            )
            .await,
        ),
        Scenario::Reexec => one(
            "reexec",
            reexec::run(bins, upgrades, load, requests_between).await,
        ),
        Scenario::Chaos => one(
            "chaos",
            chaos::run(
                baton_tests::chaos::seed(),
                a.chaos_trials.unwrap_or(if q { 10 } else { 50 }),
            )
            .await,
        ),
        Scenario::SoakStateful => one(
            "soak-stateful",
            soak::run_stateful(bins, a.upgrades.unwrap_or(if q { 100 } else { 1000 }), 8).await,
        ),
        Scenario::BaselineRestart => one(
            "baseline-restart",
            restart::run(
                bins,
                &restart::Opts {
                    restarts: a.restarts.unwrap_or(upgrades),
                    load,
                    requests_between,
                    interval,
                },
            )
            .await,
        ),
    }
}
