//! Issue 2, test 8: bad usage and configuration exit with code 2 and one line on stderr
//! naming the culprit, promptly, and without side effects.

use std::fs;
use std::net::TcpListener;
use std::time::Duration;

use baton_tests::harness::{CliOutput, TestDir, baton_cli, hello_http_bin};

/// Generous bound for an invocation that must fail fast.
const BOUND: Duration = Duration::from_secs(10);
const FAST: Duration = Duration::from_secs(5);

/// Runs `baton run --control <tmp> <args> -- <program>` and checks the failure shape.
async fn expect_usage_error(args: &[&str], program: &[&str], culprit: &str) -> CliOutput {
    let dir = TestDir::new("bad-input").unwrap();
    let control = dir.join("baton.sock");
    let mut all: Vec<String> = vec![
        "run".into(),
        "--control".into(),
        control.to_string_lossy().into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    if !program.is_empty() {
        all.push("--".into());
        all.extend(program.iter().map(|s| s.to_string()));
    }
    let out = baton_cli(&all, BOUND)
        .await
        .unwrap_or_else(|e| panic!("baton {all:?}: {e}"));
    let shown = format!(
        "baton {all:?}\nstdout: {:?}\nstderr: {:?}",
        out.stdout, out.stderr
    );
    assert_eq!(out.status.code(), Some(2), "{shown}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be exactly one line: {shown}");
    assert!(
        lines[0].contains(culprit),
        "stderr does not name the culprit {culprit:?}: {shown}"
    );
    assert!(out.elapsed < FAST, "took {:?}: {shown}", out.elapsed);
    out
}

fn hello() -> String {
    hello_http_bin().unwrap().to_string_lossy().into_owned()
}

#[tokio::test]
async fn unknown_flag() {
    expect_usage_error(
        &["--listen", "http=127.0.0.1:0", "--bogus-flag"],
        &[&hello()],
        "--bogus-flag",
    )
    .await;
}

#[tokio::test]
async fn listen_without_address() {
    expect_usage_error(&["--listen", "webz"], &[&hello()], "webz").await;
}

#[tokio::test]
async fn listen_without_port() {
    expect_usage_error(&["--listen", "webz=nohost"], &[&hello()], "nohost").await;
}

#[tokio::test]
async fn malformed_duration() {
    expect_usage_error(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready-timeout",
            "5parsecs",
        ],
        &[&hello()],
        "5parsecs",
    )
    .await;
}

/// Issue 14, defect 3: an absurd duration is a usage error, not a panic later.
#[tokio::test]
async fn huge_durations() {
    for flag in ["--drain-timeout", "--ready-timeout", "--restore-timeout"] {
        expect_usage_error(
            &["--listen", "http=127.0.0.1:0", flag, "300000000000y"],
            &[&hello()],
            flag,
        )
        .await;
    }
    let dir = TestDir::new("huge-duration").unwrap();
    let cfg = dir.join("baton.toml");
    fs::write(
        &cfg,
        "listen = [\"http=127.0.0.1:0\"]\ndrain_timeout = \"300000000000y\"\n",
    )
    .unwrap();
    expect_usage_error(
        &["--config", &cfg.to_string_lossy()],
        &[&hello()],
        "drain_timeout",
    )
    .await;
}

/// `--nice` takes -20..19 or `off`, from the flag or the config file.
#[tokio::test]
async fn bad_nice_values() {
    for v in ["-21", "20", "abc", "1.5", ""] {
        expect_usage_error(
            &["--listen", "http=127.0.0.1:0", "--nice", v],
            &[&hello()],
            "--nice",
        )
        .await;
    }
    let dir = TestDir::new("bad-nice").unwrap();
    let cfg = dir.join("baton.toml");
    fs::write(&cfg, "listen = [\"http=127.0.0.1:0\"]\nnice = -99\n").unwrap();
    expect_usage_error(&["--config", &cfg.to_string_lossy()], &[&hello()], "nice").await;
}

#[tokio::test]
async fn port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let port = taken.local_addr().unwrap().port().to_string();
    let listen = format!("http={addr}");
    expect_usage_error(&["--listen", &listen], &[&hello()], &port).await;
    drop(taken);
}

#[tokio::test]
async fn unix_path_that_is_a_regular_file_is_left_alone() {
    let dir = TestDir::new("not-a-socket").unwrap();
    let path = dir.join("precious.sock");
    fs::write(&path, "precious data\n").unwrap();
    let listen = format!("ctl=unix:{}", path.display());
    expect_usage_error(&["--listen", &listen], &[&hello()], &path.to_string_lossy()).await;
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "precious data\n",
        "baton removed or changed a file that is not a socket"
    );
}

