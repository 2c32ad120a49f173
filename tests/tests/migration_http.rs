//! Issue 4: live connection migration with hello-http.
//!
//! When the new generation announced the `adopt` feature, baton drains the old one with
//! `migrate: true` and hello-http hands every keep-alive connection over at its next request
//! boundary (fd + unread bytes), so clients keep their TCP connections across upgrades. The
//! old generation then has nothing left and exits at once, long before its drain deadline.
//!
//! Every test runs baton with `--drain-timeout 60s`: a generation that merely waited out its
//! drain (instead of handing its connections over, or closing them at request boundaries)
//! would outlive the bounds below by far, and the test would fail.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use baton_protocol::Status;
use baton_tests::harness::{
    Baton, TestDir, exclusive, fixture, generation_pids, hello_http_bin, python3, replace_symlink,
    wait_pid_gone, write_script,
};
use baton_tests::http::{Response, read_response};
use baton_tests::load::{LoadGen, LoadOpts};
use baton_tests::upgrade::{self, migrated_into, upgrade_promoted};

const DRAIN_TIMEOUT: &str = "60s";
/// How long an old generation may take to hand everything over (or finish) and exit. Far
/// below the drain timeout, generous for a loaded 2-core machine.
const PROMPT_EXIT: Duration = Duration::from_secs(10);
/// Bound on a single read or write on a raw test connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until at least `n` connections have been handed over to `generation`.
async fn wait_migrated(baton: &Baton, generation: u64, n: u64, what: &str) -> Status {
    upgrade::wait_migrated(baton, generation, n, PROMPT_EXIT, what).await
}

/// Waits until the old generation `old_pid` has exited and only `new_pid` is left, at most
/// [`PROMPT_EXIT`] after `promoted` (when `baton upgrade --wait` returned); returns how
/// long after `promoted` the old generation was seen gone.
async fn wait_old_gone(
    baton: &Baton,
    old_pid: u32,
    new_pid: u32,
    promoted: Instant,
    what: &str,
) -> Duration {
    let left = PROMPT_EXIT.saturating_sub(promoted.elapsed());
    wait_pid_gone(old_pid, left).await.unwrap_or_else(|e| {
        panic!(
            "{what}: old generation {old_pid} still alive {:?} after promotion \
             (drain timeout is {DRAIN_TIMEOUT}): {e}",
            promoted.elapsed()
        )
    });
    let took = promoted.elapsed();
    let settled = baton.wait_settled(PROMPT_EXIT).await.unwrap();
    assert_eq!(generation_pids(&settled), vec![new_pid], "{what}");
    took
}

/// Test 1: keep-alive clients keep their connections across 20 upgrades under load; every
/// generation answers on them, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_connections_survive_twenty_upgrades() {
    keepalive_across_twenty_upgrades(false).await;
}

/// The same, with every core contended by a CPU hog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_connections_survive_twenty_upgrades_under_a_cpu_hog() {
    keepalive_across_twenty_upgrades(true).await;
}

