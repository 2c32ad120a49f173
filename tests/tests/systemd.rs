//! baton under a real systemd (issue 5), driven through the shipped unit files.
//!
//! Every test boots systemd as PID 1 of private namespaces with
//! `<repo>/../shared/systemd-sandbox/sandbox`, loads the unit files from `systemd/` exactly
//! as shipped (copied byte for byte into a per-test unit directory) plus a drop-in that
//! only swaps what cannot be the same on a test machine: the binaries (the target dir's
//! `baton`, and a wrapper script around the target dir's `hello-http`), the port and the
//! log destination. The drop-in's ExecStart=/ExecReload= are *derived* from the shipped
//! lines by substitution, and every substitution must match, so a changed unit file makes
//! these tests fail loudly instead of testing a stale copy.
//!
//! The tests skip (pass, with the reason on stderr) when not root, or when systemd or the
//! sandbox script is missing. They run the target dir's binaries, so `cargo build
//! --workspace` first (a missing binary fails them). `shipped_units_are_consistent` checks
//! the unit files statically and runs everywhere.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::PoisonError;
use std::thread;
use std::time::{Duration, Instant};

use baton_protocol::UpgradeResult;
use baton_tests::harness;
use baton_tests::systemd::*;

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shipped units agree with each other and with baton's timeouts. Runs everywhere.
#[test]
fn shipped_units_are_consistent() {
    let service = read_shipped(HELLO_SERVICE);
    let socket = read_shipped(HELLO_SOCKET);
    let template = read_shipped(TEMPLATE);

    // The socket unit's fd is matched to baton's listener by name, and must be the same
    // address.
    let fd_name = unit_value(&socket, HELLO_SOCKET, "Socket", "FileDescriptorName");
    let listen_stream = unit_value(&socket, HELLO_SOCKET, "Socket", "ListenStream");
    let exec_start = unit_value(&service, HELLO_SERVICE, "Service", "ExecStart");
    let listen = flag_value(&exec_start, "--listen").expect("ExecStart has --listen");
    assert_eq!(
        listen,
        format!("{fd_name}={listen_stream}"),
        "{HELLO_SERVICE} --listen must match {HELLO_SOCKET}'s FileDescriptorName=/ListenStream="
    );
    let deps = unit_entries(&service, "Unit");
    for key in ["Requires", "After"] {
        assert!(
            deps.iter()
                .any(|(k, v)| k == key && v.split_whitespace().any(|u| u == HELLO_SOCKET)),
            "{HELLO_SERVICE}: {key}= should name {HELLO_SOCKET}"
        );
    }

    for (file, text) in [(HELLO_SERVICE, &service), (TEMPLATE, &template)] {
        let v = |key: &str| unit_value(text, file, "Service", key);
        assert_eq!(v("Type"), "notify", "{file}");
        // baton alone speaks to systemd; children speak to baton.
        assert_eq!(v("NotifyAccess"), "main", "{file}");
        assert_eq!(v("KillMode"), "mixed", "{file}");
        assert_eq!(v("Restart"), "on-failure", "{file}");
        let store: u32 = v("FileDescriptorStoreMax").parse().expect("a number");
        assert!(
            store >= 1,
            "{file}: FileDescriptorStoreMax must keep the listeners"
        );

        let start = v("ExecStart");
        let reload = v("ExecReload");
        let words: Vec<&str> = reload.split_whitespace().collect();
        assert_eq!(
            &words[..3],
            &[SHIPPED_BATON, "upgrade", "--wait"],
            "{file}: ExecReload= must wait for the outcome so that a rollback fails the reload"
        );
        let control = flag_value(&start, "--control").expect("ExecStart has --control");
        assert_eq!(
            flag_value(&reload, "--control"),
            Some(control),
            "{file}: ExecStart= and ExecReload= must use the same control socket"
        );
        let runtime = v("RuntimeDirectory");
        let expected_dir = if control.starts_with("%t/") {
            format!("%t/{runtime}/")
        } else {
            format!("/run/{runtime}/")
        };
        assert!(
            control.starts_with(&expected_dir),
            "{file}: control socket {control} is not in RuntimeDirectory={runtime}"
        );

        // baton's own deadlines must expire before systemd's: baton enforces the drain
        // deadline itself, and a reload waits up to two ready timeouts (one queued behind a
        // running upgrade). The template passes them via $BATON_OPTS (defaults: 30 s).
        let drain = flag_value(&start, "--drain-timeout").unwrap_or("30s");
        let ready = flag_value(&start, "--ready-timeout").unwrap_or("30s");
        let drain = duration(file, "--drain-timeout", drain);
        let ready = duration(file, "--ready-timeout", ready);
        let stop = duration(file, "TimeoutStopSec", &v("TimeoutStopSec"));
        let start_timeout = duration(file, "TimeoutStartSec", &v("TimeoutStartSec"));
        assert!(
            stop > drain,
            "{file}: TimeoutStopSec must exceed --drain-timeout"
        );
        assert!(
            start_timeout > 2 * ready,
            "{file}: TimeoutStartSec (also ExecReload='s timeout) must exceed 2 x --ready-timeout"
        );
    }
}

