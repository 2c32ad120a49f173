//! Issue 2, steady state: the active generation dying is replaced at once (and a crash
//! loop backs off), and a listener a child shut down is re-armed by baton.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baton_tests::harness::{Baton, exclusive, fixture, hello_http_bin, python3, wait_pid_gone};

/// One HTTP/1.1 request on a fresh connection; the body on 200.
fn get(addr: SocketAddr) -> std::io::Result<String> {
    get_path(addr, "/")
}

fn get_path(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad response: {out:?}")));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_active_generation_is_replaced_and_nothing_is_refused() {
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let baton = Baton::start(["--listen", "http=127.0.0.1:0"], [hello.as_os_str()])
        .await
        .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let old = baton.status().await.unwrap().pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_pid_gone(old, Duration::from_secs(5)).await.unwrap();
    // Nobody is accepting right now: the connection waits in the backlog until the
    // replacement takes it. It must not be refused.
    let body = tokio::task::spawn_blocking(move || get(addr))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("request after the crash failed: {e}\n{}", baton.log()));
    let st = baton
        .wait_for("a replacement generation", Duration::from_secs(10), |s| {
            s.pid.is_some_and(|p| p != old)
        })
        .await
        .unwrap();
    let new = st.pid.unwrap();
    assert!(body.contains(&format!("pid={new}")), "{body}");
    assert_eq!(st.crashes, 1);
    assert_eq!(st.generation, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_backs_off_and_is_reported() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let script = fixture("crash_after_ready.py");
    let baton = Baton::spawn_in(
        baton_tests::harness::TestDir::new("crashloop").unwrap(),
        ["--listen", "http=127.0.0.1:0"],
        [python.as_os_str(), script.as_os_str()],
    )
    .unwrap();
    let started = Instant::now();
    let st = baton
        .wait_for("five crashes", Duration::from_secs(30), |s| s.crashes >= 5)
        .await
        .unwrap();
    // Back-off: 0, 100, 200, 400 ms between the replacements at least, so five
    // crashes cannot happen in less than 0.7 s; without back-off they take ~0.2 s.
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "no back-off: {:?}",
        started.elapsed()
    );
    // The human status reports the crash count too.
    let text = baton
        .cli(&["status"], Duration::from_secs(5))
        .await
        .unwrap();
    let shown: u64 = text
        .stdout
        .split("crashes ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no crash count in: {}", text.stdout));
    assert!(shown >= st.crashes, "{} < {}", shown, st.crashes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_shut_down_by_a_child_is_rearmed() {
    let _serial = exclusive().await;
    let python = python3().await.unwrap();
    let script = fixture("shutdown_listener.py");
    // An explicit port: the kernel gives up an auto-assigned (port 0) one on shutdown().
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("http=127.0.0.1:{port}");
    let baton = Baton::start(
        ["--listen", listen.as_str()],
        [python.as_os_str(), script.as_os_str()],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    assert_eq!(addr.port(), port);
    let pid = baton.status().await.unwrap().pid.unwrap();
    // Bounded retry: baton checks its listeners every second; until then the shut-down
    // socket refuses connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match tokio::task::spawn_blocking(move || get(addr))
            .await
            .unwrap()
        {
            Ok(b) => break b,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("listener never came back: {e}\n{}", baton.log()),
        }
    };
    assert!(body.contains(&format!("pid={pid}")), "{body}");
    assert!(baton.log().contains("re-armed"), "{}", baton.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_drain_when_baton_is_sigkilled() {
    // PR_SET_PDEATHSIG: a SIGKILLed baton makes its children drain (stop signal), so an
    // in-flight request still completes and no orphan keeps serving.
    let _serial = exclusive().await;
    let hello = hello_http_bin().unwrap();
    let baton = Baton::start(["--listen", "http=127.0.0.1:0"], [hello.as_os_str()])
        .await
        .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();
    let child = baton.status().await.unwrap().pid.unwrap();
    let inflight = tokio::task::spawn_blocking(move || get_path(addr, "/sleep?ms=1500"));
    baton
        .wait_for("the request in flight", Duration::from_secs(10), |s| {
            s.generations
                .iter()
                .any(|g| g.connections.unwrap_or(0) >= 1)
        })
        .await
        .unwrap();
    baton.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let body = inflight
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request cut by baton's death: {e}"));
    assert!(body.contains(&format!("pid={child}")), "{body}");
    wait_pid_gone(child, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("child outlived baton: {e}\n{}", baton.log()));
}
