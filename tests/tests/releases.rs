//! Issue 10: the release lifecycle against the real binaries: install, probation,
//! make permanent, and the revert to the permanent release when a version fails
//! after it went live.

use std::time::Duration;

use baton_protocol::{ReleaseResultKind, ReleaseStatus};
use baton_tests::harness::{Baton, Signal, TestDir, exclusive, wait_pid_gone};
use baton_tests::load::{FailureKind, LoadGen, LoadOpts};
use baton_tests::releases::{
    INSTALL_TIMEOUT, RELEASE_CLI_TIMEOUT, StoreDir, active_release, list, release, reply, status_of,
};

/// A store with v1 (permanent) and v2 added.
async fn store_v1_v2(tag: &str, v2_args: &str, v2_healthy: bool) -> StoreDir {
    let s = StoreDir::new(tag).unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    s.add_hello("v2", v2_args, v2_healthy).await.unwrap();
    s.permanent("v1").await;
    s
}

async fn start(s: &StoreDir, extra: &[&str]) -> Baton {
    let store = s.arg();
    let mut args = vec![
        "--listen",
        "http=127.0.0.1:0",
        "--releases",
        store.as_str(),
        "--drain-timeout",
        "10s",
    ];
    args.extend_from_slice(extra);
    let baton = Baton::start_in(TestDir::new("rel-run").unwrap(), args, ["bin/app"])
        .await
        .unwrap();
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    baton
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_crashes_on_probation_is_reverted_and_no_connection_is_refused() {
    crash_after_ready("rel-crash", "3s").await;
}

/// Issue 14: a candidate that sends READY=1 and exits at once must not take the good
/// generation with it. Depending on which baton sees first, the exit or READY, it is
/// rolled back before promotion or reverted right after; either way v1 serves on and
/// no connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_exits_right_after_ready_never_costs_the_good_one() {
    crash_after_ready("rel-ready-exit", "0s").await;
}

