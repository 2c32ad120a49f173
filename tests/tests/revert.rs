//! Issue 27: baton never crash-loops a failed version while a good one is at hand.
//!
//! The revert target is the last version known to serve: the permanent release if there is
//! one, else the version that was active when the failing one was installed, whether or not
//! its own probation had finished. Without a store the previous executable (held open by
//! fd) is that version, and a short probation is on by default.

use std::path::Path;
use std::time::{Duration, Instant};

use baton_protocol::{ReleaseResultKind, ReleaseStatus, StartReason};
use baton_tests::harness::{
    Baton, TestDir, exclusive, generation_pids, hello_http_bin, write_script,
};
use baton_tests::http::http_get;
use baton_tests::load::{FailureKind, LoadGen, LoadHandle, LoadOpts};
use baton_tests::releases::{
    INSTALL_TIMEOUT, StoreDir, active_release, list, release, reply, status_of,
};

const KEEPALIVE: usize = 4;
const FRESH: usize = 4;

fn load_opts() -> LoadOpts {
    LoadOpts {
        keepalive: KEEPALIVE,
        fresh: FRESH,
        ..LoadOpts::default()
    }
}

/// Stops the load: no connection was refused, and only requests in flight inside the
/// crashing process failed, at most one per client.
async fn check_load(load: LoadHandle, what: &str) {
    let report = load.stop().await;
    println!("{what}: {report}");
    assert_eq!(
        report.failures.get(FailureKind::ConnectRefused),
        0,
        "{what}: refused: {report}"
    );
    assert!(
        report.failed <= (KEEPALIVE + FRESH) as u64,
        "{what}: {} failed, more than one per client: {}",
        report.failed,
        report.failures
    );
}

/// `baton run --releases STORE --probation 10s` on a fresh store holding only v1, which
/// boots on probation with nothing permanent.
async fn fresh_store(tag: &str) -> (StoreDir, Baton) {
    let s = StoreDir::new(tag).unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    let store = s.arg();
    let baton = Baton::start_in(
        TestDir::new("revert-run").unwrap(),
        [
            "--listen",
            "http=127.0.0.1:0",
            "--releases",
            store.as_str(),
            "--probation",
            "10s",
            "--drain-timeout",
            "10s",
        ],
        ["bin/app"],
    )
    .await
    .unwrap();
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    let st = baton.status().await.unwrap();
    let rel = st.releases.expect("a store");
    assert_eq!(rel.permanent, None, "a fresh store has nothing permanent");
    (s, baton)
}

/// Case 1 of the issue, exactly: v2 installed during v1's probation, crashing 3 s after
/// READY. v1 serves again within one probation and v2 is `failed`; v2 is never restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_release_during_the_first_ones_probation_reverts_to_the_first() {
    let _serial = exclusive().await;
    let (s, baton) = fresh_store("revert-case1").await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let load = LoadGen::start(addr, load_opts());
    load.wait_until(Duration::from_secs(10), |l| l.ok >= 200)
        .await
        .unwrap();

    s.add_hello("v2", "--exit-after 3s", true).await.unwrap();
    let installed = Instant::now();
    let out = release(
        &baton,
        &["install", "v2", "--wait", "--json"],
        INSTALL_TIMEOUT,
    )
    .await
    .unwrap();
    let r = reply(&out);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(r.result, ReleaseResultKind::Reverted, "{r:?}");
    assert!(r.detail.contains("reverted to v1"), "{r:?}");
    assert!(
        installed.elapsed() < Duration::from_secs(10),
        "v1 serves again within one probation: {:?}",
        installed.elapsed()
    );
    let settled = baton.wait_settled(Duration::from_secs(15)).await.unwrap();
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "v2"), ReleaseStatus::Failed, "{l:?}");

    // v1 passes its probation again; v2 is never started again by itself.
    let generation = settled.generation;
    let st = baton
        .wait_for("v1 permanent", Duration::from_secs(20), |s| {
            s.releases
                .as_ref()
                .is_some_and(|r| r.permanent.as_deref() == Some("v1"))
        })
        .await
        .unwrap();
    assert_eq!(st.generation, generation, "no restart after the revert");
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    check_load(load, "case 1").await;
}

