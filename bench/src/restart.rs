//! `baseline-restart`: what users suffer today. The same load while hello-http is
//! cold-restarted the way `systemctl restart` does it for a service without a `.socket`
//! unit: stop the old process (SIGTERM, wait for it to exit), then start a new one, which
//! binds the port itself. Between the two nobody holds the listening socket, so new
//! connections are refused, and the old process's accept queue is reset when it closes.
//! (With a `.socket` unit systemd would keep the socket open and connections would wait in
//! the backlog instead; that is not the common setup and not what is measured here.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_tests::harness::TestDir;
use baton_tests::load::{LoadGen, LoadOpts};

use crate::Bins;
use crate::common::{DirectApp, free_port, wait_load};
use crate::report::{Row, percentile};
use crate::swap::load_extras;

/// Shape of the run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Restarts to run.
    pub restarts: usize,
    /// The load (the same as `swap-under-load`).
    pub load: LoadOpts,
    /// Requests that must complete between two restarts.
    pub requests_between: u64,
    /// Restarts start on this schedule, as upgrades do in `swap-under-load`.
    pub interval: Duration,
}

const SCENARIO: &str = "baseline-restart";

/// Runs the scenario.
pub async fn run(bins: &Bins, opts: &Opts) -> anyhow::Result<Row> {
    let dir = TestDir::new("bench-restart")?;
    let log = dir.join("app.log");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let args = ["--label", "bench"];
    let mut app = DirectApp::spawn(&bins.hello, addr, &args, Some(&log))?;
    app.wait_serving(addr, Duration::from_secs(30)).await?;

    let load = LoadGen::start(addr, opts.load.clone());
    wait_load(&load, "the first requests", Duration::from_secs(30), |s| {
        s.ok >= opts.requests_between
    })
    .await?;

    let mut restart_ms = Vec::with_capacity(opts.restarts);
    let mut next = tokio::time::Instant::now();
    for i in 1..=opts.restarts {
        next += opts.interval;
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        app.terminate(Duration::from_secs(60)).await?;
        app = DirectApp::spawn(&bins.hello, addr, &args, Some(&log))?;
        let pid = app.pid();
        // Restarted = the new process answers the load (not a probe of ours, which would
        // compete with the load for the first accept).
        let at = wait_load(
            &load,
            &format!("restart {i}: the new pid {pid} to answer"),
            Duration::from_secs(30),
            |s| s.pids.contains(&pid),
        )
        .await?;
        restart_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        wait_load(
            &load,
            &format!("restart {i}: traffic on pid {pid}"),
            Duration::from_secs(30),
            |s| s.ok >= at.ok + opts.requests_between,
        )
        .await?;
        if i % 10 == 0 || i == opts.restarts {
            tracing::info!(
                restart = i,
                of = opts.restarts,
                failed = at.failed,
                "baseline-restart progress"
            );
        }
    }
    let report = load.stop().await;
    app.terminate(Duration::from_secs(60)).await?;

    let mut row = Row::new(SCENARIO);
    row.set("requests", report.requests)
        .set("failed", report.failed)
        .set("restarts", opts.restarts)
        .set_ms("restart_ms_p50", percentile(&restart_ms, 0.5))
        .set_ms("restart_ms_max", percentile(&restart_ms, 1.0));
    load_extras(&mut row, &report);
    row.note("no target: this is the contrast (systemctl restart without a .socket unit)");
    Ok(row)
}
