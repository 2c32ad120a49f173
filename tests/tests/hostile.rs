//! Issue 14: a live hostile-input test. While clients load hello-http and baton upgrades
//! it, a local user throws everything at baton's sockets at once: garbage, invalid UTF-8,
//! huge and deeply nested lines, thousands of connections, and fds attached to control
//! requests and to notify datagrams. baton must keep serving and upgrading, and its fds
//! and memory must stay bounded and come back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use baton_tests::harness::{
    Baton, UpgradeOutcome, exclusive, fixture, hello_http_bin, proc_fds, proc_rss_kb, python3,
};
use baton_tests::load::{LoadGen, LoadOpts};

/// How long the attack lasts; the upgrades run inside it.
const ATTACK_SECS: &str = "8";
const UPGRADES: usize = 3;
/// baton's RSS may grow by this much under the attack (its buffers are bounded).
const RSS_GROWTH_KB: u64 = 24 * 1024;
/// ...and must come back to within this of where it was. glibc keeps freed heap it
/// cannot trim, so "back" means well under the peak's growth, not the start: 4 MiB was
/// exceeded by 8 KiB once (7,212 -> peak 11,432 -> 11,316 KiB), with fds back to 21.
const RSS_AFTER_KB: u64 = 6 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_keeps_serving_and_upgrading_under_hostile_input_with_bounded_fds_and_memory() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let baton = Baton::start(
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "5s"],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    let pid = baton.pid();
    let fds_before = proc_fds(pid).unwrap().len();
    let rss_before = proc_rss_kb(pid).unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |s| s.ok >= 200)
        .await
        .unwrap();

    // Peaks while it lasts.
    let stop = Arc::new(AtomicBool::new(false));
    let (peak_rss, peak_fds) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (stop, rss, fds) = (stop.clone(), peak_rss.clone(), peak_fds.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                rss.fetch_max(proc_rss_kb(pid).unwrap_or(0), Ordering::Relaxed);
                let n = proc_fds(pid).map(|f| f.len() as u64).unwrap_or(0);
                fds.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let attack = tokio::process::Command::new(&python)
        .arg(fixture("hostile_inputs.py"))
        .arg(baton.control())
        .arg(baton.notify_path())
        .arg(ATTACK_SECS)
        .kill_on_drop(true)
        .output();
    let upgrades = async {
        let mut outcomes = Vec::new();
        for _ in 0..UPGRADES {
            outcomes.push(baton.upgrade_wait().await);
        }
        outcomes
    };
    let (attack, outcomes) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(120), attack),
        upgrades
    );
    let attack = attack.expect("the attack ran past its time").unwrap();
    assert!(
        attack.status.success(),
        "the attack could not run: {}",
        String::from_utf8_lossy(&attack.stderr)
    );
    println!("attack: {}", String::from_utf8_lossy(&attack.stdout).trim());
    for (i, o) in outcomes.iter().enumerate() {
        assert!(
            matches!(o, Ok(UpgradeOutcome::Promoted(_))),
            "upgrade {} under attack: {o:?}",
            i + 1
        );
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();

    // Still serving, with nothing failed, and still upgrading.
    let ok = load.snapshot().ok;
    load.wait_until(Duration::from_secs(10), |s| s.ok >= ok + 200)
        .await
        .unwrap();
    assert!(matches!(
        baton.upgrade_wait().await,
        Ok(UpgradeOutcome::Promoted(_))
    ));
    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "{report}");

    // Bounded while it lasted, and back afterwards.
    let (rss_peak, fds_peak) = (
        peak_rss.load(Ordering::Relaxed),
        peak_fds.load(Ordering::Relaxed),
    );
    let settle = std::time::Instant::now() + Duration::from_secs(15);
    let (fds_after, rss_after) = loop {
        let fds = proc_fds(pid).unwrap().len();
        let rss = proc_rss_kb(pid).unwrap();
        if (fds <= fds_before + 2 && rss <= rss_before + RSS_AFTER_KB)
            || std::time::Instant::now() > settle
        {
            break (fds, rss);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "baton: fds {fds_before} -> peak {fds_peak} -> {fds_after}; \
         RSS {rss_before} KiB -> peak {rss_peak} KiB -> {rss_after} KiB"
    );
    // The control cap (1,024 clients) and the 16-fd read bound the fds.
    assert!(
        fds_peak <= (fds_before + 1024 + 64) as u64,
        "fd peak {fds_peak}"
    );
    assert!(
        rss_peak <= rss_before + RSS_GROWTH_KB,
        "RSS peak {rss_peak} KiB"
    );
    assert!(fds_after <= fds_before + 2, "fds after: {fds_after}");
    assert!(
        rss_after <= rss_before + RSS_AFTER_KB,
        "RSS after: {rss_after} KiB (before: {rss_before} KiB)"
    );
}

