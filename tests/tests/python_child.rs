//! Issue 2, test 7: a level-1 child that is not Rust (tests/fixtures/py_server.py: takes
//! fd 3, sends READY=1 to NOTIFY_SOCKET, drains on SIGTERM) upgrades under load.

use std::time::Duration;

use baton_tests::harness::{Baton, UpgradeOutcome, exclusive, fixture, generation_pids, python3};
use baton_tests::load::{LoadGen, LoadOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_level1_child_upgrades_under_load() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let script = fixture("py_server.py");
    assert!(script.is_file(), "{} missing", script.display());
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "10s"],
        [python.as_os_str(), script.as_os_str()],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    let mut pids = vec![pid];

    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&pid))
        .await
        .unwrap_or_else(|s| panic!("python generation 1 never answered: {s:?}"));

    for i in 1..=3 {
        let report = match baton.upgrade_wait().await.unwrap() {
            UpgradeOutcome::Promoted(r) => r,
            UpgradeOutcome::RolledBack { message } => panic!("upgrade {i} rolled back: {message}"),
        };
        let new_pid = baton.status().await.unwrap().pid.unwrap();
        assert_ne!(new_pid, pid, "upgrade {i}");
        assert_eq!(report.pid, Some(new_pid));
        load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&new_pid))
            .await
            .unwrap_or_else(|s| panic!("upgrade {i}: pid {new_pid} never answered: {s:?}"));
        pid = new_pid;
        pids.push(pid);
    }
    // Each old python process got SIGTERM, finished its request and exited by itself.
    let settled = baton.wait_settled(Duration::from_secs(10)).await.unwrap();
    assert_eq!(generation_pids(&settled), vec![pid]);

    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    pids.sort_unstable();
    assert_eq!(report.pids, pids);
    // The server closes every connection: keep-alive clients reconnect, without failing.
    assert!(
        report.keepalive_reconnects.iter().all(|r| *r > 0),
        "{report}"
    );
}