async fn keepalive_across_twenty_upgrades(hog: bool) {
    const UPGRADES: usize = 20;
    const KEEPALIVE: usize = 8;
    let _serial = exclusive().await;
    let _hog = hog.then(|| baton_tests::hog::CpuHog::per_core().unwrap());
    let hello = hello_http_bin().unwrap();
    let baton = Baton::start(
        [
            "--listen",
            "http=127.0.0.1:0",
            "--drain-timeout",
            DRAIN_TIMEOUT,
        ],
        [&hello],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();
    let mut all_pids = vec![pid];

    let load = LoadGen::start(
        addr,
        LoadOpts {
            keepalive: KEEPALIVE,
            fresh: 0,
            ..LoadOpts::default()
        },
    );
    load.wait_until(Duration::from_secs(10), |s| {
        s.pids.contains(&pid) && s.ok >= 200
    })
    .await
    .unwrap_or_else(|s| panic!("generation 1 (pid {pid}) never served: {s:?}"));

    let mut exit_times = Vec::with_capacity(UPGRADES);
    for i in 1..=UPGRADES {
        let what = format!("upgrade {i}");
        let (report, report_at) = upgrade_promoted(&baton, &what).await;
        let new_pid = report.pid.unwrap();
        assert_ne!(new_pid, pid, "{what}: the active pid did not change");
        assert!(!all_pids.contains(&new_pid), "{what}: pid {new_pid} reused");

        // Every one of the load's connections moves to the new generation (the old one
        // holds exactly KEEPALIVE, since none ever reconnected), and then the old
        // generation has nothing left and exits.
        wait_migrated(&baton, report.generation, KEEPALIVE as u64, &what).await;
        let took = wait_old_gone(&baton, pid, new_pid, report_at, &what).await;
        exit_times.push(took);
        let status = baton.status().await.unwrap();
        assert_eq!(
            migrated_into(&status, report.generation),
            Some(KEEPALIVE as u64),
            "{what}: every connection migrates exactly once: {status:?}"
        );

        // The new pid now answers on the very connections the old one served.
        load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&new_pid))
            .await
            .unwrap_or_else(|s| panic!("{what}: new pid {new_pid} never answered: {s:?}"));
        let snap = load.snapshot();
        assert_eq!(snap.failed, 0, "{what}: failures so far: {}", snap.failures);
        assert_eq!(
            snap.reconnects, 0,
            "{what}: a keep-alive client lost its connection: {snap:?}"
        );
        // Some traffic on the new generation before the next upgrade.
        load.wait_until(Duration::from_secs(10), |s| s.ok >= snap.ok + 500)
            .await
            .unwrap_or_else(|s| panic!("{what}: load stalled after migration: {s:?}"));
        pid = new_pid;
        all_pids.push(new_pid);
    }

    let report = load.stop().await;
    println!("{report}");
    println!(
        "old generation exit after promotion: max {:?}, all {exit_times:?}",
        exit_times.iter().max()
    );
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    assert_eq!(
        report.keepalive_reconnects,
        vec![0; KEEPALIVE],
        "every connection must survive all {UPGRADES} upgrades\n{report}"
    );
    // Only keep-alive clients that never reconnected: every generation answered on them.
    let mut expected = all_pids.clone();
    expected.sort_unstable();
    assert_eq!(report.pids, expected, "{report}");
    assert_eq!(report.pid_counts.values().sum::<u64>(), report.ok);
    let status = baton.status().await.unwrap();
    assert_eq!(status.crashes, 0, "{status:?}");
}

/// A response read off a raw connection.
/// Writes `bytes` and, when `response` is true, reads one response. Blocking socket I/O
/// (bounded by the socket timeouts) off the async workers' hands.
fn raw_io(stream: &mut TcpStream, bytes: &[u8], response: bool) -> Option<Response> {
    tokio::task::block_in_place(|| {
        stream.write_all(bytes).unwrap();
        response.then(|| read_response(stream).unwrap())
    })
}

/// A GET on the raw connection; checks it is a 200 from `pid` that keeps the connection.
fn raw_get(stream: &mut TcpStream, pid: u32, what: &str) -> Response {
    let resp = raw_io(
        stream,
        b"GET / HTTP/1.1\r\nHost: test\r\nUser-Agent: migration-test\r\n\r\n",
        true,
    )
    .unwrap();
    check_hello(&resp, pid, what);
    resp
}

fn check_hello(resp: &Response, pid: u32, what: &str) {
    assert_eq!(resp.status, 200, "{what}: {resp:?}");
    assert!(
        resp.body.starts_with("hello from pid="),
        "{what}: unexpected body: {resp:?}"
    );
    assert_eq!(
        resp.pid(),
        Some(pid),
        "{what}: answered by the wrong process: {resp:?}"
    );
    assert_ne!(
        resp.header("connection").map(str::to_ascii_lowercase),
        Some("close".to_owned()),
        "{what}: the server wants to close the connection: {resp:?}"
    );
}

