//! Connection migration between two real hello-http processes, with this
//! test playing the supervisor: it gives each a control socket, sends the
//! old one `drain{migrate:true}` and relays every `migrate` (with its fd) to
//! the new one as `adopt`. Clients keep their TCP connections and are
//! answered by the new process.
//!
//! One test in this file: the control fds are passed by clearing their
//! close-on-exec flag, which must not leak into processes other tests spawn.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::Command;
use std::sync::mpsc;

use baton_protocol::wire::{encode, write_line, FrameReader};
use baton_protocol::{ChildMsg, Feature, SupervisorMsg};
use common::{Conn, Server, BOUND};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use std::os::fd::AsFd;
use tokio::net::UnixStream;

/// Spawns hello-http as generation `generation` with a control socket; the
/// returned socket is the supervisor's end.
fn spawn_generation(generation: u64, label: &str) -> (Server, StdUnixStream) {
    let (sup, child) = StdUnixStream::pair().unwrap();
    fcntl(&child, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello-http"));
    cmd.args(["--listen-fallback", "127.0.0.1:0", "--label", label])
        .env("BATON_GENERATION", generation.to_string())
        .env("BATON_CONTROL_FD", child.as_raw_fd().to_string());
    let server = Server::spawn(&mut cmd);
    drop(child);
    (server, sup)
}

enum Relayed {
    Hellos,
    Migrated { buffered: usize },
    OldClosed,
}

/// The fake supervisor: checks both hellos, waits for `go`, drains the old
/// generation with migration and relays its connections to the new one.
fn relay(
    old: StdUnixStream,
    new: StdUnixStream,
    go: mpsc::Receiver<()>,
    out: mpsc::Sender<Relayed>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        old.set_nonblocking(true).unwrap();
        new.set_nonblocking(true).unwrap();
        let old = UnixStream::from_std(old).unwrap();
        let new = UnixStream::from_std(new).unwrap();
        let (mut old_r, mut new_r) = (FrameReader::new(), FrameReader::new());
        for (r, s) in [(&mut old_r, &old), (&mut new_r, &new)] {
            let f = r.next(s).await.unwrap().expect("hello");
            assert_eq!(
                f.parse::<ChildMsg>().unwrap(),
                ChildMsg::Hello {
                    protocol: 1,
                    features: vec![Feature::Adopt]
                }
            );
        }
        out.send(Relayed::Hellos).unwrap();
        // Blocking is fine: nothing else runs on this runtime meanwhile.
        go.recv_timeout(BOUND).unwrap();
        let drain = encode(&SupervisorMsg::Drain {
            deadline_ms: 10_000,
            migrate: true,
        })
        .unwrap();
        write_line(&old, &drain, &[]).await.unwrap();
        loop {
            let Some(mut f) = old_r.next(&old).await.unwrap() else {
                out.send(Relayed::OldClosed).unwrap();
                return;
            };
            match f.parse::<ChildMsg>().unwrap() {
                ChildMsg::Migrate {
                    fds: 1,
                    listener,
                    buffered,
                    meta,
                } => {
                    let fd = f.fds.pop().expect("migrate carries an fd");
                    let n = buffered.len();
                    let adopt = encode(&SupervisorMsg::Adopt {
                        fds: 1,
                        listener,
                        buffered,
                        meta,
                    })
                    .unwrap();
                    write_line(&new, &adopt, &[fd.as_fd()]).await.unwrap();
                    out.send(Relayed::Migrated { buffered: n }).unwrap();
                }
                ChildMsg::Connections { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    });
}

fn pid_in(body: &str) -> u32 {
    body.split_whitespace()
        .find_map(|t| t.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

#[test]
fn drain_with_migrate_moves_live_connections_to_the_next_generation() {
    let (mut old, old_sup) = spawn_generation(1, "old");
    let (mut new, new_sup) = spawn_generation(2, "new");
    let old_addr = old.wait_listening();
    new.wait_listening();
    let (go_tx, go_rx) = mpsc::channel();
    let (out_tx, relayed) = mpsc::channel();
    let relay = std::thread::spawn(move || relay(old_sup, new_sup, go_rx, out_tx));
    assert!(matches!(
        relayed.recv_timeout(BOUND).unwrap(),
        Relayed::Hellos
    ));

    // Three connections to the old generation: idle keep-alive, one with a
    // request in flight, one with half a request sent.
    let mut idle = Conn::open(old_addr);
    let r = idle.get("/");
    assert_eq!(pid_in(&r.body), old.pid());
    let mut busy = Conn::open(old_addr);
    busy.send("/sleep?ms=1500");
    old.wait_line("path=\"/sleep\"");
    let mut partial = Conn::open(old_addr);
    assert_eq!(pid_in(&partial.get("/").body), old.pid());
    partial.send_raw(b"GET / HTTP/1.1\r\nHo");

    go_tx.send(()).unwrap();
    old.wait_line("migrate=true");

    // The in-flight request completes in the old process, without a close:
    // the connection moves on afterwards.
    let r = busy.recv();
    assert_eq!(r.status, 200);
    assert_eq!(pid_in(&r.body), old.pid());
    assert!(!r.closes(), "{r:?}");

    let mut migrated = 0;
    while migrated < 3 {
        match relayed.recv_timeout(BOUND).unwrap() {
            Relayed::Migrated { buffered } => {
                eprintln!("migrated a connection with {buffered} base64 bytes buffered");
                migrated += 1;
            }
            Relayed::Hellos => unreachable!(),
            Relayed::OldClosed => panic!("old generation left after {migrated} hand-overs"),
        }
    }
    // Every connection, on the same TCP connection, is now served by the
    // new generation, the request counts continuing.
    for c in [&mut idle, &mut busy] {
        let r = c.get("/");
        assert_eq!(r.status, 200);
        assert_eq!(pid_in(&r.body), new.pid(), "{r:?}");
        assert!(!r.closes(), "{r:?}");
    }
    partial.send_raw(b"st: test\r\n\r\n");
    let r = partial.recv();
    assert_eq!(r.status, 200);
    assert_eq!(pid_in(&r.body), new.pid(), "{r:?}");

    // The old generation exits on its own once everything is handed over.
    let status = old.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(matches!(
        relayed.recv_timeout(BOUND).unwrap(),
        Relayed::OldClosed
    ));
    relay.join().unwrap();
    new.wait_line("serving an adopted connection");
}
