//! Issue 14 (baton's share of an upgrade): a generation with a cgroup is created inside
//! it by `clone3(CLONE_INTO_CGROUP)`, an exec that fails after baton's checks is a
//! rollback that names the exec's error, and baton runs ahead of its app (`--nice`)
//! while every generation gets the start priority back.

use std::path::Path;

use baton_tests::harness::{
    Baton, TestDir, UpgradeOutcome, exclusive, hello_http_bin, replace_symlink, sched_of,
};

async fn start(dir: TestDir, current: &Path) -> Option<Baton> {
    let baton = Baton::start_in(dir, ["--listen", "http=127.0.0.1:0"], [current.as_os_str()])
        .await
        .unwrap();
    let status = baton.status().await.unwrap();
    if status.containment != "cgroup" {
        eprintln!(
            "SKIP: generations are not in cgroups here ({}): the clone3 path is not taken",
            status.containment
        );
        return None;
    }
    Some(baton)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_starts_inside_its_cgroup_and_a_failed_exec_names_its_error() {
    let _serial = exclusive().await;
    let dir = TestDir::new("clone3").unwrap();
    let current = dir.join("current");
    std::os::unix::fs::symlink(hello_http_bin().unwrap(), &current).unwrap();
    // An ELF for this machine (it passes baton's checks) whose dynamic loader does not
    // exist: only the exec itself can fail, with ENOENT, inside the child.
    let broken = dir.join("broken");
    let elf = std::fs::read(hello_http_bin().unwrap()).unwrap();
    let (from, to) = (
        b"/lib64/ld-linux-x86-64.so.2".as_slice(),
        b"/nope64/ld-linux-x86-64.so2".as_slice(),
    );
    assert_eq!(from.len(), to.len());
    let at = elf.windows(from.len()).position(|w| w == from);
    let Some(at) = at else {
        eprintln!("SKIP: hello-http has no x86-64 PT_INTERP to break here");
        return;
    };
    let mut patched = elf.clone();
    patched[at..at + to.len()].copy_from_slice(to);
    std::fs::write(&broken, &patched).unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let Some(baton) = start(dir, &current).await else {
        return;
    };
    let status = baton.status().await.unwrap();
    let pid = status.pid.unwrap();
    // Created there, not moved there after the fork: no window outside it.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("baton-{}-gen-1", baton.pid());
    assert!(
        cgroup
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&want)),
        "{cgroup}"
    );

    replace_symlink(&current, &broken).unwrap();
    match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::RolledBack { message } => assert!(
            message.contains("could not exec") && message.contains("No such file or directory"),
            "{message}"
        ),
        UpgradeOutcome::Promoted(r) => panic!("a binary that cannot exec was promoted: {r:?}"),
    }
    assert_eq!(
        baton.status().await.unwrap().pid,
        Some(pid),
        "the old one serves on"
    );
    replace_symlink(&current, &hello_http_bin().unwrap()).unwrap();
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
}

/// baton runs at nice -10 by default, so that it keeps its place on CPUs its app
/// saturates (`supervisor_ms` in BENCHMARKS.md); every generation, the first, an
/// upgraded one and one started by a reexec'd baton, gets back the nice value baton
/// started with, in `SCHED_OTHER` (spawns clone as `SCHED_BATCH`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_runs_ahead_of_its_app_and_generations_get_the_start_priority() {
    let _serial = exclusive().await;
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIP: lowering a nice value needs CAP_SYS_NICE (run as root)");
        return;
    }
    let (start, _) = sched_of(std::process::id()).unwrap();
    let dir = TestDir::new("nice").unwrap();
    let baton = Baton::start_in(
        dir,
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    let check = |what: &str, app: u32| {
        assert_eq!(
            sched_of(baton.pid()).unwrap().0,
            -10,
            "baton's nice ({what})"
        );
        assert_eq!(
            sched_of(app),
            Some((start, 0)),
            "{what}: the generation gets nice {start} and SCHED_OTHER back"
        );
    };
    check("first", baton.status().await.unwrap().pid.unwrap());
    let me = baton.status().await.unwrap().supervisor.unwrap();
    assert_eq!(me.nice, Some(-10), "status shows it");
    let out = baton
        .cli(&["status"], std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert!(out.stdout.contains(", nice -10,"), "{}", out.stdout);
    let up = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => r.pid.unwrap(),
        UpgradeOutcome::RolledBack { message } => panic!("rolled back: {message}"),
    };
    check("upgraded", up);
    let (ok, report) = baton.reexec_wait().await.unwrap();
    assert!(ok, "reexec: {report:?}");
    let up = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => r.pid.unwrap(),
        UpgradeOutcome::RolledBack { message } => panic!("rolled back: {message}"),
    };
    check("after a reexec", up);
}