/// v2 exits `after` its READY=1, during a 10 s probation, under load.
async fn crash_after_ready(tag: &str, after: &str) {
    let _serial = exclusive().await;
    let s = store_v1_v2(tag, &format!("--exit-after {after}"), true).await;
    let baton = start(&s, &["--probation", "10s"]).await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let v1_pid = baton.status().await.unwrap().pid.unwrap();
    let opts = LoadOpts {
        keepalive: 0,
        fresh: 6,
        ..LoadOpts::default()
    };
    let load = LoadGen::start(addr, opts.clone());
    load.wait_until(Duration::from_secs(10), |l| l.ok >= 200)
        .await
        .unwrap();

    let out = release(
        &baton,
        &["install", "v2", "--wait", "--json"],
        INSTALL_TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = reply(&out);
    let reverted = r.result == ReleaseResultKind::Reverted;
    if reverted {
        assert!(
            r.detail.contains("exited during probation") && r.detail.contains("reverted to v1"),
            "{r:?}"
        );
        let revert = r.upgrade.as_ref().expect("the revert's report");
        println!(
            "revert after the crash: v1 ready and promoted {} ms after v2 exited (spawn {:?} ms)",
            revert.duration_ms, revert.spawn_ms
        );
    } else {
        // Seen before its READY was acted on: a rollback, and v1's process serves on.
        assert!(
            after == "0s" && r.result == ReleaseResultKind::RolledBack,
            "{r:?}"
        );
        println!("v2 exited before its promotion: rolled back ({})", r.detail);
    }
    let settled = baton.wait_settled(Duration::from_secs(15)).await.unwrap();
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    if reverted {
        assert_ne!(settled.pid, Some(v1_pid), "a new process of v1");
    } else {
        assert_eq!(settled.pid, Some(v1_pid), "v1's process serves on");
    }
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "v1"), ReleaseStatus::Permanent);
    assert_eq!(status_of(&l, "v2"), ReleaseStatus::Failed);
    // v1 serves.
    let ok_then = load.snapshot().ok;
    load.wait_until(Duration::from_secs(10), |l| l.ok >= ok_then + 200)
        .await
        .unwrap();
    let report = load.stop().await;
    println!("{report}");
    assert_eq!(
        report.failures.get(FailureKind::ConnectRefused),
        0,
        "{report}"
    );
    // Only requests in flight inside the crashing process may fail: at most one per
    // client (each has one request at a time).
    assert!(
        report.failed <= opts.fresh as u64,
        "{} failed, more than the {} in flight: {}",
        report.failed,
        opts.fresh,
        report.failures
    );
    println!(
        "requests failed with the crash: {} ({})",
        report.failed, report.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_reverts_without_a_failed_request() {
    let _serial = exclusive().await;
    // v2 has no `healthy` file: its check fails.
    let s = store_v1_v2("rel-health", "", false).await;
    let baton = start(
        &s,
        &[
            "--probation",
            "30s",
            "--health",
            "exec:test -e {dir}/healthy",
            "--health-interval",
            "200ms",
            "--health-failures",
            "3",
        ],
    )
    .await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |l| l.ok >= 200)
        .await
        .unwrap();
    let out = release(&baton, &["install", "v2", "--wait"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("v2 reverted") && out.stderr.contains("health check failed 3"),
        "{out:?}"
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");
    baton.wait_settled(Duration::from_secs(15)).await.unwrap();
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    let ok_then = load.snapshot().ok;
    load.wait_until(Duration::from_secs(10), |l| l.ok >= ok_then + 200)
        .await
        .unwrap();
    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.pids.len() >= 3, "v1, v2, then v1 again: {report}");
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "v2"), ReleaseStatus::Failed);
    let v2 = l.iter().find(|r| r.version == "v2").unwrap();
    assert!(!v2.last_result().unwrap().ok, "{v2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_passes_probation_becomes_permanent() {
    let _serial = exclusive().await;
    let s = store_v1_v2("rel-pass", "", true).await;
    let baton = start(
        &s,
        &[
            "--probation",
            "1s",
            "--health",
            "exec:test -e {dir}/healthy",
        ],
    )
    .await;
    let out = release(&baton, &["install", "v2", "--promoted"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("v2: promoted, on probation"), "{out:?}");
    let st = baton.status().await.unwrap();
    let p = st.releases.unwrap().probation;
    assert!(
        p.as_ref().is_none_or(|p| p.version == "v2"),
        "probation of v2 (or already over): {p:?}"
    );
    baton
        .wait_for("v2 permanent", Duration::from_secs(20), |s| {
            s.releases
                .as_ref()
                .is_some_and(|r| r.permanent.as_deref() == Some("v2") && r.probation.is_none())
        })
        .await
        .unwrap();
    let l = s.list().await.unwrap();
    assert_eq!(status_of(&l, "v2"), ReleaseStatus::Permanent);
    assert_eq!(status_of(&l, "v1"), ReleaseStatus::Old);
    // `install --newest` (ExecReload=) has nothing to do: v2 is the newest.
    let out = release(&baton, &["install", "--newest", "--wait"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(
        out.status.success() && out.stdout.contains("installed already"),
        "{out:?}"
    );
    // `rollback` now installs the previous permanent release, v1, which becomes
    // permanent in turn.
    let out = release(&baton, &["rollback", "--wait"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "v1"), ReleaseStatus::Permanent);
    assert_eq!(status_of(&l, "v2"), ReleaseStatus::Old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_preflight_starts_nothing() {
    let _serial = exclusive().await;
    let s = store_v1_v2("rel-preflight", "", false).await;
    let baton = start(
        &s,
        &[
            "--preflight",
            "test -e {dir}/healthy || { echo bad config in {version}: no healthy file; exit 4; }",
        ],
    )
    .await;
    let before = baton.status().await.unwrap();
    let out = release(&baton, &["install", "v2", "--wait"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("preflight of v2 failed")
            && out
                .stderr
                .contains("failed (exit status 4): bad config in v2: no"),
        "{out:?}"
    );
    let after = baton.status().await.unwrap();
    assert_eq!(after.generation, before.generation, "something was started");
    assert_eq!(after.generations.len(), 1);
    assert!(after.last_upgrade.is_none(), "{after:?}");
    assert_eq!(
        status_of(&list(&baton).await.unwrap(), "v2"),
        ReleaseStatus::Failed
    );
    // `check` runs the same preflight, and says so.
    let out = release(&baton, &["check", "v1"], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_baton_killed_during_probation_boots_the_permanent_release() {
    let _serial = exclusive().await;
    let s = store_v1_v2("rel-boot", "", true).await;
    let mut baton = start(&s, &["--probation", "60s"]).await;
    let out = release(&baton, &["install", "v2", "--promoted"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v2_pid = baton.status().await.unwrap().pid.unwrap();
    baton.signal(Signal::SIGKILL).unwrap();
    baton.wait_exit(Duration::from_secs(10)).await.unwrap();
    // Its children follow (parent-death signal).
    wait_pid_gone(v2_pid, Duration::from_secs(15))
        .await
        .unwrap();
    drop(baton);

    let baton = start(&s, &["--probation", "60s"]).await;
    let st = baton.status().await.unwrap();
    let boot = st.releases.unwrap().boot;
    assert!(
        boot.contains("permanent release v1") && boot.contains("v2 was on probation"),
        "{boot}"
    );
    let out = baton.cli(&["status"], RELEASE_CLI_TIMEOUT).await.unwrap();
    assert!(
        out.stdout.contains("booted: permanent release v1"),
        "{out:?}"
    );
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "v1"), ReleaseStatus::Permanent);
    assert_eq!(status_of(&l, "v2"), ReleaseStatus::Old);
    assert!(
        !l.iter()
            .find(|r| r.version == "v2")
            .unwrap()
            .last_result()
            .unwrap()
            .ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_swapped_on_disk_is_never_run() {
    let _serial = exclusive().await;
    let s = store_v1_v2("rel-swap", "", true).await;
    let baton = start(&s, &[]).await;
    let marker = s.join("swapped-ran");
    let app = s.store().join("v2/bin/app");
    let tmp = s.store().join("v2/bin/app.new");
    baton_tests::harness::write_script(
        &tmp,
        &format!("#!/bin/sh\ntouch {}\nexec sleep 1000\n", marker.display()),
    )
    .unwrap();
    std::fs::rename(&tmp, &app).unwrap();
    let out = release(&baton, &["install", "v2", "--wait"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("does not match the store") && out.stderr.contains("sha256"),
        "{out:?}"
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out:?}");
    assert!(!marker.exists(), "the swapped file ran");
    assert_eq!(baton.status().await.unwrap().generations.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_release_input_gets_one_line_and_harms_nothing() {
    let _serial = exclusive().await;
    let s = store_v1_v2("rel-bad", "", true).await;
    let baton = start(&s, &[]).await;
    let pid = baton.status().await.unwrap().pid;
    let one_line = |out: &baton_tests::harness::CliOutput, want: &str| {
        assert!(!out.status.success(), "{out:?}");
        let err = out.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{out:?}");
        assert!(
            err.starts_with("baton: error: ") && err.contains(want),
            "{err}"
        );
    };
    let out = release(&baton, &["install", "v9"], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    one_line(&out, "no release 'v9'");
    let tree = s.hello_tree("v1b", "", true).unwrap();
    let tree = tree.display().to_string();
    let out = release(&baton, &["add", "v1", &tree], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    one_line(&out, "release 'v1' is already in the store");
    let out = release(&baton, &["remove", "v1"], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    one_line(&out, "release 'v1' is permanent");
    let out = release(&baton, &["add", "../x", &tree], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    one_line(&out, "invalid version");
    let out = release(
        &baton,
        &["add", "v3", "/nonexistent/app"],
        RELEASE_CLI_TIMEOUT,
    )
    .await
    .unwrap();
    one_line(&out, "/nonexistent/app");
    // Over the control socket, add copies into the running baton's store.
    let out = release(&baton, &["add", "v3", &tree], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = release(&baton, &["remove", "v3"], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!s.store().join("v3").exists());

    // A corrupt releases.json: every command names the file; baton keeps serving.
    let meta = s.store().join("releases.json");
    let good = std::fs::read(&meta).unwrap();
    std::fs::write(&meta, b"{\"format\": 1, \"releases\": [").unwrap();
    let out = release(&baton, &["list"], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    one_line(&out, "releases.json");
    let out = s.offline(&["list"]).await.unwrap();
    one_line(&out, "releases.json");
    let out = release(&baton, &["install", "v2"], RELEASE_CLI_TIMEOUT)
        .await
        .unwrap();
    one_line(&out, "releases.json");
    assert_eq!(baton.status().await.unwrap().pid, pid);
    // baton itself refuses to start on it, naming it, with exit 2.
    let run = s.run_to_exit().await.unwrap();
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(
        run.stderr
            .trim()
            .lines()
            .last()
            .unwrap()
            .contains("releases.json"),
        "{run:?}"
    );
    std::fs::write(&meta, good).unwrap();

    // An empty store: exit 2, saying how to add a release.
    let empty = StoreDir::new("rel-empty").unwrap();
    std::fs::create_dir(empty.store()).unwrap();
    let run = empty.run_to_exit().await.unwrap();
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("baton release add"), "{run:?}");

    // A store other users may write to (symlinks planted for baton's temporary files,
    // swapped releases): refused by baton and by the CLI.
    let open = StoreDir::new("rel-open").unwrap();
    open.add_hello("v1", "", true).await.unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(open.store(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let run = open.run_to_exit().await.unwrap();
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("lets other users replace"), "{run:?}");
    let out = open.offline(&["list"]).await.unwrap();
    one_line(&out, "lets other users replace");

    // A store that cannot be written (a read-only filesystem; root ignores modes).
    let ro = StoreDir::new("rel-ro").unwrap();
    let dir = ro.store();
    let mounted = baton_tests::harness::Tmpfs::mount(&dir, "ro,size=64k").ok();
    if mounted.is_none() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let writable = std::fs::write(dir.join("probe"), b"").is_ok();
    if writable {
        eprintln!("skipping the read-only store case: cannot make a directory unwritable here");
    } else {
        let out = ro.add("v1", std::path::Path::new(&tree)).await.unwrap_err();
        let text = out.to_string();
        assert!(
            text.contains("not writable") || text.contains("Read-only"),
            "{text}"
        );
    }
    drop(mounted);
    assert_eq!(
        baton.status().await.unwrap().pid,
        pid,
        "nothing running was touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_revert_hands_the_state_down_to_the_old_schema() {
    use baton_tests::resp::{IncrWriter, Reply, RespClient, progress};
    const WRITERS: usize = 8;
    let _serial = exclusive().await;
    let (s, baton) = kv_store_and_baton("rel-kv").await;
    let addr = baton.tcp_addr("kv").await.unwrap();
    let mut c = RespClient::connect(addr).await.unwrap();
    for i in 0..100 {
        let r = c
            .command(&["SET", &format!("v1:{i}"), &format!("value {i}")])
            .await
            .unwrap();
        assert!(r.is_ok(), "{r}");
    }
    let mut writers = Vec::new();
    for i in 0..WRITERS {
        writers.push(IncrWriter::start(addr, format!("w:{i}")).await.unwrap());
    }
    progress(&writers, 100).await.unwrap();

    let out = release(&baton, &["install", "kv2", "--promoted"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let on_v2 = baton.status().await.unwrap();
    assert_eq!(
        active_release(&baton).await.unwrap().as_deref(),
        Some("kv2")
    );
    // Writes acknowledged by v2.
    let mark = writers.iter().map(IncrWriter::last).max().unwrap_or(0);
    progress(&writers, mark + 200).await.unwrap();
    let r = c
        .command(&["SET", "v2:key", "written on v2"])
        .await
        .unwrap();
    assert!(r.is_ok(), "{r}");

    // v2 turns unhealthy: baton reverts to kv1, and kv2 writes its state as schema 1.
    std::fs::remove_file(s.store().join("kv2/healthy")).unwrap();
    let reverted = baton
        .wait_for("the revert to kv1", Duration::from_secs(30), |st| {
            st.pid != on_v2.pid
                && st
                    .generations
                    .iter()
                    .any(|g| Some(g.pid) == st.pid && g.release.as_deref() == Some("kv1"))
        })
        .await
        .unwrap();
    let mark = writers.iter().map(IncrWriter::last).max().unwrap_or(0);
    progress(&writers, mark + 200).await.unwrap();
    assert!(
        baton.log().contains("writing schema 1"),
        "no down-migration in the log"
    );

    let mut finals = Vec::new();
    for w in writers {
        let key = w.key().to_string();
        let last = w
            .finish()
            .await
            .unwrap_or_else(|e| panic!("writer failed: {e}"));
        finals.push((key, last));
    }
    // Every acknowledged write is there, on the old schema, and the clients kept
    // their connections (a writer fails on any close).
    let mut c = RespClient::connect(addr).await.unwrap();
    for (key, last) in &finals {
        match c.command(&["GET", key]).await.unwrap() {
            Reply::Bulk(Some(v)) => assert_eq!(
                String::from_utf8_lossy(&v),
                last.to_string(),
                "{key}: acknowledged {last}"
            ),
            other => panic!("{key}: {other}"),
        }
    }
    for (key, want) in [("v1:7", "value 7"), ("v2:key", "written on v2")] {
        match c.command(&["GET", key]).await.unwrap() {
            Reply::Bulk(Some(v)) => assert_eq!(String::from_utf8_lossy(&v), want),
            other => panic!("{key}: {other}"),
        }
    }
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "kv1"), ReleaseStatus::Permanent);
    assert_eq!(status_of(&l, "kv2"), ReleaseStatus::Failed);
    assert_eq!(
        reverted
            .last_upgrade
            .as_ref()
            .and_then(|u| u.reason.clone()),
        None,
        "no state lost: {:?}",
        reverted.last_upgrade
    );
    println!("writers: {finals:?}");
}

/// kv1 (schema 1, permanent) and kv2 (schema 2) in a store; baton runs kv1 with
/// `--state`, and a health check that fails once `{dir}/healthy` is gone.
async fn kv_store_and_baton(tag: &str) -> (StoreDir, Baton) {
    let s = StoreDir::new(tag).unwrap();
    let v1 = s.kv_tree("kv1", 1, true).unwrap();
    s.add("kv1", &v1).await.unwrap();
    let v2 = s.kv_tree("kv2", 2, true).unwrap();
    s.add("kv2", &v2).await.unwrap();
    s.permanent("kv1").await;
    let store = s.arg();
    let baton = Baton::start_in(
        TestDir::new("rel-kv-run").unwrap(),
        [
            "--state",
            "--listen",
            "kv=127.0.0.1:0",
            "--releases",
            store.as_str(),
            "--drain-timeout",
            "60s",
            "--probation",
            "120s",
            "--health",
            "exec:test -e {dir}/healthy",
            "--health-interval",
            "200ms",
        ],
        ["bin/app"],
    )
    .await
    .unwrap();
    (s, baton)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_the_live_state_cannot_make_is_refused_and_reported() {
    use baton_tests::resp::RespClient;
    let _serial = exclusive().await;
    let (s, baton) = kv_store_and_baton("rel-kv-refuse").await;
    let addr = baton.tcp_addr("kv").await.unwrap();
    let install = release(&baton, &["install", "kv2", "--promoted"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(install.status.success(), "{install:?}");
    let on_v2 = baton.status().await.unwrap();
    // Schema 1 holds UTF-8 only: this key cannot go down to it.
    let mut c = RespClient::connect(addr).await.unwrap();
    let key: &[u8] = b"bin\xff";
    let r = c
        .command(&[b"SET".as_slice(), key, b"v".as_slice()])
        .await
        .unwrap();
    assert!(r.is_ok(), "{r}");
    std::fs::remove_file(s.store().join("kv2/healthy")).unwrap();
    let st = baton
        .wait_for("the refused revert", Duration::from_secs(30), |st| {
            st.last_upgrade
                .as_ref()
                .is_some_and(|u| u.reason.as_deref().is_some_and(|r| r.contains("non-UTF-8")))
        })
        .await
        .unwrap();
    assert_eq!(st.pid, on_v2.pid, "kv2 keeps running");
    assert!(
        st.releases.as_ref().unwrap().probation.is_none(),
        "no revert loop"
    );
    let l = list(&baton).await.unwrap();
    assert_eq!(status_of(&l, "kv2"), ReleaseStatus::Current);
    let last = l
        .iter()
        .find(|r| r.version == "kv2")
        .unwrap()
        .last_result()
        .unwrap()
        .clone();
    assert!(
        !last.ok && last.detail.contains("revert failed"),
        "{last:?}"
    );
    // The data is intact on the connection that wrote it.
    let r = c.command(&[b"GET".as_slice(), key]).await.unwrap();
    assert_eq!(r, baton_tests::resp::Reply::Bulk(Some(b"v".to_vec())));
}

/// Without a store, the file opened at spawn is the one exec'd, and the previous
/// generation's stays open: probation reverts to it after `mv new app` replaced the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_probation_reverts_to_the_file_that_ran_before_it_was_replaced() {
    use baton_tests::harness::{hello_http_bin, write_script};
    use baton_tests::http::http_get;
    let _serial = exclusive().await;
    let dir = TestDir::new("rel-nostore").unwrap();
    let hello = hello_http_bin().unwrap();
    let app = dir.join("app");
    write_script(
        &app,
        &format!("#!/bin/sh\nexec {} --label old\n", hello.display()),
    )
    .unwrap();
    let new = dir.join("app.new");
    write_script(
        &new,
        &format!(
            "#!/bin/sh\nexec {} --label new --exit-after 2s\n",
            hello.display()
        ),
    )
    .unwrap();
    let baton = Baton::start_in(
        dir,
        ["--listen", "http=127.0.0.1:0", "--probation", "30s"],
        [&app],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let label = || {
        http_get(addr, "/", Duration::from_secs(5))
            .map(|r| r.body)
            .unwrap_or_default()
    };
    assert!(label().contains("label=old"));
    std::fs::rename(&new, &app).unwrap();
    let promoted = match baton.upgrade_wait().await.unwrap() {
        baton_tests::harness::UpgradeOutcome::Promoted(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(label().contains("label=new"));
    let st = baton
        .wait_for("the revert", Duration::from_secs(20), |s| {
            s.pid.is_some() && s.pid != promoted.pid && !s.upgrading
        })
        .await
        .unwrap();
    assert!(label().contains("label=old"), "{}", label());
    assert_eq!(st.crashes, 1);
    assert!(
        baton.log().contains("exited during probation"),
        "{}",
        baton.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_what_cannot_run_on_this_machine() {
    let _serial = exclusive().await;
    let s = StoreDir::new("rel-arch").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    // An ELF for another machine: this one's binary with e_machine patched.
    let mut elf = std::fs::read(baton_tests::harness::hello_http_bin().unwrap()).unwrap();
    elf[18] = 0x28; // EM_ARM
    elf[19] = 0;
    let foreign = s.join("foreign");
    std::fs::write(&foreign, &elf).unwrap();
    drop(elf);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = s.join("text");
    baton_tests::harness::write_script(&text, "no shebang, not a program\n").unwrap();
    s.add("arm", &foreign)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.add("text", &text).await.unwrap();
    for (v, want) in [
        ("arm", "an ELF for another machine"),
        ("text", "not an ELF executable or a #! script"),
    ] {
        let out = s.offline(&["check", v]).await.unwrap();
        assert!(!out.status.success(), "{out:?}");
        assert!(out.stderr.contains(want), "{v}: {out:?}");
    }
    assert!(s.offline(&["check", "v1"]).await.unwrap().status.success());
    s.permanent("v1").await;
    let baton = start(&s, &[]).await;
    let out = release(&baton, &["install", "arm", "--wait"], INSTALL_TIMEOUT)
        .await
        .unwrap();
    assert!(
        !out.status.success() && out.stderr.contains("another machine"),
        "{out:?}"
    );
    assert_eq!(baton.status().await.unwrap().generations.len(), 1);
}

/// Issue 32, item 12: the store recorded PROGRAM at its first `release add`, so
/// `baton run --releases STORE` needs no `-- PROGRAM`; one that disagrees with the
/// store is refused, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_store_takes_the_program_it_recorded() {
    let _serial = exclusive().await;
    let s = StoreDir::new("rel-program").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    s.permanent("v1").await;
    let store = s.arg();
    let no_program: [&str; 0] = [];
    let baton = Baton::start_in(
        TestDir::new("rel-program-run").unwrap(),
        ["--listen", "http=127.0.0.1:0", "--releases", store.as_str()],
        no_program,
    )
    .await
    .unwrap();
    assert_eq!(active_release(&baton).await.unwrap().as_deref(), Some("v1"));
    drop(baton);

    let out = s.run_to_exit_with("bin/other").await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("'bin/app'") && out.stderr.contains("'bin/other'"),
        "{out:?}"
    );
}
