//! examples/axum-hello under the real baton: an axum `Router` served with
//! `baton_child::hyper::serve`. Its keep-alive clients keep their TCP connections through
//! upgrades, and the new generation answers on them.

use std::time::Duration;

use baton_tests::harness::{Baton, bin, exclusive};
use baton_tests::load::{LoadGen, LoadOpts};
use baton_tests::upgrade::{migrated_into, upgrade_promoted, wait_migrated, wait_replaced};

const UPGRADES: usize = 10;
const KEEPALIVE: usize = 8;
/// Bound on each wait; a drain never has to run out: every connection is handed over.
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_keepalive_clients_keep_their_connections_through_ten_upgrades() {
    let _serial = exclusive().await;
    let app = bin("axum-hello").unwrap();
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "60s"],
        [&app],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();

    let load = LoadGen::start(
        addr,
        LoadOpts {
            keepalive: KEEPALIVE,
            fresh: 0,
            ..LoadOpts::default()
        },
    );
    load.wait_until(WAIT, |s| s.pids.contains(&pid) && s.ok >= 200)
        .await
        .unwrap_or_else(|s| panic!("generation 1 (pid {pid}) never served: {s:?}"));

    for i in 1..=UPGRADES {
        let what = format!("upgrade {i}");
        let (report, _) = upgrade_promoted(&baton, &what).await;
        let new_pid = report.pid.unwrap();
        assert_ne!(new_pid, pid, "{what}");
        // Every connection moves, exactly once, and the old generation is left with none.
        wait_migrated(&baton, report.generation, KEEPALIVE as u64, WAIT, &what).await;
        let settled = wait_replaced(&baton, pid, new_pid, WAIT, &what).await;
        assert_eq!(
            migrated_into(&settled, report.generation),
            Some(KEEPALIVE as u64),
            "{what}: {settled:?}"
        );
        // The new pid answers on the very connections the old one served.
        load.wait_until(WAIT, |s| s.pids.contains(&new_pid))
            .await
            .unwrap_or_else(|s| panic!("{what}: new pid {new_pid} never answered: {s:?}"));
        let snap = load.snapshot();
        assert_eq!(snap.failed, 0, "{what}: {}", snap.failures);
        assert_eq!(
            snap.reconnects, 0,
            "{what}: a client lost its connection: {snap:?}"
        );
        load.wait_until(WAIT, |s| s.ok >= snap.ok + 200)
            .await
            .unwrap_or_else(|s| panic!("{what}: load stalled after migration: {s:?}"));
        pid = new_pid;
    }

    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    assert!(
        report.keepalive_reconnects.iter().all(|&r| r == 0),
        "reconnects: {:?}",
        report.keepalive_reconnects
    );
    assert!(report.pids.len() > UPGRADES, "pids seen: {:?}", report.pids);
}
