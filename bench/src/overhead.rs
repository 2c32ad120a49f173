//! `overhead`: the same load against hello-http run directly and under baton, in
//! interleaved runs so that drift (thermal, page cache, a noisy neighbour) hits both.
//!
//! A third mode separates what baton costs from what socket activation costs: hello-http
//! socket-activated without baton (the bench binds the listener like baton does and passes
//! it as fd 3, as systemd would), which differs from the baton run only by baton's absence.

use std::net::SocketAddr;
use std::time::Duration;

use baton_tests::harness::Baton;
use baton_tests::load::{LoadGen, LoadOpts, LoadReport};

use crate::common::{Control, DirectApp, free_port, proc_cpu_secs, shutdown, with_log};
use crate::report::{RSS_TARGET_KB, Row, Target, median};
use crate::{Bins, sys};

/// Shape of the run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Rounds; each runs every mode once, in a rotating order.
    pub rounds: usize,
    /// Load before each measured window, discarded (connections set up, caches warm).
    pub warmup: Duration,
    /// Measured window per run.
    pub duration: Duration,
    /// The load.
    pub load: LoadOpts,
}

const SCENARIO: &str = "overhead";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Activated,
    Baton,
}

const MODES: [Mode; 3] = [Mode::Direct, Mode::Activated, Mode::Baton];

/// Runs the scenario.
pub async fn run(bins: &Bins, opts: &Opts) -> anyhow::Result<Row> {
    let mut direct = Vec::new();
    let mut activated = Vec::new();
    let mut under_baton = Vec::new();
    let mut rss_kb = 0;
    let mut baton_cpu_secs = 0.0;
    let mut baton_wall_secs = 0.0;
    for round in 0..opts.rounds {
        // Rotate the order, so that no mode always runs first (or right after another).
        for i in 0..MODES.len() {
            match MODES[(round + i) % MODES.len()] {
                Mode::Direct => direct.push(run_direct(bins, opts).await?),
                Mode::Activated => activated.push(run_activated(bins, opts).await?),
                Mode::Baton => {
                    let (report, rss, cpu) = run_baton(bins, opts).await?;
                    rss_kb = rss_kb.max(rss);
                    baton_cpu_secs += cpu.unwrap_or(0.0);
                    baton_wall_secs += (opts.warmup + opts.duration).as_secs_f64();
                    under_baton.push(report);
                }
            }
        }
        tracing::info!(round = round + 1, of = opts.rounds, "overhead progress");
    }

    let rps = |v: &[LoadReport]| median(&v.iter().map(|r| r.requests_per_sec).collect::<Vec<_>>());
    let p99 = |v: &[LoadReport]| {
        median(
            &v.iter()
                .map(|r| r.latency_us.p99 as f64 / 1000.0)
                .collect::<Vec<_>>(),
        )
    };
    // The runs of one round are back to back, so their ratio is the least disturbed by
    // drift in the machine's speed; the median ignores a round hit by a noisy neighbour.
    let ratio = |num: &[LoadReport], den: &[LoadReport]| {
        let ratios: Vec<f64> = num
            .iter()
            .zip(den)
            .filter(|(_, d)| d.requests_per_sec > 0.0)
            .map(|(n, d)| n.requests_per_sec / d.requests_per_sec)
            .collect();
        (median(&ratios) * 1000.0).round() / 1000.0
    };
    let runs = |v: &[LoadReport]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|r| (r.requests_per_sec.round() as u64).into())
            .collect()
    };
    let failed: u64 = direct
        .iter()
        .chain(&activated)
        .chain(&under_baton)
        .map(|r| r.failed)
        .sum();

    let mut row = Row::new(SCENARIO);
    row.set("rps_direct", rps(&direct).round() as u64)
        .set("rps_baton", rps(&under_baton).round() as u64)
        .set("throughput_ratio", ratio(&under_baton, &direct))
        .target("throughput_ratio", Target::Ge(0.99))
        .set_ms("p99_ms_direct", p99(&direct))
        .set_ms("p99_ms_baton", p99(&under_baton))
        .set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB)
        .set("failed", failed)
        .target("failed", Target::Eq(0.0))
        .set("rps_socket_activated", rps(&activated).round() as u64)
        .set_ms("p99_ms_socket_activated", p99(&activated))
        .set(
            "throughput_ratio_vs_socket_activated",
            ratio(&under_baton, &activated),
        )
        .target("throughput_ratio_vs_socket_activated", Target::Ge(0.99))
        .set(
            "throughput_ratio_socket_activated_vs_direct",
            ratio(&activated, &direct),
        )
        .set(
            "supervisor_cpu_pct",
            (baton_cpu_secs / baton_wall_secs.max(f64::EPSILON) * 1000.0).round() / 10.0,
        )
        .set("rounds", opts.rounds)
        .set("rps_direct_runs", runs(&direct))
        .set("rps_socket_activated_runs", runs(&activated))
        .set("rps_baton_runs", runs(&under_baton))
        .note("rps and p99: medians over the runs; ratios: medians of the per-round ratios")
        .note("socket_activated: hello-http given the listener as fd 3 (LISTEN_FDS) without baton")
        .note("supervisor_cpu_pct: baton's own CPU while the load ran, in % of one core");
    Ok(row)
}

async fn measure(addr: SocketAddr, opts: &Opts) -> LoadReport {
    let warm = LoadGen::start(addr, opts.load.clone());
    tokio::time::sleep(opts.warmup).await;
    drop(warm.stop().await);
    let load = LoadGen::start(addr, opts.load.clone());
    tokio::time::sleep(opts.duration).await;
    load.stop().await
}

const ARGS: [&str; 2] = ["--label", "bench"];

async fn run_direct(bins: &Bins, opts: &Opts) -> anyhow::Result<LoadReport> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut app = DirectApp::spawn(&bins.hello, addr, &ARGS, None)?;
    app.wait_serving(addr, Duration::from_secs(30)).await?;
    let report = measure(addr, opts).await;
    app.terminate(Duration::from_secs(30)).await?;
    Ok(report)
}

async fn run_activated(bins: &Bins, opts: &Opts) -> anyhow::Result<LoadReport> {
    // Bound like baton binds: SO_REUSEADDR (std does it), O_NONBLOCK, backlog somaxconn.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    sys::listen_somaxconn(std::os::fd::AsFd::as_fd(&listener))?;
    let addr = listener.local_addr()?;
    let mut app = DirectApp::spawn_activated(&bins.hello, &listener, &ARGS)?;
    // Only the app holds the socket from now on, as when systemd hands it over.
    drop(listener);
    app.wait_serving(addr, Duration::from_secs(30)).await?;
    let report = measure(addr, opts).await;
    app.terminate(Duration::from_secs(30)).await?;
    Ok(report)
}

/// One run under baton: the load report, baton's RSS, and baton's CPU seconds meanwhile.
async fn run_baton(bins: &Bins, opts: &Opts) -> anyhow::Result<(LoadReport, u64, Option<f64>)> {
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0"],
        [bins.hello.as_os_str(), ARGS[0].as_ref(), ARGS[1].as_ref()],
    )
    .await?;
    let control = Control::new(baton.control());
    let result = async {
        let addr = baton.tcp_addr("http").await?;
        let cpu_before = proc_cpu_secs(baton.pid());
        let report = measure(addr, opts).await;
        let cpu = proc_cpu_secs(baton.pid())
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let rss = control.status().await?.rss_kb;
        anyhow::Ok((report, rss, cpu))
    }
    .await;
    let measured = result.map_err(|e| with_log(&baton, e))?;
    shutdown(baton).await?;
    Ok(measured)
}
