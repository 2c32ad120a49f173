//! Issue 16: UDP listeners. Every generation reads the one kernel socket, so datagrams
//! sent at a steady rate through 20 upgrades are each answered exactly once, and the
//! new generation answers after each upgrade.

use std::time::Duration;

use baton_tests::harness::{Baton, UpgradeOutcome, exclusive, udp_echo_bin, wait_pid_gone};
use baton_tests::udp::UdpLoad;

/// 1,000 datagrams a second: steady, and far below what loopback drops.
const INTERVAL: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_are_answered_exactly_once_through_20_upgrades() {
    let _serial = exclusive().await;
    let echo = udp_echo_bin().unwrap();
    let baton = Baton::start(
        ["--listen", "udp=udp:127.0.0.1:0", "--drain-timeout", "10s"],
        [echo.as_os_str()],
    )
    .await
    .unwrap();
    let addr = baton.udp_addr("udp").await.unwrap();
    let load = UdpLoad::start(addr, INTERVAL).unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    let first = pid;
    load.wait_until("replies from generation 1", Duration::from_secs(10), |s| {
        s.pids.get(&first).is_some_and(|&n| n >= 100)
    })
    .await
    .unwrap();
    for i in 1..=20 {
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
    println!("UDP through 20 upgrades: {stats}");
    println!(
        "loss: {} of {} datagrams ({:.4} %)",
        stats.lost(),
        stats.sent,
        100.0 * stats.lost() as f64 / stats.sent.max(1) as f64
    );
    assert_eq!(stats.pid_set().len(), 21, "{stats}");
    assert_eq!(stats.garbled, 0, "{stats}");
    assert_eq!(stats.duplicated(), 0, "{stats}");
    assert_eq!(stats.lost(), 0, "{stats}");
}
