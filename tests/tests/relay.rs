//! Issue 14: relay back-pressure, end to end. An old generation hands 600 connections
//! over as fast as it can while its successor does not read its control socket: baton
//! holds at most its 256 relay slots of fds (it stops reading the old generation instead
//! of queueing), and once the successor reads, every connection arrives.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use baton_tests::harness::{
    Baton, Signal, TestDir, exclusive, fixture, proc_fds, python3, signal_pid, wait_pid_gone,
};
use baton_tests::kv::App;
use baton_tests::python::sdk_path;

const CONNECTIONS: usize = 600;
/// baton's relay slots (`generation::RELAY_SLOTS`).
const RELAY_SLOTS: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_successor_backs_the_relay_up_to_its_bound_and_loses_nothing() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let dir = TestDir::new("relay").unwrap();
    let count = dir.join("adopted");
    let py = python.display();
    let app = App::prepare_commands(
        &dir,
        &[
            (
                "old",
                format!(
                    "env PYTHONPATH='{}' '{py}' '{}'",
                    sdk_path().display(),
                    fixture("relay_old.py").display()
                ),
            ),
            (
                "stalled",
                format!(
                    "'{py}' '{}' '{}'",
                    fixture("relay_stalled.py").display(),
                    count.display()
                ),
            ),
        ],
        "old",
    );
    let baton = Baton::start_in(
        dir,
        ["--listen", "tcp=127.0.0.1:0", "--drain-timeout", "120s"],
        [&app.link],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("tcp").await.unwrap();
    let old = baton.status().await.unwrap().pid.unwrap();
    let clients: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    baton
        .wait_for(
            "the old generation holds every connection",
            Duration::from_secs(30),
            |s| {
                s.generations
                    .iter()
                    .any(|g| g.pid == old && g.connections == Some(CONNECTIONS as u64))
            },
        )
        .await
        .unwrap();
    let base = proc_fds(baton.pid()).unwrap().len();

    app.select("stalled");
    baton.upgrade().await.unwrap();
    let new = baton
        .wait_for(
            "the stalled successor promoted",
            Duration::from_secs(30),
            |s| s.pid.is_some_and(|p| p != old),
        )
        .await
        .unwrap()
        .pid
        .unwrap();
    // While the successor reads nothing: the relay fills to its bound and stays there.
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(proc_fds(baton.pid()).unwrap().len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("baton: {base} fds before, at most {peak} with the successor stalled");
    assert!(
        peak > base + 16,
        "the relay never backed up ({peak} fds): the test would prove nothing"
    );
    assert!(
        peak <= base + RELAY_SLOTS + 32,
        "baton held {peak} fds, more than its {RELAY_SLOTS} relay slots over {base}"
    );
    assert!(
        baton_tests::harness::pid_alive(old),
        "the old one waits, it is not killed"
    );

    // The successor reads: everything arrives, and the old one finishes and exits.
    signal_pid(new, Signal::SIGUSR1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: usize = std::fs::read_to_string(&count)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if n == CONNECTIONS {
            break;
        }
        assert!(Instant::now() < deadline, "{n} of {CONNECTIONS} adopted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_pid_gone(old, Duration::from_secs(30)).await.unwrap();
    drop(clients);
}
