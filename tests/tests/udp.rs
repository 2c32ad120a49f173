//! Issue 16: UDP listeners. Every generation reads the one kernel socket, so datagrams
//! sent at a steady rate through 20 upgrades are each answered exactly once, and the
//! new generation answers after each upgrade: with the Rust SDK (examples/udp-echo) and
//! the Python SDK (examples/py-udp-echo).

use std::ffi::OsString;
use std::time::Duration;

use baton_tests::harness::{
    Baton, TestDir, UpgradeOutcome, baton_bin, exclusive, python3, udp_echo_bin, wait_pid_gone,
};
use baton_tests::python::{example, sdk_path};
use baton_tests::udp::UdpLoad;

/// 1,000 datagrams a second: steady, and far below what loopback drops.
const INTERVAL: Duration = Duration::from_millis(1);
const UPGRADES: usize = 20;

async fn answered_exactly_once_through_upgrades(program: Vec<OsString>) {
    let sdk = sdk_path();
    let baton = Baton::spawn_with(
        &baton_bin().unwrap(),
        &[("PYTHONPATH", sdk.to_str().unwrap())],
        TestDir::new("udp").unwrap(),
        ["--listen", "udp=udp:127.0.0.1:0", "--drain-timeout", "10s"],
        program,
    )
    .unwrap();
    baton.wait_active(Duration::from_secs(20)).await.unwrap();
    let addr = baton.udp_addr("udp").await.unwrap();
    let load = UdpLoad::start(addr, INTERVAL).unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    let first = pid;
    load.wait_until("replies from generation 1", Duration::from_secs(10), |s| {
        s.pids.get(&first).is_some_and(|&n| n >= 100)
    })
    .await
    .unwrap();
    for i in 1..=UPGRADES {
        let report = match baton.upgrade_wait().await.unwrap() {
            UpgradeOutcome::Promoted(r) => r,
            UpgradeOutcome::RolledBack { message } => panic!("upgrade {i} rolled back: {message}"),
        };
        let new = report.pid.unwrap();
        assert_ne!(new, pid, "upgrade {i}");
        wait_pid_gone(pid, Duration::from_secs(15)).await.unwrap();
        load.wait_until(
            &format!("upgrade {i}: replies from pid {new}"),
            Duration::from_secs(10),
            |s| s.pids.get(&new).is_some_and(|&n| n >= 20),
        )
        .await
        .unwrap();
        pid = new;
    }
    let stats = load.stop(Duration::from_secs(5)).await;
    println!("UDP through {UPGRADES} upgrades: {stats}");
    println!(
        "loss: {} of {} datagrams ({:.4} %)",
        stats.lost(),
        stats.sent,
        100.0 * stats.lost() as f64 / stats.sent.max(1) as f64
    );
    assert_eq!(stats.pid_set().len(), UPGRADES + 1, "{stats}");
    assert_eq!(stats.garbled, 0, "{stats}");
    assert_eq!(stats.duplicated(), 0, "{stats}");
    assert_eq!(stats.lost(), 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_udp_datagrams_are_answered_exactly_once_through_20_upgrades() {
    let _serial = exclusive().await;
    answered_exactly_once_through_upgrades(vec![udp_echo_bin().unwrap().into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_udp_datagrams_are_answered_exactly_once_through_20_upgrades() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    answered_exactly_once_through_upgrades(vec![
        python.into(),
        example("py-udp-echo/echo.py").into(),
    ])
    .await;
}
