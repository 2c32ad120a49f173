//! Issue 31: a second hostile-input round. Each test fails on the code before its fix.

use std::time::Duration;

use baton_tests::harness::{
    Baton, KillOnDrop, TestDir, UpgradeOutcome, descendants, exclusive, generation_cgroups,
    generation_pids, hello_http_bin, pid_alive, pids_with_cmdline, proc_comm, signal_pid,
    wait_pid_gone, write_script,
};
use baton_tests::http;
use nix::sys::signal::Signal;

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

/// Defect 8: a FIFO as `history.jsonl` hung baton, and 100 MB of garbage cost 105 MB and
/// a million warning lines. Now each is set aside with one line, and baton starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_history_file_is_set_aside_and_baton_starts() {
    let _serial = exclusive().await;
    for kind in ["fifo", "garbage"] {
        let dir = baton_tests::harness::TestDir::new("bad-history").unwrap();
        let state = dir.join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let file = state.join("history.jsonl");
        if kind == "fifo" {
            nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        } else {
            let line = b"not json at all, not a history line\n";
            let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
            for _ in 0..(100 << 20) / line.len() {
                std::io::Write::write_all(&mut f, line).unwrap();
            }
        }
        let state_arg = state.display().to_string();
        let baton = Baton::start_in(
            dir,
            [
                "--listen",
                "http=127.0.0.1:0",
                "--state-dir",
                state_arg.as_str(),
            ],
            [hello_http_bin().unwrap()],
        )
        .await
        .unwrap();
        let log = baton.log();
        assert!(log.contains("history unreadable"), "{kind}:\n{log}");
        assert!(
            state.join("history.jsonl.bad").exists(),
            "{kind}: set aside"
        );
        let hwm = baton_tests::harness::proc_peak_rss_kb(baton.pid()).unwrap();
        assert!(hwm < 32 * 1024, "{kind}: peak RSS {hwm} KiB");
        // History works again.
        match baton.upgrade_wait().await.unwrap() {
            UpgradeOutcome::Promoted(_) => {}
            other => panic!("{kind}: {other:?}"),
        }
    }
}

/// Defect 8: every refused control connection logged a line (7,578 for 19,500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_control_connections_log_a_line_now_and_then_not_each() {
    let _serial = exclusive().await;
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    // Followers of the event stream are busy, not idle: they hold their slots.
    let mut held = Vec::new();
    for _ in 0..2000 {
        if let Ok(mut c) = std::os::unix::net::UnixStream::connect(baton.control()) {
            let _ = std::io::Write::write_all(&mut c, b"{\"cmd\":\"events\",\"follow\":true}\n");
            held.push(c);
        }
    }
    // baton still answers its own clients... once the flood lets go.
    drop(held);
    let st = baton.wait_active(Duration::from_secs(20)).await.unwrap();
    assert!(st.pid.is_some());
    let lines = baton.log().matches("too many control connections").count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} warning lines for 2,000 connections:\n{}",
        baton.log()
    );
}