/// systemd's own linter finds nothing to complain about in the shipped units (an unknown
/// or misspelt key is only a warning to systemd, and would silently fall back to the
/// default). Needs `systemd-analyze`, not root.
#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let Some(analyze) = harness::which("systemd-analyze") else {
        eprintln!("SKIP systemd::shipped_units_pass_systemd_analyze_verify: no systemd-analyze");
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("systemd-verify-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir");
    // verify also checks that the commands exist; /bin/true stands in for the binaries
    // that are installed under /usr/local/bin on a real machine.
    for file in [HELLO_SOCKET, HELLO_SERVICE, TEMPLATE] {
        let text = read_shipped(file)
            .replace(SHIPPED_BATON, "/bin/true")
            .replace(SHIPPED_APP, "/bin/true");
        fs::write(dir.join(file), text).expect("write unit");
    }
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.join(HELLO_SOCKET))
        .arg(dir.join(HELLO_SERVICE))
        .arg(dir.join(TEMPLATE_INSTANCE))
        .output()
        .expect("run systemd-analyze");
    let _ = fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}

/// (a) Socket activation: a connection to the socket starts the service; the unit is
/// `activating` until the app is READY and only then `active`, and the request that
/// triggered the start is served.
#[test]
fn socket_activated_start_waits_for_ready() {
    let _serial = serial();
    let Some(tools) = tools("socket_activated_start_waits_for_ready") else {
        return;
    };
    let delay = format!("{}ms", READY_DELAY.as_millis());
    let mut fx = Fixture::new(
        "activation",
        tools,
        Layout::SocketUnit,
        &["--ready-delay", &delay],
    );
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SOCKET]);
    let state = fx.prop("ActiveState");
    fx.check(state == "inactive", || {
        format!("service is {state} before any connection")
    });

    let addr = fx.addr();
    let client = thread::spawn(move || http_get(addr, "/", LONG));

    // Record every ActiveState seen until the unit is active.
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + LONG;
    loop {
        let s = fx.prop("ActiveState");
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == "active" || s == "failed" || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    fx.check(seen.last().map(String::as_str) == Some("active"), || {
        format!("ActiveState went {seen:?}, never active")
    });
    let activating = seen.iter().position(|s| s == "activating");
    fx.check(activating.is_some_and(|i| i + 1 < seen.len()), || {
        format!("ActiveState went {seen:?}: expected activating before active")
    });

    // systemd's own timestamps: active no earlier than the app's READY.
    let ts = fx.show(
        HELLO_SERVICE,
        &[
            "InactiveExitTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
        ],
    );
    let usec = |k: &str| ts.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let took = Duration::from_micros(
        usec("ActiveEnterTimestampMonotonic")
            .saturating_sub(usec("InactiveExitTimestampMonotonic")),
    );
    fx.check(took >= READY_DELAY, || {
        format!(
            "unit became active {took:?} after starting, before the app's READY ({READY_DELAY:?})"
        )
    });

    let resp = client.join().expect("client thread");
    let resp = resp.unwrap_or_else(|e| fx.fail(&format!("the activating request failed: {e}")));
    fx.check(resp.status == 200, || {
        format!("activating request: {resp:?}")
    });

    let st = fx.status();
    let main_pid = fx.main_pid();
    fx.check(st.supervisor_pid == main_pid, || {
        format!("MainPID {main_pid} is not baton ({})", st.supervisor_pid)
    });
    fx.check(
        st.generation == 1 && st.pid.is_some() && resp.pid() == st.pid,
        || format!("response {resp:?} not from the first generation: {st:?}"),
    );
    let http = st.listeners.iter().find(|l| l.name == "http");
    fx.check(
        http.is_some_and(|l| l.inherited && l.addr == addr.to_string()),
        || format!("listener http should be inherited from {HELLO_SOCKET} at {addr}: {st:?}"),
    );
    let text = fx.prop("StatusText");
    fx.check(mentions(&text, "generation", 1), || {
        format!("StatusText {text:?} does not name generation 1")
    });

    // baton's log is plain text when not on a tty, and says which generation is which.
    let log = fx.unit_log();
    fx.check(!log.contains('\u{1b}'), || {
        "ANSI escapes in the unit's output".to_owned()
    });
    fx.check(log.contains("generation"), || {
        "no generation field in baton's log".to_owned()
    });
}

