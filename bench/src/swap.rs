//! `swap-under-load`: hello-http under baton at saturation, K upgrades, every request
//! counted.

use std::time::Duration;

use baton_protocol::UpgradeResult;
use baton_tests::harness::Baton;
use baton_tests::load::{LoadGen, LoadOpts, LoadReport};

use crate::Bins;
use crate::common::{Control, shutdown, wait_load, with_log};
use crate::report::{RSS_TARGET_KB, Row, Target, percentile};

/// Shape of the run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Upgrades to run.
    pub upgrades: usize,
    /// The load.
    pub load: LoadOpts,
    /// Requests that must complete between two upgrades, so that every upgrade overlaps
    /// real traffic on a settled generation rather than the tail of the previous swap.
    pub requests_between: u64,
    /// Upgrades start on this schedule (one every `interval`), or as soon as the previous
    /// one has settled if that takes longer.
    pub interval: Duration,
    /// `--plot DIR`: write the run's timeline there.
    pub plot: Option<std::path::PathBuf>,
}

const SCENARIO: &str = "swap-under-load";

/// baton's figures after one settled upgrade, for trends over a long run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// baton's open fds.
    pub fds: f64,
    /// baton's RSS in KiB.
    pub rss_kb: f64,
    /// The upgrade's wall time in ms.
    pub upgrade_ms: f64,
}

/// Runs the scenario.
pub async fn run(bins: &Bins, opts: &Opts) -> anyhow::Result<Row> {
    run_sampled(bins, opts, SCENARIO).await.map(|(row, _)| row)
}

/// Runs the scenario under `name`, returning the per-upgrade samples too.
pub async fn run_sampled(
    bins: &Bins,
    opts: &Opts,
    name: &'static str,
) -> anyhow::Result<(Row, Vec<Sample>)> {
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "20s"],
        [bins.hello.as_os_str(), "--label".as_ref(), "bench".as_ref()],
    )
    .await?;
    let control = Control::new(baton.control());
    let out = measure(&baton, &control, opts, name)
        .await
        .map_err(|e| with_log(&baton, e))?;
    shutdown(baton).await?;
    Ok(out)
}

