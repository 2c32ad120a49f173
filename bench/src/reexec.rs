//! `reexec`: hello-http under load while baton re-executes itself K times. Every
//! request must succeed, no keep-alive connection may be reopened (the app is not
//! touched), and baton's fds must be the same after as before.

use std::time::Duration;

use baton_protocol::ReexecResult;
use baton_tests::harness::{Baton, proc_fds};
use baton_tests::load::{LoadGen, LoadOpts};

use crate::Bins;
use crate::common::{Control, shutdown, wait_load, with_log};
use crate::report::{RSS_TARGET_KB, Row, Target, percentile};
use crate::swap::load_extras;

const SCENARIO: &str = "reexec";

/// Runs the scenario: `reexecs` of them, `requests_between` requests apart.
pub async fn run(
    bins: &Bins,
    reexecs: usize,
    load: LoadOpts,
    requests_between: u64,
) -> anyhow::Result<Row> {
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "20s"],
        [bins.hello.as_os_str(), "--label".as_ref(), "bench".as_ref()],
    )
    .await?;
    let control = Control::new(baton.control());
    let out = measure(&baton, &control, reexecs, load, requests_between)
        .await
        .map_err(|e| with_log(&baton, e));
    shutdown(baton).await?;
    out
}

async fn measure(
    baton: &Baton,
    control: &Control,
    reexecs: usize,
    opts: LoadOpts,
    requests_between: u64,
) -> anyhow::Result<Row> {
    let addr = baton.tcp_addr("http").await?;
    let app = control.status().await?.pid;
    let fds_before = proc_fds(baton.pid()).map(|f| f.len()).unwrap_or(0);
    let load = LoadGen::start(addr, opts);
    let mut at = wait_load(&load, "the first requests", Duration::from_secs(30), |s| {
        s.ok >= requests_between
    })
    .await?;
    let (mut inside_ms, mut wall_ms, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    let mut rss_kb = 0;
    for i in 1..=reexecs {
        let (report, took) = control.reexec().await?;
        if report.result != ReexecResult::Done {
            failed.push(report.reason.unwrap_or_default());
            continue;
        }
        inside_ms.push(report.duration_ms);
        wall_ms.push(took.as_secs_f64() * 1000.0);
        let st = control.status().await?;
        rss_kb = rss_kb.max(st.rss_kb);
        anyhow::ensure!(st.pid == app, "reexec {i}: the app changed: {st:?}");
        let before = at.ok;
        at = wait_load(
            &load,
            &format!("reexec {i}: traffic"),
            Duration::from_secs(30),
            |s| s.ok >= before + requests_between,
        )
        .await?;
    }
    let report = load.stop().await;
    let fds_after = proc_fds(baton.pid()).map(|f| f.len()).unwrap_or(0);
    let mut row = Row::new(SCENARIO);
    row.set("requests", report.requests)
        .set("failed", report.failed)
        .target("failed", Target::Eq(0.0))
        .set("reexecs", inside_ms.len())
        .set("reexecs_failed", failed.len())
        .target("reexecs_failed", Target::Eq(0.0))
        .set_ms("reexec_ms_p50", percentile(&inside_ms, 0.50))
        .set_ms("reexec_ms_p99", percentile(&inside_ms, 0.99))
        .set_ms("reexec_ms_max", percentile(&inside_ms, 1.0))
        .set_ms("reexec_wall_ms_p50", percentile(&wall_ms, 0.50))
        .set_ms("reexec_wall_ms_p99", percentile(&wall_ms, 0.99))
        .set("fds_before", fds_before)
        .set("fds_after", fds_after)
        .target("fds_after", Target::Le(fds_before as f64))
        .set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB);
    load_extras(&mut row, &report);
    row.target("keepalive_reconnects", Target::Eq(0.0));
    for why in failed.iter().take(3) {
        row.note(format!("reexec failed: {why}"));
    }
    Ok(row)
}
