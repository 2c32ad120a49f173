//! `precopy`: kv-server holding S MiB (`DEBUG POPULATE`) with 8 writers, upgraded three ways:
//! the one-shot snapshot of a build without pre-copy (`classic`), the chunked one-shot
//! (`baton run --precopy off`), and pre-copy. One row per state size and mode.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_protocol::UpgradeResult;
use baton_tests::harness::Baton;
use baton_tests::resp::{Reply, RespClient};

use crate::Bins;
use crate::common::{Control, shutdown, with_log};
use crate::report::{RSS_TARGET_KB, Row, Target, median, percentile};

const SCENARIO: &str = "precopy";
const WRITERS: usize = 8;
/// Value bytes per populated key: S MiB is S * 1024 keys.
const VALUE_LEN: u64 = 1000;

/// Shape of the run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// State sizes in MiB.
    pub sizes_mb: Vec<u64>,
    /// Upgrades per size and mode.
    pub upgrades: usize,
}

/// How the state crosses.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Classic,
    Chunked,
    Precopy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Classic => "one-shot",
            Mode::Chunked => "chunked one-shot",
            Mode::Precopy => "pre-copy",
        }
    }
}

/// Runs the scenario.
pub async fn run(bins: &Bins, opts: &Opts) -> Vec<Row> {
    let mut rows = Vec::new();
    for &mb in &opts.sizes_mb {
        for mode in [Mode::Classic, Mode::Chunked, Mode::Precopy] {
            let row = run_one(bins, opts, mb, mode).await.unwrap_or_else(|e| {
                let mut row = Row::error(SCENARIO, &e);
                row.set("state_mb", mb).set("mode", mode.name());
                row
            });
            rows.push(row);
        }
    }
    rows
}

/// The rows as plot lines: accept gap p50 by state size, one line per mode.
pub fn series(rows: &[Row]) -> Vec<crate::plot::Series> {
    [Mode::Classic, Mode::Chunked, Mode::Precopy]
        .iter()
        .map(|m| {
            let pts = rows
                .iter()
                .filter(|r| r.get("mode").and_then(|v| v.as_str()) == Some(m.name()))
                .filter_map(|r| Some((r.get_f64("state_mb")?, r.get_f64("accept_gap_ms_p50")?)))
                .collect();
            (m.name().to_owned(), pts)
        })
        .collect()
}

async fn run_one(bins: &Bins, opts: &Opts, mb: u64, mode: Mode) -> anyhow::Result<Row> {
    let mut args = vec![
        "--state",
        "--listen",
        "kv=127.0.0.1:0",
        "--ready-timeout",
        "600s",
        "--snapshot-timeout",
        "600s",
        "--restore-timeout",
        "600s",
    ];
    if matches!(mode, Mode::Chunked) {
        args.extend(["--precopy", "off"]);
    }
    let mut program = vec![bins.kv.clone().into_os_string()];
    if matches!(mode, Mode::Classic) {
        program.push("--no-precopy".into());
    }
    let baton = Baton::start(args, program).await?;
    let control = Control::new(baton.control());
    let row = measure(&baton, &control, opts, mb, mode)
        .await
        .map_err(|e| with_log(&baton, e));
    shutdown(baton).await?;
    row
}