/// The stranger cache: while an unrelated process floods the notify socket with READY=1
/// (each datagram after the first costs baton a map lookup), a candidate whose READY
/// comes from its own child, not from the generation's pid, is still found through its
/// ancestry and promoted; the flood promotes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_flood_neither_promotes_nor_hides_a_descendants_ready() {
    use baton_tests::harness::{TestDir, replace_symlink, write_script};
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let dir = TestDir::new("strangers").unwrap();
    let current = dir.join("current");
    let helper_ready = dir.join("helper-ready");
    // The candidate's READY comes from a child it starts, half a second in (its start-up
    // time: an earlier promotion would be the flood's); then it only sleeps.
    write_script(
        &helper_ready,
        &format!(
            "#!/bin/sh\n'{}' -c \"import os, socket, time; time.sleep(0.5); socket.socket(socket.AF_UNIX, \
             socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\" &\n\
             exec sleep 60\n",
            python.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink(hello_http_bin().unwrap(), &current).unwrap();
    let baton = Baton::start_in(
        dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--ready-timeout",
            "10s",
            "--drain-timeout",
            "5s",
        ],
        [current.as_os_str()],
    )
    .await
    .unwrap();
    let old = baton.status().await.unwrap().pid.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (path, stop, sent) = (baton.notify_path(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let s = std::os::unix::net::UnixDatagram::unbound().unwrap();
            while !stop.load(Ordering::Relaxed) {
                if s.send_to(b"READY=1", &path).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    replace_symlink(&current, &helper_ready).unwrap();
    let outcome = baton.upgrade_wait().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let report = match outcome {
        UpgradeOutcome::Promoted(r) => r,
        UpgradeOutcome::RolledBack { message } => {
            panic!("the descendant's READY was lost in the flood: {message}")
        }
    };
    let new = report.pid.unwrap();
    assert_ne!(new, old);
    println!(
        "{} stranger datagrams; the candidate was promoted {} ms after the upgrade began",
        sent.load(Ordering::Relaxed),
        report.duration_ms
    );
    assert!(sent.load(Ordering::Relaxed) > 100, "the flood did not run");
    assert!(
        report.duration_ms >= 500,
        "promoted after {} ms, before the candidate said READY: the flood promoted it",
        report.duration_ms
    );
    // Nothing but the candidate is a generation now.
    let st = baton.wait_settled(Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.pid, Some(new));
}

/// A generation that floods its own control channel: `line` written as fast as the socket
/// takes it, for `secs`, after READY. `connections` lines are valid; anything else is not.
fn flooder(
    dir: &std::path::Path,
    python: &std::path::Path,
    line: &str,
    secs: u32,
) -> std::path::PathBuf {
    let path = dir.join("flooder");
    baton_tests::harness::write_script(
        &path,
        &format!(
            r#"#!{py}
import os, socket, time
ctl = socket.socket(fileno=int(os.environ["BATON_CONTROL_FD"]))
ctl.setblocking(True)
ctl.sendall(b'{{"type":"hello","protocol":1,"features":[],"restores":[]}}\n')
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", addr)
chunk = b'{line}\n' * 4096
end = time.monotonic() + {secs}
while time.monotonic() < end:
    ctl.sendall(chunk)
time.sleep(3600)
"#,
            py = python.display()
        ),
    )
    .unwrap();
    path
}

/// Issue 31, defect 1: while a generation floods its control channel for 10 s with valid
/// `connections` lines, baton's memory stays bounded, `status` answers promptly, and an
/// upgrade away from the flooder works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_flooding_valid_messages_costs_no_memory_and_blocks_nothing() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let dir = baton_tests::harness::TestDir::new("flood-valid").unwrap();
    let app = dir.join("app");
    let flood = flooder(
        dir.path(),
        &python,
        r#"{"type":"connections","active":7}"#,
        10,
    );
    baton_tests::harness::replace_symlink(&app, &flood).unwrap();
    let baton = Baton::start_in(
        dir,
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "2s"],
        [&app],
    )
    .await
    .unwrap();
    let pid = baton.pid();
    let rss_before = proc_rss_kb(pid).unwrap();
    let started = std::time::Instant::now();
    let (mut peak, mut slowest) = (0, Duration::ZERO);
    while started.elapsed() < Duration::from_secs(8) {
        let t = std::time::Instant::now();
        let st = baton.status().await.unwrap();
        slowest = slowest.max(t.elapsed());
        peak = peak.max(proc_rss_kb(pid).unwrap());
        assert_eq!(st.generations.len(), 1, "the flooder keeps running: {st:?}");
        assert_eq!(st.generations[0].connections, Some(7), "{st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "valid flood: baton RSS {rss_before} KiB before, peak {peak} KiB; slowest status {slowest:?}"
    );
    assert!(
        peak < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {peak} KiB"
    );
    assert!(slowest < Duration::from_secs(1), "status took {slowest:?}");
    // An upgrade away from the flooder, while it floods.
    baton_tests::harness::replace_symlink(&baton.dir().join("app"), &hello_http_bin().unwrap())
        .unwrap();
    let t = std::time::Instant::now();
    match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(_) => {}
        other => panic!("upgrade during the flood: {other:?}"),
    }
    println!("upgrade during the flood took {:?}", t.elapsed());
}

/// Issue 31, defect 1: a generation that floods malformed lines is killed, with the reason,
/// after a bounded number; baton logs one warning line for it, not one per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_flooding_garbage_is_killed_with_the_reason_and_one_log_line() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let hello = hello_http_bin().unwrap();
    let dir = baton_tests::harness::TestDir::new("flood-bad").unwrap();
    let app = dir.join("app");
    let flood = flooder(dir.path(), &python, "xx", 10);
    baton_tests::harness::replace_symlink(&app, &hello).unwrap();
    let baton = Baton::start_in(
        dir,
        ["--listen", "http=127.0.0.1:0", "--drain-timeout", "2s"],
        [&app],
    )
    .await
    .unwrap();
    let pid = baton.pid();
    let rss_before = proc_rss_kb(pid).unwrap();
    let app = baton.dir().join("app");
    baton_tests::harness::replace_symlink(&app, &flood).unwrap();
    // Rolled back (killed before its promotion) or reverted (right after): either way
    // it is killed, and the good version serves.
    let _ = baton.upgrade_wait().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !baton.log().contains("killing a hostile generation") {
        assert!(
            std::time::Instant::now() < deadline,
            "never killed:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    baton_tests::harness::replace_symlink(&app, &hello).unwrap();
    let st = baton.wait_settled(Duration::from_secs(30)).await.unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let body = baton_tests::http::http_get(addr, "/", Duration::from_secs(5))
        .unwrap()
        .body;
    assert!(body.contains("hello"), "{body}");
    let log = baton.log();
    assert!(
        log.contains("killed by baton") && log.contains("malformed control messages"),
        "the reason is given with its exit:\n{log}"
    );
    let warnings = log.matches("bad control message").count();
    assert_eq!(warnings, 1, "one warning line, not one per line:\n{log}");
    let rss = proc_rss_kb(pid).unwrap();
    assert!(rss < rss_before + 16 * 1024, "{rss_before} -> {rss} KiB");
    println!(
        "garbage flood: killed; now {:?}; RSS {rss_before} -> {rss} KiB",
        st.pid
    );
}
