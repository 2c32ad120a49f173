//! `stateful`: kv-server holding S MB under `baton run --state`; the accept gap of a
//! two-phase upgrade with the one-shot snapshot (kv-server `--no-precopy`) against a plain
//! in-process serialise + parse of the same state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_protocol::{UpgradeReport, UpgradeResult};
use baton_tests::harness::Baton;
use baton_tests::resp::{Reply, RespClient};
use serde::{Deserialize, Serialize};

use crate::Bins;
use crate::common::{Control, shutdown, with_log};
use crate::report::{RSS_TARGET_KB, Row, Target, median};

/// Shape of the run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// State sizes in MiB; one row each.
    pub sizes_mb: Vec<u64>,
    /// Stateful upgrades per size.
    pub upgrades: usize,
}

const SCENARIO: &str = "stateful";
/// Key and value bytes per entry: a 16-byte key and a 1008-byte value, so S MiB of state
/// is S * 1024 entries.
const KEY_LEN: usize = 16;
const ENTRY_BYTES: usize = 1024;
const VALUE_LEN: usize = ENTRY_BYTES - KEY_LEN;
/// SETs per pipelined batch while filling.
const FILL_BATCH: usize = 512;
/// Keys read back after each upgrade, spread over the keyspace.
const SAMPLES: u64 = 200;

/// Runs the scenario: one row per state size.
pub async fn run(bins: &Bins, opts: &Opts) -> Vec<Row> {
    let mut rows = Vec::new();
    for &mb in &opts.sizes_mb {
        let row = match run_size(bins, opts, mb).await {
            Ok(row) => row,
            Err(e) => {
                let mut row = Row::error(SCENARIO, &e);
                row.set("state_mb", mb);
                row
            }
        };
        let skipped = row.is_skipped();
        rows.push(row);
        if skipped {
            // The reason (the app or baton cannot do it) holds for every size.
            for &rest in opts.sizes_mb.iter().skip_while(|m| **m != mb).skip(1) {
                let mut r = rows[rows.len() - 1].clone();
                r.set("state_mb", rest);
                rows.push(r);
            }
            break;
        }
    }
    rows
}

async fn run_size(bins: &Bins, opts: &Opts, mb: u64) -> anyhow::Result<Row> {
    let baton = Baton::start(
        [
            "--state",
            "--listen",
            "kv=127.0.0.1:0",
            "--ready-timeout",
            "600s",
            "--snapshot-timeout",
            "600s",
            "--restore-timeout",
            "600s",
            "--drain-timeout",
            "30s",
        ],
        // The one-shot snapshot this scenario compares with serde in-process; the
        // `precopy` scenario measures the other paths.
        [bins.kv.as_os_str(), std::ffi::OsStr::new("--no-precopy")],
    )
    .await?;
    let control = Control::new(baton.control());
    let measured = measure(&baton, &control, opts, mb)
        .await
        .map_err(|e| with_log(&baton, e))?;
    // Free kv-server's memory before the in-process baseline builds the same state.
    shutdown(baton).await?;
    let (mut row, entries) = match measured {
        Measured::Done(row, entries) => (row, entries),
        Measured::Skipped(row) => return Ok(row),
    };
    let serde = serde_baseline(entries, if mb <= 100 { 3 } else { 1 })?;
    let serde_ms = serde.total_ms;
    let gap = row.get_f64("accept_gap_ms_max").unwrap_or(0.0);
    row.set_ms("serde_ms", serde_ms)
        .set_ms("serde_serialise_ms", serde.serialise_ms)
        .set_ms("serde_parse_ms", serde.parse_ms)
        .set(
            "serde_ms_runs",
            serde
                .runs_ms
                .iter()
                .map(|ms| serde_json::Value::from(crate::report::round3(*ms)))
                .collect::<Vec<_>>(),
        );
    let ratio = |gap: f64| {
        let r = if serde_ms > 0.0 { gap / serde_ms } else { 0.0 };
        (r * 1000.0).round() / 1000.0
    };
    let gap_p50 = row.get_f64("accept_gap_ms_p50").unwrap_or(0.0);
    row.set("transport_overhead_ratio", ratio(gap))
        .target("transport_overhead_ratio", Target::Le(1.3))
        // The target holds the worst upgrade; the typical one is worth knowing too.
        .set("transport_overhead_ratio_p50", ratio(gap_p50));
    Ok(row)
}