#[tokio::test]
async fn program_path_missing() {
    expect_usage_error(
        &["--listen", "http=127.0.0.1:0"],
        &["/nonexistent/baton-test/prog"],
        "/nonexistent/baton-test/prog",
    )
    .await;
}

#[tokio::test]
async fn program_not_in_path() {
    expect_usage_error(
        &["--listen", "http=127.0.0.1:0"],
        &["baton-test-no-such-program"],
        "baton-test-no-such-program",
    )
    .await;
}

#[tokio::test]
async fn no_program_at_all() {
    expect_usage_error(&["--listen", "http=127.0.0.1:0"], &[], "PROGRAM").await;
}

#[tokio::test]
async fn no_listener_at_all() {
    // Each generation would bind its own socket: no seamless upgrade is possible.
    expect_usage_error(&[], &[&hello()], "--listen").await;
}

#[tokio::test]
async fn malformed_config_file_names_the_line() {
    let dir = TestDir::new("bad-config").unwrap();
    let cfg = dir.join("baton.toml");
    fs::write(
        &cfg,
        "listen = [\"http=127.0.0.1:0\"]\ndrain_timeout = 30\n",
    )
    .unwrap();
    let out = expect_usage_error(&["--config", cfg.to_str().unwrap()], &[&hello()], "line 2").await;
    assert!(out.stderr.contains("baton.toml"), "{}", out.stderr);
}

#[tokio::test]
async fn metrics_on_a_udp_address_is_refused() {
    expect_usage_error(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--metrics",
            "udp:127.0.0.1:0",
        ],
        &[&hello()],
        "metrics are served over HTTP",
    )
    .await;
}

#[tokio::test]
async fn udp_listener_without_a_port_is_refused() {
    expect_usage_error(
        &["--listen", "dns=udp:127.0.0.1"],
        &[&hello()],
        "udp: needs HOST:PORT",
    )
    .await;
}

