//! Issue 31: a second hostile-input round. Each test fails on the code before its fix.

use std::time::Duration;

use baton_tests::harness::{Baton, UpgradeOutcome, exclusive, hello_http_bin};

/// Defect 7: a health check that leaves a background child (or times out) leaks
/// nothing: each check runs in its own process group, killed whole when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_leave_no_process_behind() {
    let _serial = exclusive().await;
    let marker = format!("sleep 78{}", std::process::id() % 1000);
    let dir = baton_tests::harness::TestDir::new("health-leak").unwrap();
    let ran = dir.join("ran");
    let check = format!("exec:touch {}; {marker} >/dev/null & true", ran.display());
    // A new file for the upgrade: only a new version goes on probation.
    let hello = hello_http_bin().unwrap();
    let app = dir.join("app");
    baton_tests::harness::replace_symlink(&app, &hello).unwrap();
    let wrapper = dir.join("v2");
    baton_tests::harness::write_script(&wrapper, &format!("#!/bin/sh\nexec {}\n", hello.display()))
        .unwrap();
    let baton = Baton::start_in(
        dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--probation",
            "3s",
            "--health",
            check.as_str(),
            "--health-interval",
            "200ms",
        ],
        [&app],
    )
    .await
    .unwrap();
    baton_tests::harness::replace_symlink(&app, &wrapper).unwrap();
    // The upgraded version is on probation: checked every 200 ms for 3 s.
    match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(_) => {}
        other => panic!("{other:?}"),
    }
    // Probation over: no new check starts; one in flight ends within a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !baton.log().contains(" permanent") {
        assert!(
            std::time::Instant::now() < deadline,
            "probation never ended:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let count = || {
        let out = std::process::Command::new("pgrep")
            .args(["-c", "-f", &format!("^{marker}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    // A leaked one lives 78 s: the count would not fall.
    let settle = std::time::Instant::now() + Duration::from_secs(3);
    let mut n = count();
    while n > 0 && std::time::Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
        n = count();
    }
    let log = baton.log();
    assert!(ran.exists(), "no health check ran; log:\n{log}");
    assert_eq!(n, 0, "{n} check processes leaked; log:\n{log}");
}