/// (b) Five `systemctl reload`s under continuous load: each succeeds, baton's PID stays,
/// the app's changes, StatusText follows, and not one request fails.
#[test]
fn reload_under_load_keeps_main_pid_and_serves_every_request() {
    let _serial = serial();
    let Some(tools) = tools("reload_under_load_keeps_main_pid_and_serves_every_request") else {
        return;
    };
    let mut fx = Fixture::new("reload", tools, Layout::SocketUnit, &[]);
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let first = fx.status();
    let mut gen_id = first.generation;
    let mut pid = first.pid.unwrap_or_else(|| fx.fail("no active pid"));
    let mut pids = vec![pid];
    // The shipped unit delegates its cgroup: each generation gets one of its own.
    fx.check(first.containment == "cgroup", || {
        format!("containment under Delegate=yes: {:?}", first.containment)
    });

    let load = Load::start(&fx, fx.addr());
    for i in 1..=5 {
        let ok_before = load.handle().snapshot().ok;
        let started = Instant::now();
        fx.ctl_ok(&["reload", HELLO_SERVICE]);
        let took = started.elapsed();
        let ok_during = load.handle().snapshot().ok - ok_before;
        fx.check(ok_during > 0, || {
            format!("reload {i}: no request completed while it ran ({took:?}): not under load")
        });
        let m = fx.main_pid();
        fx.check(m == main_pid, || {
            format!("reload {i}: MainPID {main_pid} -> {m}")
        });
        let state = fx.show(HELLO_SERVICE, &["ActiveState", "SubState"]);
        fx.check(
            state.get("ActiveState").map(String::as_str) == Some("active")
                && state.get("SubState").map(String::as_str) == Some("running"),
            || format!("reload {i}: unit is {state:?}"),
        );
        let st = fx.status();
        let new_pid = st.pid.unwrap_or(0);
        fx.check(
            st.generation > gen_id && new_pid != 0 && new_pid != pid,
            || format!("reload {i} (took {took:?}) did not promote a new generation: {st:?}"),
        );
        let promoted = st
            .last_upgrade
            .as_ref()
            .is_some_and(|u| u.result == UpgradeResult::Promoted && u.generation == st.generation);
        fx.check(promoted, || {
            format!("reload {i}: last_upgrade {:?}", st.last_upgrade)
        });
        gen_id = st.generation;
        pid = new_pid;
        pids.push(pid);
        // baton sends STATUS= before answering `upgrade --wait`; allow systemd a moment
        // to have processed the datagram.
        fx.wait_prop("StatusText", SHORT, |t| {
            mentions(t, "generation", gen_id) && mentions(t, "pid", u64::from(pid))
        });
        load.progress(&fx, 20);
    }
    let report = load.stop();
    eprintln!("{report}");
    fx.check(report.failed == 0, || {
        format!("requests failed during reloads:\n{report}")
    });
    fx.check(report.pids.contains(&pid), || {
        format!("the last generation (pid {pid}) served nothing:\n{report}")
    });
    let restarts = fx.prop_u64("NRestarts");
    fx.check(restarts == 0, || format!("NRestarts={restarts}"));
    // Every replaced generation drains and exits (no load holds them any more).
    let deadline = Instant::now() + LONG;
    loop {
        let st = fx.status();
        if st.generations.len() == 1 {
            break;
        }
        if Instant::now() >= deadline {
            fx.fail(&format!("old generations never exited: {st:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    for old in &pids[..pids.len() - 1] {
        fx.check(!fx.pid_alive(*old), || {
            format!("old app pid {old} still runs")
        });
    }
}

/// (c) A reload to a binary that cannot start fails `systemctl reload`, and changes
/// nothing for clients: the unit stays active, the old generation keeps serving.
#[test]
fn reload_to_broken_binary_fails_and_keeps_serving() {
    let _serial = serial();
    let Some(tools) = tools("reload_to_broken_binary_fails_and_keeps_serving") else {
        return;
    };
    let mut fx = Fixture::new("rollback", tools, Layout::SocketUnit, &[]);
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let before = fx.status();
    let load = Load::start(&fx, fx.addr());

    fx.write_broken_app();
    let out = fx.sb().ctl(&["reload", HELLO_SERVICE]);
    fx.check(!out.status.success(), || {
        "systemctl reload succeeded although the new binary exits at once".to_owned()
    });
    let state = fx.show(HELLO_SERVICE, &["ActiveState", "SubState", "MainPID"]);
    fx.check(
        state.get("ActiveState").map(String::as_str) == Some("active")
            && state.get("SubState").map(String::as_str) == Some("running")
            && state.get("MainPID") == Some(&main_pid.to_string()),
        || format!("after the failed reload the unit is {state:?} (MainPID was {main_pid})"),
    );
    let st = fx.status();
    fx.check(
        st.generation == before.generation && st.pid == before.pid,
        || format!("the old generation is no longer active: before {before:?}, now {st:?}"),
    );
    let rolled_back = st
        .last_upgrade
        .as_ref()
        .is_some_and(|u| u.result == UpgradeResult::RolledBack);
    fx.check(rolled_back, || {
        format!("last_upgrade {:?}", st.last_upgrade)
    });
    fx.wait_prop("StatusText", SHORT, |t| t.contains("rolled back"));
    load.progress(&fx, 50);
    let snap = load.handle().snapshot();
    let old_pid = before.pid.unwrap_or(0);
    fx.check(snap.pids.contains(&old_pid), || {
        format!("the old generation (pid {old_pid}) did not serve: {snap:?}")
    });

    // Fixed binary: the next reload goes through.
    fx.write_wrapper(&[]);
    fx.ctl_ok(&["reload", HELLO_SERVICE]);
    let after = fx.status();
    fx.check(after.pid.is_some() && after.pid != before.pid, || {
        format!("reload after the fix did not promote: {after:?}")
    });
    load.progress(&fx, 20);
    let report = load.stop();
    eprintln!("{report}");
    fx.check(report.failed == 0, || format!("requests failed:\n{report}"));
}

/// (d) `kill -9` of baton with the socket bound by baton itself (template unit, port 0):
/// only the fd store can keep the listener. Connections made while baton is down are
/// served after the restart, on the same port.
#[test]
fn crash_restart_keeps_listener_via_fd_store() {
    let _serial = serial();
    let Some(tools) = tools("crash_restart_keeps_listener_via_fd_store") else {
        return;
    };
    let fx = Fixture::new("fdstore", tools, Layout::Template, &[]);
    crash_restart(fx, Layout::Template);
}

/// (d, socket unit) The same crash with hello-http.socket: after the restart systemd
/// passes the socket unit's fd *and* the fd store's copy of it, both named `http`.
#[test]
fn crash_restart_with_socket_unit() {
    let _serial = serial();
    let Some(tools) = tools("crash_restart_with_socket_unit") else {
        return;
    };
    let fx = Fixture::new("crashsock", tools, Layout::SocketUnit, &[]);
    crash_restart(fx, Layout::SocketUnit);
}

fn crash_restart(mut fx: Fixture, layout: Layout) {
    fx.boot();
    fx.ctl_ok(&["start", fx.unit]);
    let addr = fx.addr();
    let before = fx.status();
    let old_main = fx.main_pid();
    let old_app = before.pid.unwrap_or_else(|| fx.fail("no active pid"));
    // baton parks the listeners it bound itself in systemd's fd store; one that came
    // from the socket unit is held by systemd already.
    let stored = match layout {
        Layout::Template | Layout::Packaged => "1",
        Layout::SocketUnit => "0",
    };
    fx.wait_prop("NFileDescriptorStore", SHORT, |v| v == stored);
    let resp = http_get(addr, "/", SHORT)
        .unwrap_or_else(|e| fx.fail(&format!("request before the crash: {e}")));
    fx.check(resp.status == 200, || format!("before the crash: {resp:?}"));

    let kill = fx.sb().exec(&["kill", "-9", &old_main.to_string()]);
    fx.check(kill.status.success(), || {
        format!("kill -9 {old_main}: {kill:?}")
    });
    // Restart=on-failure, RestartSec=1s: systemd sits in auto-restart with no baton.
    fx.wait_prop("SubState", SHORT, |s| s == "auto-restart");

    // Connect during the gap: the listening socket is still open in systemd, so the
    // kernel completes the handshake and queues the connection.
    let mut gap_clients = Vec::new();
    for _ in 0..8 {
        let mut s = connect(addr, SHORT)
            .unwrap_or_else(|e| fx.fail(&format!("connect while baton was down: {e}")));
        send_get(&mut s, "/", true)
            .unwrap_or_else(|e| fx.fail(&format!("send while baton was down: {e}")));
        gap_clients.push(s);
    }
    let state = fx.prop("ActiveState");
    fx.check(state != "active", || {
        "baton was back before the gap clients connected: the test proved nothing".to_owned()
    });

    fx.wait_prop("ActiveState", LONG, |s| s == "active");
    let new_main = fx.main_pid();
    fx.check(new_main != old_main, || format!("MainPID still {old_main}"));
    let restarts = fx.prop_u64("NRestarts");
    fx.check(restarts == 1, || format!("NRestarts={restarts}"));
    let after = fx.status();
    let new_app = after.pid.unwrap_or(0);
    for (i, mut s) in gap_clients.into_iter().enumerate() {
        let resp = read_response(&mut s).unwrap_or_else(|e| {
            fx.fail(&format!(
                "gap client {i}: connected while baton was down, then: {e}"
            ))
        });
        fx.check(resp.status == 200 && resp.pid() == Some(new_app), || {
            format!("gap client {i}: {resp:?}, expected 200 from the new app pid {new_app}")
        });
    }
    fx.check_listener_inherited(&before, &after, addr);
    let now = fx.prop("NFileDescriptorStore");
    fx.check(now == stored, || {
        format!("NFileDescriptorStore={now} after the restart, {stored} before")
    });
    fx.check(!fx.pid_alive(old_app), || {
        format!("old app pid {old_app} survived")
    });
    let resp = http_get(addr, "/", SHORT)
        .unwrap_or_else(|e| fx.fail(&format!("request after the restart: {e}")));
    fx.check(resp.status == 200, || {
        format!("after the restart: {resp:?}")
    });
}

/// (e) `systemctl stop` lets an in-flight request finish, and the unit ends `inactive`
/// (not `failed`) with no process left.
#[test]
fn stop_drains_in_flight_request() {
    let _serial = serial();
    let Some(tools) = tools("stop_drains_in_flight_request") else {
        return;
    };
    let mut fx = Fixture::new("stop", tools, Layout::SocketUnit, &[]);
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let app_pid = fx.status().pid.unwrap_or_else(|| fx.fail("no active pid"));
    let addr = fx.addr();

    // A first request proves the connection is accepted and being served, so the slow
    // request below is read by the app as soon as it is sent: it is in flight when the
    // stop begins.
    let mut conn = connect(addr, LONG).unwrap_or_else(|e| fx.fail(&format!("connect: {e}")));
    send_get(&mut conn, "/", false).unwrap_or_else(|e| fx.fail(&format!("send: {e}")));
    let warm = read_response(&mut conn).unwrap_or_else(|e| fx.fail(&format!("warm-up: {e}")));
    fx.check(warm.status == 200, || format!("warm-up: {warm:?}"));
    let slow = Duration::from_secs(3);
    send_get(&mut conn, &format!("/sleep?ms={}", slow.as_millis()), true)
        .unwrap_or_else(|e| fx.fail(&format!("send slow request: {e}")));
    let sent = Instant::now();

    let sandbox_script = fx.tools.sandbox.clone();
    let name = fx.sb().name.clone();
    let stopper = thread::spawn(move || {
        let out = Command::new(sandbox_script)
            .args(["ctl", &name, "stop", HELLO_SERVICE])
            .output();
        (out, Instant::now())
    });
    let resp = read_response(&mut conn);
    let answered = Instant::now();
    let (out, stopped) = stopper.join().expect("stopper thread");
    let out = out.expect("run systemctl stop");

    let resp = resp.unwrap_or_else(|e| fx.fail(&format!("the in-flight request failed: {e}")));
    fx.check(resp.status == 200 && resp.pid() == Some(app_pid), || {
        format!("in-flight request: {resp:?}")
    });
    fx.check(answered.duration_since(sent) >= slow, || {
        "the slow request was answered early: the test's premise is wrong".to_owned()
    });
    fx.check(out.status.success(), || format!("systemctl stop: {out:?}"));
    fx.check(answered <= stopped, || {
        "systemctl stop returned before the in-flight request was answered".to_owned()
    });
    let state = fx.show(HELLO_SERVICE, &["ActiveState", "Result", "ExecMainStatus"]);
    fx.check(
        state.get("ActiveState").map(String::as_str) == Some("inactive")
            && state.get("Result").map(String::as_str) == Some("success")
            && state.get("ExecMainStatus").map(String::as_str) == Some("0"),
        || format!("after stop: {state:?}"),
    );
    let procs = fx.processes();
    let left: Vec<_> = procs
        .iter()
        .filter(|(p, c)| *p == main_pid || *p == app_pid || c == "baton" || c == "hello-http")
        .collect();
    fx.check(left.is_empty(), || {
        format!("processes left after stop: {left:?}")
    });
}

/// baton pings the watchdog when the unit sets WatchdogSec= (here shortened to 1 s so the
/// test sees several pings): systemd records each one and never kills baton.
#[test]
fn watchdog_is_pinged() {
    let _serial = serial();
    let Some(tools) = tools("watchdog_is_pinged") else {
        return;
    };
    let mut fx = Fixture::new("watchdog", tools, Layout::SocketUnit, &[]);
    // Sorts after the main drop-in (50-test.conf), so it wins.
    fx.drop_in_named(
        HELLO_SERVICE,
        "60-watchdog.conf",
        "[Service]\nWatchdogSec=1s\n",
    );
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let mut last = fx.prop_u64("WatchdogTimestampMonotonic");
    for ping in 1..=3 {
        let v = fx.wait_prop("WatchdogTimestampMonotonic", SHORT, |v| {
            v.parse::<u64>().is_ok_and(|t| t > last)
        });
        last = v.parse().unwrap_or(last);
        let m = fx.main_pid();
        fx.check(m == main_pid, || {
            format!("watchdog ping {ping}: MainPID {main_pid} -> {m}")
        });
    }
    let restarts = fx.prop_u64("NRestarts");
    fx.check(restarts == 0, || format!("NRestarts={restarts}"));
}

/// The fire-and-forget alternative documented in the units, `ExecReload=/bin/kill -HUP
/// $MAINPID`: `systemctl reload` returns at once, baton upgrades on SIGHUP and reports
/// the outcome through StatusText.
#[test]
fn reload_by_sighup_alternative() {
    let _serial = serial();
    let Some(tools) = tools("reload_by_sighup_alternative") else {
        return;
    };
    let mut fx = Fixture::new("sighup", tools, Layout::SocketUnit, &[]);
    let alternative = "ExecReload=/bin/kill -HUP $MAINPID";
    fx.check(read_shipped(HELLO_SERVICE).contains(alternative), || {
        format!("{HELLO_SERVICE} no longer documents {alternative}")
    });
    fx.drop_in_named(
        HELLO_SERVICE,
        "60-sighup.conf",
        &format!("[Service]\nExecReload=\n{alternative}\n"),
    );
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let before = fx.status();
    let load = Load::start(&fx, fx.addr());
    for i in 1..=2u64 {
        fx.ctl_ok(&["reload", HELLO_SERVICE]);
        let gen_id = before.generation + i;
        let text = fx.wait_prop("StatusText", LONG, |t| {
            mentions(t, "generation", gen_id) && t.contains("promoted")
        });
        let st = fx.status();
        fx.check(st.generation == gen_id, || {
            format!("after {text:?}: {st:?}")
        });
        fx.wait_prop("ActiveState", SHORT, |s| s == "active");
        let m = fx.main_pid();
        fx.check(m == main_pid, || {
            format!("SIGHUP {i}: MainPID {main_pid} -> {m}")
        });
        load.progress(&fx, 20);
    }
    let report = load.stop();
    eprintln!("{report}");
    fx.check(report.failed == 0, || format!("requests failed:\n{report}"));
}

/// The releases layout of systemd/README.md: `systemctl reload` runs `baton release install
/// --newest --wait`, `StatusText` shows the probation, and the reload returns once the new
/// release is permanent.
#[test]
fn reload_installs_the_newest_release_with_probation_in_status() {
    let _serial = serial();
    let Some(tools) = tools("reload_installs_the_newest_release_with_probation_in_status") else {
        return;
    };
    let mut fx = Fixture::new("releases", tools, Layout::Template, &[]);
    let readme = fs::read_to_string(systemd_dir().join("README.md")).unwrap();
    let reload_line = "release install --newest --wait";
    fx.check(readme.contains(reload_line), || {
        format!("systemd/README.md no longer shows ExecReload=... {reload_line}")
    });
    let store = fx.dir.join("releases");
    let baton = fx.tools.baton.display().to_string();
    let (dir, hello) = (fx.dir.clone(), fx.tools.hello.clone());
    let add = |version: &str| {
        let tree = dir.join(format!("src-{version}"));
        fs::create_dir_all(tree.join("bin")).unwrap();
        harness::write_script(
            &tree.join("bin/app"),
            &format!(
                "#!/bin/sh\nexec '{}' --label {version} \"$@\"\n",
                hello.display()
            ),
        )
        .unwrap();
        let out = Command::new(&baton)
            .args(["release", "--releases"])
            .arg(&store)
            .args(["add", "--program", "bin/app", version])
            .arg(&tree)
            .output()
            .unwrap();
        assert!(out.status.success(), "release add {version}: {out:?}");
    };
    add("v1");
    let control = fx.control.clone();
    let store_s = store.display().to_string();
    fx.drop_in_named(
        TEMPLATE_INSTANCE,
        "60-releases.conf",
        &format!(
            "[Service]\nExecStart=\nExecStart={baton} run --control {control} --releases {store_s} \
             --probation 3s --listen http=127.0.0.1:0 -- bin/app\nExecReload=\n\
             ExecReload={baton} {reload_line} --control {control}\n"
        ),
    );
    fx.boot();
    fx.ctl_ok(&["start", TEMPLATE_INSTANCE]);
    let main_pid = fx.main_pid();
    // v1 booted with no permanent release: permanent after its probation.
    fx.wait_prop("StatusText", LONG, |t| !t.contains("on probation"));
    add("v2");
    let load = Load::start(&fx, fx.addr());
    fx.ctl_ok(&["reload", "--no-block", TEMPLATE_INSTANCE]);
    let text = fx.wait_prop("StatusText", LONG, |t| t.contains("v2 on probation ("));
    eprintln!("StatusText during probation: {text}");
    fx.wait_prop("StatusText", LONG, |t| !t.contains("on probation"));
    fx.wait_prop("ActiveState", SHORT, |s| s == "active");
    let st = fx.status();
    let releases = st.releases.clone().unwrap();
    fx.check(releases.permanent.as_deref() == Some("v2"), || {
        format!("v2 is not permanent: {st:?}")
    });
    fx.check(fx.main_pid() == main_pid, || "MainPID changed".to_owned());
    // Nothing newer: the next reload succeeds and changes nothing.
    let gen_id = st.generation;
    fx.ctl_ok(&["reload", TEMPLATE_INSTANCE]);
    fx.check(fx.status().generation == gen_id, || {
        "a reload without a new release started a generation".to_owned()
    });
    load.progress(&fx, 20);
    let report = load.stop();
    eprintln!("{report}");
    fx.check(report.failed == 0, || format!("requests failed:\n{report}"));
}

/// Under systemd (`JOURNAL_STREAM` set) baton writes to journald's native socket,
/// with its fields as journal fields: `journalctl GENERATION=2` finds the promotion.
/// The sandbox has no journald, so a stand-in (`fixtures/fake_journald.py`) binds
/// the socket inside it and records what arrives.
#[test]
fn baton_logs_to_journald_with_its_fields() {
    let _serial = serial();
    let Some(tools) = tools("baton_logs_to_journald_with_its_fields") else {
        return;
    };
    let mut fx = Fixture::new("journald", tools, Layout::Template, &[]);
    fx.drop_in_named(
        TEMPLATE_INSTANCE,
        "60-journal.conf",
        "[Service]\nEnvironment=JOURNAL_STREAM=8:1\n",
    );
    fx.boot();
    let out = fx.dir.join("journal.jsonl");
    let fake = baton_tests::harness::fixture("fake_journald.py");
    let mut journald = std::process::Command::new(&fx.tools.sandbox)
        .args(["exec", &fx.sb().name, "python3"])
        .arg(&fake)
        .arg(&out)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + SHORT;
    while !std::fs::read_to_string(&out).is_ok_and(|t| t.contains("listening")) {
        fx.check(std::time::Instant::now() < deadline, || {
            "the fake journald did not start".into()
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    fx.ctl_ok(&["start", TEMPLATE_INSTANCE]);
    fx.ctl_ok(&["reload", TEMPLATE_INSTANCE]);
    let entries: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let _ = journald.kill();
    let _ = journald.wait();
    let promoted = entries.iter().find(|e| {
        e["MESSAGE"] == "promoted" && e["GENERATION"] == "2" && e["SYSLOG_IDENTIFIER"] == "baton"
    });
    fx.check(promoted.is_some(), || {
        format!("no promotion of generation 2 in {entries:#?}")
    });
    let p = promoted.unwrap_or(&serde_json::Value::Null);
    fx.check(
        p["PID"].as_str().is_some_and(|s| s.parse::<u32>().is_ok()),
        || format!("no PID field: {p}"),
    );
    fx.check(p["PRIORITY"] == "6", || format!("info is priority 6: {p}"));
    // baton's own lines went to journald, not to stdout/stderr.
    let log = fx.unit_log();
    fx.check(!log.contains("promoted generation=2"), || log.clone());
}
