//! Issue 2, tests 3, 5 and 6: the drain deadline, a SIGHUP storm, and stopping baton.

use std::time::{Duration, Instant};

use baton_protocol::{Phase, UpgradeResult};
use baton_tests::harness::{
    Baton, Signal, UpgradeOutcome, descendants, exclusive, generation_pids, generation_tree,
    hello_http_bin, pid_alive, wait_pid_gone,
};
use baton_tests::load::{LoadGen, LoadOpts};

/// Test 3: an old generation that ignores drain is SIGKILLed at the drain deadline: not
/// before, and not much after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_ignoring_drain_is_killed_at_the_deadline() {
    const DRAIN: Duration = Duration::from_secs(2);
    /// Allowed lateness of the kill (timer slack, reaping, a loaded 2-core machine).
    const LATE: Duration = Duration::from_millis(1500);
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "2s"],
        [hello.as_os_str(), "--ignore-drain".as_ref()],
    )
    .await
    .unwrap();
    let old = baton.status().await.unwrap().pid.unwrap();

    let requested = Instant::now();
    let promoted = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => r,
        UpgradeOutcome::RolledBack { message } => panic!("upgrade rolled back: {message}"),
    };
    // baton's share is reported, and split into its three parts.
    let parts = [
        promoted.cgroup_ms,
        promoted.spawn_ms,
        promoted.ready_to_drain_ms,
    ];
    let total = promoted.supervisor_ms.expect("supervisor_ms");
    let sum: f64 = parts
        .iter()
        .map(|p| p.expect("every part of supervisor_ms"))
        .sum();
    assert!(
        (sum - total).abs() < 0.01,
        "{parts:?} should add up to {total}"
    );
    // Promotion (and so the start of the drain) happened between `requested` and now.
    let answered = Instant::now();
    let status = baton.status().await.unwrap();
    assert_eq!(status.pid, promoted.pid);
    let draining = status.generations.iter().find(|g| g.pid == old);
    assert!(
        draining.is_some_and(|g| g.phase == Phase::Draining) || !pid_alive(old),
        "old generation should be draining: {status:?}"
    );

    wait_pid_gone(old, DRAIN + LATE + Duration::from_secs(3))
        .await
        .unwrap_or_else(|e| panic!("generation ignoring drain was not killed: {e}"));
    let gone = Instant::now();
    // The deadline runs from promotion, which was no earlier than `requested`.
    assert!(
        gone.duration_since(requested) + Duration::from_millis(20) >= DRAIN,
        "killed {:?} after the upgrade request, before the {DRAIN:?} drain deadline",
        gone.duration_since(requested)
    );
    assert!(
        gone.duration_since(answered) <= DRAIN + LATE,
        "killed {:?} after promotion, drain deadline {DRAIN:?}",
        gone.duration_since(answered)
    );
    let settled = baton.wait_settled(Duration::from_secs(5)).await.unwrap();
    assert_eq!(settled.pid, promoted.pid);
    assert_eq!(settled.crashes, 0);
}

/// Test 5: 20 SIGHUPs within a second, under load: the upgrades coalesce, one generation
/// is left, nothing failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hup_storm_under_load() {
    const READY_DELAY: &str = "150ms";
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "20s"],
        [
            hello.as_os_str(),
            "--ready-delay".as_ref(),
            READY_DELAY.as_ref(),
        ],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let first = baton.status().await.unwrap();
    let first_pid = first.pid.unwrap();
    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&first_pid))
        .await
        .unwrap_or_else(|s| panic!("generation 1 never answered: {s:?}"));

    // 20 signals over ~1 s (pacing of the stimulus, not a synchronisation). Every candidate
    // takes >= READY_DELAY to get ready, so most signals arrive while an upgrade runs and
    // must coalesce into the one queued upgrade.
    for _ in 0..20 {
        baton.hup().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    baton
        .wait_for(
            "an upgrade to have happened",
            Duration::from_secs(30),
            |s| s.generation > first.generation,
        )
        .await
        .unwrap();
    let settled = baton.wait_settled(Duration::from_secs(60)).await.unwrap();
    let pid = settled.pid.unwrap();
    assert_ne!(pid, first_pid);
    // At most one upgrade runs and one waits: 20 signals over ~1 s against >= 150 ms
    // upgrades cannot each have become an upgrade of their own.
    assert!(
        settled.generation < first.generation + 20,
        "SIGHUPs did not coalesce: {settled:?}"
    );
    let last = settled.last_upgrade.clone().expect("last upgrade");
    assert_eq!(last.result, UpgradeResult::Promoted, "{last:?}");
    assert_eq!(settled.crashes, 0);
    // No candidate or draining generation is left anywhere in baton's process tree.
    assert_eq!(
        generation_tree(baton.pid()),
        vec![pid],
        "baton's process tree"
    );

    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&pid))
        .await
        .unwrap_or_else(|s| panic!("final generation never answered: {s:?}"));
    let report = load.stop().await;
    println!(
        "{} upgrades for 20 SIGHUPs\n{report}",
        settled.generation - first.generation
    );
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);

    // Still settled on the same generation: no late signal started another upgrade.
    let again = baton.status().await.unwrap();
    assert_eq!(again.pid, Some(pid));
    assert!(!again.upgrading && again.queued_upgrades == 0, "{again:?}");
    assert_eq!(generation_pids(&again), vec![pid]);
}

/// Test 6: SIGTERM to baton drains every generation and exits 0; the children are gone
/// and the port is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let _serial = exclusive().await;
    stop_and_check(StopBy::Sigterm).await;
}

/// `baton stop` does the same as SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_stop_drains_and_exits_zero() {
    let _serial = exclusive().await;
    stop_and_check(StopBy::Cli).await;
}

enum StopBy {
    Sigterm,
    Cli,
}

async fn stop_and_check(stop: StopBy) {
    let hello = hello_http_bin().unwrap();
    let mut baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "10s"],
        [&hello],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    // Two generations, so that stopping has something to drain besides the active one.
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
    let status = baton.status().await.unwrap();
    let mut children = descendants(baton.pid());
    children.sort_unstable();
    assert!(!children.is_empty());
    for p in generation_pids(&status) {
        // The old generation may finish draining between the two looks.
        assert!(
            children.contains(&p) || !pid_alive(p),
            "{p} not a child of baton: {children:?}"
        );
    }

    // A request works before the stop.
    let load = LoadGen::start(
        addr,
        LoadOpts {
            keepalive: 1,
            fresh: 0,
            ..LoadOpts::default()
        },
    );
    load.wait_until(Duration::from_secs(10), |s| s.ok >= 10)
        .await
        .unwrap_or_else(|s| panic!("no answer before the stop: {s:?}"));
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{report}");

    match stop {
        StopBy::Sigterm => baton.signal(Signal::SIGTERM).unwrap(),
        StopBy::Cli => {
            baton.stop_cli().await.unwrap();
        }
    }
    let exit = baton.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        exit.code(),
        Some(0),
        "baton exit status {exit}\n{}",
        baton.log()
    );
    for p in children {
        wait_pid_gone(p, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("child of the stopped baton left behind: {e}"));
    }
    // The listener went with baton.
    let err = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("the port still accepts after baton stopped");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}