/// Issue 31, defect 8: a TOML `unix_mode = 600` is decimal (0o1130), which locked the
/// owner out; it is refused, naming the fix. `0o600` and `"0600"` are accepted.
#[tokio::test]
async fn a_decimal_unix_mode_in_the_config_is_refused() {
    let dir = TestDir::new("bad-mode").unwrap();
    let cfg = dir.join("baton.toml");
    fs::write(&cfg, "listen = [\"http=127.0.0.1:0\"]\nunix_mode = 600\n").unwrap();
    let out = expect_usage_error(
        &["--config", cfg.to_str().unwrap()],
        &[&hello()],
        "unix_mode",
    )
    .await;
    assert!(out.stderr.contains("0o600"), "{}", out.stderr);
    for ok in ["unix_mode = 0o600", "unix_mode = \"0600\""] {
        let good = dir.join("good.toml");
        fs::write(&good, format!("listen = [\"http=127.0.0.1:0\"]\n{ok}\n")).unwrap();
        let control = dir.join("good.sock");
        let out = baton_cli(
            [
                "run",
                "--config",
                good.to_str().unwrap(),
                "--control",
                control.to_str().unwrap(),
                "--",
                "/nonexistent/app",
            ],
            BOUND,
        )
        .await
        .unwrap();
        // Refused for the program, not for the mode.
        assert!(!out.stderr.contains("unix_mode"), "{ok}: {}", out.stderr);
        assert!(
            out.stderr.contains("/nonexistent/app"),
            "{ok}: {}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn a_backlog_out_of_range_names_the_range() {
    let out = expect_usage_error(
        &["--listen", "http=127.0.0.1:0", "--backlog", "9999999999"],
        &[&hello()],
        "backlog",
    )
    .await;
    assert!(
        out.stderr.contains("from 1 to 2147483647"),
        "{}",
        out.stderr
    );
}

/// `--config /dev/zero` grew baton's memory without end, and a FIFO hung it.
#[tokio::test]
async fn a_config_that_is_not_a_regular_file_is_refused_at_once() {
    let dir = TestDir::new("bad-config-kind").unwrap();
    let fifo = dir.join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for cfg in ["/dev/zero".to_owned(), fifo.display().to_string()] {
        let out = expect_usage_error(
            &["--config", cfg.as_str()],
            &[&hello()],
            "not a regular file",
        )
        .await;
        assert!(out.stderr.contains(&cfg), "{}", out.stderr);
    }
}

/// Issue 28, item 4: an app asking for a listener name baton did not pass fails at start
/// with one line naming the names baton did pass; it no longer binds its fallback port
/// (udp-echo's was 127.0.0.1:5353, and the first upgrade then failed on it).
#[tokio::test]
async fn a_listener_name_baton_did_not_pass_fails_at_start() {
    let udp_echo = baton_tests::harness::udp_echo_bin().unwrap();
    for (listen, program, asked) in [
        (
            "echo=udp:127.0.0.1:0",
            udp_echo.display().to_string(),
            "\"udp\"",
        ),
        ("web=127.0.0.1:0", hello(), "\"http\""),
    ] {
        let dir = TestDir::new("bad-listener-name").unwrap();
        let control = dir.join("baton.sock").display().to_string();
        let out = baton_cli(
            [
                "run",
                "--control",
                &control,
                "--listen",
                listen,
                "--",
                &program,
            ],
            BOUND,
        )
        .await
        .unwrap();
        assert!(!out.status.success(), "{listen}: {out:?}");
        let passed = format!("\"{}\"", listen.split('=').next().unwrap());
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains("was not passed by baton"))
            .unwrap_or_else(|| panic!("{listen}: no error naming the listener: {out:?}"));
        assert!(line.contains(asked) && line.contains(&passed), "{line}");
        assert!(!out.stderr.contains("binding the fallback"), "{out:?}");
    }
}

/// A `#!` script that finds itself by `$0`, as pyenv, rbenv and asdf shims do, cannot
/// under baton (it runs as `/proc/<baton>/fd/N`); its "command not found" (127) comes
/// with what to do instead.
#[tokio::test]
async fn a_shim_that_looks_for_itself_by_its_name_is_explained() {
    let dir = TestDir::new("shim").unwrap();
    let shim = dir.join("python3");
    baton_tests::harness::write_script(
        &shim,
        "#!/bin/sh\nprog=$(basename \"$0\")\n[ \"$prog\" = python3 ] || { echo \"fakeenv: $prog: command not found\" >&2; exit 127; }\n",
    )
    .unwrap();
    let out = baton_cli(
        [
            "run".as_ref(),
            "--control".as_ref(),
            dir.join("baton.sock").as_os_str(),
            "--listen".as_ref(),
            "http=127.0.0.1:0".as_ref(),
            "--".as_ref(),
            shim.as_os_str(),
        ],
        BOUND,
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("exit status 127")
            && last.contains("pyenv")
            && last.contains("real interpreter"),
        "{out:?}"
    );
}

/// A Python app asking for a listener name baton did not pass fails at start with one
/// line naming the ones baton passed, and binds nothing (its fallback port stays free).
#[tokio::test]
async fn a_python_app_asking_for_a_listener_baton_did_not_pass_says_so() {
    let python = baton_tests::harness::python3().await.unwrap();
    let dir = TestDir::new("py-misnamed").unwrap();
    let fallback = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = fallback.local_addr().unwrap().port();
    drop(fallback);
    let out = baton_cli(
        [
            "run".to_owned(),
            "--control".to_owned(),
            dir.join("baton.sock").display().to_string(),
            "--state".to_owned(),
            "--listen".to_owned(),
            "wrong=127.0.0.1:0".to_owned(),
            "--".to_owned(),
            "env".to_owned(),
            format!("PYTHONPATH={}", baton_tests::python::sdk_path().display()),
            python.display().to_string(),
            baton_tests::python::example("py-counter/counter.py")
                .display()
                .to_string(),
            "--listen-fallback".to_owned(),
            format!("127.0.0.1:{port}"),
        ],
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("py-counter:") && l.contains("not passed"))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(
        line.contains("'counter'") && line.contains("'wrong'"),
        "{line}"
    );
    // The fallback was never bound: the port is still free.
    TcpListener::bind(("127.0.0.1", port)).unwrap();
}

/// A relative `--control` works: children get an absolute `NOTIFY_SOCKET` (the SDK
/// refuses a relative one), and the client finds the socket by the same relative path.
#[tokio::test]
async fn a_relative_control_path_works() {
    let dir = TestDir::new("rel-control").unwrap();
    let mut child = tokio::process::Command::new(baton_tests::harness::baton_bin().unwrap())
        .args([
            "run",
            "--control",
            "./rel.sock",
            "--listen",
            "http=127.0.0.1:0",
            "--",
        ])
        .arg(hello_http_bin().unwrap())
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = |args: &'static [&'static str]| {
        let dir = dir.path().to_path_buf();
        async move {
            let mut cmd = tokio::process::Command::new(baton_tests::harness::baton_bin().unwrap());
            cmd.args(args).current_dir(dir);
            baton_tests::harness::run_to_exit(cmd, "baton", BOUND)
                .await
                .unwrap()
        }
    };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = status(&["status", "--json", "--control", "./rel.sock"]).await;
        if out.status.success() && out.stdout.contains("\"phase\":\"active\"") {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "baton exited: {out:?}");
        assert!(std::time::Instant::now() < until, "never active: {out:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = status(&["stop", "--control", "./rel.sock"]).await;
    assert!(out.status.success(), "{out:?}");
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
