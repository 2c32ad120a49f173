//! Issue 2: baton started with `LISTEN_FDS` (socket activation, here by
//! `systemd-socket-activate`) takes the sockets by `LISTEN_FDNAMES`, binds only the names
//! that were not passed, takes a datagram socket (`ListenDatagram=`) as UDP, and refuses an
//! inherited socket of another kind than its `--listen` asks for.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_tests::harness::{
    TestDir, baton_bin, baton_cli, descendants, exclusive, hello_http_bin, udp_echo_bin, which,
};

/// Kills the process and everything below it on drop.
struct Tree(Child);

impl Drop for Tree {
    fn drop(&mut self) {
        let pid = self.0.id();
        for p in descendants(pid).into_iter().chain([pid]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}

/// One request on a fresh connection; the whole response.
fn get(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn activator() -> Option<std::path::PathBuf> {
    let found = which("systemd-socket-activate");
    if found.is_none() {
        eprintln!("SKIP: systemd-socket-activate not installed (apt-get install systemd)");
    }
    found
}

async fn status_json(control: &Path) -> Option<serde_json::Value> {
    let out = baton_cli(
        ["status", "--json", "--control", control.to_str().unwrap()],
        Duration::from_secs(5),
    )
    .await
    .ok()?;
    serde_json::from_str(out.stdout.trim()).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inherited_listeners_are_matched_by_name() {
    let _serial = exclusive().await;
    let Some(activate) = activator() else { return };
    let dir = TestDir::new("activate").unwrap();
    let control = dir.join("baton.sock");
    let admin = dir.join("admin.sock");
    let port = free_port();
    let log = std::fs::File::create(dir.join("baton.log")).unwrap();
    let tree = Tree(
        Command::new(activate)
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg("--fdname=http")
            .arg(baton_bin().unwrap())
            .args(["run", "--control", control.to_str().unwrap()])
            .arg(format!("--listen=http=127.0.0.1:{port}"))
            .arg(format!("--listen=admin=unix:{}", admin.display()))
            .arg("--")
            .arg(hello_http_bin().unwrap())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // systemd-socket-activate execs baton on the first connection. That connection
    // waits in the backlog and must be answered by the child once it is up.
    let log_path = dir.join("baton.log");
    let listening = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("Listening on")
    {
        assert!(Instant::now() < listening, "activator never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = tokio::task::spawn_blocking(move || get(port));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = status_json(&control).await {
            if s["pid"].is_u64() {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "baton never became active: {}",
            std::fs::read_to_string(dir.join("baton.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let listeners = status["listeners"].as_array().unwrap();
    let by_name = |n: &str| {
        listeners
            .iter()
            .find(|l| l["name"] == n)
            .unwrap_or_else(|| panic!("no listener {n}: {status}"))
    };
    assert_eq!(by_name("http")["inherited"], true, "{status}");
    assert_eq!(by_name("http")["addr"], format!("127.0.0.1:{port}"));
    assert_eq!(by_name("admin")["inherited"], false, "{status}");
    assert!(admin.exists(), "baton bound the name that was not passed");
    // The activator's socket reaches the child.
    let child = status["pid"].as_u64().unwrap();
    for body in [
        first.await.unwrap(),
        tokio::task::spawn_blocking(move || get(port))
            .await
            .unwrap(),
    ] {
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains(&format!("pid={child}")), "{body}");
    }
    // baton keeps LISTEN_* to itself: the child sees its own layout, not baton's.
    let env = baton_tests::harness::proc_environ(child as u32).unwrap();
    assert_eq!(env["LISTEN_FDNAMES"], "http:admin");
    assert_eq!(env["LISTEN_PID"], child.to_string());
    drop(tree);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inherited_datagram_socket_is_refused_where_a_stream_is_asked_for() {
    let _serial = exclusive().await;
    let Some(activate) = activator() else { return };
    let dir = TestDir::new("activate-dgram").unwrap();
    let port = free_port();
    let out = tokio::task::spawn_blocking({
        let control = dir.join("baton.sock");
        move || {
            // The activator execs baton on the first datagram.
            std::thread::spawn(move || {
                let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                for _ in 0..300 {
                    let _ = u.send_to(b"x", ("127.0.0.1", port));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            Command::new(activate)
                .arg("--datagram")
                .arg(format!("--listen=127.0.0.1:{port}"))
                .arg("--fdname=http")
                .arg(baton_bin().unwrap())
                .args(["run", "--control", control.to_str().unwrap()])
                .arg(format!("--listen=http=127.0.0.1:{port}"))
                .args(["--", "true"])
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("inherited fd 3 ('http')")
            && lines[0].contains(&format!(
                "it is udp:127.0.0.1:{port} but --listen asks for 127.0.0.1:{port}"
            )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inherited_datagram_socket_serves_as_a_udp_listener() {
    let _serial = exclusive().await;
    let Some(activate) = activator() else { return };
    let dir = TestDir::new("activate-udp").unwrap();
    let control = dir.join("baton.sock");
    let port = free_port();
    let log = std::fs::File::create(dir.join("baton.log")).unwrap();
    let tree = Tree(
        Command::new(activate)
            .arg("--datagram")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg("--fdname=udp")
            .arg(baton_bin().unwrap())
            .args(["run", "--control", control.to_str().unwrap()])
            .arg(format!("--listen=udp=udp:127.0.0.1:{port}"))
            .arg("--")
            .arg(udp_echo_bin().unwrap())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The activator execs baton on the first datagram, which must then be answered by
    // the child from the socket's buffer.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 512];
    let reply = loop {
        let _ = client.send_to(b"seq=1", ("127.0.0.1", port));
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            break String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no reply: {}",
            std::fs::read_to_string(dir.join("baton.log")).unwrap_or_default()
        );
    };
    let status = status_json(&control).await.expect("status");
    let child = status["pid"].as_u64().unwrap();
    assert!(reply.starts_with("seq=1 pid="), "{reply}");
    assert!(reply.contains(&format!("pid={child}")), "{reply}");
    let l = &status["listeners"][0];
    assert_eq!(l["name"], "udp", "{status}");
    assert_eq!(l["inherited"], true, "{status}");
    assert_eq!(l["addr"], format!("udp:127.0.0.1:{port}"), "{status}");
    drop(tree);
}
