//! Issue 30: `baton rehearse`, against the real binaries: kv-server schema 1 → 2 → 1
//! with 100,000 keys and writers, a broken B that loses keys, a B that cannot go back,
//! a stateless HTTP app, the Python SDK's py-counter, and interruptions that must leave
//! nothing behind.

use std::time::{Duration, Instant};

use baton_tests::harness::{
    TestDir, exclusive, hello_http_bin, pids_with_cmdline, python3, signal_pid, write_script,
};
use baton_tests::kv::App;
use baton_tests::python::command;
use baton_tests::rehearse::{leftovers, rehearse};
use nix::sys::signal::Signal;

/// 100,000 `SET kN vN` in the Redis protocol, through `redis-cli --pipe`.
const SETUP_100K: &str = r#"seq 100000 | awk '{k="k"$1; v="v"$1; printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, length(v), v}' | redis-cli -h $REHEARSE_KV_HOST -p $REHEARSE_KV_PORT --pipe"#;

/// A writer that checks every reply: INCR must count up by one each time. It runs until
/// stopped (and says how many writes it made) or fails at the first lost write.
const WRITER: &str = r#"i=0; trap 'echo "$i writes, none lost"; exit 0' TERM; while :; do i=$((i+1)); r=$(redis-cli -h $REHEARSE_KV_HOST -p $REHEARSE_KV_PORT INCR w) || { echo "write $i failed"; exit 1; }; [ "$r" = "$i" ] || { echo "write $i: INCR gave $r"; exit 1; }; done"#;

/// Some keys, among them keys starting with `x`.
const SETUP_X: &str = r#"for i in $(seq 50); do echo "SET k$i v$i"; echo "SET x$i v$i"; done | redis-cli -h $REHEARSE_KV_HOST -p $REHEARSE_KV_PORT > /dev/null"#;

/// Wrapper scripts `<name>.sh` running kv-server with those flags; their paths.
fn kv<const N: usize>(dir: &TestDir, releases: [(&str, &str); N]) -> [String; N] {
    App::prepare(dir, &releases, releases[0].0);
    releases.map(|(name, _)| dir.join(format!("{name}.sh")).display().to_string())
}

