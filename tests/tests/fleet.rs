//! Issue 15: fleet rollouts with `deploy/ansible`, against four baton hosts on this
//! machine under continuous load: the rollout is gated on baton's verdict host by host,
//! stops at the first host baton reverts, and the revert playbook undoes it.

use std::time::Duration;

use baton_protocol::ReleaseStatus;
use baton_tests::fleet::{Fleet, HEALTHY, recap};
use baton_tests::harness::{CliOutput, exclusive, wait_pid_gone};
use baton_tests::load::{LoadGen, LoadHandle, LoadOpts};
use baton_tests::releases::active_release;
use baton_tests::venv::venv_tool;

/// v3's health check fails on a host whose configuration has this file.
const V3_HEALTHCHECK: &str = r#"test ! -e "$1/v3-incompatible""#;

fn shown(out: &CliOutput) -> String {
    format!(
        "exit {:?} after {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        out.elapsed.as_secs_f64(),
        out.stdout,
        out.stderr
    )
}

/// The play failed (exit 2); the `fatal: [host]` line, which must contain `text`.
fn play_failed_on<'a>(out: &'a CliOutput, host: &str, text: &str) -> &'a str {
    assert_eq!(out.status.code(), Some(2), "the play fails: {}", shown(out));
    out.stdout
        .lines()
        .find(|l| l.starts_with(&format!("fatal: [{host}]")) && l.contains(text))
        .unwrap_or_else(|| panic!("no failure on {host} saying {text:?}: {}", shown(out)))
}

async fn permanents(fleet: &Fleet) -> Vec<String> {
    let mut v = Vec::new();
    for h in &fleet.hosts {
        v.push(h.permanent().await.unwrap().unwrap_or_default());
    }
    v
}