/// `--nice off` leaves baton where it started; `--nice 5` lowers baton's priority
/// and the generation still gets the start value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nice_off_leaves_baton_alone_and_a_higher_value_is_baton_s_only() {
    let _serial = exclusive().await;
    let (start, _) = sched_of(std::process::id()).unwrap();
    if start >= 5 {
        eprintln!("SKIP: the test runs at nice {start}, not below 5");
        return;
    }
    for (flag, want) in [("off", start), ("5", 5)] {
        let dir = TestDir::new("nice-flag").unwrap();
        let baton = Baton::start_in(
            dir,
            ["--nice", flag, "--listen", "http=127.0.0.1:0"],
            [hello_http_bin().unwrap()],
        )
        .await
        .unwrap();
        assert_eq!(sched_of(baton.pid()).unwrap().0, want, "--nice {flag}");
        let app = baton.status().await.unwrap().pid.unwrap();
        // Raising it back from 5 needs CAP_SYS_NICE; without it the app keeps 5.
        let app_nice = sched_of(app).unwrap().0;
        let root = nix::unistd::getuid().is_root();
        assert!(
            app_nice == start || (!root && app_nice == want),
            "--nice {flag}: the generation runs at {app_nice}, baton started at {start}"
        );
    }
}

/// Without CAP_SYS_NICE baton cannot go below its start value: it says so once and
/// runs and upgrades as ever, at the value it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cap_sys_nice_baton_keeps_its_start_priority_and_says_so() {
    let _serial = exclusive().await;
    let Some(setpriv) = baton_tests::harness::which("setpriv") else {
        eprintln!("SKIP: no setpriv to drop CAP_SYS_NICE with");
        return;
    };
    let (start, _) = sched_of(std::process::id()).unwrap();
    if start <= -10 {
        eprintln!("SKIP: the test runs at nice {start} already");
        return;
    }
    let dir = TestDir::new("nice-nocap").unwrap();
    // A wrapper that drops CAP_SYS_NICE and execs baton: the pid stays baton's.
    let wrapper = dir.join("baton-nocap");
    baton_tests::harness::write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec {} --bounding-set -sys_nice --inh-caps -sys_nice {} \"$@\"\n",
            setpriv.display(),
            baton_tests::harness::baton_bin().unwrap().display()
        ),
    )
    .unwrap();
    let baton = Baton::spawn_with(
        &wrapper,
        &[],
        dir,
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .unwrap();
    baton
        .wait_active(std::time::Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(sched_of(baton.pid()).unwrap().0, start);
    let me = baton.status().await.unwrap().supervisor.unwrap();
    assert_eq!(me.nice, Some(start));
    let log = baton.log();
    assert!(
        log.contains("baton keeps the nice value it started with")
            && log.contains("cannot set nice -10"),
        "{log}"
    );
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
    let app = baton.status().await.unwrap().pid.unwrap();
    // Back from the batch clone to SCHED_OTHER needs no privilege either.
    assert_eq!(sched_of(app), Some((start, 0)));
}

/// Health commands are baton's children too: they run at the nice value baton started
/// with, not at baton's -10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_commands_get_the_start_priority() {
    let _serial = exclusive().await;
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIP: lowering a nice value needs CAP_SYS_NICE (run as root)");
        return;
    }
    let (start, _) = sched_of(std::process::id()).unwrap();
    let dir = TestDir::new("nice-health").unwrap();
    let seen = dir.join("health-nice");
    // Field 19 of the check's own /proc/self/stat (awk's) is its nice value.
    let health = format!(
        "exec:awk '{{print $19}}' /proc/self/stat > {}.tmp && mv {0}.tmp {0}",
        seen.display()
    );
    // Probation (and so the check) needs a new executable: `app` is replaced before
    // the upgrade.
    let hello = hello_http_bin().unwrap();
    let app = dir.join("app");
    let script = |label: &str| format!("#!/bin/sh\nexec {} --label {label}\n", hello.display());
    baton_tests::harness::write_script(&app, &script("old")).unwrap();
    let new = dir.join("app.new");
    baton_tests::harness::write_script(&new, &script("new")).unwrap();
    let baton = Baton::start_in(
        dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--probation",
            "30s",
            "--health-interval",
            "50ms",
            "--health",
            health.as_str(),
        ],
        [&app],
    )
    .await
    .unwrap();
    std::fs::rename(&new, &app).unwrap();
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        if let Ok(t) = std::fs::read_to_string(&seen) {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no health check ran: {}",
            baton.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(text.trim(), start.to_string(), "the health check's nice");
}