/// `--from A --to B --state --listen kv=... --setup SETUP_X --load WRITER`, then `extra`.
fn kv_args(a: &str, b: &str, extra: &[&str]) -> Vec<String> {
    let base = [
        "--from",
        a,
        "--to",
        b,
        "--state",
        "--listen",
        "kv=127.0.0.1:0",
        "--setup",
        SETUP_X,
        "--load",
        WRITER,
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn assert_all_pass(r: &baton_tests::rehearse::Rehearsal) {
    assert_eq!(r.out.status.code(), Some(0), "{:?}", r.out);
    assert_eq!(r.report["passed"], true, "{}", r.report);
    for s in r.steps() {
        assert_ne!(s["outcome"], "fail", "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_server_schema_1_to_2_and_back_passes_every_step_with_100k_keys_and_writers() {
    let _serial = exclusive().await;
    let dir = TestDir::new("rehearse-kv").unwrap();
    let [a, b] = kv(&dir, [("kv1", "--schema 1"), ("kv2", "--schema 2")]);
    let r = rehearse(
        dir.path(),
        [
            "--from",
            &a,
            "--to",
            &b,
            "--state",
            "--listen",
            "kv=127.0.0.1:0",
            "--faults",
            "--setup",
            SETUP_100K,
            "--load",
            WRITER,
        ],
    )
    .await
    .unwrap();
    assert_all_pass(&r);
    for step in [
        "A starts",
        "setup",
        "fault: B killed before it is ready",
        "fault: B killed while it restores",
        "snapshot A",
        "A → B, no load",
        "B's state",
        "B writes schema 1",
        "state check: B kept A's state",
        "B → A, no load",
        "state check: A → B → A gives A's state back",
        "A → B under load",
        "B → A under load",
        "load",
    ] {
        assert_eq!(r.outcome(step), "pass", "{step}: {}", r.report);
    }
    // Schema 1 cannot hold the counters: the app's declared drop is listed.
    assert!(
        r.detail("B writes schema 1")
            .contains("declared drops: /stats")
    );
    assert_eq!(
        r.step("B writes schema 1")["figures"]["dropped"][0],
        "/stats"
    );
    // 100,000 keys of about 17 bytes each went through.
    let bytes = r.step("snapshot A")["figures"]["bytes"].as_u64().unwrap();
    assert!(bytes > 1_500_000, "{bytes}");
    // The writer ran through both upgrades and lost nothing (it checks every reply).
    assert!(
        r.detail("load").contains("none lost"),
        "{}",
        r.detail("load")
    );
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_b_that_loses_keys_fails_the_state_check_and_names_one() {
    let _serial = exclusive().await;
    let dir = TestDir::new("rehearse-broken").unwrap();
    let [a, b] = kv(
        &dir,
        [
            ("kv1", "--schema 1"),
            ("kvx", "--schema 2 --fault lose-x-keys"),
        ],
    );
    let r = rehearse(dir.path(), kv_args(&a, &b, &[])).await.unwrap();
    assert_eq!(r.out.status.code(), Some(1), "{:?}", r.out);
    assert_eq!(r.outcome("state check: B kept A's state"), "fail");
    let d = r.detail("state check: B kept A's state");
    assert!(
        d.contains("/state/entries/x") && d.contains("is missing"),
        "names no missing key: {d}"
    );
    assert_eq!(r.outcome("state check: A → B → A"), "fail");
    // The upgrades themselves worked: only the state is wrong.
    assert_eq!(r.outcome("A → B, no load"), "pass");
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b_that_cannot_go_back_is_reported_and_passes_only_with_no_downgrade() {
    let _serial = exclusive().await;
    let dir = TestDir::new("rehearse-nodown").unwrap();
    let [a, b] = kv(
        &dir,
        [
            ("kv1", "--schema 1"),
            ("kvr", "--schema 2 --fault refuse-downgrade"),
        ],
    );
    let r = rehearse(dir.path(), kv_args(&a, &b, &[])).await.unwrap();
    assert_eq!(r.out.status.code(), Some(1), "{:?}", r.out);
    assert_eq!(r.outcome("B writes schema 1"), "fail");
    assert!(
        r.detail("B writes schema 1")
            .contains("cannot write schema 1"),
        "{}",
        r.detail("B writes schema 1")
    );
    assert_eq!(r.outcome("B → A, no load"), "fail");
    assert!(r.detail("B → A, no load").contains("serves on"));

    let r = rehearse(dir.path(), kv_args(&a, &b, &["--no-downgrade"]))
        .await
        .unwrap();
    assert_all_pass(&r);
    assert_eq!(r.outcome("A → B under load"), "pass");
    assert_eq!(r.outcome("B → A under load"), "skip");
    assert_eq!(r.detail("B → A under load"), "--no-downgrade");
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_http_app_passes_with_the_built_in_load_and_says_no_state() {
    let _serial = exclusive().await;
    let dir = TestDir::new("rehearse-http").unwrap();
    let exe = hello_http_bin().unwrap();
    let exe = exe.to_str().unwrap();
    let r = rehearse(dir.path(), ["--from", exe, "--to", exe, "--faults"])
        .await
        .unwrap();
    assert_all_pass(&r);
    assert_eq!(r.outcome("state"), "skip");
    assert!(r.detail("state").contains("no state"));
    assert_eq!(r.outcome("fault: B killed before it is ready"), "pass");
    for step in ["A → B under load", "B → A under load"] {
        assert_eq!(r.outcome(step), "pass", "{}", r.report);
        let f = &r.step(step)["figures"];
        assert!(f["requests"].as_u64().unwrap() > 0, "{step}: no load: {f}");
        assert_eq!(f["failed"], 0, "{step}");
    }
    assert_eq!(r.outcome("load"), "pass");
    // --state on an app without state hand-over: said so, not failed.
    let r = rehearse(dir.path(), ["--from", exe, "--to", exe, "--state"])
        .await
        .unwrap();
    assert_all_pass(&r);
    assert!(
        r.detail("state").contains("does not take part"),
        "{}",
        r.report
    );
    assert!(leftovers(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_counter_on_the_python_sdk_passes_the_full_rehearsal() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let dir = TestDir::new("rehearse-py").unwrap();
    App::prepare_commands(
        &dir,
        &[
            (
                "py1",
                command(&python, "py-counter/counter.py", "--schema 1"),
            ),
            (
                "py2",
                command(&python, "py-counter/counter.py", "--schema 2"),
            ),
        ],
        "py1",
    );
    let (a, b) = (dir.join("py1.sh"), dir.join("py2.sh"));
    let setup = r#"printf 'INCR a\nINCR b\nINCR b\n' | socat -t 5 - TCP:$REHEARSE_COUNTER | grep -c '^OK' | grep -qx 3"#;
    let load = r#"i=0; trap 'echo "$i increments"; exit 0' TERM; while :; do i=$((i+1)); r=$(printf 'INCR w\n' | socat -t 10 - TCP:$REHEARSE_COUNTER); case "$r" in "OK w $i "*) ;; *) echo "increment $i: $r"; exit 1;; esac; done"#;
    let r = rehearse(
        dir.path(),
        [
            "--from".as_ref(),
            a.as_os_str(),
            "--to".as_ref(),
            b.as_os_str(),
            "--state".as_ref(),
            "--listen".as_ref(),
            "counter=127.0.0.1:0".as_ref(),
            "--faults".as_ref(),
            "--setup".as_ref(),
            setup.as_ref(),
            "--load".as_ref(),
            load.as_ref(),
            "--baton-arg=--ready-timeout=30s".as_ref(),
        ]
        .map(std::ffi::OsStr::to_owned),
    )
    .await
    .unwrap();
    assert_all_pass(&r);
    assert_eq!(
        r.outcome("state check: A → B → A gives A's state back"),
        "pass"
    );
    // py-counter's down-migration to schema 1 drops its operation count, and says so.
    assert!(
        r.detail("B writes schema 1").contains("/ops"),
        "{}",
        r.report
    );
    assert!(
        r.detail("load").contains("increments"),
        "{}",
        r.detail("load")
    );
    assert!(leftovers(dir.path()).is_empty());
}

/// Where a rehearsal is interrupted, and what says it got there.
enum At {
    /// A never becomes ready; its process exists.
    Start,
    /// `--setup` runs.
    Setup,
    /// B never becomes ready, during A → B under load.
    Upgrade,
    /// The load runs, before the first upgrade under it.
    Load,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupting_rehearse_at_each_step_leaves_no_process_socket_or_file() {
    let _serial = exclusive().await;
    for at in [At::Start, At::Setup, At::Upgrade, At::Load] {
        let dir = TestDir::new("rehearse-int").unwrap();
        let mark = format!("mark-{}", std::process::id());
        let started = dir.join("started");
        let hello = hello_http_bin().unwrap().display().to_string();
        let never = dir.join(format!("never-ready-{mark}"));
        write_script(
            &never,
            &format!(
                "#!/bin/sh\ntouch '{}'\nwhile :; do sleep 1; done\n",
                started.display()
            ),
        )
        .unwrap();
        let touch_and_wait = format!(
            "touch '{}'; exec sh -c 'while :; do sleep 1; done' {mark}",
            started.display()
        );
        let never = never.display().to_string();
        let mut args: Vec<String> = vec!["rehearse".into()];
        match at {
            At::Start => args.extend(["--from".into(), never.clone(), "--to".into(), hello]),
            At::Setup => args.extend([
                "--from".into(),
                hello.clone(),
                "--to".into(),
                hello,
                "--setup".into(),
                touch_and_wait,
            ]),
            At::Upgrade => args.extend(["--from".into(), hello, "--to".into(), never.clone()]),
            At::Load => args.extend([
                "--from".into(),
                hello.clone(),
                "--to".into(),
                hello,
                "--settle".into(),
                "10m".into(),
                "--load".into(),
                touch_and_wait,
            ]),
        }
        args.push("--baton-arg=--ready-timeout=10m".into());
        let mut child = tokio::process::Command::new(baton_tests::harness::baton_bin().unwrap())
            .args(&args)
            .env("TMPDIR", dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while !started.exists() {
            assert!(
                Instant::now() < until,
                "the rehearsal never got to its step"
            );
            assert!(child.try_wait().unwrap().is_none(), "rehearse exited early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let private_dir = format!("{}/baton-rehearse-", dir.path().display());
        assert!(
            !pids_with_cmdline(&private_dir).is_empty(),
            "no private baton found"
        );
        signal_pid(child.id().unwrap(), Signal::SIGINT).unwrap();
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("rehearse did not exit after SIGINT")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
        // Nothing of it runs: no private baton, app, guardian, setup or load.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<u32> = pids_with_cmdline(&private_dir)
                .into_iter()
                .chain(pids_with_cmdline(&mark))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < until, "left running: {left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            leftovers(dir.path()).is_empty(),
            "left files: {:?}",
            leftovers(dir.path())
        );
    }
}

#[tokio::test]
async fn a_missing_or_non_executable_release_is_one_clear_line() {
    let dir = TestDir::new("rehearse-bad").unwrap();
    let plain = dir.join("plain.txt");
    std::fs::write(&plain, "not a program").unwrap();
    let hello = hello_http_bin().unwrap();
    for (from, want) in [
        (dir.join("nope"), "--from"),
        (plain.clone(), "not an executable file"),
        (
            dir.path().to_path_buf(),
            "is a directory: say which executable",
        ),
    ] {
        let out = baton_tests::harness::baton_cli(
            [
                "rehearse".as_ref(),
                "--from".as_ref(),
                from.as_os_str(),
                "--to".as_ref(),
                hello.as_os_str(),
            ],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
        assert!(out.stderr.contains(want), "{out:?}");
    }
}

/// Releases as directories (`--program`), states compared by a command (`--compare`),
/// and a setup that fails: the rehearsal stops there, says why, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_directories_a_compare_command_and_a_failing_setup() {
    let _serial = exclusive().await;
    let dir = TestDir::new("rehearse-dirs").unwrap();
    App::prepare(&dir, &[("kv1", "--schema 1"), ("kv2", "--schema 2")], "kv1");
    for (rel, script) in [("a", "kv1.sh"), ("b", "kv2.sh")] {
        std::fs::create_dir_all(dir.join(rel).join("bin")).unwrap();
        std::fs::copy(dir.join(script), dir.join(rel).join("bin/kv")).unwrap();
    }
    let (a, b) = (dir.join("a"), dir.join("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let common = [
        "--from",
        a,
        "--to",
        b,
        "--program",
        "bin/kv",
        "--state",
        "--listen",
        "kv=127.0.0.1:0",
        "--setup",
        SETUP_X,
        "--load",
        WRITER,
    ];
    // A command decides: one that compares the JSON passes, one that never agrees fails.
    let same = "python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1])) != json.load(open(sys.argv[2])))'";
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--compare", same]);
    let r = rehearse(dir.path(), args).await.unwrap();
    assert_eq!(r.outcome("state check: A → B → A"), "pass", "{}", r.report);
    assert_eq!(r.outcome("A → B under load"), "pass", "{}", r.report);
    let mut args: Vec<&str> = common.to_vec();
    args.extend(["--compare", "false"]);
    let r = rehearse(dir.path(), args).await.unwrap();
    assert_eq!(r.out.status.code(), Some(1), "{:?}", r.out);
    assert!(
        r.detail("state check: B kept A's state")
            .contains("false: exit status: 1"),
        "{}",
        r.report
    );

    let mut args: Vec<&str> = common.to_vec();
    let setup = args.iter().position(|a| *a == "--setup").unwrap() + 1;
    args[setup] = "echo broken >&2; exit 3";
    let r = rehearse(dir.path(), args).await.unwrap();
    assert_eq!(r.out.status.code(), Some(1), "{:?}", r.out);
    assert_eq!(r.outcome("setup"), "fail");
    assert!(
        r.detail("setup").contains("exit status: 3") && r.detail("setup").contains("broken"),
        "{}",
        r.detail("setup")
    );
    assert_eq!(
        r.steps().len(),
        2,
        "nothing runs after a failed setup: {}",
        r.report
    );
    assert!(leftovers(dir.path()).is_empty());
}