/// A failed release is never started again by a crash restart: v1 is killed twice after
/// the revert, and each replacement runs v1. 60 s of observation, with the number of
/// generations bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_never_becomes_current_again_by_itself() {
    let _serial = exclusive().await;
    let (s, baton) = fresh_store("revert-loop").await;
    s.add_hello("v2", "--exit-after 1s", true).await.unwrap();
    let out = release(
        &baton,
        &["install", "v2", "--wait", "--json"],
        INSTALL_TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(reply(&out).result, ReleaseResultKind::Reverted, "{out:?}");
    let start = baton.wait_settled(Duration::from_secs(15)).await.unwrap();
    let first_gen = start.generation;

    let observe = Instant::now();
    let mut kills = 0;
    while observe.elapsed() < Duration::from_secs(60) {
        let st = baton.status().await.unwrap();
        let active = active_release(&baton).await.unwrap();
        assert_ne!(active.as_deref(), Some("v2"), "v2 is current again: {st:?}");
        assert!(
            st.generation <= first_gen + 2,
            "generations keep starting: {st:?}"
        );
        if kills < 2 && observe.elapsed() >= Duration::from_secs(10 + 20 * kills) {
            let pid = st.pid.unwrap();
            baton_tests::harness::signal_pid(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
            kills += 1;
            let st = baton
                .wait_for("the replacement", Duration::from_secs(20), |s| {
                    s.pid.is_some_and(|p| p != pid) && !s.upgrading
                })
                .await
                .unwrap();
            assert_eq!(
                active_release(&baton).await.unwrap().as_deref(),
                Some("v1"),
                "a crash restart runs v1: {st:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "v2"), ReleaseStatus::Failed, "{l:?}");
}

/// Case 2 of the issue: plain `baton run` (no store, no `--probation`), `mv` of a new
/// file over PROGRAM, then `kill -HUP`. The new file fails `after` its READY; the old
/// executable serves again.
async fn plain_revert(tag: &str, after: &str) {
    let _serial = exclusive().await;
    let dir = TestDir::new(tag).unwrap();
    let hello = hello_http_bin().unwrap();
    let app = dir.join("app");
    script(&app, &hello, "--label old");
    let new = dir.join("app.new");
    script(&new, &hello, &format!("--label new --exit-after {after}"));
    let baton = Baton::start_in(dir, ["--listen", "http=127.0.0.1:0"], [&app])
        .await
        .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let label = || {
        http_get(addr, "/", Duration::from_secs(5))
            .map(|r| r.body)
            .unwrap_or_default()
    };
    assert!(label().contains("label=old"));
    let load = LoadGen::start(addr, load_opts());
    load.wait_until(Duration::from_secs(10), |l| l.ok >= 200)
        .await
        .unwrap();
    let before = baton.status().await.unwrap();

    std::fs::rename(&new, &app).unwrap();
    baton.hup().unwrap();
    // Promoted and then reverted, or (READY and exit seen together) rolled back.
    let st = baton
        .wait_for(
            "the old executable serving again",
            Duration::from_secs(30),
            |s| {
                let rolled_back = s
                    .last_upgrade
                    .as_ref()
                    .is_some_and(|u| u.result == baton_protocol::UpgradeResult::RolledBack);
                let reverted = s.crashes >= 1 && s.generation >= before.generation + 2;
                !s.upgrading && (rolled_back || reverted)
            },
        )
        .await
        .unwrap();
    let settled = baton.wait_settled(Duration::from_secs(20)).await.unwrap();
    let body = label();
    assert!(
        body.contains("label=old"),
        "the old executable serves: {body}; {st:?}; log:\n{}",
        baton.log()
    );
    // And keeps serving: nothing restarts the new file.
    let ok = load.snapshot().ok;
    load.wait_until(Duration::from_secs(10), |l| l.ok >= ok + 500)
        .await
        .unwrap();
    let now = baton.status().await.unwrap();
    assert_eq!(now.pid, settled.pid, "no restart of the bad file");
    assert_eq!(generation_pids(&now).len(), 1);
    check_load(load, tag).await;
}

fn script(path: &Path, hello: &Path, args: &str) {
    write_script(
        path,
        &format!("#!/bin/sh\nexec {} {args}\n", hello.display()),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_run_reverts_a_file_that_exits_right_after_ready() {
    plain_revert("revert-plain-0s", "0s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_run_reverts_a_file_that_crashes_five_seconds_after_ready() {
    plain_revert("revert-plain-5s", "5s").await;
}

/// `--probation 0` turns the plain path's default off: a crash is then restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_run_with_probation_zero_restarts_instead() {
    let _serial = exclusive().await;
    let dir = TestDir::new("revert-plain-off").unwrap();
    let hello = hello_http_bin().unwrap();
    let app = dir.join("app");
    script(&app, &hello, "--label old");
    let new = dir.join("app.new");
    script(&new, &hello, "--label new --exit-after 1s");
    let baton = Baton::start_in(
        dir,
        ["--listen", "http=127.0.0.1:0", "--probation", "0"],
        [&app],
    )
    .await
    .unwrap();
    std::fs::rename(&new, &app).unwrap();
    baton.upgrade_wait().await.unwrap();
    let st = baton
        .wait_for("a crash restart", Duration::from_secs(20), |s| {
            s.crashes >= 1
        })
        .await
        .unwrap();
    assert!(
        !baton.log().contains("reverting"),
        "no revert with --probation 0: {st:?}"
    );
}

/// A rollback to a release that was permanent before makes it permanent at once, with no
/// new probation, and history says `rollback`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_a_formerly_permanent_release_is_permanent_at_once() {
    let _serial = exclusive().await;
    let s = StoreDir::new("revert-rollback").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    s.add_hello("v2", "", true).await.unwrap();
    s.permanent("v1").await;
    let store = s.arg();
    let baton = Baton::start_in(
        TestDir::new("revert-rb-run").unwrap(),
        [
            "--listen",
            "http=127.0.0.1:0",
            "--releases",
            store.as_str(),
            "--probation",
            "3s",
            "--state-dir",
            s.join("state").to_str().unwrap(),
        ],
        ["bin/app"],
    )
    .await
    .unwrap();
    // Without --json (and without a terminal) the wait prints the probation's progress.
    let out = release(&baton, &["install", "v2", "--wait"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout.contains("v2 on probation:") && out.stdout.contains("s left"),
        "no probation progress: {out:?}"
    );

    let asked = Instant::now();
    let out = release(&baton, &["rollback", "--wait", "--json"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    let r = reply(&out);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(r.result, ReleaseResultKind::Permanent, "{r:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "no probation: {:?}",
        asked.elapsed()
    );
    let st = baton.status().await.unwrap();
    let rel = st.releases.unwrap();
    assert_eq!(rel.permanent.as_deref(), Some("v1"));
    assert!(rel.probation.is_none(), "{rel:?}");
    let out = baton
        .cli(&["history", "--json"], Duration::from_secs(10))
        .await
        .unwrap();
    let last: baton_protocol::HistoryEntry =
        serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last.why, StartReason::Rollback, "{last:?}");
}

/// The stateful variant of case 1: kv-server with `--state` and writers. The revert
/// happens, and the state lost with the crashed generation is reported as `STATE LOST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_release_failing_during_the_first_ones_probation_reverts_and_says_state_lost() {
    use baton_tests::resp::IncrWriter;
    let _serial = exclusive().await;
    let s = StoreDir::new("revert-kv").unwrap();
    let v1 = s.kv_tree("kv1", 2, true).unwrap();
    s.add("kv1", &v1).await.unwrap();
    let store = s.arg();
    let baton = Baton::start_in(
        TestDir::new("revert-kv-run").unwrap(),
        [
            "--state",
            "--listen",
            "kv=127.0.0.1:0",
            "--releases",
            store.as_str(),
            "--probation",
            "10s",
            "--drain-timeout",
            "30s",
        ],
        ["bin/app"],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("kv").await.unwrap();
    let mut writers = Vec::new();
    for i in 0..2 {
        writers.push(IncrWriter::start(addr, format!("w{i}")).await.unwrap());
    }
    baton_tests::resp::progress(&writers, 20).await.unwrap();
    let v2 = s.kv_tree_with("kv2", 2, "--exit-after 3s", true).unwrap();
    s.add("kv2", &v2).await.unwrap();
    let out = release(
        &baton,
        &["install", "kv2", "--wait", "--json"],
        INSTALL_TIMEOUT,
    )
    .await
    .unwrap();
    let r = reply(&out);
    assert_eq!(r.result, ReleaseResultKind::Reverted, "{r:?}");
    baton.wait_settled(Duration::from_secs(15)).await.unwrap();
    assert_eq!(
        active_release(&baton).await.unwrap().as_deref(),
        Some("kv1")
    );
    let revert = r.upgrade.expect("the revert's report");
    assert!(
        revert
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("STATE LOST"),
        "the lost state is reported, not hidden: {revert:?}"
    );
    for w in writers {
        // They lost their connection (and their counters) with kv2: expected here.
        let _ = w.finish().await;
    }
}
