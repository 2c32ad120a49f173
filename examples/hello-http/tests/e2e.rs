//! Runs the real hello-http binary and talks HTTP/1.1 to it over loopback.
//!
//! Every wait is on an event (a log line, a READY datagram, a response, an
//! EOF, the process exiting) with a bound; every process is killed on drop.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BOUND, Conn, Server, tmpdir};
use nix::sys::signal::Signal;

#[test]
fn serves_pid_generation_and_label_with_keep_alive() {
    let dir = tmpdir("basic");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(BOUND)).unwrap();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello-http"));
    cmd.args(["--listen-fallback", "127.0.0.1:0"])
        .env("HELLO_LABEL", "test-v1")
        .env("NOTIFY_SOCKET", &notify_path);
    let mut server = Server::spawn(&mut cmd);
    let addr = server.wait_listening();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY datagram");
    assert_eq!(&buf[..n], b"READY=1");

    let mut c = Conn::open(addr);
    let r = c.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        format!(
            "hello from pid={} generation=0 label=test-v1\n",
            server.pid()
        )
    );
    assert!(!r.closes(), "{r:?}");
    // Same connection again (keep-alive), then the other routes.
    let r = c.get("/sleep?ms=20");
    assert_eq!(r.status, 200);
    assert!(r.body.contains(&format!("pid={}", server.pid())));
    assert_eq!(c.get("/sleep?ms=x").status, 400);
    assert_eq!(c.get("/nope").status, 404);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_finishes_in_flight_requests_and_closes_keep_alive_connections() {
    let mut server = Server::standalone(&["--label", "drain"]);
    let addr = server.wait_listening();
    server.wait_line("ready");

    // An idle keep-alive connection...
    let mut idle = Conn::open(addr);
    assert!(!idle.get("/").closes());
    // ...and one with a request in flight.
    let mut busy = Conn::open(addr);
    busy.send("/sleep?ms=1500");
    server.wait_line("path=\"/sleep\"");

    server.signal(Signal::SIGTERM);
    server.wait_line("stopped accepting");

    // No new connections (standalone, the listener was ours alone).
    let refused = TcpStream::connect(addr).expect_err("listener should be closed");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    // The idle connection's next request is served, with Connection: close.
    let r = idle.get("/");
    assert_eq!(r.status, 200);
    assert!(r.closes(), "{r:?}");
    idle.expect_eof();

    // The in-flight request completes, also with Connection: close.
    let r = busy.recv();
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("hello from pid="), "{r:?}");
    assert!(r.closes(), "{r:?}");
    busy.expect_eof();

    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    server.wait_line("all connections done");
}

#[test]
fn idle_keep_alive_connections_are_closed_at_the_drain_deadline() {
    let mut server = Server::standalone(&["--drain-timeout", "1s"]);
    let addr = server.wait_listening();
    let mut idle = Conn::open(addr);
    assert!(!idle.get("/").closes());

    server.signal(Signal::SIGTERM);
    let drained_at = Instant::now();
    server.wait_line("stopped accepting");
    // Nothing is sent on the connection: it stays open until the deadline.
    idle.expect_eof();
    assert!(
        drained_at.elapsed() >= Duration::from_millis(500),
        "closed too early: {:?}",
        drained_at.elapsed()
    );
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    server.wait_line("drain deadline");
}

#[test]
fn ignore_drain_keeps_serving_through_sigterm() {
    let mut server = Server::standalone(&["--ignore-drain"]);
    let addr = server.wait_listening();
    let mut c = Conn::open(addr);
    assert!(!c.get("/").closes());
    server.signal(Signal::SIGTERM);
    server.wait_line("drain requested");
    // A second SIGTERM does not exit either.
    server.signal(Signal::SIGTERM);
    server.wait_line("count=2");
    let r = c.get("/");
    assert_eq!(r.status, 200);
    assert!(!r.closes(), "{r:?}");
    assert!(Conn::open(addr).get("/").status == 200);
    assert!(server.child.try_wait().unwrap().is_none());
}

#[test]
fn ready_delay_holds_back_ready() {
    let dir = tmpdir("delay");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(BOUND)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello-http"));
    cmd.args(["--listen-fallback", "127.0.0.1:0", "--ready-delay", "700ms"])
        .env("NOTIFY_SOCKET", &notify_path);
    let mut server = Server::spawn(&mut cmd);
    server.wait_listening();
    let listening_at = Instant::now();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY datagram");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(listening_at.elapsed() >= Duration::from_millis(500));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under systemd's own socket activation tool: the listener is inherited
/// by name (the fallback would be a different, random port) and the pid is
/// the activated process's.
#[test]
fn inherits_the_listener_under_systemd_socket_activate() {
    let tool = "systemd-socket-activate";
    assert!(
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{tool} not found (Debian package systemd)"
    );
    // The tool needs a fixed port: take a free one and retry if somebody
    // grabs it in between.
    for _attempt in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(tool);
        cmd.args([
            "-l",
            &format!("127.0.0.1:{port}"),
            "--fdname=http",
            "-E",
            "RUST_LOG=hello_http=debug,baton_child=debug",
            env!("CARGO_BIN_EXE_hello-http"),
            "--listen-fallback",
            "127.0.0.1:0",
            "--label",
            "activated",
        ]);
        let mut server = Server::spawn(&mut cmd);
        if server.wait_line_or_eof("Listening on").is_none() {
            // Most likely the port was taken in between.
            continue;
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // The tool execs hello-http on the first connection attempt.
        let mut c = Conn::open(addr);
        let r = c.get("/");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            format!(
                "hello from pid={} generation=0 label=activated\n",
                server.pid()
            )
        );
        server.wait_line("using inherited TCP listener");
        let listening = server.wait_listening();
        assert_eq!(listening.port(), port);
        return;
    }
    panic!("could not get a free port for {tool}");
}
