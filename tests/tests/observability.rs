//! Issue 12: what an operator sees. `/metrics` parsed by a real Prometheus parser
//! while upgrades and rollbacks run, the history across a SIGKILL, the event
//! stream, and an idle baton's footprint.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_protocol::{Event, EventKind, HistoryEntry, StartReason, UpgradeResult};
use baton_tests::harness::{
    Baton, TestDir, UpgradeOutcome, baton_bin, exclusive, hello_http_bin, proc_rss_kb,
    replace_symlink, write_script,
};
use baton_tests::metrics::{Scrape, parse, scrape_text, venv_python};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(20);

/// `<dir>/app` → hello-http, and `<dir>/broken.sh` to point it at for a rollback.
fn app_dir(tag: &str) -> (TestDir, PathBuf, PathBuf) {
    let dir = TestDir::new(tag).unwrap();
    let hello = hello_http_bin().unwrap();
    let app = dir.join("app");
    std::os::unix::fs::symlink(&hello, &app).unwrap();
    write_script(&dir.join("broken.sh"), "#!/bin/sh\nexit 3\n").unwrap();
    (dir, app, hello)
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], baton_tests::systemd::free_port()))
}

fn scrape(python: &PathBuf, addr: SocketAddr) -> Scrape {
    let (status, text, ctype) = scrape_text(addr);
    assert_eq!(status, 200, "{text}");
    assert!(
        ctype
            .as_deref()
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{ctype:?}"
    );
    parse(python, &text)
}

/// A histogram's buckets are cumulative, end in +Inf equal to the count, and the
/// sum is positive when anything was observed.
fn check_histogram(s: &Scrape, name: &str) -> f64 {
    let f = s
        .family(name)
        .unwrap_or_else(|| panic!("no {name}: {:?}", s.0));
    assert_eq!(f.kind, "histogram");
    let mut last = 0.0;
    let mut inf = None;
    for b in f
        .samples
        .iter()
        .filter(|x| x.name == format!("{name}_bucket"))
    {
        assert!(
            b.value >= last,
            "{name}: buckets not cumulative: {:?}",
            f.samples
        );
        last = b.value;
        if b.labels.get("le").map(String::as_str) == Some("+Inf") {
            inf = Some(b.value);
        }
    }
    let count = s.value(&format!("{name}_count"), &[]);
    assert_eq!(inf, Some(count), "{name}: +Inf bucket vs count");
    if count > 0.0 {
        assert!(s.value(&format!("{name}_sum"), &[]) > 0.0, "{name}_sum");
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_upgrades_and_rollbacks_and_parse_as_openmetrics() {
    let _serial = exclusive().await;
    let python = match venv_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP metrics test: {why}");
            return;
        }
    };
    let (dir, app, hello) = app_dir("metrics");
    let addr = free_addr();
    let metrics = addr.to_string();
    let baton = Baton::start_in(
        dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--metrics",
            metrics.as_str(),
            "--ready-timeout",
            "3s",
        ],
        [&app],
    )
    .await
    .unwrap();
    let s = scrape(&python, addr);
    assert_eq!(
        s.value("baton_upgrades_total", &[("result", "promoted")]),
        0.0
    );
    assert_eq!(s.value("baton_active_generation", &[]), 1.0);
    assert_eq!(s.value("baton_generations", &[("phase", "active")]), 1.0);
    assert!(s.family("baton_build").is_some_and(|f| f.kind == "info"));
    assert!(s.value("baton_resident_memory_bytes", &[]) > 1e6);
    assert!(s.value("baton_open_fds", &[]) > 3.0);

    for i in 1..=3u32 {
        assert!(matches!(
            baton.upgrade_wait().await.unwrap(),
            UpgradeOutcome::Promoted(_)
        ));
        let st = baton.wait_settled(WAIT).await.unwrap();
        let s = scrape(&python, addr);
        assert_eq!(
            s.value("baton_upgrades_total", &[("result", "promoted")]),
            f64::from(i)
        );
        assert_eq!(
            s.value("baton_active_generation", &[]),
            st.generation as f64
        );
        assert_eq!(
            check_histogram(&s, "baton_upgrade_duration_seconds"),
            f64::from(i)
        );
    }
    replace_symlink(&app, &baton.dir().join("broken.sh")).unwrap();
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::RolledBack { .. }
    ));
    replace_symlink(&app, &hello).unwrap();
    let s = scrape(&python, addr);
    assert_eq!(
        s.value("baton_upgrades_total", &[("result", "rolled_back")]),
        1.0
    );
    assert_eq!(
        s.value("baton_upgrades_total", &[("result", "promoted")]),
        3.0
    );
    // Rollbacks are not promotion durations.
    assert_eq!(check_histogram(&s, "baton_upgrade_duration_seconds"), 3.0);
    check_histogram(&s, "baton_accept_gap_seconds");
    check_histogram(&s, "baton_snapshot_size_bytes");

    // A crash of the active generation: counted, and its replacement too.
    let pid = baton.status().await.unwrap().pid.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    baton
        .wait_for("the replacement", WAIT, |st| {
            st.pid.is_some_and(|p| p != pid)
        })
        .await
        .unwrap();
    let s = scrape(&python, addr);
    assert_eq!(s.value("baton_crashes_total", &[]), 1.0);
    assert_eq!(s.value("baton_restarts_total", &[]), 1.0);

    // Not /metrics: 404, and the text is still valid afterwards.
    let r = baton_tests::http::http_get(addr, "/", Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 404);
}

