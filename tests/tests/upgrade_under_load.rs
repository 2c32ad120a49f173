//! Issue 2, test 1: stateless upgrades of hello-http under continuous load lose nothing.

use std::time::Duration;

use baton_protocol::{Phase, UpgradeResult};
use baton_tests::harness::{
    Baton, UpgradeOutcome, exclusive, generation_pids, hello_http_bin, proc_rss_kb, wait_pid_gone,
};
use baton_tests::load::{LoadGen, LoadOpts};

const UPGRADES: usize = 20;
/// baton must stay small: it is not in the data path and keeps no per-request state.
const MAX_RSS_KB: u64 = 10 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_upgrades_under_load_fail_no_request() {
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "20s"],
        [&hello],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let first = baton.status().await.unwrap();
    let mut pid = first.pid.unwrap();
    let mut generation = first.generation;
    let mut all_pids = vec![pid];

    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&pid))
        .await
        .unwrap_or_else(|s| panic!("generation 1 (pid {pid}) never answered: {s:?}"));

    for i in 1..=UPGRADES {
        let report = match baton.upgrade_wait().await.unwrap() {
            UpgradeOutcome::Promoted(r) => r,
            UpgradeOutcome::RolledBack { message } => {
                panic!(
                    "upgrade {i} rolled back: {message}; load so far: {:?}",
                    load.snapshot()
                )
            }
        };
        assert_eq!(
            report.result,
            UpgradeResult::Promoted,
            "upgrade {i}: {report:?}"
        );
        let status = baton.status().await.unwrap();
        let new_pid = status.pid.expect("an active pid after promotion");
        assert_ne!(new_pid, pid, "upgrade {i} did not change the active pid");
        assert!(!all_pids.contains(&new_pid), "pid {new_pid} reused");
        assert_eq!(report.pid, Some(new_pid), "upgrade {i}: report vs status");
        assert!(
            status.generation > generation,
            "upgrade {i}: generation did not grow"
        );
        assert!(
            status
                .generations
                .iter()
                .any(|g| g.pid == new_pid && g.phase == Phase::Active),
            "upgrade {i}: {status:?}"
        );
        // The new generation really serves: its pid shows up in response bodies.
        load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&new_pid))
            .await
            .unwrap_or_else(|s| panic!("upgrade {i}: new pid {new_pid} never answered: {s:?}"));
        // Keep the load on the new generation (while the old one drains) for a while
        // before the next upgrade, so that every upgrade overlaps real traffic.
        let snap = load.snapshot();
        assert_eq!(
            snap.failed, 0,
            "upgrade {i}: failures so far: {}",
            snap.failures
        );
        load.wait_until(Duration::from_secs(10), |s| s.ok >= snap.ok + 500)
            .await
            .unwrap_or_else(|s| panic!("upgrade {i}: load stalled: {s:?}"));
        pid = new_pid;
        generation = status.generation;
        all_pids.push(new_pid);
    }

    // Every old generation drains and exits on its own (well before the drain deadline).
    let settled = baton.wait_settled(Duration::from_secs(30)).await.unwrap();
    assert_eq!(generation_pids(&settled), vec![pid]);
    for old in &all_pids[..all_pids.len() - 1] {
        wait_pid_gone(*old, Duration::from_secs(5)).await.unwrap();
    }

    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    assert!(report.ok > 0);
    // Every generation served, and nobody else did.
    let mut expected = all_pids.clone();
    expected.sort_unstable();
    assert_eq!(report.pids, expected, "{report}");
    assert_eq!(report.pid_counts.values().sum::<u64>(), report.ok);

    let status = baton.status().await.unwrap();
    assert_eq!(status.crashes, 0);
    let rss = proc_rss_kb(baton.pid()).unwrap();
    println!(
        "baton RSS: status {} KiB, /proc VmRSS {rss} KiB",
        status.rss_kb
    );
    assert!(
        status.rss_kb < MAX_RSS_KB && rss < MAX_RSS_KB,
        "baton RSS after {UPGRADES} upgrades: status {} KiB, /proc {} KiB (limit {MAX_RSS_KB})",
        status.rss_kb,
        rss
    );
}
