//! Issue 28: a stateful axum app (examples/axum-counter) under the real baton. With
//! `hyper::Server::state`, 16 clients (keep-alive and fresh) go through 10 upgrades, one
//! of them aborted by a candidate that crashes after its restore: no request fails, no
//! keep-alive client reconnects, and the final counter is exactly the number of
//! increments acknowledged. The obvious code without it (`--naive`: the stateless
//! `serve` plus a task that answers the quiesce) loses increments.

use std::net::SocketAddr;
use std::time::Duration;

use baton_tests::harness::{Baton, TestDir, UpgradeOutcome, bin, exclusive};
use baton_tests::load::{LoadGen, LoadOpts, LoadReport};

const UPGRADES: usize = 10;
/// The upgrade whose candidate crashes after its restore (so it is aborted).
const CRASHING: usize = 5;
const WAIT: Duration = Duration::from_secs(20);

/// Runs the counter through the upgrades under load; returns the load's report and the
/// final count.
async fn run(tag: &str, naive: bool) -> (LoadReport, u64) {
    let dir = TestDir::new(tag).unwrap();
    let crash = dir.join("crash");
    let crash_arg = crash.display().to_string();
    let app = bin("axum-counter").unwrap();
    let mut program = vec![
        app.display().to_string(),
        "--crash-if-exists".into(),
        crash_arg,
    ];
    if naive {
        program.push("--naive".into());
    }
    let baton = Baton::start_in(
        dir,
        [
            "--state",
            "--listen",
            "http=127.0.0.1:0",
            "--drain-timeout",
            "20s",
        ],
        program,
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let load = LoadGen::start(
        addr,
        LoadOpts {
            keepalive: 8,
            fresh: 8,
            path: "/incr".into(),
            ..LoadOpts::default()
        },
    );
    load.wait_until(WAIT, |s| s.ok >= 500)
        .await
        .unwrap_or_else(|s| panic!("{tag}: no increments before the first upgrade: {s:?}"));
    for i in 1..=UPGRADES {
        if i == CRASHING {
            std::fs::write(&crash, b"").unwrap();
        }
        let outcome = baton.upgrade_wait().await.unwrap();
        match (i == CRASHING, &outcome) {
            (false, UpgradeOutcome::Promoted(_)) | (true, UpgradeOutcome::RolledBack { .. }) => {}
            _ => panic!("{tag}: upgrade {i}: {outcome:?}\n{}", baton.log()),
        }
        // Load runs between upgrades: every generation serves.
        let before = load.snapshot().ok;
        load.wait_until(WAIT, |s| s.ok >= before + 1000)
            .await
            .unwrap_or_else(|s| panic!("{tag}: no progress after upgrade {i}: {s:?}"));
    }
    let report = load.stop().await;
    (report, count(addr).await)
}

async fn count(addr: SocketAddr) -> u64 {
    let reply = tokio::task::spawn_blocking(move || {
        baton_tests::http::get(addr, "/count", Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body.trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_axum_counter_loses_no_increment_through_ten_upgrades() {
    let _serial = exclusive().await;
    let (report, count) = run("axum-counter", false).await;
    assert_eq!(report.failed, 0, "{report}");
    assert!(
        report.keepalive_reconnects.iter().all(|&n| n == 0),
        "keep-alive clients reconnected: {:?}",
        report.keepalive_reconnects
    );
    assert_eq!(
        count, report.ok,
        "{} increments acknowledged, the counter says {count}",
        report.ok
    );
    eprintln!(
        "{} increments through {UPGRADES} upgrades, none lost: {report}",
        report.ok
    );
}

/// The naive variant is kept as a fixture: it proves the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_naive_stateful_axum_counter_loses_increments() {
    let _serial = exclusive().await;
    let (report, count) = run("axum-counter-naive", true).await;
    assert!(
        count < report.ok,
        "the naive variant lost nothing this time ({count} of {} acknowledged)",
        report.ok
    );
    eprintln!(
        "naive: {} increments acknowledged, {} lost",
        report.ok,
        report.ok - count
    );
}
