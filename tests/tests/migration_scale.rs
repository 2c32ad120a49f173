//! Issue 26: connection migration past baton's relay bound, under CPU contention.
//!
//! A generation hands its connections to baton faster than baton may relay them (it holds
//! at most `RELAY_SLOTS` fds at once), then exits. Everything it sent before it exited must
//! still reach the new generation: its exit is handled only once its control channel has
//! been read to the end. Every connection here is held idle, then asked one request after
//! each upgrade, on the same TCP connection, and must be answered by the new pid.
//!
//! A successor that never reads its control socket is the one case where connections are
//! lost; then each of status, history, events and metrics says how many.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use baton_protocol::{Event, EventKind, HistoryEntry, Status, UpgradeReport};
use baton_tests::harness::{
    Baton, TestDir, exclusive, generation_pids, hello_http_bin, kv_server_bin, python3,
    raise_nofile, replace_symlink, write_script,
};
use baton_tests::hog::CpuHog;
use baton_tests::idle::{self, App, Conn};
use baton_tests::resp::{IncrWriter, progress};
use baton_tests::upgrade::{upgrade_promoted, wait_replaced};

/// baton's relay slots (`generation::RELAY_SLOTS`).
const RELAY_SLOTS: usize = 256;
/// Past four times the relay bound.
const CONNECTIONS: usize = 4 * RELAY_SLOTS + 76;
const UPGRADES: usize = 5;
const REPEATS: usize = 3;
/// Bound on an old generation handing everything over and exiting, under the hog.
const SETTLE: Duration = Duration::from_secs(60);
/// Bound on one request on a held connection.
const REQUEST: Duration = Duration::from_secs(30);
const WRITERS: usize = 4;

fn listen(app: App) -> (&'static str, &'static str) {
    match app {
        App::Http => ("http=127.0.0.1:0", "http"),
        App::Kv => ("kv=127.0.0.1:0", "kv"),
    }
}