/// Each host's load has made progress since `before`: the host still serves.
async fn all_serving(loads: &[LoadHandle]) {
    for l in loads {
        let then = l.snapshot().ok;
        l.wait_until(Duration::from_secs(10), |s| s.ok >= then + 20)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_stops_at_the_host_baton_reverts_and_the_revert_playbook_undoes_it() {
    let _serial = exclusive().await;
    // install-test-deps installs it; a missing one is a broken setup, not a skip.
    let ansible = venv_tool("ansible-playbook").unwrap_or_else(|why| panic!("{why}"));
    let fleet = Fleet::start(4, ansible).await.unwrap();
    let opts = LoadOpts {
        keepalive: 2,
        fresh: 1,
        ..LoadOpts::default()
    };
    let loads: Vec<LoadHandle> = fleet
        .hosts
        .iter()
        .map(|h| LoadGen::start(h.addr, opts.clone()))
        .collect();
    all_serving(&loads).await;
    let v2 = fleet.artifact("v2", "v2", HEALTHY).unwrap();
    let v3 = fleet.artifact("v3", "v3", V3_HEALTHCHECK).unwrap();
    std::fs::write(fleet.hosts[1].conf().join("v3-incompatible"), "").unwrap();
    let v2_vars = [
        ("baton_version", "v2"),
        ("baton_artifact", v2.to_str().unwrap()),
    ];

    // Check mode says what it would do and does nothing.
    let out = fleet.playbook("rollout.yml", &v2_vars, true).await.unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(
        out.stdout
            .matches("would install v2 (permanent now: v1)")
            .count(),
        4,
        "{}",
        shown(&out)
    );
    assert!(
        out.stdout.contains("+permanent: v2"),
        "the diff: {}",
        shown(&out)
    );
    for h in &fleet.hosts {
        assert_eq!(h.permanent().await.unwrap().as_deref(), Some("v1"));
        assert_eq!(
            h.has("v2").await.unwrap(),
            (false, false),
            "{}: check mode added or shipped v2",
            h.name
        );
    }

    // v2 everywhere, one host at a time.
    let out = fleet
        .playbook("rollout.yml", &v2_vars, false)
        .await
        .unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    println!(
        "rollout of v2 to 4 hosts: {:.1} s",
        out.elapsed.as_secs_f64()
    );
    assert_eq!(permanents(&fleet).await, ["v2"; 4]);
    for h in &fleet.hosts {
        assert_eq!(
            active_release(&h.baton).await.unwrap().as_deref(),
            Some("v2")
        );
        let r = recap(&out.stdout, &h.name).unwrap_or_else(|| panic!("{}", shown(&out)));
        assert!(r.contains("failed=0"), "{r}");
    }
    all_serving(&loads).await;

    // v3 breaks on host2 only: host1 takes it, baton reverts host2, and the play stops
    // there with host2's reason, before host3 and host4.
    let out = fleet
        .playbook(
            "rollout.yml",
            &[
                ("baton_version", "v3"),
                ("baton_artifact", v3.to_str().unwrap()),
            ],
            false,
        )
        .await
        .unwrap();
    println!(
        "rollout of v3, stopped at host2: {:.1} s",
        out.elapsed.as_secs_f64()
    );
    let failed = play_failed_on(&out, "host2", "");
    assert!(
        failed.contains("v3 reverted: health check failed 2 time(s) in a row")
            && failed.contains("reverted to v2"),
        "host2's reason: {failed}"
    );
    for untouched in ["host3", "host4"] {
        assert!(
            !out.stdout.contains(&format!("[{untouched}]")),
            "the play reached {untouched}: {}",
            shown(&out)
        );
    }
    assert_eq!(permanents(&fleet).await, ["v3", "v2", "v2", "v2"]);
    let h2 = fleet.hosts[1].releases().await.unwrap();
    assert_eq!(
        h2.iter().find(|r| r.version == "v3").map(|r| r.status),
        Some(ReleaseStatus::Failed)
    );
    assert_eq!(
        active_release(&fleet.hosts[1].baton)
            .await
            .unwrap()
            .as_deref(),
        Some("v2")
    );
    for h in &fleet.hosts[2..] {
        assert_eq!(
            h.has("v3").await.unwrap(),
            (false, false),
            "{} got v3",
            h.name
        );
    }
    all_serving(&loads).await;

    // The revert playbook takes host1 back to its previous permanent release; the hosts
    // that do not run v3 are left alone.
    let out = fleet
        .playbook(
            "revert.yml",
            &[("baton_version", "v3"), ("baton_serial", "50%")],
            false,
        )
        .await
        .unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    assert!(
        out.stdout.contains("rolled back from v3 to v2"),
        "{}",
        shown(&out)
    );
    assert_eq!(permanents(&fleet).await, ["v2"; 4]);
    for (h, changed) in fleet.hosts.iter().zip([1, 0, 0, 0]) {
        assert_eq!(
            active_release(&h.baton).await.unwrap().as_deref(),
            Some("v2")
        );
        let r = recap(&out.stdout, &h.name).unwrap_or_else(|| panic!("{}", shown(&out)));
        assert!(r.contains(&format!("changed={changed} ")), "{r}");
    }
    all_serving(&loads).await;

    // v4 passes baton's checks but serves the wrong thing: the role's HTTP check through
    // the host's listener fails on host1, which is rolled back, and the play stops.
    let v4 = fleet.artifact("v4", "not-v4", HEALTHY).unwrap();
    let out = fleet
        .playbook(
            "rollout.yml",
            &[
                ("baton_version", "v4"),
                ("baton_artifact", v4.to_str().unwrap()),
                ("baton_http_check_retries", "2"),
            ],
            false,
        )
        .await
        .unwrap();
    let failed = play_failed_on(&out, "host1", "failed the check of http://");
    assert!(
        failed.contains("label=v4") && failed.contains("rolled back"),
        "{failed}"
    );
    assert!(!out.stdout.contains("[host2]"), "{}", shown(&out));
    assert_eq!(permanents(&fleet).await, ["v2"; 4]);
    assert_eq!(
        active_release(&fleet.hosts[0].baton)
            .await
            .unwrap()
            .as_deref(),
        Some("v2")
    );
    all_serving(&loads).await;

    for (h, load) in fleet.hosts.iter().zip(loads) {
        let report = load.stop().await;
        println!("{}: {report}", h.name);
        assert_eq!(report.failed, 0, "{}: {report}", h.name);
    }

    // Nothing outlives the test: no process, no directory.
    let pids = fleet.pids();
    let dir = fleet.dir().to_path_buf();
    drop(fleet);
    for pid in pids {
        wait_pid_gone(pid, Duration::from_secs(10)).await.unwrap();
    }
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
