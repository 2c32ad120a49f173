//! Issue 13: pre-copy state hand-over of kv-server under `baton run --state`, end to end.
//!
//! Both generations announce `precopy`, so baton streams the keyspace while the old one
//! serves, then sends the deltas, and quiesces it only for the last one. The writers from
//! `baton_tests::kv` check every acknowledged write and every INCR across the upgrades; the
//! one-shot path (a build started with `--no-precopy`) is measured in the same run.

use std::net::SocketAddr;
use std::time::Duration;

use baton_protocol::UpgradeReport;
use baton_tests::harness::{exclusive, proc_rss_kb};
use baton_tests::kv::{
    self, Writers, assert_clean, command, connect, reason, serving_pid, totals, upgrade_promoted,
    upgrade_rolled_back, verify_writes,
};
use baton_tests::resp::Reply;

const SCRIPTS: &[(&str, &str)] = &[
    ("kv2", "--schema 2"),
    ("kv2-one-shot", "--schema 2 --no-precopy"),
    ("kv2-crash", "--schema 2 --fault crash-during-restore"),
    ("kv2-fail-delta", "--schema 2 --fault fail-delta-round"),
    ("kv2-die", "--schema 2 --fault die-during-precopy"),
    ("kv2-slow", "--schema 2 --fault slow-precopy"),
];
const WRITERS: usize = 8;
const STEPS_BETWEEN: u64 = 50;
/// baton relays chunk fds and never maps them.
const MAX_BATON_RSS_KB: u64 = 20 * 1024;

/// `DEBUG POPULATE count big size`, checked.
async fn populate(addr: SocketAddr, count: u64, size: u64) {
    let mut c = connect(addr).await;
    let (n, s) = (count.to_string(), size.to_string());
    let reply = command(&mut c, &["DEBUG", "POPULATE", &n, "big", &s]).await;
    assert_eq!(reply, Reply::Simple("OK".into()), "DEBUG POPULATE");
}

/// Every populated key is still there with its value (spot checks across the range).
async fn check_populated(addr: SocketAddr, count: u64, size: usize, what: &str) {
    let mut c = connect(addr).await;
    for i in (0..count).step_by((count / 97).max(1) as usize) {
        let key = format!("big:{i}");
        let got = command(&mut c, &["GET", &key]).await;
        let mut want = format!("value:{i}").into_bytes();
        want.resize(size, 0);
        assert_eq!(got.as_bytes(), Some(&want[..]), "{what}: {key}");
    }
}

