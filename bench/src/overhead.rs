//! `overhead`: the same load against hello-http run directly and under baton, in
//! interleaved runs so that drift (thermal, page cache, a noisy neighbour) hits both.

use std::net::SocketAddr;
use std::time::Duration;

use baton_tests::harness::Baton;
use baton_tests::load::{LoadGen, LoadOpts, LoadReport};

use crate::common::{free_port, proc_cpu_secs, shutdown, with_log, Control, DirectApp};
use crate::report::{median, Row, Target, RSS_TARGET_KB};
use crate::Bins;

/// Shape of the run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Pairs of (direct, baton) runs.
    pub pairs: usize,
    /// Load before each measured window, discarded (connections set up, caches warm).
    pub warmup: Duration,
    /// Measured window per run.
    pub duration: Duration,
    /// The load.
    pub load: LoadOpts,
}

const SCENARIO: &str = "overhead";

/// Runs the scenario.
pub async fn run(bins: &Bins, opts: &Opts) -> anyhow::Result<Row> {
    let mut direct = Vec::new();
    let mut under_baton = Vec::new();
    let mut rss_kb = 0;
    let mut baton_cpu_secs = 0.0;
    let mut baton_wall_secs = 0.0;
    for pair in 0..opts.pairs {
        // Alternate which goes first, so neither always runs on a warmer machine.
        for baton_first in [pair % 2 == 1, pair % 2 == 0] {
            if baton_first {
                let (report, rss, cpu) = run_baton(bins, opts).await?;
                rss_kb = rss_kb.max(rss);
                baton_cpu_secs += cpu.unwrap_or(0.0);
                baton_wall_secs += (opts.warmup + opts.duration).as_secs_f64();
                under_baton.push(report);
            } else {
                direct.push(run_direct(bins, opts).await?);
            }
        }
        tracing::info!(pair = pair + 1, of = opts.pairs, "overhead progress");
    }

    let rps = |v: &[LoadReport]| median(&v.iter().map(|r| r.requests_per_sec).collect::<Vec<_>>());
    let p99 = |v: &[LoadReport]| {
        median(
            &v.iter()
                .map(|r| r.latency_us.p99 as f64 / 1000.0)
                .collect::<Vec<_>>(),
        )
    };
    let failed: u64 = direct.iter().chain(&under_baton).map(|r| r.failed).sum();
    let (rps_direct, rps_baton) = (rps(&direct), rps(&under_baton));
    // Each pair ran back to back, so its ratio is the least disturbed by drift in the
    // machine's speed; the median ignores a pair hit by a noisy neighbour.
    let ratios: Vec<f64> = direct
        .iter()
        .zip(&under_baton)
        .filter(|(d, _)| d.requests_per_sec > 0.0)
        .map(|(d, b)| b.requests_per_sec / d.requests_per_sec)
        .collect();
    let ratio = median(&ratios);
    let runs = |v: &[LoadReport]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|r| (r.requests_per_sec.round() as u64).into())
            .collect()
    };

    let mut row = Row::new(SCENARIO);
    row.set("rps_direct", rps_direct.round() as u64)
        .set("rps_baton", rps_baton.round() as u64)
        .set("throughput_ratio", (ratio * 1000.0).round() / 1000.0)
        .target("throughput_ratio", Target::Ge(0.98))
        .set_ms("p99_ms_direct", p99(&direct))
        .set_ms("p99_ms_baton", p99(&under_baton))
        .set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB)
        .set("failed", failed)
        .target("failed", Target::Eq(0.0))
        .set("runs", opts.pairs)
        .set(
            "supervisor_cpu_pct",
            (baton_cpu_secs / baton_wall_secs.max(f64::EPSILON) * 1000.0).round() / 10.0,
        )
        .set("rps_direct_runs", runs(&direct))
        .set("rps_baton_runs", runs(&under_baton))
        .note(
            "rps and p99: medians over the runs; throughput_ratio: median of the per-pair ratios",
        );
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

async fn run_direct(bins: &Bins, opts: &Opts) -> anyhow::Result<LoadReport> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut app = DirectApp::spawn(&bins.hello, addr, &["--label", "bench"], None)?;
    app.wait_serving(addr, Duration::from_secs(30)).await?;
    let report = measure(addr, opts).await;
    app.terminate(Duration::from_secs(30)).await?;
    Ok(report)
}

/// One run under baton: the load report, baton's RSS, and baton's CPU seconds meanwhile.
async fn run_baton(bins: &Bins, opts: &Opts) -> anyhow::Result<(LoadReport, u64, Option<f64>)> {
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0"],
        [bins.hello.as_os_str(), "--label".as_ref(), "bench".as_ref()],
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