enum Measured {
    Done(Row, u64),
    Skipped(Row),
}

async fn measure(
    baton: &Baton,
    control: &Control,
    opts: &Opts,
    mb: u64,
) -> anyhow::Result<Measured> {
    let addr = baton.tcp_addr("kv").await?;
    let mut rss_kb = control.status().await?.rss_kb;

    // Does a --state upgrade carry state at all with the binaries at hand?
    let mut client = RespClient::connect(addr).await?;
    let probe = client
        .command(&["SET", "baton-bench:probe", "kept"])
        .await?;
    if !probe.is_ok() {
        bail!("SET probe: {probe}");
    }
    drop(client);
    let (report, _) = control.upgrade().await?;
    if report.result != UpgradeResult::Promoted {
        bail!("probe upgrade rolled back: {:?}", report.reason);
    }
    let mut client = RespClient::connect(addr).await?;
    let got = client.command(&["GET", "baton-bench:probe"]).await?;
    if got.as_bytes() != Some(b"kept".as_slice()) {
        return Ok(Measured::Skipped(skipped(
            mb,
            format!(
                "kv-server did not keep its state across a `baton run --state` upgrade \
                 (SET k, upgrade, GET k returned {got}); stateful hand-over is not wired yet"
            ),
        )));
    }
    if report.accept_gap_ms.is_none() {
        return Ok(Measured::Skipped(skipped(
            mb,
            "the upgrade report has no accept_gap_ms: baton did not run a two-phase upgrade",
        )));
    }
    client.command(&["DEL", "baton-bench:probe"]).await?;

    let keys = (mb as usize * 1024 * 1024 / ENTRY_BYTES) as u64;
    let filled_in = fill(&mut client, keys).await?;
    tracing::info!(
        mb,
        keys,
        secs = filled_in.as_secs_f64(),
        "stateful: state loaded"
    );
    drop(client);

    let mut gaps = Vec::new();
    let mut snapshots = Vec::new();
    let mut restores = Vec::new();
    let mut bytes = 0;
    let mut stall_ms: f64 = 0.0;
    let mut client_failed = 0;
    for i in 1..=opts.upgrades {
        let probe = Prober::start(addr);
        let upgrade = control.upgrade().await;
        let (stall, failed) = probe.stop().await;
        let (report, _) = upgrade?;
        stall_ms = stall_ms.max(stall);
        client_failed += failed;
        let report = promoted(report, i)?;
        gaps.push(report.accept_gap_ms.unwrap_or(0.0));
        snapshots.push(report.snapshot_ms.unwrap_or(0.0));
        restores.push(report.restore_ms.unwrap_or(0.0));
        bytes = report.snapshot_bytes.unwrap_or(0);
        verify(addr, keys)
            .await
            .with_context(|| format!("after upgrade {i}"))?;
        let status = control.wait_settled(Duration::from_secs(60)).await?;
        rss_kb = rss_kb.max(status.rss_kb);
        tracing::info!(
            mb,
            upgrade = i,
            accept_gap_ms = report.accept_gap_ms,
            snapshot_ms = report.snapshot_ms,
            restore_ms = report.restore_ms,
            duration_ms = report.duration_ms,
            "stateful upgrade verified"
        );
    }

    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let mut row = Row::new(SCENARIO);
    row.set("state_mb", mb)
        .set_ms("accept_gap_ms_max", max(&gaps))
        .set_ms("snapshot_ms", median(&snapshots))
        .set_ms("restore_ms", median(&restores))
        // Filled in by the caller once baton is gone (placeholders keep the key order).
        .set("serde_ms", serde_json::Value::Null)
        .set("transport_overhead_ratio", serde_json::Value::Null)
        .set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB)
        .set("snapshot_bytes", bytes)
        .set("upgrades", opts.upgrades)
        .set_ms("client_stall_ms_max", stall_ms)
        .set("client_failed", client_failed)
        .target("client_failed", Target::Eq(0.0))
        .set("keys", keys)
        .set_ms("accept_gap_ms_p50", median(&gaps))
        .set(
            "accept_gap_ms_runs",
            gaps.iter()
                .map(|g| serde_json::Value::from(crate::report::round3(*g)))
                .collect::<Vec<_>>(),
        )
        .note("snapshot_ms / restore_ms: medians; serde_ms: serialise + parse + rebuild the map in-process")
        .note("client_stall_ms_max: slowest connect+PING of a client probing on new connections during the upgrades");
    Ok(Measured::Done(row, keys))
}