async fn measure(
    baton: &Baton,
    control: &Control,
    opts: &Opts,
    name: &'static str,
) -> anyhow::Result<(Row, Vec<Sample>)> {
    let addr = baton.tcp_addr("http").await?;
    let first = control.status().await?;
    let mut rss_kb = first.rss_kb;

    let load = LoadGen::start(addr, opts.load.clone());
    wait_load(&load, "the first requests", Duration::from_secs(30), |s| {
        s.ok >= opts.requests_between
    })
    .await?;

    let mut wall_ms = Vec::with_capacity(opts.upgrades);
    let mut supervisor_ms = Vec::with_capacity(opts.upgrades);
    // baton's share, split: the cgroup, fork + exec, READY to drain.
    let mut parts: [Vec<f64>; 3] = Default::default();
    let mut promoted = 0u64;
    let mut rollbacks = Vec::new();
    let mut samples = Vec::with_capacity(opts.upgrades);
    let mut spans = Vec::with_capacity(opts.upgrades);
    let mut next = tokio::time::Instant::now();
    for i in 1..=opts.upgrades {
        next += opts.interval;
        tokio::time::sleep_until(next).await;
        let from = load.elapsed().as_secs_f64();
        let (report, took) = control.upgrade().await?;
        spans.push(crate::plot::Span {
            from,
            to: load.elapsed().as_secs_f64(),
        });
        wall_ms.push(took.as_secs_f64() * 1000.0);
        if let Some(ms) = report.supervisor_ms {
            supervisor_ms.push(ms);
        }
        for (v, part) in
            parts
                .iter_mut()
                .zip([report.cgroup_ms, report.spawn_ms, report.ready_to_drain_ms])
        {
            v.extend(part);
        }
        match report.result {
            UpgradeResult::Promoted => promoted += 1,
            UpgradeResult::RolledBack => {
                rollbacks.push(report.reason.clone().unwrap_or_default());
                continue;
            }
        }
        let new_pid = report.pid.unwrap_or(0);
        // Events, not sleeps: the new generation answers, the old one has drained and
        // exited, and enough requests went through before the next swap.
        let at = wait_load(
            &load,
            &format!("upgrade {i}: the new pid {new_pid} to answer"),
            Duration::from_secs(30),
            |s| s.pids.contains(&new_pid),
        )
        .await?;
        let status = control.wait_settled(Duration::from_secs(30)).await?;
        rss_kb = rss_kb.max(status.rss_kb);
        samples.push(Sample {
            fds: baton_tests::harness::proc_fds(baton.pid())
                .map(|f| f.len() as f64)
                .unwrap_or(f64::NAN),
            rss_kb: status.rss_kb as f64,
            upgrade_ms: took.as_secs_f64() * 1000.0,
        });
        wait_load(
            &load,
            &format!("upgrade {i}: traffic on generation {}", report.generation),
            Duration::from_secs(30),
            |s| s.ok >= at.ok + opts.requests_between,
        )
        .await?;
        if i % 10 == 0 || i == opts.upgrades {
            tracing::info!(
                upgrade = i,
                of = opts.upgrades,
                failed = at.failed,
                "{name} progress"
            );
        }
    }
    let report = load.stop().await;
    rss_kb = rss_kb.max(control.status().await?.rss_kb);

    let mut row = Row::new(name);
    if let Some(dir) = &opts.plot {
        let title = format!(
            "{name}: {} upgrades of hello-http under load, {} requests, {} failed",
            promoted, report.requests, report.failed
        );
        let path = crate::plot::timeline(dir, name, &title, &report.timeline, &spans)?;
        row.note(format!("timeline: {}", path.display()));
    }
    row.set("requests", report.requests)
        .set("failed", report.failed)
        .target("failed", Target::Eq(0.0))
        .set("upgrades", promoted)
        .set_ms("upgrade_ms_p50", percentile(&wall_ms, 0.50))
        .set_ms("upgrade_ms_p99", percentile(&wall_ms, 0.99))
        .set_ms("upgrade_ms_max", percentile(&wall_ms, 1.0));
    if supervisor_ms.is_empty() {
        row.set("supervisor_ms_p99", serde_json::Value::Null)
            .note("baton reported no supervisor_ms");
    } else {
        row.set_ms("supervisor_ms_p99", percentile(&supervisor_ms, 0.99))
            .target("supervisor_ms_p99", Target::Le(2.0));
    }
    row.set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB)
        .set("rolled_back", rollbacks.len())
        .target("rolled_back", Target::Eq(0.0));
    load_extras(&mut row, &report);
    row.set_ms("supervisor_ms_p50", percentile(&supervisor_ms, 0.5))
        .set_ms("supervisor_ms_max", percentile(&supervisor_ms, 1.0));
    for (name, v) in ["cgroup_ms", "spawn_ms", "ready_to_drain_ms"]
        .iter()
        .zip(&parts)
    {
        if !v.is_empty() {
            row.set_ms(&format!("{name}_p50"), percentile(v, 0.5))
                .set_ms(&format!("{name}_p99"), percentile(v, 0.99));
        }
    }
    for reason in rollbacks.iter().take(3) {
        row.note(format!("rollback: {reason}"));
    }
    Ok((row, samples))
}

/// Throughput, latency and failure kinds of a load run, appended after the documented keys.
pub fn load_extras(row: &mut Row, report: &LoadReport) {
    row.set("rps", report.requests_per_sec.round() as u64)
        .set_ms("latency_ms_p50", report.latency_us.p50 as f64 / 1000.0)
        .set_ms("latency_ms_p99", report.latency_us.p99 as f64 / 1000.0)
        .set_ms("latency_ms_max", report.latency_us.max as f64 / 1000.0)
        .set(
            "keepalive_reconnects",
            report.keepalive_reconnects.iter().sum::<u64>(),
        )
        .set("duration_s", (report.duration_s * 10.0).round() / 10.0);
    if report.failed > 0 {
        // Honest accounting: say which kinds of failure happened, not just how many.
        let kinds: serde_json::Map<String, serde_json::Value> = report
            .failures
            .nonzero()
            .into_iter()
            .map(|(k, n)| (k.name().to_owned(), n.into()))
            .collect();
        row.set("failures", serde_json::Value::Object(kinds));
        row.note(format!("failure kinds: {}", report.failures));
    }
}