/// `baton history --json`: the promotions, by generation.
async fn history(baton: &Baton) -> Vec<HistoryEntry> {
    let out = baton
        .cli(&["history", "--json", "-n", "100"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(out.status.success(), "baton history: {}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("history line {l}: {e}")))
        .collect()
}

/// `baton events --json`, as recorded so far.
async fn events(baton: &Baton) -> Vec<Event> {
    let out = baton
        .cli(&["events", "--json"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(out.status.success(), "baton events: {}", out.stderr);
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until the upgrade to `generation` is settled (its `settled` event was
/// emitted), and returns its final figures.
async fn settled(baton: &Baton, generation: u64, what: &str) -> UpgradeReport {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let found = events(baton).await.into_iter().find_map(|e| match e.kind {
            EventKind::Settled { report } if report.generation == generation => Some(report),
            _ => None,
        });
        if let Some(r) = found {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: generation {generation} never settled within {SETTLE:?}; log:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One baton, `CONNECTIONS` idle connections (plus writers on kv), `UPGRADES` upgrades:
/// every connection is answered by each new pid, none is lost, and every report agrees.
async fn held_through_upgrades(app: App, repeat: usize, hog: bool) {
    let what = format!(
        "{app:?} run {repeat}{}",
        if hog { " under the CPU hog" } else { "" }
    );
    let program = match app {
        App::Http => hello_http_bin().unwrap(),
        App::Kv => kv_server_bin().unwrap(),
    };
    let (spec, name) = listen(app);
    let dir = TestDir::new("migration-scale").unwrap();
    let state = dir.join("state");
    let state = state.to_str().unwrap().to_owned();
    // kv-server keeps its data across upgrades only as a stateful app: migration and
    // state hand-over together.
    let mut args = vec![
        "--listen",
        spec,
        "--drain-timeout",
        "120s",
        "--state-dir",
        state.as_str(),
    ];
    if app == App::Kv {
        args.push("--state");
    }
    let baton = Baton::start_in(dir, args, [&program]).await.unwrap();
    let addr: SocketAddr = baton.tcp_addr(name).await.unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();

    let conns = idle::open_all(app, addr, 0, CONNECTIONS).await.unwrap();
    let r = idle::round(conns, pid, 0, REQUEST).await;
    assert_eq!(r.lost, 0, "{what}: before any upgrade: {:?}", r.first_loss);
    let mut conns: Vec<Conn> = r.kept;

    let mut writers = Vec::new();
    if app == App::Kv {
        for i in 0..WRITERS {
            writers.push(
                IncrWriter::start(addr, format!("scale-{repeat}-{i}"))
                    .await
                    .unwrap(),
            );
        }
        progress(&writers, 50).await.unwrap();
    }
    let expected = (CONNECTIONS + writers.len()) as u64;

    let _hog = hog.then(|| CpuHog::per_core().unwrap());
    for i in 1..=UPGRADES {
        let what = format!("{what}, upgrade {i}");
        let (report, _) = upgrade_promoted(&baton, &what).await;
        let new_pid = report.pid.unwrap();
        // The old generation hands everything over and exits long before its drain
        // deadline; only then is the upgrade settled.
        let status: Status = wait_replaced(&baton, pid, new_pid, SETTLE, &what).await;
        assert_eq!(generation_pids(&status), vec![new_pid], "{what}");
        let fin = settled(&baton, report.generation, &what).await;
        assert_eq!(
            (
                fin.handed_over_connections,
                fin.migrated_connections,
                fin.lost_connections
            ),
            (expected, expected, 0),
            "{what}: handed over, migrated, lost: {fin:?}"
        );
        let last = baton.status().await.unwrap().last_upgrade.unwrap();
        assert_eq!(
            last.migrated_connections, expected,
            "{what}: status: {last:?}"
        );
        assert_eq!(last.lost_connections, 0, "{what}: status: {last:?}");

        let r = idle::round(conns, new_pid, 0, REQUEST).await;
        assert_eq!(
            r.lost,
            0,
            "{what}: {} of {CONNECTIONS} held connections lost (first: {:?}); log:\n{}",
            r.lost,
            r.first_loss,
            baton.log()
        );
        conns = r.kept;
        if !writers.is_empty() {
            let at = writers.iter().map(IncrWriter::last).min().unwrap_or(0);
            if let Err(e) = progress(&writers, at + 20).await {
                let mut why = Vec::new();
                for w in writers {
                    if let Err(e) = w.finish().await {
                        why.push(e);
                    }
                }
                panic!("{what}: {e}: {why:?}; log:\n{}", baton.log());
            }
        }
        pid = new_pid;
    }
    for w in writers {
        let key = w.key().to_owned();
        let n = w
            .finish()
            .await
            .unwrap_or_else(|e| panic!("{what}: writer {key}: {e}"));
        assert!(n > 0, "{what}: writer {key} wrote nothing");
    }

    // The history lines were written once final: each carries every connection.
    let lines: Vec<HistoryEntry> = history(&baton)
        .await
        .into_iter()
        .filter(|e| e.report.generation >= 2)
        .collect();
    assert_eq!(lines.len(), UPGRADES, "{what}: history: {lines:?}");
    for e in &lines {
        assert_eq!(
            (e.report.migrated_connections, e.report.lost_connections),
            (expected, 0),
            "{what}: history line for generation {}: {:?}",
            e.report.generation,
            e.report
        );
    }
}

async fn repeated(app: App, hog: bool) {
    let _serial = exclusive().await;
    raise_nofile().unwrap();
    for repeat in 1..=REPEATS {
        held_through_upgrades(app, repeat, hog).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_past_the_relay_bound_survive_upgrades() {
    repeated(App::Http, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_past_the_relay_bound_survive_upgrades_under_a_cpu_hog() {
    repeated(App::Http, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_connections_and_writers_past_the_relay_bound_survive_upgrades_under_a_cpu_hog() {
    repeated(App::Kv, true).await;
}

/// A successor that announces `adopt`, says READY, and never reads its control socket.
fn mute_successor(dir: &Path, python: &Path) -> std::path::PathBuf {
    let path = dir.join("mute-successor");
    write_script(
        &path,
        &format!(
            r#"#!{}
import os, socket, time
ctl = socket.socket(fileno=int(os.environ["BATON_CONTROL_FD"]))
ctl.sendall(b'{{"type":"hello","protocol":1,"features":["adopt"],"restores":[]}}\n')
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", addr)
time.sleep(3600)
"#,
            python.display()
        ),
    )
    .unwrap();
    path
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Connections handed to a successor that never takes them are lost, and every report
/// says how many: status, the history line, the `settled` event and the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_never_reads_loses_connections_and_every_report_says_so() {
    let _serial = exclusive().await;
    raise_nofile().unwrap();
    let python = python3().await.unwrap();
    let hello = hello_http_bin().unwrap();
    let dir = TestDir::new("migration-mute").unwrap();
    let app = dir.join("app");
    replace_symlink(&app, &hello).unwrap();
    let mute = mute_successor(dir.path(), &python);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    drop(metrics);
    let maddr = metrics_addr.to_string();
    let baton = Baton::start_in(
        dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--drain-timeout",
            "2s",
            "--metrics",
            maddr.as_str(),
        ],
        [&app],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let pid = baton.status().await.unwrap().pid.unwrap();
    let conns = idle::open_all(App::Http, addr, 0, CONNECTIONS)
        .await
        .unwrap();
    let r = idle::round(conns, pid, 0, REQUEST).await;
    assert_eq!(r.lost, 0, "before any upgrade: {:?}", r.first_loss);
    let _held = r.kept;

    replace_symlink(&app, &mute).unwrap();
    let (report, _) = upgrade_promoted(&baton, "upgrade to the mute successor").await;
    let mute_gen = report.generation;
    // The old generation is killed at its drain deadline with connections unsent or
    // unread; after the stall bound baton discards them, counted.
    let status = baton
        .wait_for(
            "connections reported lost",
            Duration::from_secs(60),
            |s: &Status| {
                s.last_upgrade
                    .as_ref()
                    .is_some_and(|u| u.generation == mute_gen && u.lost_connections > 0)
            },
        )
        .await
        .unwrap();
    let lost_then = status.last_upgrade.unwrap().lost_connections;
    let text = baton
        .cli(&["status"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        text.stdout.contains(&format!("LOST {lost_then}")) || text.stdout.contains("LOST "),
        "status text: {}",
        text.stdout
    );
    assert!(
        baton.log().contains("ERROR"),
        "the loss is logged at ERROR:\n{}",
        baton.log()
    );

    // Replacing the mute generation ends its queue too: what was queued for it and never
    // written is lost as well, and its upgrade settles with the final count.
    replace_symlink(&app, &hello).unwrap();
    upgrade_promoted(&baton, "upgrade away from the mute successor").await;
    let fin = settled(&baton, mute_gen, "mute successor").await;
    assert!(fin.lost_connections >= lost_then, "{fin:?}");
    assert_eq!(
        fin.handed_over_connections,
        fin.migrated_connections + fin.lost_connections,
        "{fin:?}"
    );
    let line = history(&baton)
        .await
        .into_iter()
        .find(|e| e.report.generation == mute_gen)
        .expect("a history line for the mute successor");
    assert_eq!(
        line.report.lost_connections, fin.lost_connections,
        "{line:?}"
    );
    let (code, body, _) = baton_tests::metrics::scrape_text(metrics_addr);
    assert_eq!(code, 200);
    let lost_metric = sample(&body, "baton_lost_connections_total");
    assert!(
        lost_metric >= fin.lost_connections as f64,
        "metric {lost_metric} < {}",
        fin.lost_connections
    );
    let handed = sample(&body, "baton_handed_over_connections_total");
    assert!(handed >= fin.handed_over_connections as f64, "{body}");
}

/// A reexec asked for while the old generation hands its connections over waits until
/// the hand-over is done (a channel blocked on relay slots cannot be paused), then
/// carries the pending history line over: nothing is lost, and the figures are final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reexec_in_the_middle_of_a_migration_loses_nothing() {
    let _serial = exclusive().await;
    raise_nofile().unwrap();
    let hello = hello_http_bin().unwrap();
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "120s"],
        [&hello],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    // Enough connections that the hand-over outlasts the reexec's own start.
    const HELD: usize = 4 * CONNECTIONS;
    let conns = idle::open_all(App::Http, addr, 0, HELD).await.unwrap();
    let r = idle::round(conns, pid, 0, REQUEST).await;
    assert_eq!(r.lost, 0, "before any upgrade: {:?}", r.first_loss);
    let mut conns = r.kept;
    let _hog = CpuHog::per_core().unwrap();
    let mut overlapped = 0;
    for i in 1..=3 {
        let what = format!("upgrade {i} with a reexec in the middle");
        let (report, _) = upgrade_promoted(&baton, &what).await;
        // The old generation is handing over now.
        let (ok, rx) = baton.reexec_wait().await.unwrap();
        assert!(ok, "{what}: reexec failed: {rx:?}; log:\n{}", baton.log());
        let new_pid = report.pid.unwrap();
        wait_replaced(&baton, pid, new_pid, SETTLE, &what).await;
        let fin = settled(&baton, report.generation, &what).await;
        let evs = events(&baton).await;
        let at = |f: &dyn Fn(&Event) -> bool| evs.iter().rev().find(|e| f(e)).map(|e| e.at_ms);
        let reexec_at = at(&|e| matches!(e.kind, EventKind::Reexec { .. }));
        let exited_at = at(&|e| e.pid == Some(pid) && matches!(e.kind, EventKind::Exited { .. }));
        println!("{what}: reexec at {reexec_at:?}, old generation exited at {exited_at:?}");
        if let (Some(r), Some(x)) = (reexec_at, exited_at) {
            overlapped += usize::from(r <= x);
        }
        assert_eq!(
            (
                fin.handed_over_connections,
                fin.migrated_connections,
                fin.lost_connections
            ),
            (HELD as u64, HELD as u64, 0),
            "{what}: {fin:?}"
        );
        let r = idle::round(conns, new_pid, 0, REQUEST).await;
        assert_eq!(
            r.lost,
            0,
            "{what}: {} connections lost (first: {:?}); log:\n{}",
            r.lost,
            r.first_loss,
            baton.log()
        );
        conns = r.kept;
        pid = new_pid;
    }
    assert!(
        overlapped > 0,
        "no reexec happened while an old generation was still handing over: \
         the test did not test what it says"
    );
}
