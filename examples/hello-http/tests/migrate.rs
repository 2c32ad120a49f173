//! Connection migration between two real hello-http processes, with this
//! test playing the supervisor: it gives each a control socket, sends the
//! old one `drain{migrate:true}` and relays every `migrate` (with its fd) to
//! the new one as `adopt`. Clients keep their TCP connections and are
//! answered by the new process.
//!
//! The supervisor's side is `baton_child::testing::FakeSupervisor`.

mod common;

use std::process::Command;
use std::sync::mpsc;

use baton_child::testing::FakeSupervisor;
use baton_protocol::Feature;
use common::{BOUND, Conn, Server};

/// Spawns hello-http as generation `generation` under `sup`.
fn spawn_generation(sup: &mut FakeSupervisor, label: &str) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello-http"));
    cmd.args(["--listen-fallback", "127.0.0.1:0", "--label", label]);
    sup.command(&mut cmd).unwrap();
    Server::spawn(&mut cmd)
}

enum Relayed {
    Hellos,
    Migrated { buffered: usize },
    OldClosed,
}

/// The fake supervisor: checks both hellos, waits for `go`, drains the old
/// generation with migration and relays its connections to the new one.
async fn relay(
    mut old: FakeSupervisor,
    mut new: FakeSupervisor,
    go: mpsc::Receiver<()>,
    out: mpsc::Sender<Relayed>,
) {
    for sup in [&mut old, &mut new] {
        assert_eq!(sup.hello().await.unwrap(), vec![Feature::Adopt]);
    }
    out.send(Relayed::Hellos).unwrap();
    // Blocking is fine: nothing else runs on this runtime meanwhile.
    go.recv_timeout(BOUND).unwrap();
    old.drain(std::time::Duration::from_secs(10), true)
        .await
        .unwrap();
    loop {
        let Ok(m) = old.migrated().await else {
            out.send(Relayed::OldClosed).unwrap();
            return;
        };
        let buffered = m.buffered.len();
        new.adopt(m).await.unwrap();
        out.send(Relayed::Migrated { buffered }).unwrap();
    }
}

fn pid_in(body: &str) -> u32 {
    body.split_whitespace()
        .find_map(|t| t.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

#[test]
fn drain_with_migrate_moves_live_connections_to_the_next_generation() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let mut old_sup = FakeSupervisor::new(1).unwrap();
    let mut new_sup = FakeSupervisor::new(2).unwrap();
    let mut old = spawn_generation(&mut old_sup, "old");
    let mut new = spawn_generation(&mut new_sup, "new");
    let old_addr = old.wait_listening();
    new.wait_listening();
    let (go_tx, go_rx) = mpsc::channel();
    let (out_tx, relayed) = mpsc::channel();
    drop(_enter);
    let relay = std::thread::spawn(move || rt.block_on(relay(old_sup, new_sup, go_rx, out_tx)));
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
                eprintln!("migrated a connection with {buffered} bytes buffered");
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