/// The last upgrades survive a SIGKILL of baton: the next baton on the same
/// `--state-dir` shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_sigkill_and_a_restart() {
    let _serial = exclusive().await;
    let (dir, app, hello) = app_dir("history");
    let state = dir.join("state");
    let state_s = state.display().to_string();
    let args = [
        "--listen",
        "http=127.0.0.1:0",
        "--state-dir",
        state_s.as_str(),
        "--ready-timeout",
        "3s",
    ];
    let dir2 = TestDir::new("history-2").unwrap();
    let mut first = Baton::start_in(dir, args, [&app]).await.unwrap();
    for _ in 0..2 {
        assert!(matches!(
            first.upgrade_wait().await.unwrap(),
            UpgradeOutcome::Promoted(_)
        ));
    }
    replace_symlink(&app, &first.dir().join("broken.sh")).unwrap();
    assert!(matches!(
        first.upgrade_wait().await.unwrap(),
        UpgradeOutcome::RolledBack { .. }
    ));
    replace_symlink(&app, &hello).unwrap();
    first.signal(Signal::SIGKILL).unwrap();
    first.wait_exit(WAIT).await.unwrap();

    let second = Baton::start_in(dir2, args, [&app]).await.unwrap();
    let out = second
        .cli(&["history", "--json"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let entries: Vec<HistoryEntry> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(StartReason, UpgradeResult, u64)> = entries
        .iter()
        .map(|e| (e.why, e.report.result, e.report.generation))
        .collect();
    use StartReason::{Initial, Upgrade};
    use UpgradeResult::{Promoted, RolledBack};
    assert_eq!(
        seen,
        vec![
            (Initial, Promoted, 1),
            (Upgrade, Promoted, 2),
            (Upgrade, Promoted, 3),
            (Upgrade, RolledBack, 4),
            (Initial, Promoted, 1),
        ],
        "{entries:#?}"
    );
    assert!(
        entries[3]
            .report
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("exit status 3")
    );
    let text = second
        .cli(&["history", "-n", "2"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        text.stdout.contains("rolled back") && text.stdout.contains("history.jsonl"),
        "{text:?}"
    );
    assert_eq!(
        text.stdout
            .lines()
            .filter(|l| l.contains(" initial ") || l.contains(" upgrade "))
            .count(),
        2
    );
    // A first start is not counted as an upgrade (issue 32, item 3).
    let all = second
        .cli(&["history"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        all.stdout.contains("(3 upgrades, 2 first starts; kept in"),
        "{all:?}"
    );
}

/// `baton events --follow --json`, as a separate process, read line by line.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(control: &Path) -> Follower {
        let mut child = Command::new(baton_bin().unwrap())
            .args(["events", "--follow", "--json", "--control"])
            .arg(control)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// Events until one matches `until` (bounded).
    fn until(&self, what: &str, until: impl Fn(&Event) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}; got {got:#?}"));
            let e: Event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let done = until(&e);
            got.push(e);
            if done {
                return got;
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn names(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let v = serde_json::to_value(e).unwrap();
            format!("{}:{}", v["event"].as_str().unwrap_or("?"), e.generation)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_a_promotion_a_rollback_and_a_crash() {
    let _serial = exclusive().await;
    let (dir, app, hello) = app_dir("events");
    let baton = Baton::start_in(
        dir,
        // No probation: a crash is replaced, not reverted (releases.rs covers that).
        [
            "--listen",
            "http=127.0.0.1:0",
            "--ready-timeout",
            "3s",
            "--probation",
            "0",
        ],
        [&app],
    )
    .await
    .unwrap();
    let f = Follower::start(baton.control());
    // What happened before it connected comes first.
    let start = f.until("the first promotion", |e| {
        matches!(e.kind, EventKind::Promoted { .. })
    });
    assert_eq!(names(&start), ["spawned:1", "ready:1", "promoted:1"]);

    // A promotion: the old one drains and exits.
    baton.upgrade().await.unwrap();
    // Its figures are final once generation 1 has exited.
    let up = f.until("the upgrade settled", |e| {
        matches!(e.kind, EventKind::Settled { .. })
    });
    assert_eq!(
        names(&up),
        [
            "spawned:2",
            "ready:2",
            "draining:1",
            "promoted:2",
            "exited:1",
            "settled:2"
        ]
    );
    assert!(matches!(
        up[0].kind,
        EventKind::Spawned {
            why: StartReason::Upgrade,
            ..
        }
    ));

    // A rollback, with its reason.
    replace_symlink(&app, &baton.dir().join("broken.sh")).unwrap();
    baton.upgrade().await.unwrap();
    let back = f.until("the rollback", |e| {
        matches!(e.kind, EventKind::RolledBack { .. })
    });
    replace_symlink(&app, &hello).unwrap();
    // Without a store the executable is the version: it is said to have failed too.
    assert_eq!(
        names(&back),
        ["spawned:3", "exited:3", "release_failed:0", "rolled_back:3"]
    );
    match &back[3].kind {
        EventKind::RolledBack { report, .. } => {
            assert!(
                report
                    .reason
                    .as_deref()
                    .unwrap_or("")
                    .contains("exit status 3")
            )
        }
        other => panic!("{other:?}"),
    }

    // A crash of the active one, and its replacement.
    let pid = baton.status().await.unwrap().pid.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let crash = f.until("the replacement's promotion", |e| {
        matches!(e.kind, EventKind::Promoted { .. })
    });
    assert_eq!(
        names(&crash),
        ["crashed:2", "spawned:4", "ready:4", "promoted:4"]
    );
    assert!(matches!(
        crash[1].kind,
        EventKind::Spawned {
            why: StartReason::Replace,
            ..
        }
    ));
    // Without --follow: the recent ones, then the end.
    let out = baton
        .cli(&["events"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        out.status.success() && out.stdout.contains("CRASHED"),
        "{out:?}"
    );
}

/// With metrics served, an idle baton stays small and sleeps: its wake-ups over
/// 10 s are its 1 s housekeeping tick and little else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_baton_with_metrics_is_small_and_quiet() {
    let _serial = exclusive().await;
    let (dir, app, _) = app_dir("idle");
    let addr = free_addr().to_string();
    let baton = Baton::start_in(
        dir,
        ["--listen", "http=127.0.0.1:0", "--metrics", addr.as_str()],
        [&app],
    )
    .await
    .unwrap();
    let (status, _, _) = scrape_text(addr.parse().unwrap());
    assert_eq!(status, 200);
    // Anyone who can reach the port: 200 silent connections cost at most the cap (16).
    // A new one evicts the oldest (so slow clients cannot starve the scrapers): all but
    // at most the last 16 are closed at once, well before hyper's 5 s header timeout
    // would close a held one.
    let before = baton_tests::harness::proc_fds(baton.pid()).unwrap().len();
    let held: Vec<_> = (0..200)
        .filter_map(|_| std::net::TcpStream::connect(addr.as_str()).ok())
        .collect();
    let mut closed = 0;
    for c in &held {
        let mut c = c;
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut b = [0u8; 1];
        if matches!(baton_tests::http::read_retrying(&mut c, &mut b), Ok(0)) {
            closed += 1;
        }
    }
    let fds = baton_tests::harness::proc_fds(baton.pid()).unwrap().len();
    assert!(
        closed >= held.len() - 16,
        "{} of {} connections were held open, past the cap of 16",
        held.len() - closed,
        held.len()
    );
    assert!(
        fds <= before + 16 + 8,
        "baton went from {before} to {fds} fds"
    );
    drop(held);
    let switches = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    };
    let before = switches(baton.pid());
    // A measurement window, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let wakeups = switches(baton.pid()) - before;
    let rss = proc_rss_kb(baton.pid()).unwrap();
    println!("idle baton: {wakeups} context switches in 10 s, RSS {rss} KiB");
    assert!(wakeups <= 40, "{wakeups} wake-ups in 10 s");
    assert!(rss <= 10 * 1024, "RSS {rss} KiB");
}

/// `upgrade --wait` shows the phases as they happen (plain lines off a terminal);
/// `status --watch` redraws; `status` is a table with uptime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_upgrade_phases_and_watches_status() {
    let _serial = exclusive().await;
    let (dir, app, _) = app_dir("cli-obs");
    let baton = Baton::start_in(dir, ["--listen", "http=127.0.0.1:0"], [&app])
        .await
        .unwrap();
    let out = baton
        .cli(&["upgrade", "--wait"], Duration::from_secs(30))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {lines:#?}"))
    };
    assert!(at("spawned generation 2") < at("generation 2 ready"));
    assert!(at("generation 2 ready") < at("generation 2 promoted"));
    assert!(at("generation 1 draining") < at("promoted generation 2 (pid"));
    assert!(
        lines.iter().all(|l| !l.contains('\x1b')),
        "no terminal codes off a terminal"
    );

    let st = baton
        .cli(&["status"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        st.stdout.contains("uptime") && st.stdout.contains("active"),
        "{st:?}"
    );

    let mut watch = Command::new(baton_bin().unwrap())
        .args(["status", "--watch", "--control"])
        .arg(baton.control())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = watch.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if l.starts_with("active:") && tx.send(l).is_err() {
                return;
            }
        }
    });
    for frame in 1..=2 {
        rx.recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("status --watch drew no frame {frame}"));
    }
    let _ = watch.kill();
    let _ = watch.wait();
}

/// Issue 32, item 2: `upgrade --wait` asked while another upgrade is in flight says so,
/// and shows and reports its own upgrade (generation 3), not the one in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_wait_during_another_upgrade_reports_its_own() {
    let _serial = exclusive().await;
    let (dir, app, _) = app_dir("wait-own");
    let app = app.display().to_string();
    let baton = Baton::start_in(
        dir,
        ["--listen", "http=127.0.0.1:0"],
        [app.as_str(), "--ready-delay", "1s"],
    )
    .await
    .unwrap();
    baton.hup().unwrap();
    baton
        .wait_for("the SIGHUP upgrade in flight", WAIT, |s| s.upgrading)
        .await
        .unwrap();
    let out = baton
        .cli(&["upgrade", "--wait"], Duration::from_secs(30))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("an upgrade (to generation 2) is in flight: this one is queued after it"),
        "{out:?}"
    );
    assert!(out.stdout.contains("spawned generation 3"), "{out:?}");
    assert!(out.stdout.contains("promoted generation 3 (pid"), "{out:?}");
    assert!(
        !out.stdout.contains("generation 2 promoted")
            && !out.stdout.contains("spawned generation 2"),
        "the upgrade in flight was shown as this one: {out:?}"
    );
}
