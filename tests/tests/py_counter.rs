//! Issue 16: a stateful Python app (examples/py-counter, on the Python SDK) with 20
//! persistent clients through 10 stateful upgrades: every acknowledged increment is kept,
//! every client keeps its connection and sees each new pid, schema 1 migrates to 2, and
//! a downgrade that schema 1 cannot hold is refused and rolls back; and pre-copy at 100 MB
//! (issue 28).

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
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    wait_all(&mut clients, "generation 1", |_, s| s.pids.contains(&pid)).await;

    for i in 1..=UPGRADES {
        // The first upgrade migrates schema 1 to 2; the others are 2 to 2.
        app.select("v2");
        let report = match baton.upgrade_wait().await.unwrap() {
            UpgradeOutcome::Promoted(r) => r,
            UpgradeOutcome::RolledBack { message } => panic!("upgrade {i} rolled back: {message}"),
        };
        let new = report.pid.unwrap();
        assert_ne!(new, pid);
        // Both generations announce pre-copy: the counters stream while clients write,
        // and only the last delta is sent paused.
        assert!(
            report.precopy_rounds.is_some_and(|r| r >= 1),
            "upgrade {i} did not pre-copy: {report:?}"
        );
        wait_pid_gone(pid, Duration::from_secs(15)).await.unwrap();
        wait_all(&mut clients, &format!("upgrade {i}"), |_, s| {
            s.pids.contains(&new)
        })
        .await;
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
    wait_all(&mut clients, "after the refused downgrade", |i, s| {
        s.acked > then[i] + 5
    })
    .await;
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

type Client = (
    tokio::task::JoinHandle<Result<(Seen, String), baton_tests::harness::HarnessError>>,
    watch::Receiver<Seen>,
);

/// Waits (30 s at most) until every client's [`Seen`] passes `done`. A client that
/// stopped fails the test with its own error or panic, not just "it failed".
async fn wait_all(clients: &mut [Client], what: &str, done: impl Fn(usize, &Seen) -> bool) {
    for (i, (task, rx)) in clients.iter_mut().enumerate() {
        let waited = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| done(i, s)))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => {}
            Ok(Err(_)) => match task.await {
                Ok(Ok(_)) => panic!("{what}: client {i} ended early"),
                Ok(Err(e)) => panic!("{what}: client {i} failed: {e}"),
                Err(e) => panic!("{what}: client {i} panicked: {e}"),
            },
            Err(_) => panic!("{what}: client {i} timed out: {:?}", *rx.borrow()),
        }
    }
}

/// Python pre-copy at scale: 1,000,000 counters with 100-character names (over 100 MB of
/// JSON) stream to the new generation while 4 clients keep incrementing. Every increment
/// acknowledged is kept, every populated counter arrives, and the clients are paused for
/// less than half of the upgrade (the bulk moved while they were served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_counter_precopies_100_mb_of_state_under_writers() {
    const KEYS: u64 = 1_000_000;
    const WIDTH: u64 = 100;
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let dir = TestDir::new("py-counter-big").unwrap();
    let app = App::prepare_commands(
        &dir,
        &[(
            "v2",
            command(&python, "py-counter/counter.py", "--schema 2"),
        )],
        "v2",
    );
    let baton = Baton::start_in(
        dir,
        [
            "--state",
            "--listen",
            "counter=127.0.0.1:0",
            "--drain-timeout",
            "30s",
            "--ready-timeout",
            "60s",
            "--snapshot-timeout",
            "60s",
            "--restore-timeout",
            "120s",
        ],
        [&app.link],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("counter").await.unwrap();
    let mut c = CounterClient::connect(addr).await.unwrap();
    let reply = c.call(&format!("POPULATE {KEYS} {WIDTH}")).await.unwrap();
    assert!(
        reply.starts_with(&format!("OK populated {KEYS}")),
        "{reply}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for i in 0..4 {
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut c = CounterClient::connect(addr).await.unwrap();
            let mut acked = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let reply = c.call(&format!("INCR w{i}")).await.unwrap();
                let (n, _) = parse_counter_reply(&reply).unwrap();
                assert_eq!(n, acked + 1, "w{i}: a lost or repeated increment");
                acked = n;
            }
            acked
        }));
    }
    let report = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => r,
        UpgradeOutcome::RolledBack { message } => panic!("rolled back: {message}"),
    };
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.unwrap());
    }
    assert!(
        report.precopy_bytes.is_some_and(|b| b >= 100_000_000),
        "not 100 MB pre-copied: {report:?}"
    );
    let gap = report.accept_gap_ms.unwrap_or(f64::MAX);
    assert!(
        gap < report.duration_ms as f64 / 2.0,
        "paused {gap} ms of a {} ms upgrade: {report:?}",
        report.duration_ms
    );
    for (i, n) in acked.iter().enumerate() {
        let reply = c.call(&format!("GET w{i}")).await.unwrap();
        assert_eq!(
            parse_counter_reply(&reply).map(|(v, _)| v),
            Some(*n),
            "w{i}"
        );
    }
    for k in [0, KEYS / 2, KEYS - 1] {
        let key = format!("p{k:0width$}", width = (WIDTH - 1) as usize);
        let reply = c.call(&format!("GET {key}")).await.unwrap();
        assert_eq!(
            parse_counter_reply(&reply).map(|(v, _)| v),
            Some(1),
            "{key}"
        );
    }
    eprintln!(
        "py-counter: {} MB pre-copied in {} rounds; paused {gap:.1} ms of {} ms; {} increments kept",
        report.precopy_bytes.unwrap_or(0) / 1_000_000,
        report.precopy_rounds.unwrap_or(0),
        report.duration_ms,
        acked.iter().sum::<i64>()
    );
}
