//! `soak` and `soak-stateful`: many upgrades under load, stateless (hello-http) and
//! stateful (kv-server with writers): 0 failed requests or lost writes, and baton's fd
//! count, RSS and upgrade time flat. "Flat" is the least-squares slope per 100 upgrades,
//! so a leak of one fd or a few KiB per upgrade shows however noisy the single figures are.

use std::time::{Duration, Instant};

use baton_protocol::UpgradeResult;
use baton_tests::harness::{Baton, proc_fds};
use baton_tests::resp::{IncrWriter, Reply, RespClient};

use crate::Bins;
use crate::common::{Control, shutdown, with_log};
use crate::report::{RSS_TARGET_KB, Row, Target, percentile};
use crate::swap::{self, Sample};

const SCENARIO: &str = "soak";
const STATEFUL: &str = "soak-stateful";

/// Runs the scenario: `swap-under-load`'s run, with trends.
pub async fn run(bins: &Bins, opts: &swap::Opts) -> anyhow::Result<Row> {
    let (mut row, samples) = swap::run_sampled(bins, opts, SCENARIO).await?;
    trends(&mut row, &samples);
    Ok(row)
}

/// The fd, RSS and upgrade-time trends of `samples`, appended to `row`.
fn trends(row: &mut Row, samples: &[Sample]) {
    let slope = |f: fn(&Sample) -> f64| slope_per_100(&samples.iter().map(f).collect::<Vec<_>>());
    let first = samples.first().map(|s| s.fds).unwrap_or(0.0);
    let last = samples.last().map(|s| s.fds).unwrap_or(0.0);
    row.set("fds_first", first)
        .set("fds_last", last)
        .set_ms("fds_slope_per_100", slope(|s| s.fds))
        // Below one fd per 100 upgrades: no per-upgrade leak.
        .target("fds_slope_per_100", Target::Le(1.0))
        .set_ms("rss_kb_slope_per_100", slope(|s| s.rss_kb))
        // Below 64 KiB per 100 upgrades: nothing kept per upgrade beyond noise.
        .target("rss_kb_slope_per_100", Target::Le(64.0))
        .set_ms("upgrade_ms_slope_per_100", slope(|s| s.upgrade_ms));
}

/// `soak-stateful`: kv-server under `--state`, `writers` clients pipelining INCRs on one
/// connection each, through `upgrades` stateful upgrades; every acknowledged INCR must be
/// there at the end and no connection may break.
pub async fn run_stateful(bins: &Bins, upgrades: usize, writers: usize) -> anyhow::Result<Row> {
    let baton = Baton::start(
        [
            "--state",
            "--listen",
            "kv=127.0.0.1:0",
            "--drain-timeout",
            "20s",
        ],
        [bins.kv.as_os_str()],
    )
    .await?;
    let control = Control::new(baton.control());
    let out = measure_stateful(&baton, &control, upgrades, writers)
        .await
        .map_err(|e| with_log(&baton, e));
    shutdown(baton).await?;
    out
}

async fn measure_stateful(
    baton: &Baton,
    control: &Control,
    upgrades: usize,
    writers: usize,
) -> anyhow::Result<Row> {
    let addr = baton.tcp_addr("kv").await?;
    let mut ws = Vec::with_capacity(writers);
    for i in 0..writers {
        ws.push(IncrWriter::start(addr, format!("soak:{i}")).await?);
    }
    let mut samples = Vec::with_capacity(upgrades);
    let (mut gaps, mut rss_kb, mut migrated) = (Vec::new(), 0u64, 0u64);
    for i in 1..=upgrades {
        // Every writer got a batch through the current generation.
        let marks: Vec<i64> = ws.iter().map(IncrWriter::last).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ws
            .iter()
            .zip(&marks)
            .any(|(w, m)| w.last() < m + IncrWriter::BATCH as i64)
        {
            if let Some(w) = ws.iter().find(|w| w.broken()) {
                anyhow::bail!("upgrade {i}: writer {} broke", w.key());
            }
            anyhow::ensure!(Instant::now() < deadline, "upgrade {i}: writers stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (report, took) = control.upgrade().await?;
        anyhow::ensure!(
            report.result == UpgradeResult::Promoted,
            "upgrade {i} rolled back: {:?}",
            report.reason
        );
        gaps.extend(report.accept_gap_ms);
        let status = control.wait_settled(Duration::from_secs(30)).await?;
        // Counted as the old generation hands them over, after promotion.
        migrated += status
            .last_upgrade
            .as_ref()
            .map_or(0, |u| u.migrated_connections);
        rss_kb = rss_kb.max(status.rss_kb);
        samples.push(Sample {
            fds: proc_fds(baton.pid())
                .map(|f| f.len() as f64)
                .unwrap_or(f64::NAN),
            rss_kb: status.rss_kb as f64,
            upgrade_ms: took.as_secs_f64() * 1000.0,
        });
        if i % 100 == 0 {
            tracing::info!(upgrade = i, of = upgrades, "{STATEFUL} progress");
        }
    }
    let (mut acked, mut broken, mut lost) = (0i64, 0u64, 0u64);
    let mut finals = Vec::new();
    for w in ws {
        let key = w.key().to_owned();
        match w.finish().await {
            Ok(last) => {
                acked += last;
                finals.push((key, last));
            }
            Err(e) => {
                broken += 1;
                tracing::error!(error = %e, "writer broke");
            }
        }
    }
    let mut c = RespClient::connect(addr).await?;
    for (key, last) in &finals {
        let got = match c.command(&["GET", key.as_str()]).await? {
            Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).parse::<i64>().ok(),
            _ => None,
        };
        if got != Some(*last) {
            lost += 1;
            tracing::error!(key, last, ?got, "acknowledged writes missing");
        }
    }
    let mut row = Row::new(STATEFUL);
    row.set("upgrades", upgrades)
        .set("acknowledged_incrs", acked)
        .set("keys_wrong", lost)
        .target("keys_wrong", Target::Eq(0.0))
        .set("broken_connections", broken)
        .target("broken_connections", Target::Eq(0.0))
        .set("migrated_connections", migrated)
        .set_ms("accept_gap_ms_p50", percentile(&gaps, 0.5))
        .set_ms("accept_gap_ms_p99", percentile(&gaps, 0.99))
        .set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB);
    trends(&mut row, &samples);
    Ok(row)
}

/// Least-squares slope of `ys` against 0, 1, 2, ..., times 100.
pub fn slope_per_100(ys: &[f64]) -> f64 {
    let ys: Vec<(f64, f64)> = ys
        .iter()
        .enumerate()
        .filter(|(_, y)| y.is_finite())
        .map(|(i, y)| (i as f64, *y))
        .collect();
    let n = ys.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = ys.iter().map(|p| p.0).sum::<f64>() / n;
    let my = ys.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = ys.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = ys.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { 100.0 * sxy / sxx }
}

#[cfg(test)]
mod tests {
    use super::slope_per_100;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<f64> = (0..50).map(|i| 10.0 + 0.5 * i as f64).collect();
        assert!((slope_per_100(&line) - 50.0).abs() < 1e-9);
        let flat = [7.0, 8.0, 7.0, 8.0, 7.0, 8.0];
        assert!(slope_per_100(&flat).abs() < 20.0);
        assert_eq!(slope_per_100(&[1.0]), 0.0);
    }
}