/// Defect 5: 16 connections that pipeline requests and never read held every metrics
/// slot (0 of 25 scrapes succeeded). Now a connection lives 10 s at most, and a new one
/// evicts the oldest when all are taken: scrapes go through while the attacker renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_cannot_starve_metrics_scrapes() {
    let _serial = exclusive().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let maddr = port.to_string();
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--metrics", maddr.as_str()],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
            let mut conns: Vec<std::net::TcpStream> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                conns.retain_mut(|c| {
                    c.set_write_timeout(Some(Duration::from_millis(10))).ok();
                    // Closed by baton (evicted or timed out): write fails.
                    !matches!(std::io::Write::write(c, b"\r\n"), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut)
                });
                while conns.len() < 16 {
                    let Ok(mut c) = std::net::TcpStream::connect(port) else {
                        break;
                    };
                    c.set_write_timeout(Some(Duration::from_millis(50))).ok();
                    let _ = std::io::Write::write_all(&mut c, req.as_bytes());
                    conns.push(c);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Let the attacker take every slot first.
    std::thread::sleep(Duration::from_millis(500));
    let mut ok = 0;
    for _ in 0..25 {
        if let Ok(r) = baton_tests::http::http_get(port, "/metrics", Duration::from_secs(5)) {
            ok += usize::from(r.status == 200 && r.body.contains("baton_build_info"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.join().unwrap();
    assert_eq!(
        ok,
        25,
        "{ok} of 25 scrapes went through; log:\n{}",
        baton.log()
    );
}

/// Defect 8: `releases.json` versions are checked again on every read: a hand-edited
/// `../../x` is refused, naming it, instead of booting from outside the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_version_outside_the_store_is_refused() {
    let _serial = exclusive().await;
    let s = baton_tests::releases::StoreDir::new("store-edit").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    s.permanent("v1").await;
    let meta = s.store().join("releases.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["releases"][0]["version"] = serde_json::json!("../../x");
    std::fs::write(&meta, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let out = s.offline(&["list"]).await.unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stderr.contains("../../x"), "{out:?}");
    let out = s.run_to_exit().await.unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("../../x"), "{out:?}");
}

/// Defect 2: a crash restart re-exec'd the kept fd without checking it again, so a
/// PROGRAM rewritten in place during the back-off ran. Now every exec checks the sha256
/// (re-hashing when the file changed), and the changed file never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_rewritten_in_place_never_runs_not_even_on_a_crash_restart() {
    let _serial = exclusive().await;
    let s = baton_tests::releases::StoreDir::new("store-rewrite").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    s.permanent("v1").await;
    let store = s.arg();
    let baton = Baton::start_in(
        baton_tests::harness::TestDir::new("rewrite-run").unwrap(),
        ["--listen", "http=127.0.0.1:0", "--releases", store.as_str()],
        ["bin/app"],
    )
    .await
    .unwrap();
    let pid = baton.status().await.unwrap().pid.unwrap();
    // Rewrite PROGRAM in place: same inode, new bytes.
    let program = s.store().join("v1/bin/app");
    let marker = s.join("pwned");
    let evil = format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display());
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&program)
            .unwrap();
        f.write_all(evil.as_bytes()).unwrap();
    }
    baton_tests::harness::signal_pid(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !baton.log().contains("no longer matches the store") {
        assert!(
            std::time::Instant::now() < deadline,
            "never refused:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !marker.exists(),
        "the rewritten program ran; log:\n{}",
        baton.log()
    );
}

/// Defect 2, beyond PROGRAM: a file anywhere in the release tree that others may write
/// (a wrapper's `env.sh`, say) stops `release check` and every exec, a crash restart's
/// included, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_writable_file_anywhere_in_a_release_stops_check_and_every_exec() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = exclusive().await;
    let s = baton_tests::releases::StoreDir::new("store-tree").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    s.permanent("v1").await;
    let store = s.arg();
    let baton = Baton::start_in(
        TestDir::new("tree-run").unwrap(),
        ["--listen", "http=127.0.0.1:0", "--releases", store.as_str()],
        ["bin/app"],
    )
    .await
    .unwrap();
    let pid = baton.status().await.unwrap().pid.unwrap();
    let shared = s.store().join("v1/healthy");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = s.offline(&["check", "v1"]).await.unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("healthy has mode 666"),
        "check does not name the file: {out:?}"
    );
    // The crash restart refuses too: the generation does not come back.
    signal_pid(pid, Signal::SIGKILL).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !baton.log().contains("healthy has mode 666") {
        assert!(
            std::time::Instant::now() < deadline,
            "the crash restart did not refuse:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = baton.status().await.unwrap();
    assert!(
        status
            .generations
            .iter()
            .all(|g| !pid_alive(g.pid) || g.pid == pid),
        "a generation runs from the shared tree: {status:?}"
    );
}

/// Defect 2: `release add` kept a source's setuid bits, group/world write and (with
/// `--move`) its owner. The store now holds only its owner's files, without those bits,
/// and baton refuses to run a PROGRAM that breaks the rule later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_holds_only_its_owners_files_without_setuid_or_shared_write() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: giving files to another user needs root");
        return;
    }
    let _serial = exclusive().await;
    let nobody = 65534;
    let s = baton_tests::releases::StoreDir::new("store-owner").unwrap();
    for (version, mv) in [("v1", false), ("v2", true)] {
        let tree = s.hello_tree(version, "", true).unwrap();
        std::fs::write(tree.join("env.sh"), "X=1\n").unwrap();
        for (p, mode) in [
            (tree.join("bin/app"), 0o6777),
            (tree.join("env.sh"), 0o666),
            (tree.join("bin"), 0o777),
            (tree.clone(), 0o777),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&p, Some(nobody), Some(nobody)).unwrap();
        }
        let path = tree.display().to_string();
        let mut args = vec!["add", "--program", "bin/app"];
        if mv {
            args.push("--move");
        }
        args.extend([version, path.as_str()]);
        let out = s.offline(&args).await.unwrap();
        assert!(out.status.success(), "{version}: {out:?}");
        let rel = s.store().join(version);
        for (p, want) in [
            (rel.join("bin/app"), 0o755),
            (rel.join("env.sh"), 0o644),
            (rel.join("bin"), 0o755),
            (rel.clone(), 0o755),
        ] {
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o7777, want, "{version}: {}", p.display());
            assert_eq!(
                m.uid(),
                0,
                "{version}: {} is the store owner's",
                p.display()
            );
        }
    }
    s.permanent("v1").await;
    // Another user's PROGRAM in the store (planted after the fact) never runs.
    std::os::unix::fs::chown(s.store().join("v1/bin/app"), Some(nobody), None).unwrap();
    let out = s.run_to_exit().await.unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("belongs to uid 65534"), "{out:?}");
}

