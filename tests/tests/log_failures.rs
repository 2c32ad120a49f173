//! Issue 31, defect 3: baton never dies from a log write. A log pipe closed at the first
//! line, or a log file on a full disk, loses lines; baton keeps serving and upgrading. A
//! client command whose output cannot be written says so in one line and exits 1.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use baton_tests::harness::{Baton, TestDir, UpgradeOutcome, baton_cli, exclusive, hello_http_bin};
use baton_tests::http::http_get;

/// baton (and its app, which shares its stderr) keep serving and upgrading.
async fn serves_and_upgrades(baton: &Baton, what: &str) {
    baton.wait_active(Duration::from_secs(20)).await.unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    for i in 1..=2 {
        match baton.upgrade_wait().await.unwrap() {
            UpgradeOutcome::Promoted(_) => {}
            other => panic!("{what}: upgrade {i}: {other:?}"),
        }
        let r = http_get(addr, "/", Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200, "{what}");
    }
    assert!(
        baton_tests::harness::pid_alive(baton.pid()),
        "{what}: baton died"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_closed_after_the_first_line_loses_lines_not_baton() {
    let _serial = exclusive().await;
    let (read, write) = nix::unistd::pipe().unwrap();
    let baton = Baton::spawn_with_stderr(
        TestDir::new("log-pipe").unwrap(),
        std::fs::File::from(write),
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .unwrap();
    // As `baton run ... 2>&1 | head -1`: one line, then the reader is gone.
    let mut first = String::new();
    BufReader::new(std::fs::File::from(read))
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    serves_and_upgrades(&baton, "closed pipe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_on_a_full_disk_loses_lines_not_baton() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: mounting a 1 MB tmpfs needs root");
        return;
    }
    let _serial = exclusive().await;
    let dir = TestDir::new("log-full").unwrap();
    let mnt = dir.join("full");
    let _tmpfs = baton_tests::harness::Tmpfs::mount(&mnt, "size=1m").unwrap();
    // Fill it, so that every log write fails with ENOSPC.
    let filler = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", mnt.join("filler").display()))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!filler.success(), "dd stops at a full disk");
    let log = std::fs::File::create(mnt.join("baton.log")).unwrap();
    let baton = Baton::spawn_with_stderr(
        dir,
        log,
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .unwrap();
    serves_and_upgrades(&baton, "full disk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_output_cannot_be_written_says_so_in_one_line() {
    let _serial = exclusive().await;
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    let control = baton.control().display().to_string();
    let bin = baton_tests::harness::baton_bin().unwrap();
    let out = std::process::Command::new(bin)
        .args(["status", "--control", control.as_str()])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
    // The same command with somewhere to write works.
    let ok = baton_cli(
        ["status", "--control", control.as_str()],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(ok.status.success());
}