fn skipped(mb: u64, reason: impl Into<String>) -> Row {
    let mut row = Row::skipped(SCENARIO, reason);
    row.set("state_mb", mb);
    row
}

fn promoted(report: UpgradeReport, i: usize) -> anyhow::Result<UpgradeReport> {
    if report.result != UpgradeResult::Promoted {
        bail!("upgrade {i} rolled back: {:?}", report.reason);
    }
    if report.accept_gap_ms.is_none() {
        bail!("upgrade {i}: no accept_gap_ms in {report:?}");
    }
    Ok(report)
}

fn key(i: u64) -> Vec<u8> {
    format!("k:{i:014}").into_bytes()
}

/// A value that is not an integer (so it is stored and snapshotted as a string), unique
/// per key, printable ASCII without JSON escapes.
fn value(i: u64) -> Vec<u8> {
    let mut v = format!("v{i:014}:").into_bytes();
    let filler = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let start = (i % filler.len() as u64) as usize;
    while v.len() < VALUE_LEN {
        let at = (start + v.len()) % filler.len();
        v.push(filler[at]);
    }
    v
}

async fn fill(
    client: &mut RespClient<tokio::net::TcpStream>,
    keys: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut i = 0;
    while i < keys {
        let end = (i + FILL_BATCH as u64).min(keys);
        let batch: Vec<Vec<Vec<u8>>> = (i..end)
            .map(|n| vec![b"SET".to_vec(), key(n), value(n)])
            .collect();
        for (n, reply) in client.pipeline(&batch).await?.into_iter().enumerate() {
            if !reply.is_ok() {
                bail!("SET key {}: {reply}", i + n as u64);
            }
        }
        i = end;
    }
    Ok(started.elapsed())
}

/// Every key is there (DBSIZE) and a spread of them have exactly their value.
async fn verify(addr: SocketAddr, keys: u64) -> anyhow::Result<()> {
    let mut client = RespClient::connect(addr).await?;
    let size = client.command(&["DBSIZE"]).await?;
    if size != Reply::Integer(keys as i64) {
        bail!("DBSIZE is {size}, expected {keys}: state was lost");
    }
    let step = (keys / SAMPLES).max(1);
    let mut n = 0;
    while n < keys {
        let got = client.command(&[b"GET".to_vec(), key(n)]).await?;
        if got.as_bytes() != Some(value(n).as_slice()) {
            bail!(
                "GET {} returned {got}: state was corrupted",
                String::from_utf8_lossy(&key(n))
            );
        }
        n += step;
    }
    Ok(())
}

/// A client that keeps opening new connections and sending PING during an upgrade: the
/// accept gap as a client sees it (a connection waiting in the backlog), and any refusal.
struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(f64, u64)>,
}

impl Prober {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut worst: f64 = 0.0;
            let mut failed = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let attempt = tokio::time::timeout(Duration::from_secs(60), async {
                    let mut c = RespClient::connect(addr).await?;
                    c.command(&["PING"]).await
                })
                .await;
                worst = worst.max(started.elapsed().as_secs_f64() * 1000.0);
                match attempt {
                    Ok(Ok(Reply::Simple(s))) if s == "PONG" => {}
                    _ => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (worst, failed)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (f64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or((f64::NAN, 1))
    }
}

/// Schema-2 snapshot shape of kv-server (`examples/kv-server/src/state.rs`), copied so
/// that the baseline serialises and parses exactly what the app does.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    version: u32,
    state: StateOut<'a>,
}

