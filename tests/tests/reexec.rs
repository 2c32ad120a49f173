//! Issue 11: baton re-executes itself in place (`baton reexec`, SIGUSR2). Its pid,
//! its children, their connections and its state carry over; a new executable that
//! cannot take over leaves the old one supervising.
//!
//! Each test runs its own copy of the baton executable (`<tmp>/baton`), so that it
//! can replace it the way a package upgrade does (a new file renamed over the path).

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_protocol::{Phase, ReexecResult, UpgradeResult};
use baton_tests::harness::{
    Baton, TestDir, UpgradeOutcome, baton_bin, exclusive, hello_http_bin, kv_server_bin, proc_fds,
    write_script,
};
use baton_tests::http::http_get;
use baton_tests::load::{LoadGen, LoadOpts};
use baton_tests::resp::{IncrWriter, Reply, RespClient, progress};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(20);

/// A copy of baton in a fresh test dir, and the dir.
fn own_baton(tag: &str) -> (TestDir, PathBuf) {
    let dir = TestDir::new(tag).unwrap();
    let exe = dir.join("baton");
    install(&baton_bin().unwrap(), &exe);
    (dir, exe)
}

/// Puts `src` at `dst` as a package manager does: a new file renamed over the
/// old path (the running image keeps its own, now unlinked, file).
fn install(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// What `/proc/<pid>/exe` points to.
fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

async fn start_hello(dir: TestDir, exe: &Path, env: &[(&str, &str)]) -> Baton {
    let hello = hello_http_bin().unwrap();
    let b = Baton::spawn_with(
        exe,
        env,
        dir,
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "20s"],
        [&hello],
    )
    .unwrap();
    b.wait_active(WAIT).await.unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reexecs_under_load_fail_no_request_and_keep_every_connection() {
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-load");
    let baton = start_hello(dir, &exe, &[]).await;
    let addr = baton.tcp_addr("http").await.unwrap();
    // One upgrade first, so that there is history to carry over.
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
    let before = baton.wait_settled(WAIT).await.unwrap();
    let app = before.pid.unwrap();
    let fds_before = proc_fds(baton.pid()).unwrap();

    let load = LoadGen::start(
        addr,
        LoadOpts {
            keepalive: 8,
            fresh: 8,
            ..LoadOpts::default()
        },
    );
    load.wait_until(WAIT, |s| s.ok >= 500).await.unwrap();
    for i in 1..=10u32 {
        // Every other time a new file, as a package upgrade leaves it.
        if i % 2 == 0 {
            install(&baton_bin().unwrap(), &exe);
        }
        let (ok, r) = baton.reexec_wait().await.unwrap();
        assert!(ok && r.result == ReexecResult::Done, "reexec {i}: {r:?}");
        assert_eq!(
            r.new.as_ref().map(|b| &b.exe),
            Some(&exe.display().to_string())
        );
        let st = baton.status().await.unwrap();
        assert_eq!(st.supervisor_pid, baton.pid(), "reexec {i}: baton's pid");
        assert_eq!(st.pid, Some(app), "reexec {i}: the app was touched");
        assert_eq!(st.supervisor.as_ref().map(|s| s.reexecs), Some(i));
        assert_eq!(st.last_upgrade, before.last_upgrade, "reexec {i}: history");
        assert_eq!(st.generation, before.generation);
        assert_eq!(
            exe_of(baton.pid()),
            exe.display().to_string(),
            "runs the new file"
        );
        let snap = load.snapshot();
        assert_eq!(snap.failed, 0, "reexec {i}: {}", snap.failures);
        load.wait_until(WAIT, |s| s.ok >= snap.ok + 300)
            .await
            .unwrap();
    }
    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "{}", report.failures);
    assert!(
        report.keepalive_reconnects.iter().all(|n| *n == 0),
        "keep-alive clients reconnected: {:?}",
        report.keepalive_reconnects
    );
    assert_eq!(report.pids, vec![app], "one app process served everything");
    // No fd leaked or lost over ten exec's (a control client just served may
    // still be closing: wait for it, bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let fds_after = proc_fds(baton.pid()).unwrap();
        if fds_after.len() == fds_before.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "before: {fds_before:?}\nafter: {fds_after:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new baton upgrades as the old one did.
    match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => assert_eq!(r.result, UpgradeResult::Promoted),
        UpgradeOutcome::RolledBack { message } => panic!("{message}"),
    }
    let st = baton.wait_settled(WAIT).await.unwrap();
    assert_ne!(st.pid, Some(app));
    let body = http_get(addr, "/", Duration::from_secs(5)).unwrap();
    assert_eq!(body.pid(), st.pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_baton_leaves_the_old_one_supervising() {
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-broken");
    let baton = start_hello(dir, &exe, &[]).await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let app = baton.status().await.unwrap().pid;
    let script = baton.dir().join("broken");
    write_script(
        &script,
        "#!/bin/sh\necho 'cannot start: broken build' >&2\nexit 1\n",
    )
    .unwrap();
    install(&script, &exe);

    let (ok, r) = baton.reexec_wait().await.unwrap();
    assert!(!ok, "reexec --wait must fail: {r:?}");
    assert_eq!(r.result, ReexecResult::Failed);
    let why = r.reason.clone().unwrap_or_default();
    assert!(
        why.contains("failed its probe") && why.contains("broken build"),
        "{why}"
    );
    // Still the old baton, still supervising and serving.
    let st = baton.status().await.unwrap();
    assert_eq!(st.supervisor_pid, baton.pid());
    assert_eq!(st.pid, app);
    assert_eq!(st.supervisor.as_ref().map(|s| s.reexecs), Some(0));
    assert_eq!(
        http_get(addr, "/", Duration::from_secs(5)).unwrap().pid(),
        app
    );
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
    // Something that is not baton at all (it answers nothing) is refused too.
    write_script(&script, "#!/bin/sh\necho hello\n").unwrap();
    install(&script, &exe);
    let (ok, r) = baton.reexec_wait().await.unwrap();
    assert!(!ok);
    assert!(r.reason.unwrap_or_default().contains("is it baton?"));
    // A good one goes through.
    install(&baton_bin().unwrap(), &exe);
    let (ok, r) = baton.reexec_wait().await.unwrap();
    assert!(ok, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_baton_that_cannot_take_over_execs_the_old_one_back() {
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-back");
    // The new image refuses the hand-over once it has it (the fault is not injected
    // into the image exec'd back).
    let baton = start_hello(dir, &exe, &[("BATON_FAULT", "reexec-takeover")]).await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let st0 = baton.status().await.unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    baton_tests::http::send_get(&mut conn, "/", false).unwrap();
    let first = baton_tests::http::read_response(&mut conn).unwrap();

    let (ok, r) = baton.reexec_wait().await.unwrap();
    assert!(!ok, "{r:?}");
    assert_eq!(r.result, ReexecResult::Failed);
    assert!(r.reason.unwrap_or_default().contains("fault injected"));
    let st = baton.status().await.unwrap();
    assert_eq!(st.supervisor_pid, baton.pid());
    assert_eq!(st.pid, st0.pid);
    assert!(baton.log().contains("the previous one carries on"));
    // The same connection still works: nothing was dropped on the way there and back.
    baton_tests::http::send_get(&mut conn, "/", false).unwrap();
    let again = baton_tests::http::read_response(&mut conn).unwrap();
    assert_eq!(again.pid(), first.pid());
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reexec_during_an_upgrade_waits_and_carries_the_queued_one_over() {
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-queue");
    let hello = hello_http_bin().unwrap();
    // Slow candidates: the upgrade is under way when the reexec is asked for.
    let baton = Baton::spawn_with(
        &exe,
        &[],
        dir,
        ["--listen", "http=127.0.0.1:0"],
        [
            hello.as_os_str(),
            "--ready-delay".as_ref(),
            "1500ms".as_ref(),
        ],
    )
    .unwrap();
    baton.wait_active(WAIT).await.unwrap();
    let out = baton.upgrade().await.unwrap();
    assert!(out.status.success());
    let (reexec, queued) = tokio::join!(baton.reexec_wait(), async {
        // Asked for after the reexec: it must wait for it, and be run by the new image.
        baton
            .wait_for("the reexec to be pending", WAIT, |_| {
                baton.log().contains("reexec requested")
            })
            .await
            .unwrap();
        baton.upgrade_wait().await
    });
    let (ok, r) = reexec.unwrap();
    assert!(ok, "{r:?}");
    assert!(r.duration_ms > 500.0, "it waited for the upgrade: {r:?}");
    match queued.unwrap() {
        UpgradeOutcome::Promoted(u) => assert_eq!(u.generation, 3, "{u:?}"),
        UpgradeOutcome::RolledBack { message } => panic!("{message}"),
    }
    let log = baton.log();
    let reexec_at = log.find("re-executed; supervising").unwrap();
    let spawn3 = log.find("spawned generation=3").unwrap();
    assert!(reexec_at < spawn3, "generation 3 started after the reexec");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_reexecs() {
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-usr2");
    let baton = start_hello(dir, &exe, &[]).await;
    baton.signal(Signal::SIGUSR2).unwrap();
    let st = baton
        .wait_for("the reexec", WAIT, |s| {
            s.supervisor.as_ref().is_some_and(|m| m.reexecs == 1)
        })
        .await
        .unwrap();
    assert_eq!(st.supervisor_pid, baton.pid());
    // Signals sent right across the exec are not lost, nor fatal (they are held
    // blocked until the new image handles them).
    for _ in 0..5 {
        baton.signal(Signal::SIGUSR2).unwrap();
        baton.hup().unwrap();
    }
    baton
        .wait_for("more reexecs and an upgrade", WAIT, |s| {
            s.supervisor.as_ref().is_some_and(|m| m.reexecs >= 2)
                && s.generation >= 2
                && !s.upgrading
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_kv_keeps_fifty_pipelining_clients_through_five_reexecs() {
    const WRITERS: usize = 50;
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-kv");
    let kv = kv_server_bin().unwrap();
    let baton = Baton::spawn_with(
        &exe,
        &[],
        dir,
        [
            "--state",
            "--listen",
            "kv=127.0.0.1:0",
            "--drain-timeout",
            "20s",
        ],
        [kv.as_os_str(), "--schema".as_ref(), "2".as_ref()],
    )
    .unwrap();
    baton.wait_active(WAIT).await.unwrap();
    let addr = baton.tcp_addr("kv").await.unwrap();
    let mut c = RespClient::connect(addr).await.unwrap();
    for i in 0..200 {
        let r = c
            .command(&["SET", &format!("k:{i}"), &format!("value {i}")])
            .await
            .unwrap();
        assert!(r.is_ok(), "{r}");
    }
    let mut writers = Vec::new();
    for i in 0..WRITERS {
        writers.push(IncrWriter::start(addr, format!("w:{i}")).await.unwrap());
    }
    progress(&writers, 50).await.unwrap();
    let app = baton.status().await.unwrap().pid;
    for i in 1..=5 {
        let (ok, r) = baton.reexec_wait().await.unwrap();
        assert!(ok, "reexec {i}: {r:?}");
        assert_eq!(baton.status().await.unwrap().pid, app);
        let mark = writers.iter().map(IncrWriter::last).max().unwrap_or(0);
        progress(&writers, mark + 20).await.unwrap();
    }
    // A stateful upgrade after the reexecs hands the state over as before.
    match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => {
            assert!(r.snapshot_bytes.unwrap_or(0) > 0, "{r:?}");
        }
        UpgradeOutcome::RolledBack { message } => panic!("{message}"),
    }
    let st = baton.wait_settled(WAIT).await.unwrap();
    assert_ne!(st.pid, app);
    assert!(st.generations.iter().all(|g| g.phase == Phase::Active));
    let mark = writers.iter().map(IncrWriter::last).max().unwrap_or(0);
    progress(&writers, mark + 20).await.unwrap();
    let mut finals = Vec::new();
    for w in writers {
        let key = w.key().to_string();
        let last = w.finish().await.unwrap_or_else(|e| panic!("writer: {e}"));
        finals.push((key, last));
    }
    let mut c = RespClient::connect(addr).await.unwrap();
    for (key, last) in &finals {
        match c.command(&["GET", key]).await.unwrap() {
            Reply::Bulk(Some(v)) => assert_eq!(String::from_utf8_lossy(&v), last.to_string()),
            other => panic!("{key}: {other}"),
        }
    }
    match c.command(&["GET", "k:123"]).await.unwrap() {
        Reply::Bulk(Some(v)) => assert_eq!(v, b"value 123"),
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_baton_that_crashes_taking_over_execs_the_old_one_back() {
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-crash");
    // The new image gets SIGSEGV after its probe passed, while taking over.
    let baton = start_hello(dir, &exe, &[("BATON_FAULT", "reexec-crash")]).await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let app = baton.status().await.unwrap().pid;
    let (ok, r) = baton.reexec_wait().await.unwrap();
    assert!(!ok, "{r:?}");
    let why = r.reason.unwrap_or_default();
    assert!(why.contains("crashed while taking over (SIGSEGV)"), "{why}");
    let st = baton.status().await.unwrap();
    assert_eq!(st.supervisor_pid, baton.pid());
    assert_eq!(st.pid, app);
    assert_eq!(
        http_get(addr, "/", Duration::from_secs(5)).unwrap().pid(),
        app
    );
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_history_carry_over_a_reexec() {
    let _serial = exclusive().await;
    let (dir, exe) = own_baton("reexec-obs");
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], baton_tests::systemd::free_port()));
    let hello = hello_http_bin().unwrap();
    let m = metrics.to_string();
    let baton = Baton::spawn_with(
        &exe,
        &[],
        dir,
        ["--listen", "http=127.0.0.1:0", "--metrics", m.as_str()],
        [&hello],
    )
    .unwrap();
    baton.wait_active(WAIT).await.unwrap();
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
    let (ok, r) = baton.reexec_wait().await.unwrap();
    assert!(ok, "{r:?}");
    // The same metrics socket answers (handed over, not bound again).
    let r = http_get(metrics, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("baton_reexecs_total{result=\"done\"} 1"),
        "{}",
        r.body
    );
    // History and events from before the reexec are still there (no --state-dir).
    let h = baton
        .cli(&["history", "--json"], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(h.stdout.lines().count(), 2, "{h:?}");
    let e = baton
        .cli(&["events", "--json"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        e.stdout.contains("\"event\":\"promoted\"") && e.stdout.contains("\"event\":\"reexec\""),
        "{e:?}"
    );
}