async fn measure(
    baton: &Baton,
    control: &Control,
    opts: &Opts,
    mb: u64,
    mode: Mode,
) -> anyhow::Result<Row> {
    let addr = baton.tcp_addr("kv").await?;
    let keys = mb * 1024 * 1024 / VALUE_LEN;
    let mut c = RespClient::connect(addr).await?;
    let (n, size) = (keys.to_string(), VALUE_LEN.to_string());
    let reply = c.command(&["DEBUG", "POPULATE", &n, "big", &size]).await?;
    if !reply.is_ok() {
        bail!("DEBUG POPULATE: {reply}");
    }
    let writers = Writers::start(addr);
    let (mut gaps, mut totals, mut finals, mut rounds) = (vec![], vec![], vec![], vec![]);
    let (mut old_rss, mut new_rss, mut rss_kb) = (0u64, 0u64, 0u64);
    let mut stop = None;
    for i in 1..=opts.upgrades {
        let (report, _) = control.upgrade().await?;
        if report.result != UpgradeResult::Promoted {
            bail!("upgrade {i} rolled back: {:?}", report.reason);
        }
        gaps.push(report.accept_gap_ms.context("no accept gap")?);
        totals.push(report.duration_ms as f64);
        finals.push(report.final_delta_bytes.unwrap_or(0) as f64);
        rounds.push(f64::from(report.precopy_rounds.unwrap_or(0)));
        old_rss = old_rss.max(report.old_peak_rss_bytes.unwrap_or(0));
        new_rss = new_rss.max(report.new_peak_rss_bytes.unwrap_or(0));
        stop = report.precopy_stop.clone().or(stop);
        let status = control.wait_settled(Duration::from_secs(120)).await?;
        rss_kb = rss_kb.max(status.rss_kb);
        tracing::info!(
            mb,
            mode = mode.name(),
            upgrade = i,
            gap = gaps[i - 1],
            "upgraded"
        );
    }
    let (latencies, acked, errors) = writers.stop().await;
    let lost = verify(addr, &acked).await?;
    let mut row = Row::new(SCENARIO);
    row.set("state_mb", mb)
        .set("mode", mode.name())
        .set_ms("accept_gap_ms_p50", median(&gaps))
        .set_ms(
            "accept_gap_ms_max",
            gaps.iter().copied().fold(0.0, f64::max),
        )
        .set_ms("upgrade_ms_p50", median(&totals))
        .set("precopy_rounds_p50", median(&rounds))
        .set("final_delta_bytes_p50", median(&finals))
        .set("precopy_stop", stop.unwrap_or_default())
        .set_ms("kv_p99_ms", percentile(&latencies, 0.99))
        .set_ms("kv_max_ms", latencies.iter().copied().fold(0.0, f64::max))
        .set("acked_writes", acked.iter().map(Vec::len).sum::<usize>())
        .set("lost_writes", lost)
        .target("lost_writes", Target::Eq(0.0))
        .set("writer_errors", errors)
        .target("writer_errors", Target::Eq(0.0))
        .set("old_peak_rss_mb", old_rss >> 20)
        .set("new_peak_rss_mb", new_rss >> 20)
        .set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB)
        .set("upgrades", opts.upgrades);
    if matches!(mode, Mode::Precopy) {
        let (p50, max) = if mb >= 1000 {
            (50.0, 100.0)
        } else {
            (20.0, f64::MAX)
        };
        row.target("accept_gap_ms_p50", Target::Le(p50));
        if max < f64::MAX {
            row.target("accept_gap_ms_max", Target::Le(max));
        }
    }
    row.note("kv_p99_ms: SET latency of the 8 writers over the whole run, upgrades included");
    Ok(row)
}

/// What one writer saw: latencies (ms), the acknowledged `n`, connect failures.
type Written = (Vec<f64>, Vec<u64>, u64);

/// Eight writers, one connection each, `SET w{i}:{n} n` one at a time.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Written>>,
}

impl Writers {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WRITERS)
            .map(|w| {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let (mut lat, mut acked, mut errors) = (Vec::new(), Vec::new(), 0u64);
                    let mut conn = None;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if conn.is_none() {
                            conn = RespClient::connect(addr).await.ok();
                        }
                        let Some(c) = conn.as_mut() else {
                            errors += 1;
                            continue;
                        };
                        let (key, value) = (format!("w{w}:{n}"), n.to_string());
                        let t = Instant::now();
                        match c.command(&["SET", &key, &value]).await {
                            Ok(r) if r.is_ok() => {
                                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                                acked.push(n);
                                n += 1;
                            }
                            // Closed at a command boundary: reconnect and send it again.
                            _ => conn = None,
                        }
                    }
                    (lat, acked, errors)
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    async fn stop(self) -> (Vec<f64>, Vec<Vec<u64>>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut lat, mut acked, mut errors) = (Vec::new(), Vec::new(), 0);
        for t in self.tasks {
            let (l, a, e) = t.await.unwrap_or_default();
            lat.extend(l);
            acked.push(a);
            errors += e;
        }
        (lat, acked, errors)
    }
}

/// Acknowledged writes missing from the keyspace.
async fn verify(addr: SocketAddr, acked: &[Vec<u64>]) -> anyhow::Result<u64> {
    let mut c = RespClient::connect(addr).await?;
    let mut lost = 0;
    for (w, ns) in acked.iter().enumerate() {
        for chunk in ns.chunks(500) {
            let mut args = vec!["MGET".to_owned()];
            args.extend(chunk.iter().map(|n| format!("w{w}:{n}")));
            let Reply::Array(Some(values)) = c.command(&args).await? else {
                bail!("MGET failed");
            };
            for (n, v) in chunk.iter().zip(values) {
                if v.as_bytes() != Some(n.to_string().as_bytes()) {
                    lost += 1;
                }
            }
        }
    }
    Ok(lost)
}