/// `(tx_queue, rx_queue)` of the IPv4 TCP socket `local` <-> `remote`, from
/// `/proc/net/tcp`: bytes sent but not acknowledged, and bytes received but not yet read by
/// the process that owns the socket.
fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    // The kernel prints the IPv4 address as a host-order u32 (little-endian here) and the
    // port in host order, both in hex.
    let key = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        SocketAddr::V6(_) => None,
    };
    let (local, remote) = (key(local)?, key(remote)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// Waits (bounded) until the bytes just written on `stream` have reached the server's
/// socket (our send queue is acknowledged) and the server process has read them (its
/// receive queue is empty).
async fn wait_server_read(stream: &TcpStream) {
    let (client, server) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let ours = tcp_queues(client, server);
        let theirs = tcp_queues(server, client);
        if matches!((ours, theirs), (Some((0, _)), Some((_, 0)))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server never read the bytes sent on {client}: \
             (tx, rx) ours {ours:?}, the server's {theirs:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn connect_raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Test 2: one idle raw connection across 5 upgrades answers each time from the new
/// generation; then a request cut in half by an upgrade is completed on the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_raw_connection_and_half_sent_request_migrate() {
    const UPGRADES: usize = 5;
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let dir = TestDir::new("migrate-raw").unwrap();
    // Debug logs of hello-http show how many unread bytes each hand-over carried.
    let app = dir.join("hello.sh");
    write_script(
        &app,
        &format!(
            "#!/bin/sh\nRUST_LOG=info,hello_http=debug,baton_child=debug exec '{}' \"$@\"\n",
            hello.display()
        ),
    )
    .unwrap();
    let baton = Baton::start_in(
        dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--drain-timeout",
            DRAIN_TIMEOUT,
        ],
        [&app],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let mut pid = baton.status().await.unwrap().pid.unwrap();

    let mut stream = connect_raw(addr);
    let local = stream.local_addr().unwrap();
    for i in 1..=UPGRADES {
        let what = format!("upgrade {i}");
        raw_get(&mut stream, pid, &format!("{what}, before"));
        // The connection is idle now: the old generation hands it over at once.
        let (report, report_at) = upgrade_promoted(&baton, &what).await;
        let new_pid = report.pid.unwrap();
        assert_ne!(new_pid, pid, "{what}");
        wait_migrated(&baton, report.generation, 1, &what).await;
        wait_old_gone(&baton, pid, new_pid, report_at, &what).await;
        let status = baton.status().await.unwrap();
        assert_eq!(
            migrated_into(&status, report.generation),
            Some(1),
            "{what}: {status:?}"
        );
        // Same socket, same local port, no reconnect: the new process answers on it.
        raw_get(&mut stream, new_pid, &format!("{what}, after"));
        assert_eq!(stream.local_addr().unwrap(), local);
        pid = new_pid;
    }

    // A request line cut in half by an upgrade: the first half is read by the old
    // generation and must travel with the connection.
    let handed_over_before = baton.log().matches("connection handed over").count();
    raw_io(&mut stream, b"GET / HT", false);
    wait_server_read(&stream).await;
    let (report, report_at) = upgrade_promoted(&baton, "half-sent request").await;
    let new_pid = report.pid.unwrap();
    wait_migrated(&baton, report.generation, 1, "half-sent request").await;
    wait_old_gone(&baton, pid, new_pid, report_at, "half-sent request").await;
    let resp = raw_io(
        &mut stream,
        b"TP/1.1\r\nHost: test\r\nUser-Agent: migration-test\r\n\r\n",
        true,
    )
    .unwrap();
    check_hello(&resp, new_pid, "completed half-sent request");
    // And the connection is still in step: one more plain request.
    raw_get(&mut stream, new_pid, "after the half-sent request");
    assert_eq!(stream.local_addr().unwrap(), local);

    // The bytes really were carried over by the hand-over (read by the old generation,
    // which `wait_server_read` made sure of, and replayed by the new one).
    let log = baton.log();
    let hand_overs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection handed over"))
        .collect();
    assert_eq!(
        hand_overs.len(),
        handed_over_before + 1,
        "one hand-over per upgrade expected:\n{}",
        hand_overs.join("\n")
    );
    println!("hand-overs seen in the log:\n{}", hand_overs.join("\n"));
    let last = hand_overs.last().copied().unwrap_or_default();
    assert!(
        last.contains("buffered=8"),
        "the hand-over of the half-sent request should carry its 8 bytes: {last:?}"
    );
}

/// Writes `<dir>/py.sh`, which runs the level-1 Python server (no SDK, no migration).
async fn python_wrapper(dir: &TestDir) -> std::path::PathBuf {
    let python = python3().await.unwrap();
    let script = fixture("py_server.py");
    assert!(script.is_file(), "{} missing", script.display());
    let wrapper = dir.join("py.sh");
    // Written before baton starts: nothing may hold a script open for writing while baton
    // execs it (ETXTBSY).
    write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec '{}' '{}'\n",
            python.display(),
            script.display()
        ),
    )
    .unwrap();
    wrapper
}

/// Starts baton on `<dir>/app`, a symlink to `initial`.
async fn start_on_symlink(dir: TestDir, initial: &Path) -> (Baton, std::path::PathBuf) {
    let app = dir.join("app");
    std::os::unix::fs::symlink(initial, &app).unwrap();
    let baton = Baton::start_in(
        dir,
        [
            "--listen",
            "http=127.0.0.1:0",
            "--drain-timeout",
            DRAIN_TIMEOUT,
        ],
        [&app],
    )
    .await
    .unwrap();
    (baton, app)
}

