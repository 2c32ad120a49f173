//! Issue 32: the README's walkthroughs, run as written (read from README.md) against the
//! release binaries, so a README command that breaks fails CI. The ports and paths are the
//! README's own (8080, 8081, 6380, 3000, 7000, /tmp/b.sock, /tmp/kv.sock).

use std::time::Duration;

use baton_tests::harness::{exclusive, which};
use baton_tests::readme::{Session, blocks, blocks_in, first_command};

const SCRIPT: Duration = Duration::from_secs(60);

/// Command 1, then the two-minute walkthrough: an upgrade between two `curl`s, ten
/// upgrades under load with no failed request, and a broken candidate rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_minute_walkthrough_runs_as_written() {
    let _serial = exclusive().await;
    if which("curl").is_none() {
        eprintln!("SKIP: curl is not installed (scripts/install-test-deps installs it)");
        return;
    }
    let mut s = Session::default();
    s.start(first_command().trim());
    let b = blocks("Two-minute walkthrough");
    assert_eq!(b.len(), 3, "{b:#?}");

    let ran = s.run(&b[0], SCRIPT);
    let out = &ran[0].output;
    let first = out.find("generation=1").unwrap_or_else(|| panic!("{out}"));
    let second = out.find("generation=2").unwrap_or_else(|| panic!("{out}"));
    assert!(first < second && ran[0].code == Some(0), "{ran:?}");

    let ran = s.run(&b[1], SCRIPT);
    let out = &ran[0].output;
    assert!(out.contains("failed 0"), "{out}");
    assert_eq!(out.matches("promoted generation").count(), 10, "{out}");

    let ran = s.run(&b[2], SCRIPT);
    let out: String = ran.iter().map(|r| r.output.as_str()).collect();
    assert!(out.contains("rolled back"), "{out}");
    assert!(out.contains("exit status 3"), "{out}");
    assert!(
        out.trim_end()
            .lines()
            .last()
            .unwrap_or("")
            .contains("hello from"),
        "{out}"
    );
    assert_eq!(ran.last().and_then(|r| r.code), Some(0), "{ran:?}");
    let _ = std::fs::remove_file("/tmp/app");
    let _ = std::fs::remove_file("/tmp/current");
    let _ = std::fs::remove_file("/tmp/broken");
}

/// The stateful walkthrough, up to its 1 GB step (which needs 2.3 GB of free memory,
/// as the README says): the key survives an upgrade into a new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stateful_walkthrough_runs_as_written() {
    let _serial = exclusive().await;
    if which("redis-cli").is_none() {
        eprintln!("SKIP: redis-cli is not installed (scripts/install-test-deps installs it)");
        return;
    }
    let mut s = Session::default();
    let b = blocks("Stateful walkthrough: a Redis-protocol server that keeps its data");
    let upto: Vec<String> = b[0]
        .iter()
        .take_while(|l| !l.contains("1 GB of state"))
        .cloned()
        .collect();
    let ran = s.run(&upto, SCRIPT);
    let out: String = ran.iter().map(|r| r.output.as_str()).collect();
    assert!(
        out.lines().any(|l| l.trim() == "1"),
        "GET a after the upgrade:\n{out}"
    );
    assert!(out.contains("baton_generation:2"), "{out}");
    assert!(out.contains("accept gap"), "{out}");
}

/// The SDK section's shell blocks: axum-hello keeps answering across an upgrade, and the
/// Python counter keeps its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_walkthroughs_run_as_written() {
    let _serial = exclusive().await;
    if which("curl").is_none() || which("socat").is_none() {
        eprintln!("SKIP: curl or socat is not installed (scripts/install-test-deps installs them)");
        return;
    }
    let b = blocks("The SDK, for apps that want more than level 1");
    assert_eq!(b.len(), 2, "{b:#?}");
    {
        let mut s = Session::default();
        // The build line is the suite's own work, done already.
        let lines: Vec<String> = b[0]
            .iter()
            .filter(|l| !l.starts_with("cargo build"))
            .cloned()
            .collect();
        let ran = s.run(&lines, SCRIPT);
        let out: String = ran.iter().map(|r| r.output.as_str()).collect();
        assert_eq!(out.matches("hello").count(), 2, "{out}");
        assert_eq!(ran.last().and_then(|r| r.code), Some(0), "{ran:?}");
    }
    let mut s = Session::default();
    let ran = s.run(&b[1], SCRIPT);
    let out: String = ran.iter().map(|r| r.output.as_str()).collect();
    assert!(out.contains("OK a 1"), "{out}");
    assert_eq!(ran.last().and_then(|r| r.code), Some(0), "{ran:?}");
}

/// docs/TESTING-UPGRADES.md's kv-server rehearsal, as written: every step passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_testing_upgrades_example_runs_as_written() {
    let _serial = exclusive().await;
    if which("redis-cli").is_none() {
        eprintln!("SKIP: redis-cli is not installed (scripts/install-test-deps installs it)");
        return;
    }
    let b = blocks_in(
        "docs/TESTING-UPGRADES.md",
        "Example: this repository's kv-server",
    );
    let ran = Session::default().run(&b[0], Duration::from_secs(180));
    let out: String = ran.iter().map(|r| r.output.as_str()).collect();
    assert_eq!(ran.last().and_then(|r| r.code), Some(0), "{out}");
    assert!(out.contains("none failed"), "{out}");
    assert!(
        out.contains("state check: A → B → A gives A's state back  pass"),
        "{out}"
    );
    assert!(out.contains("writes"), "the writer said nothing: {out}");
}