#[derive(Serialize)]
struct StateOut<'a> {
    entries: Vec<EntryOut<'a>>,
    stats: Stats,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    k: &'a str,
    kind: &'static str,
    v: &'a str,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    #[allow(dead_code)]
    version: u32,
    state: StateIn,
}

#[derive(Deserialize)]
struct StateIn {
    entries: Vec<EntryIn>,
    #[allow(dead_code)]
    stats: Stats,
}

#[derive(Deserialize)]
struct EntryIn {
    k: String,
    #[allow(dead_code)]
    kind: String,
    // kv-server parses values as a JSON value first (an entry may hold an int).
    v: serde_json::Value,
}

#[derive(Serialize, Deserialize, Default)]
struct Stats {
    commands_processed: u64,
    keyspace_hits: u64,
    keyspace_misses: u64,
}

/// The in-process baseline, medians over its runs.
struct Baseline {
    /// Serialise + parse + rebuild.
    total_ms: f64,
    /// Map to JSON bytes.
    serialise_ms: f64,
    /// JSON bytes to a rebuilt map.
    parse_ms: f64,
    /// Every run's total, in order: the first one runs on memory the allocator has not
    /// used yet, as a freshly started candidate does.
    runs_ms: Vec<f64>,
}

/// Serialise + parse + rebuild of the same keyspace in this process (median of `runs`):
/// the floor any state transfer is compared with.
fn serde_baseline(keys: u64, runs: usize) -> anyhow::Result<Baseline> {
    let mut db: HashMap<Vec<u8>, Vec<u8>> = HashMap::with_capacity(keys as usize);
    for i in 0..keys {
        db.insert(key(i), value(i));
    }
    let mut totals = Vec::with_capacity(runs);
    let mut sers = Vec::with_capacity(runs);
    let mut des = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let entries = db
            .iter()
            .map(|(k, v)| {
                Ok(EntryOut {
                    k: std::str::from_utf8(k)?,
                    kind: "str",
                    v: std::str::from_utf8(v)?,
                })
            })
            .collect::<Result<Vec<_>, std::str::Utf8Error>>()?;
        let json = serde_json::to_vec(&EnvelopeOut {
            version: 2,
            state: StateOut {
                entries,
                stats: Stats::default(),
            },
        })?;
        let serialised = started.elapsed();
        let parsed: EnvelopeIn = serde_json::from_slice(&json)?;
        let mut restored: HashMap<Vec<u8>, Vec<u8>> =
            HashMap::with_capacity(parsed.state.entries.len());
        for e in parsed.state.entries {
            let serde_json::Value::String(v) = e.v else {
                bail!("baseline: non-string value");
            };
            restored.insert(e.k.into_bytes(), v.into_bytes());
        }
        let elapsed = started.elapsed();
        if restored.len() != db.len() {
            bail!(
                "baseline: {} of {} entries came back",
                restored.len(),
                db.len()
            );
        }
        totals.push(elapsed.as_secs_f64() * 1000.0);
        sers.push(serialised.as_secs_f64() * 1000.0);
        des.push((elapsed - serialised).as_secs_f64() * 1000.0);
        drop(restored);
        drop(json);
    }
    Ok(Baseline {
        runs_ms: totals.clone(),
        total_ms: median(&totals),
        serialise_ms: median(&sers),
        parse_ms: median(&des),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_have_the_documented_size_and_are_not_integers() {
        assert_eq!(key(7).len(), KEY_LEN);
        assert_eq!(value(7).len(), VALUE_LEN);
        assert_ne!(value(7), value(8));
        assert!(
            std::str::from_utf8(&value(3))
                .unwrap()
                .parse::<i64>()
                .is_err()
        );
    }
}