/// Test 3: a candidate without migration support (the Python server says no hello) gets
/// no connections; the old hello-http closes its keep-alive connections at request
/// boundaries instead, and exits as soon as they are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidate_without_adopt_falls_back_to_plain_drain() {
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let dir = TestDir::new("migrate-fallback").unwrap();
    let py = python_wrapper(&dir).await;
    let (baton, app) = start_on_symlink(dir, &hello).await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let old_pid = baton.status().await.unwrap().pid.unwrap();

    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |s| {
        s.pids.contains(&old_pid) && s.ok >= 200
    })
    .await
    .unwrap_or_else(|s| panic!("hello-http never served: {s:?}"));
    assert_eq!(
        load.snapshot().reconnects,
        0,
        "hello-http keeps connections"
    );

    replace_symlink(&app, &py).unwrap();
    let (report, report_at) = upgrade_promoted(&baton, "hello-http -> python").await;
    let new_pid = report.pid.unwrap();
    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&new_pid))
        .await
        .unwrap_or_else(|s| panic!("python generation never answered: {s:?}"));
    let took = wait_old_gone(&baton, old_pid, new_pid, report_at, "hello-http -> python").await;
    let status = baton.status().await.unwrap();
    assert_eq!(
        migrated_into(&status, report.generation),
        Some(0),
        "nothing may be handed to a child that cannot adopt: {status:?}"
    );

    let report = load.stop().await;
    println!("{report}\nold generation exited {took:?} after promotion");
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    assert_eq!(report.pids, sorted(vec![old_pid, new_pid]), "{report}");
    // The keep-alive clients were told `Connection: close` and reconnected (the Python
    // server then closes every connection anyway).
    assert!(
        report.keepalive_reconnects.iter().all(|r| *r > 0),
        "{report}"
    );
}

/// Test 4: the reverse: an old generation without the SDK (Python, stopped by SIGTERM) is
/// replaced by hello-http as a plain stateless upgrade; the next hello-http -> hello-http
/// upgrade then migrates the keep-alive connections again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_generation_without_sdk_upgrades_to_hello_http() {
    const KEEPALIVE: usize = 4;
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let dir = TestDir::new("migrate-reverse").unwrap();
    let py = python_wrapper(&dir).await;
    let (baton, app) = start_on_symlink(dir, &py).await;
    let addr = baton.tcp_addr("http").await.unwrap();
    let py_pid = baton.status().await.unwrap().pid.unwrap();

    let load = LoadGen::start(
        addr,
        LoadOpts {
            keepalive: KEEPALIVE,
            fresh: 4,
            ..LoadOpts::default()
        },
    );
    load.wait_until(Duration::from_secs(10), |s| {
        s.pids.contains(&py_pid) && s.ok >= 100
    })
    .await
    .unwrap_or_else(|s| panic!("python generation never served: {s:?}"));

    replace_symlink(&app, &hello).unwrap();
    let (first, first_at) = upgrade_promoted(&baton, "python -> hello-http").await;
    let hello_pid = first.pid.unwrap();
    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&hello_pid))
        .await
        .unwrap_or_else(|s| panic!("hello-http never answered: {s:?}"));
    let took = wait_old_gone(&baton, py_pid, hello_pid, first_at, "python -> hello-http").await;
    let status = baton.status().await.unwrap();
    assert_eq!(
        migrated_into(&status, first.generation),
        Some(0),
        "a child without the SDK hands nothing over: {status:?}"
    );
    let snap = load.snapshot();
    assert_eq!(snap.failed, 0, "python -> hello-http: {}", snap.failures);

    // Every keep-alive client is on a hello-http connection now (Python is gone; a few
    // hundred requests later, any client that read Python's last `Connection: close` has
    // reconnected), and keeps it from here on: the next upgrade migrates them.
    let reconnects = load
        .wait_until(Duration::from_secs(10), |s| s.ok >= snap.ok + 200)
        .await
        .unwrap_or_else(|s| panic!("load stalled on hello-http: {s:?}"))
        .reconnects;
    let (second, second_at) = upgrade_promoted(&baton, "hello-http -> hello-http").await;
    let last_pid = second.pid.unwrap();
    wait_migrated(
        &baton,
        second.generation,
        KEEPALIVE as u64,
        "hello-http -> hello-http",
    )
    .await;
    load.wait_until(Duration::from_secs(10), |s| s.pids.contains(&last_pid))
        .await
        .unwrap_or_else(|s| panic!("last generation never answered: {s:?}"));
    wait_old_gone(
        &baton,
        hello_pid,
        last_pid,
        second_at,
        "hello-http -> hello-http",
    )
    .await;

    let report = load.stop().await;
    println!("{report}\npython generation exited {took:?} after promotion");
    assert_eq!(report.failed, 0, "failures: {}\n{report}", report.failures);
    assert_eq!(report.ok, report.requests);
    assert_eq!(
        report.pids,
        sorted(vec![py_pid, hello_pid, last_pid]),
        "{report}"
    );
    assert_eq!(
        report.keepalive_reconnects.iter().sum::<u64>(),
        reconnects,
        "keep-alive clients reconnected during the migrating upgrade\n{report}"
    );
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}
