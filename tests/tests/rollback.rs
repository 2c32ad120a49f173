//! Issue 2, test 2: a failed candidate changes nothing for clients.
//!
//! baton runs `<tmp>/app`, a symlink to hello-http. PROGRAM is resolved again at every
//! upgrade, so pointing the symlink elsewhere (or removing it) picks the next candidate.
//! Each case upgrades under load into a broken candidate, checks the rollback, then points
//! the link back at hello-http and checks that the next upgrade still works.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_protocol::{UpgradeReport, UpgradeResult};
use baton_tests::harness::{
    Baton, TestDir, UpgradeOutcome, exclusive, generation_pids, hello_http_bin, pid_alive,
    replace_symlink, wait_pid_gone, write_script,
};
use baton_tests::load::{LoadGen, LoadOpts};

const READY_TIMEOUT: Duration = Duration::from_secs(2);

struct Case {
    dir: TestDir,
    app: PathBuf,
    hello: PathBuf,
}

impl Case {
    fn new(tag: &str) -> Self {
        let dir = TestDir::new(tag).unwrap();
        let hello = hello_http_bin().unwrap();
        let app = dir.join("app");
        std::os::unix::fs::symlink(&hello, &app).unwrap();
        // Written before baton starts: nothing may hold a script open for writing while
        // baton execs it (ETXTBSY).
        write_script(&dir.join("exit3.sh"), "#!/bin/sh\nexit 3\n").unwrap();
        write_script(&dir.join("hang.sh"), "#!/bin/sh\nexec sleep 1000\n").unwrap();
        Self { dir, app, hello }
    }
}

/// Runs one rollback case; `break_app` turns `<dir>/app` into a bad candidate.
/// Returns the rollback report.
async fn rollback_under_load(tag: &str, break_app: impl FnOnce(&Path, &Path)) -> UpgradeReport {
    let _serial = exclusive().await;
    let case = Case::new(tag);
    let app = case.app.clone();
    let hello = case.hello.clone();
    let ready_timeout = format!("{}ms", READY_TIMEOUT.as_millis());
    let baton = Baton::start_in(
        case.dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--ready-timeout",
            ready_timeout.as_str(),
            "--drain-timeout",
            "10s",
        ],
        [&app],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let before = baton.status().await.unwrap();
    let old_pid = before.pid.unwrap();

    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |s| {
        s.pids.contains(&old_pid) && s.ok >= 100
    })
    .await
    .unwrap_or_else(|s| panic!("generation 1 never served: {s:?}"));

    break_app(&app, baton.dir().path());
    let started = Instant::now();
    let message = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::RolledBack { message } => message,
        UpgradeOutcome::Promoted(r) => panic!("a broken candidate was promoted: {r:?}"),
    };
    let took = started.elapsed();
    assert!(
        !message.is_empty(),
        "`baton upgrade --wait` gave no reason on stderr"
    );

    let after = baton.status().await.unwrap();
    let last = after
        .last_upgrade
        .clone()
        .expect("last_upgrade after a rollback");
    assert_eq!(last.result, UpgradeResult::RolledBack, "{last:?}");
    let reason = last.reason.clone().unwrap_or_default();
    assert!(
        !reason.trim().is_empty(),
        "rollback without a reason: {last:?}"
    );
    assert_eq!(
        after.pid,
        Some(old_pid),
        "the old generation must stay active"
    );
    assert_eq!(after.generation, before.generation);
    assert!(!after.upgrading, "{after:?}");
    // The candidate is gone, not left behind.
    if let Some(candidate) = last.pid {
        wait_pid_gone(candidate, Duration::from_secs(5))
            .await
            .unwrap();
    }
    let settled = baton.wait_settled(Duration::from_secs(10)).await.unwrap();
    assert_eq!(generation_pids(&settled), vec![old_pid]);
    assert!(pid_alive(old_pid));

    // The old generation still serves: more successful answers after the rollback.
    let ok_then = load.snapshot().ok;
    load.wait_until(Duration::from_secs(10), |s| s.ok >= ok_then + 1000)
        .await
        .unwrap_or_else(|s| panic!("old generation stopped serving after rollback: {s:?}"));

    // And baton is not wedged: a good candidate is promoted next.
    replace_symlink(&app, &hello).unwrap();
    let promoted = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => r,
        UpgradeOutcome::RolledBack { message } => {
            panic!("upgrade after the rollback failed too: {message}")
        }
    };
    let new_pid = promoted.pid.expect("promoted pid");
    assert_ne!(new_pid, old_pid);
    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&new_pid))
        .await
        .unwrap_or_else(|s| panic!("new generation never answered: {s:?}"));
    baton.wait_settled(Duration::from_secs(15)).await.unwrap();

    let report = load.stop().await;
    println!("{tag}: rolled back in {took:?}: {message}\n{report}");
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    let mut expected = vec![old_pid, new_pid];
    expected.sort_unstable();
    assert_eq!(
        report.pids, expected,
        "only the two good generations may answer"
    );
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn program_missing_at_upgrade() {
    let last = rollback_under_load("missing", |app, _| fs::remove_file(app).unwrap()).await;
    assert_eq!(last.pid, None, "nothing to spawn, yet a pid: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn program_not_executable_at_upgrade() {
    let last = rollback_under_load("noexec", |app, _| {
        fs::remove_file(app).unwrap();
        fs::write(app, "this is not a program\n").unwrap();
        fs::set_permissions(app, fs::Permissions::from_mode(0o644)).unwrap();
    })
    .await;
    assert_eq!(last.pid, None, "exec cannot have succeeded: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_exits_at_once() {
    rollback_under_load("exit3", |app, dir| {
        replace_symlink(app, &dir.join("exit3.sh")).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_never_ready() {
    let last = rollback_under_load("hang", |app, dir| {
        replace_symlink(app, &dir.join("hang.sh")).unwrap();
    })
    .await;
    // Rolled back by the ready timeout, not earlier and not much later.
    let ms = u128::from(last.duration_ms);
    assert!(
        ms + 100 >= READY_TIMEOUT.as_millis() && ms <= READY_TIMEOUT.as_millis() + 3000,
        "rollback after {ms} ms with --ready-timeout {READY_TIMEOUT:?}"
    );
    let pid = last.pid.expect("the hanging candidate was spawned");
    assert!(
        !pid_alive(pid),
        "the hanging candidate {pid} is still running"
    );
}
