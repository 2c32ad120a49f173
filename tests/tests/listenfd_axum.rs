//! examples/listenfd-axum under the real baton: a plain axum app written for systemd socket
//! activation (listenfd + sd-notify, no baton SDK) upgrades with no failed request (level 1
//! of PROTOCOL.md: the listener is passed, READY comes over NOTIFY_SOCKET, drain is SIGTERM).

use std::time::Duration;

use baton_tests::harness::{Baton, bin, exclusive};
use baton_tests::load::{LoadGen, LoadOpts};
use baton_tests::upgrade::{upgrade_promoted, wait_replaced};

const UPGRADES: usize = 5;
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_listenfd_app_upgrades_without_a_failed_request() {
    let _serial = exclusive().await;
    let app = bin("listenfd-axum").unwrap();
    // No SDK: readiness is READY=1 from sd-notify, and the drain is the stop signal.
    let baton = Baton::start(["--listen", "http=127.0.0.1:0"], [&app])
        .await
        .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    // Connection-per-request clients: a non-SDK app cannot hand keep-alive connections over,
    // and axum's graceful shutdown closes idle ones.
    let load = LoadGen::start(
        addr,
        LoadOpts {
            keepalive: 0,
            fresh: 4,
            ..LoadOpts::default()
        },
    );
    load.wait_until(WAIT, |s| s.pids.contains(&pid) && s.ok >= 100)
        .await
        .unwrap_or_else(|s| panic!("generation 1 (pid {pid}) never served: {s:?}"));
    for i in 1..=UPGRADES {
        let what = format!("upgrade {i}");
        let (report, _) = upgrade_promoted(&baton, &what).await;
        let new_pid = report.pid.unwrap();
        wait_replaced(&baton, pid, new_pid, WAIT, &what).await;
        load.wait_until(WAIT, |s| s.pids.contains(&new_pid))
            .await
            .unwrap_or_else(|s| panic!("{what}: new pid {new_pid} never answered: {s:?}"));
        let snap = load.snapshot();
        assert_eq!(snap.failed, 0, "{what}: {}", snap.failures);
        pid = new_pid;
    }
    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    assert!(report.pids.len() > UPGRADES, "pids seen: {:?}", report.pids);
}
