//! Issue 16: a stateful Python app (examples/py-counter, on the Python SDK) with 20
//! persistent clients through 10 stateful upgrades: every acknowledged increment is kept,
//! every client keeps its connection and sees each new pid, schema 1 migrates to 2, and
//! a downgrade that schema 1 cannot hold is refused and rolls back.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use baton_tests::harness::{Baton, TestDir, UpgradeOutcome, exclusive, python3, wait_pid_gone};
use baton_tests::kv::App;
use baton_tests::python::{CounterClient, command, parse_counter_reply};
use tokio::sync::watch;

const CLIENTS: usize = 20;
const UPGRADES: usize = 10;

/// What one client saw: its last acknowledged count and every pid that answered.
#[derive(Debug, Clone, Default)]
struct Seen {
    acked: i64,
    pids: BTreeSet<u32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_counter_keeps_every_increment_and_connection_through_stateful_upgrades() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let dir = TestDir::new("py-counter").unwrap();
    let app = App::prepare_commands(
        &dir,
        &[
            (
                "v1",
                command(&python, "py-counter/counter.py", "--schema 1"),
            ),
            (
                "v2",
                command(&python, "py-counter/counter.py", "--schema 2"),
            ),
        ],
        "v1",
    );
    let baton = Baton::start_in(
        dir,
        [
            "--state",
            "--listen",
            "counter=127.0.0.1:0",
            "--drain-timeout",
            "10s",
            "--ready-timeout",
            "20s",
        ],
        [&app.link],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("counter").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (tx, rx) = watch::channel(Seen::default());
        let stop = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut c = CounterClient::connect(addr).await?;
            let key = format!("client{i}");
            let mut seen = Seen::default();
            while !stop.load(Ordering::Relaxed) {
                let reply = c.call(&format!("INCR {key}")).await?;
                let (n, pid) = parse_counter_reply(&reply).ok_or_else(|| {
                    baton_tests::harness::HarnessError::Setup(format!("bad reply {reply:?}"))
                })?;
                assert_eq!(n, seen.acked + 1, "{key}: a lost or repeated increment");
                seen.acked = n;
                seen.pids.insert(pid);
                let _ = tx.send(seen.clone());
            }
            // The same connection, to the end: the last count is what was acknowledged.
            let reply = c.call(&format!("GET {key}")).await?;
            Ok::<_, baton_tests::harness::HarnessError>((seen, reply))
        });
        clients.push((task, rx));
    }
    let wait_all = |pid: u32, what: String| {
        let rxs: Vec<_> = clients.iter().map(|(_, rx)| rx.clone()).collect();
        async move {
            for mut rx in rxs {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    rx.wait_for(|s| s.pids.contains(&pid)),
                )
                .await
                .unwrap_or_else(|_| panic!("{what}: a client never saw pid {pid}"))
                .unwrap_or_else(|_| panic!("{what}: a client failed (see its error below)"));
            }
        }
    };
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    wait_all(pid, "generation 1".into()).await;

    for i in 1..=UPGRADES {
        // The first upgrade migrates schema 1 to 2; the others are 2 to 2.
        app.select("v2");
        let report = match baton.upgrade_wait().await.unwrap() {
            UpgradeOutcome::Promoted(r) => r,
            UpgradeOutcome::RolledBack { message } => panic!("upgrade {i} rolled back: {message}"),
        };
        let new = report.pid.unwrap();
        assert_ne!(new, pid);
        wait_pid_gone(pid, Duration::from_secs(15)).await.unwrap();
        wait_all(new, format!("upgrade {i}")).await;
        pid = new;
    }

    // A negative count (schema 2 only) cannot go down to schema 1: the downgrade is
    // refused, rolls back, and the clients carry on with the same process.
    let mut odd = CounterClient::connect(addr).await.unwrap();
    let reply = odd.call("DECR debt").await.unwrap();
    assert_eq!(parse_counter_reply(&reply), Some((-1, pid)), "{reply}");
    app.select("v1");
    match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::RolledBack { message } => assert!(
            message.contains("schema 1 cannot hold negative counts"),
            "{message}"
        ),
        UpgradeOutcome::Promoted(r) => panic!("the downgrade went through: {r:?}"),
    }
    assert_eq!(baton.status().await.unwrap().pid, Some(pid));
    let then: Vec<i64> = clients.iter().map(|(_, rx)| rx.borrow().acked).collect();
    for ((_, rx), before) in clients.iter().zip(then) {
        let mut rx = rx.clone();
        tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|s| s.acked > before + 5),
        )
        .await
        .expect("clients progress after the refused downgrade")
        .expect("a client failed");
    }
    let reply = odd.call("GET debt").await.unwrap();
    assert_eq!(parse_counter_reply(&reply), Some((-1, pid)), "{reply}");

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for (task, _) in clients {
        let (seen, reply) = task.await.unwrap().unwrap();
        assert_eq!(
            parse_counter_reply(&reply),
            Some((seen.acked, pid)),
            "the count is every acknowledged increment: {reply}"
        );
        assert_eq!(
            seen.pids.len(),
            UPGRADES + 1,
            "one connection, served by every generation: {:?}",
            seen.pids
        );
        total += seen.acked;
    }
    println!(
        "py-counter: {total} acknowledged increments by {CLIENTS} clients through {UPGRADES} stateful upgrades, all kept"
    );
}