fn gap(r: &UpgradeReport) -> f64 {
    r.accept_gap_ms
        .unwrap_or_else(|| panic!("no accept gap in {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_upgrades_of_a_256mb_state_lose_nothing_and_pause_less_than_one_shot() {
    let _x = exclusive().await;
    let (baton, app, addr) = kv::start("precopy-256", SCRIPTS, "kv2", &[]).await;
    const KEYS: u64 = 256 * 1024;
    const SIZE: u64 = 1000;
    populate(addr, KEYS, SIZE).await;
    let mut writers = Writers::start(addr, WRITERS);
    writers
        .wait_progress(STEPS_BETWEEN, "before the first upgrade")
        .await;

    // One-shot twice (out of and into a build without pre-copy), then five pre-copies.
    let mut one_shot = Vec::new();
    for target in ["kv2-one-shot", "kv2"] {
        app.select(target);
        let r = upgrade_promoted(&baton, target).await;
        assert_eq!(r.precopy_rounds, None, "{target}: {r:?}");
        one_shot.push(gap(&r));
        writers.wait_progress(STEPS_BETWEEN, target).await;
    }
    let mut precopy = Vec::new();
    for i in 1..=5 {
        let what = format!("pre-copy upgrade {i}");
        let r = upgrade_promoted(&baton, &what).await;
        let rounds = r.precopy_rounds.unwrap_or_else(|| panic!("{what}: {r:?}"));
        assert!(rounds >= 1, "{what}: {r:?}");
        let sent = r.precopy_bytes.unwrap_or(0);
        assert!(
            sent >= KEYS * SIZE,
            "{what}: only {sent} bytes while serving"
        );
        let last = r.final_delta_bytes.unwrap_or(u64::MAX);
        assert!(
            last < sent / 10,
            "{what}: last round {last} of {sent} bytes"
        );
        assert!(r.precopy_stop.is_some(), "{what}: {r:?}");
        assert!(
            r.old_peak_rss_bytes.is_some() && r.new_peak_rss_bytes.is_some(),
            "{what}: {r:?}"
        );
        precopy.push(gap(&r));
        writers.wait_progress(STEPS_BETWEEN, &what).await;
    }
    let logs = writers.stop().await;
    assert_clean(&logs, "pre-copy");
    let reconnects: u64 = logs.iter().map(|l| l.reconnects).sum();
    assert_eq!(
        reconnects,
        0,
        "live connections must be handed over: {}",
        totals(&logs)
    );
    verify_writes(addr, &logs, KEYS, "pre-copy").await;
    check_populated(addr, KEYS, SIZE as usize, "pre-copy").await;

    let worst = precopy.iter().copied().fold(0.0, f64::max);
    let best_one_shot = one_shot.iter().copied().fold(f64::MAX, f64::min);
    assert!(
        worst < best_one_shot,
        "pre-copy gaps {precopy:?} ms, one-shot gaps {one_shot:?} ms"
    );
    // The figures are in the history and the rounds in the event stream too.
    let out = baton
        .cli(&["history", "--json", "-n", "5"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let history: Vec<baton_protocol::HistoryEntry> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(history.len(), 5);
    assert!(
        history.iter().all(|e| e.report.precopy_rounds.is_some()
            && e.report.final_delta_bytes.is_some()
            && e.report.new_peak_rss_bytes.is_some()),
        "{history:#?}"
    );
    let out = baton
        .cli(&["events", "--json"], Duration::from_secs(10))
        .await
        .unwrap();
    let rounds = out
        .stdout
        .lines()
        .filter(|l| l.contains(r#""event":"precopy""#))
        .count();
    assert!(rounds >= 5 * 2, "{rounds} pre-copy round events");
    // Text output gives sizes as people read them; --json (above) keeps exact counts.
    let text = baton
        .cli(&["status"], Duration::from_secs(10))
        .await
        .unwrap();
    let precopy_line = text
        .stdout
        .lines()
        .find(|l| l.contains("pre-copy:"))
        .unwrap_or_else(|| panic!("no pre-copy line: {text:?}"));
    assert!(
        precopy_line.contains(" MiB while serving") && !precopy_line.contains("bytes"),
        "{precopy_line}"
    );
    let rss = proc_rss_kb(baton.pid()).unwrap();
    assert!(rss <= MAX_BATON_RSS_KB, "baton RSS {rss} KiB");
    eprintln!(
        "accept gaps: one-shot {one_shot:?} ms, pre-copy {precopy:?} ms; baton RSS {rss} KiB"
    );
}

/// Upgrades out of `initial` into `candidate` with writers running; the upgrade must roll
/// back with `want` in its reason, nothing may be lost, and the next upgrade must work.
async fn abort_case(tag: &str, initial: &str, candidate: &str, want: &str) {
    abort_case_with(false, tag, initial, candidate, want).await;
}

/// [`abort_case`], under a CPU hog when `hog`.
async fn abort_case_with(hog: bool, tag: &str, initial: &str, candidate: &str, want: &str) {
    let _x = exclusive().await;
    let _hog = hog.then(|| baton_tests::hog::CpuHog::per_core().unwrap());
    let (baton, app, addr) = kv::start(tag, SCRIPTS, initial, &["--snapshot-timeout", "5s"]).await;
    const KEYS: u64 = 20_000;
    populate(addr, KEYS, 1000).await;
    let mut writers = Writers::start(addr, 4);
    writers.wait_progress(STEPS_BETWEEN, tag).await;
    app.select(candidate);
    let (r, _) = upgrade_rolled_back(&baton, tag).await;
    assert!(reason(&r).contains(want), "{tag}: {r:?}");
    writers
        .wait_progress(STEPS_BETWEEN, "after the abort")
        .await;
    app.select("kv2");
    let r = upgrade_promoted(&baton, "the next upgrade").await;
    assert!(r.precopy_rounds.is_some(), "{tag}: {r:?}");
    writers
        .wait_progress(STEPS_BETWEEN, "after the next upgrade")
        .await;
    let logs = writers.stop().await;
    assert_clean(&logs, tag);
    verify_writes(addr, &logs, KEYS, tag).await;
    check_populated(addr, KEYS, 1000, tag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_candidate_crashes_mid_precopy() {
    candidate_crashes_mid_precopy(false).await;
}

/// The same, with every core contended by a CPU hog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_candidate_crashes_mid_precopy_under_a_cpu_hog() {
    candidate_crashes_mid_precopy(true).await;
}

async fn candidate_crashes_mid_precopy(hog: bool) {
    abort_case_with(hog, "precopy-crash", "kv2", "kv2-crash", "candidate exited").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_a_delta_round_fails() {
    abort_case(
        "precopy-fail-delta",
        "kv2-fail-delta",
        "kv2",
        "failed pre-copy round 1",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_generation_dying_mid_precopy_is_a_crash_and_the_candidate_is_aborted() {
    let _x = exclusive().await;
    let (baton, app, addr) = kv::start("precopy-die", SCRIPTS, "kv2-die", &[]).await;
    populate(addr, 20_000, 1000).await;
    let old = serving_pid(addr).await;
    app.select("kv2");
    let outcome = baton.upgrade_wait().await.unwrap();
    let message = format!("{outcome:?}");
    assert!(message.contains("STATE LOST"), "{message}");
    // Replaced as after any crash: a new generation serves, empty, and says why.
    let status = baton.wait_settled(kv::WAIT).await.unwrap();
    let new = status.pid.expect("a replacement generation");
    assert_ne!(new, old);
    assert_eq!(serving_pid(addr).await, new);
    let mut c = connect(addr).await;
    assert_eq!(command(&mut c, &["DBSIZE"]).await, Reply::Integer(0));
    assert_eq!(
        command(&mut c, &["SET", "k", "v"]).await,
        Reply::Simple("OK".into())
    );
    drop(c);
    let r = upgrade_promoted(&baton, "the next upgrade").await;
    assert!(r.precopy_rounds.is_some(), "{r:?}");
    let mut c = connect(addr).await;
    assert_eq!(
        command(&mut c, &["GET", "k"]).await.as_bytes(),
        Some(&b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_faster_than_the_deltas_fall_back_to_stop_and_copy_with_the_reason() {
    let _x = exclusive().await;
    let (baton, app, addr) = kv::start("precopy-slow", SCRIPTS, "kv2-slow", &[]).await;
    // A hot set rewritten whole by each MSET: every delta round (150 ms a chunk in this
    // build) finds all of it dirty again, so the deltas never shrink.
    const HOT: usize = 600;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut c = connect(addr).await;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let value = format!("{n:04000}");
                let mut args = vec!["MSET".to_owned()];
                for k in 0..HOT {
                    args.push(format!("hot:{k}"));
                    args.push(value.clone());
                }
                let reply = command(&mut c, &args).await;
                assert_eq!(reply, Reply::Simple("OK".into()), "MSET {n}");
            }
            n
        }
    });
    let mut writers = Writers::start(addr, 2);
    writers.wait_progress(STEPS_BETWEEN, "hot").await;
    app.select("kv2");
    let r = upgrade_promoted(&baton, "hot writes").await;
    let why = r.precopy_stop.clone().unwrap_or_default();
    assert!(why.starts_with("not converging"), "{r:?}");
    let status = baton.status().await.unwrap();
    let shown = status
        .last_upgrade
        .and_then(|u| u.precopy_stop)
        .unwrap_or_default();
    assert_eq!(shown, why, "the reason is in status");
    writers.wait_progress(STEPS_BETWEEN, "after").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = tokio::time::timeout(Duration::from_secs(30), hammer)
        .await
        .expect("the MSET writer stops")
        .expect("the MSET writer never failed");
    let logs = writers.stop().await;
    assert_clean(&logs, "hot");
    verify_writes(addr, &logs, HOT as u64, "hot").await;
    let mut c = connect(addr).await;
    let want = format!("{last:04000}");
    for k in [0, HOT / 2, HOT - 1] {
        let got = command(&mut c, &["GET", &format!("hot:{k}")]).await;
        assert_eq!(got.as_bytes(), Some(want.as_bytes()), "hot:{k}");
    }
}