/// Defect 4: with the store's disk full during probation, `release install --wait`
/// printed `v2: permanent` and exited 0 while the store still said v1. Now the command
/// fails with the reason, and status says the store is out of sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_write_that_fails_fails_the_command_and_status_says_so() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: mounting a 1 MB tmpfs needs root");
        return;
    }
    let _serial = exclusive().await;
    let s = baton_tests::releases::StoreDir::new("store-full").unwrap();
    let store = s.store();
    let _tmpfs = baton_tests::harness::Tmpfs::mount(&store, "size=1m,mode=0755").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    s.add_hello("v2", "", true).await.unwrap();
    s.permanent("v1").await;
    let arg = s.arg();
    let baton = Baton::start_in(
        baton_tests::harness::TestDir::new("store-full-run").unwrap(),
        [
            "--listen",
            "http=127.0.0.1:0",
            "--releases",
            arg.as_str(),
            "--probation",
            "3s",
        ],
        ["bin/app"],
    )
    .await
    .unwrap();
    // `install --wait` waits for the probation's end, in the background.
    let control = baton.control().display().to_string();
    let waiting = tokio::spawn(async move {
        baton_tests::harness::baton_cli(
            [
                "release",
                "--control",
                control.as_str(),
                "install",
                "v2",
                "--wait",
            ],
            Duration::from_secs(60),
        )
        .await
        .unwrap()
    });
    baton
        .wait_for("v2 on probation", Duration::from_secs(20), |s| {
            s.releases
                .as_ref()
                .and_then(|r| r.probation.as_ref())
                .is_some_and(|p| p.version == "v2")
        })
        .await
        .unwrap();
    // Fill the disk: recording `permanent` will fail.
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", store.join("filler").display()))
        .stderr(std::process::Stdio::null())
        .status();
    let out = waiting.await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(
        out.stderr.contains("could not record it") && out.stderr.contains("v2"),
        "{out:?}"
    );
    let st = baton
        .wait_for("the store out of sync", Duration::from_secs(20), |s| {
            s.releases.as_ref().is_some_and(|r| r.store_error.is_some())
        })
        .await
        .unwrap();
    let why = st.releases.unwrap().store_error.unwrap();
    assert!(why.contains("space"), "{why}");
    let text = baton
        .cli(&["status"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(text.stdout.contains("OUT OF SYNC"), "{}", text.stdout);
    // The store still says v1, and says so truthfully.
    let meta = std::fs::read_to_string(store.join("releases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let perm: Vec<_> = v["releases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "permanent")
        .map(|r| r["version"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(perm, vec!["v1".to_owned()], "{meta}");
    // Space again: the change still pending is written, and status is back in sync, so
    // a restart boots what runs now.
    std::fs::remove_file(store.join("filler")).unwrap();
    baton
        .wait_for("the store back in sync", Duration::from_secs(20), |s| {
            s.releases.as_ref().is_some_and(|r| r.store_error.is_none())
        })
        .await
        .unwrap();
    let meta = std::fs::read_to_string(store.join("releases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let status_of = |version: &str| {
        v["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["version"] == version)
            .map(|r| r["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status_of("v2").as_deref(), Some("permanent"), "{meta}");
    assert_eq!(status_of("v1").as_deref(), Some("old"), "{meta}");
}

/// Defect 8: a store path that is another user's symlink was accepted (the control
/// directory already refused one): that user could point it elsewhere later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_reached_through_another_users_symlink_is_refused() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: giving a symlink to another user needs root");
        return;
    }
    let _serial = exclusive().await;
    let s = baton_tests::releases::StoreDir::new("store-link").unwrap();
    s.add_hello("v1", "", true).await.unwrap();
    let link = s.join("link");
    std::os::unix::fs::symlink(s.store(), &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let out = baton_tests::harness::baton_cli(
        ["release", "--releases", link.to_str().unwrap(), "list"],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stderr.contains("symlink owned by uid 65534"), "{out:?}");
    // The store itself, named directly, is fine.
    let ok = s.offline(&["list"]).await.unwrap();
    assert!(ok.status.success(), "{ok:?}");
}

/// Defect 6's app: a wrapper that leaves a `sleep <marker>` behind, a grandchild of
/// baton out of PR_SET_PDEATHSIG's reach that inherits the listener, then execs
/// hello-http. While `<dir>/slow` exists it takes 60 s to get there, so that a
/// candidate can be caught mid-upgrade.
fn leaky_wrapper(dir: &TestDir, marker: &str) -> std::path::PathBuf {
    let app = dir.join("leaky-app");
    let script = format!(
        "#!/bin/sh\nsleep {marker} &\nif [ -e {slow} ]; then sleep 60; fi\nexec {hello}\n",
        slow = dir.join("slow").display(),
        hello = hello_http_bin().unwrap().display(),
    );
    write_script(&app, &script).unwrap();
    app
}

/// A `sleep` duration no other test uses.
fn marker() -> String {
    format!("{}", 860_000 + std::process::id() % 10_000)
}

/// Waits (bounded) until `n` marker processes run.
async fn wait_markers(marker: &str, n: usize) -> Vec<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let pids = pids_with_cmdline(&format!("sleep {marker}"));
        if pids.len() >= n {
            return pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} wrapper grandchildren started",
            pids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Defect 6: baton SIGKILLed mid-upgrade takes every process of every generation with
/// it, the candidate's and the grandchildren a wrapper left included; its cgroups go
/// too, and a new baton binds the same port at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_baton_takes_every_process_of_its_generations_with_it() {
    let _serial = exclusive().await;
    let dir = TestDir::new("orphans").unwrap();
    let marker = marker();
    let app = leaky_wrapper(&dir, &marker);
    let slow = dir.join("slow");
    let mut baton = Baton::start_in(dir, ["--listen", "http=127.0.0.1:0"], [&app])
        .await
        .unwrap();
    let status = baton.status().await.unwrap();
    if status.containment != "cgroup" {
        eprintln!(
            "SKIP: generations are not in cgroups here ({}); only the process group is killed",
            status.containment
        );
        return;
    }
    let addr = baton.tcp_addr("http").await.unwrap();
    wait_markers(&marker, 1).await;
    // Mid-upgrade: the candidate has left its own grandchild and is not ready.
    std::fs::write(&slow, b"").unwrap();
    baton.upgrade().await.unwrap();
    wait_markers(&marker, 2).await;
    let tree = descendants(baton.pid());
    assert!(
        tree.iter().any(|&p| proc_comm(p) == "baton-guard"),
        "no guardian among baton's children: {tree:?}"
    );
    let pid = baton.pid();
    baton.signal(Signal::SIGKILL).unwrap();
    baton.wait_exit(Duration::from_secs(10)).await.unwrap();
    for p in tree {
        let comm = proc_comm(p);
        wait_pid_gone(p, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{p} ({comm}) outlived the SIGKILLed baton: {e}"));
    }
    assert!(pids_with_cmdline(&format!("sleep {marker}")).is_empty());
    let left = generation_cgroups(pid);
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    // The port is free: a new baton binds it at once, and serves.
    std::fs::remove_file(&slow).unwrap();
    let again = Baton::start(
        ["--listen".to_owned(), format!("http={addr}")],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap_or_else(|e| panic!("restart on {addr}: {e}"));
    let reply = http::get(addr, "/", Duration::from_secs(5)).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", again.log());
}

/// Defect 6, the fallback: baton and its guardian both SIGKILLed leave the wrapper's
/// grandchild on the port. The next baton kills it and removes the dead baton's cgroups
/// before it binds, so it starts; another live baton's generation and cgroups are left
/// alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_baton_reclaims_what_a_dead_baton_left_and_spares_a_live_one() {
    let _serial = exclusive().await;
    let dir = TestDir::new("reclaim").unwrap();
    let marker = marker();
    let app = leaky_wrapper(&dir, &marker);
    let mut dead = Baton::start_in(dir, ["--listen", "http=127.0.0.1:0"], [&app])
        .await
        .unwrap();
    if dead.status().await.unwrap().containment != "cgroup" {
        eprintln!("SKIP: generations are not in cgroups here; there is nothing to reclaim");
        return;
    }
    let live = Baton::start(
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    let addr = dead.tcp_addr("http").await.unwrap();
    wait_markers(&marker, 1).await;
    let guard = descendants(dead.pid())
        .into_iter()
        .find(|&p| proc_comm(p) == "baton-guard")
        .expect("no guardian");
    signal_pid(guard, Signal::SIGKILL).unwrap();
    wait_pid_gone(guard, Duration::from_secs(10)).await.unwrap();
    let dead_pid = dead.pid();
    dead.signal(Signal::SIGKILL).unwrap();
    dead.wait_exit(Duration::from_secs(10)).await.unwrap();
    let orphans = pids_with_cmdline(&format!("sleep {marker}"));
    assert_eq!(
        orphans.len(),
        1,
        "without a guardian the grandchild outlives baton"
    );
    let _reap = KillOnDrop(orphans[0]);
    assert!(!generation_cgroups(dead_pid).is_empty());
    let live_cgroups = generation_cgroups(live.pid());
    let live_gens = generation_pids(&live.status().await.unwrap());
    assert!(!live_cgroups.is_empty() && !live_gens.is_empty());

    let next = Baton::start(
        ["--listen".to_owned(), format!("http={addr}")],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap_or_else(|e| panic!("restart on {addr} with the dead baton's orphan on it: {e}"));
    assert!(
        next.log().contains("dead baton"),
        "nothing said about the reclaim:\n{}",
        next.log()
    );
    wait_pid_gone(orphans[0], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(generation_cgroups(dead_pid).is_empty());
    let reply = http::get(addr, "/", Duration::from_secs(5)).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    // The other baton is untouched.
    for p in &live_gens {
        assert!(pid_alive(*p), "the live baton's generation {p} was killed");
    }
    for d in &live_cgroups {
        assert!(d.exists(), "the live baton's {} was removed", d.display());
    }
    assert!(live.status().await.is_ok());
}

/// Defect 8: a reexec probed (and would exec) baton's own executable from a directory
/// anyone could write. It now applies the store's rule: the file and every directory
/// on its path belong to baton's user or root, and none is writable by others (unless
/// sticky). baton keeps running after a refusal, and a good file is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reexec_refuses_an_executable_others_could_have_placed() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = exclusive().await;
    let dir = TestDir::new("reexec-owner").unwrap();
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let exe = shared.join("baton");
    std::fs::copy(baton_tests::harness::baton_bin().unwrap(), &exe).unwrap();
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(&shared, 0o777);
    let baton = Baton::spawn_with(
        &exe,
        &[],
        dir,
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .unwrap();
    baton.wait_active(Duration::from_secs(20)).await.unwrap();
    let before = baton.status().await.unwrap();

    let (ok, report) = baton.reexec_wait().await.unwrap();
    let why = report.reason.clone().unwrap_or_default();
    assert!(!ok, "{report:?}");
    assert!(
        why.contains("which others can write") && why.contains("shared"),
        "{report:?}"
    );

    mode(&shared, 0o755);
    mode(&exe, 0o757);
    let (ok, report) = baton.reexec_wait().await.unwrap();
    assert!(!ok, "{report:?}");
    assert!(report.reason.unwrap_or_default().contains("has mode 757"));
    // Group write by another group: nobody's (65534), when root may give it away.
    if nix::unistd::geteuid().is_root() {
        mode(&exe, 0o775);
        std::os::unix::fs::chown(&exe, None, Some(65534)).unwrap();
        let (ok, report) = baton.reexec_wait().await.unwrap();
        assert!(!ok, "{report:?}");
        assert!(report.reason.unwrap_or_default().contains("has mode 775"));
        std::os::unix::fs::chown(&exe, None, Some(0)).unwrap();
    }

    // Nothing was harmed: the same baton and generation serve.
    let after = baton.status().await.unwrap();
    assert_eq!(after.pid, before.pid);
    let addr = baton.tcp_addr("http").await.unwrap();
    assert_eq!(
        http::get(addr, "/", Duration::from_secs(5)).unwrap().status,
        200
    );

    mode(&exe, 0o755);
    let (ok, report) = baton.reexec_wait().await.unwrap();
    assert!(ok, "a file that obeys the rule is taken: {report:?}");
}
