//! The real `kv-server` binary in stateful upgrades, with `baton_child::testing`'s
//! `FakeSupervisor` playing the supervisor's side of the control protocol (`PROTOCOL.md`).
//!
//! What is under test is kv-server: it restores (and migrates or rejects) snapshots before it
//! becomes ready, holds commands back while quiesced, resumes, and closes at command
//! boundaries on commit. Handing the shared listener over is baton's job and is covered by
//! the end-to-end tests in `tests/`; here each process binds its own port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_child::testing::{FakeSupervisor, Migrated, Restore, Snapshot};
use baton_protocol::Feature;
use serde_json::{Value, json};

/// Bound on every wait in this file.
const T: Duration = Duration::from_secs(20);

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kv-stateful-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One kv-server process under a `FakeSupervisor`, driven from a blocking test through a
/// runtime of its own.
struct Generation {
    rt: tokio::runtime::Runtime,
    sup: FakeSupervisor,
    child: Child,
    log: mpsc::Receiver<String>,
    /// The TCP address it accepts on (`None` for a Unix listener).
    addr: Option<SocketAddr>,
    /// What it logged as its listening address (`HOST:PORT` or `unix:PATH`).
    listen: String,
}

impl Generation {
    /// Spawns kv-server under a fake supervisor and reads its hello (which must announce
    /// `state`).
    fn spawn(generation: u64, schema: u32) -> Generation {
        Generation::spawn_with(generation, schema, &[], None)
    }

    /// [`spawn`](Self::spawn) with extra arguments and, optionally, an inherited listener
    /// named `kv` (at fd 3 with `LISTEN_FDS`; the control socket then goes to fd 4). Either
    /// way `--listen-fallback` is a TCP address.
    fn spawn_with(
        generation: u64,
        schema: u32,
        extra: &[&str],
        inherited: Option<OwnedFd>,
    ) -> Generation {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut sup = {
            let _enter = rt.enter();
            FakeSupervisor::new(generation).unwrap()
        };
        let mut cmd = Command::new("sh");
        match inherited {
            None => {
                cmd.args(["-c", "exec \"$0\" \"$@\""]).stdin(Stdio::null());
                sup.command(&mut cmd).unwrap();
            }
            Some(listener) => {
                // The listener comes in as stdin and the shell moves it to fd 3. `exec`
                // keeps the pid, so LISTEN_PID is `$$`.
                cmd.args([
                    "-c",
                    "LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\" 3<&0 0</dev/null",
                ])
                .env("LISTEN_FDS", "1")
                .env("LISTEN_FDNAMES", "kv")
                .stdin(Stdio::from(listener));
                sup.command_at(&mut cmd, 4).unwrap();
            }
        }
        let mut child = cmd
            .arg(env!("CARGO_BIN_EXE_kv-server"))
            .args(["--listen-fallback", "127.0.0.1:0", "--schema"])
            .arg(schema.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kv-server");
        // The Command holds our copy of the child's control end: drop it now, so that the
        // child's exit closes the socket.
        drop(cmd);
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("[gen {generation}] {line}");
                let _ = tx.send(line);
            }
        });
        let features = rt.block_on(sup.hello()).unwrap();
        assert!(features.contains(&Feature::State), "{features:?}");
        Generation {
            rt,
            sup,
            child,
            log,
            addr: None,
            listen: String::new(),
        }
    }

    /// Answers the candidate's `prepared` with `fresh`.
    fn fresh(&mut self) {
        self.rt.block_on(self.sup.fresh()).unwrap();
    }

    /// Hands it `snapshot` and returns its answer.
    fn restore(&mut self, snapshot: &Snapshot) -> Restore {
        self.rt.block_on(self.sup.restore(snapshot)).unwrap()
    }

    fn resume(&mut self, reason: &str) {
        self.rt.block_on(self.sup.resume(reason)).unwrap();
    }

    fn commit(&mut self, migrate: bool) {
        self.rt
            .block_on(self.sup.commit(Duration::from_secs(10), migrate))
            .unwrap();
    }

    /// Waits for READY=1, then learns the port from the log.
    fn wait_ready(&mut self) {
        self.rt.block_on(self.sup.ready()).unwrap();
        let line = self.wait_log("accepting addr=");
        let addr = line
            .split("accepting addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("address in log line");
        self.addr = addr.parse().ok();
        self.listen = addr.to_owned();
    }

    fn wait_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line containing {needle:?}: {e}"),
            }
        }
    }

    fn connect(&self) -> Client {
        let s = TcpStream::connect(self.addr.expect("ready")).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + T;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "kv-server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends quiesce and returns the snapshot and its JSON.
    fn quiesce(&mut self) -> (Snapshot, Value) {
        let snap = self.rt.block_on(self.sup.quiesce()).unwrap();
        let snapshot: Value = serde_json::from_slice(&snap.bytes().unwrap()).unwrap();
        assert_eq!(snapshot["version"], snap.version);
        (snap, snapshot)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn send(&mut self, args: &[&str]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        self.w.write_all(&out).unwrap();
    }

    /// One reply, raw (first line, plus the payload line of a bulk string).
    fn reply(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        if line.starts_with('$') && line != "$-1\r\n" {
            self.r.read_line(&mut line).unwrap();
        }
        line
    }

    fn cmd(&mut self, args: &[&str]) -> String {
        self.send(args);
        self.reply()
    }

    fn expect_eof(&mut self) {
        let mut buf = [0u8; 64];
        match self.r.read(&mut buf) {
            Ok(0) => {}
            other => panic!("expected EOF, got {other:?}"),
        }
    }

    fn info_field(&mut self, name: &str) -> String {
        self.send(&["INFO"]);
        let mut header = String::new();
        self.r.read_line(&mut header).unwrap();
        let len: usize = header.trim_end()[1..].parse().unwrap();
        let mut body = vec![0; len + 2];
        self.r.read_exact(&mut body).unwrap();
        let body = String::from_utf8(body).unwrap();
        body.split("\r\n")
            .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    }
}

/// Probes that a command sent while quiesced is held back: no reply within a short while.
/// (The deterministic check of the gate is a unit test in `server.rs`.)
fn assert_no_reply(c: &mut Client) {
    c.w.flush().unwrap();
    c.r.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    match c.r.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("a command ran while quiesced: {other:?}"),
    }
    c.r.get_ref().set_read_timeout(Some(T)).unwrap();
}

#[test]
fn commit_hands_state_to_a_newer_schema() {
    let mut old = Generation::spawn(1, 1);
    old.fresh();
    old.wait_ready();
    let mut c = old.connect();
    assert_eq!(c.cmd(&["SET", "a", "1"]), "+OK\r\n");
    assert_eq!(c.cmd(&["SET", "text", "hello world"]), "+OK\r\n");
    for i in 1..=3 {
        assert_eq!(c.cmd(&["INCR", "n"]), format!(":{i}\r\n"));
    }

    let (snap, snapshot) = old.quiesce();
    assert_eq!(
        snapshot,
        json!({"version": 1, "state": {"entries": {"a": "1", "text": "hello world", "n": "3"}}})
    );
    // Acknowledged writes are in the snapshot; this one is held back and never runs here.
    c.send(&["SET", "late", "x"]);
    assert_no_reply(&mut c);

    let mut new = Generation::spawn(2, 2);
    assert_eq!(new.restore(&snap), Restore::Restored { from_version: 1 });
    new.wait_ready();
    let mut c2 = new.connect();
    assert_eq!(c2.cmd(&["GET", "text"]), "$11\r\nhello world\r\n");
    assert_eq!(c2.cmd(&["INCR", "n"]), ":4\r\n");
    assert_eq!(c2.cmd(&["EXISTS", "late"]), ":0\r\n");
    assert_eq!(c2.info_field("kv_schema"), "2");
    assert_eq!(c2.info_field("kv_restored_from_schema"), "1");
    assert_eq!(c2.info_field("baton_generation"), "2");

    old.commit(false);
    // The paused connection is closed without running the held-back command.
    c.expect_eof();
    drop(c);
    let status = old.wait_exit();
    assert!(status.success(), "old generation exit: {status}");
}

#[test]
fn resume_after_abort_runs_held_back_commands() {
    let mut g = Generation::spawn(1, 2);
    g.fresh();
    g.wait_ready();
    let mut c = g.connect();
    assert_eq!(c.cmd(&["SET", "k", "v"]), "+OK\r\n");
    let (_, snapshot) = g.quiesce();
    assert_eq!(snapshot["version"], 2);
    assert_eq!(
        snapshot["state"]["entries"],
        json!([{"k": "k", "kind": "str", "v": "v"}])
    );
    c.send(&["SET", "k2", "v2"]);
    assert_no_reply(&mut c);

    g.resume("candidate crashed");
    assert_eq!(
        c.reply(),
        "+OK\r\n",
        "the held-back command runs after resume"
    );
    assert_eq!(c.cmd(&["GET", "k2"]), "$2\r\nv2\r\n");
    // And it accepts new connections again.
    let mut c2 = g.connect();
    assert_eq!(c2.cmd(&["DBSIZE"]), ":2\r\n");
}

#[test]
fn older_schema_rejects_a_newer_snapshot() {
    let mut old = Generation::spawn(1, 2);
    old.fresh();
    old.wait_ready();
    assert_eq!(old.connect().cmd(&["SET", "k", "v"]), "+OK\r\n");
    let (snap, _) = old.quiesce();

    let mut candidate = Generation::spawn(2, 1);
    let Restore::Rejected { reason } = candidate.restore(&snap) else {
        panic!("the older schema must reject the snapshot");
    };
    assert!(
        reason.contains("snapshot schema 2 is newer than this server's schema 1"),
        "{reason}"
    );
    // Like baton, stop the rejecting candidate; it exits with failure.
    candidate
        .rt
        .block_on(candidate.sup.drain(Duration::from_secs(5), false))
        .unwrap();
    let status = candidate.wait_exit();
    assert_eq!(
        status.code(),
        Some(1),
        "a rejecting candidate exits with failure"
    );

    // The old generation resumes with its state intact.
    old.resume("rejected");
    assert_eq!(old.connect().cmd(&["GET", "k"]), "$1\r\nv\r\n");
}

/// A snapshot memfd without the write/shrink/grow seals could change under the candidate
/// while it reads: the real binary refuses it (and restores the same bytes sealed).
#[test]
fn unsealed_snapshots_are_rejected_and_sealed_ones_restored() {
    let good = br#"{"version":2,"state":{"entries":[]}}"#;
    let mut candidate = Generation::spawn(2, 2);
    let unsealed = Snapshot::from_bytes(2, good, false).unwrap();
    let Restore::Rejected { reason } = candidate.restore(&unsealed) else {
        panic!("an unsealed snapshot must be refused");
    };
    assert!(reason.contains("not sealed"), "{reason}");
    // The same bytes sealed are fine for a fresh candidate.
    let mut ok = Generation::spawn(3, 2);
    let sealed = Snapshot::from_bytes(2, good, true).unwrap();
    assert_eq!(ok.restore(&sealed), Restore::Restored { from_version: 2 });
}

#[test]
fn schema_1_refuses_to_snapshot_binary_data_and_keeps_serving() {
    let mut g = Generation::spawn(1, 1);
    g.fresh();
    g.wait_ready();
    let mut c = g.connect();
    c.w.write_all(b"*3\r\n$3\r\nSET\r\n$3\r\nbin\r\n$2\r\n\xff\xfe\r\n")
        .unwrap();
    assert_eq!(c.reply(), "+OK\r\n");
    let failed = g.rt.block_on(g.sup.quiesce()).unwrap_err();
    assert!(failed.to_string().contains("non-UTF-8"), "{failed}");
    // Nothing is lost and it serves on, even before the supervisor's resume arrives.
    assert_eq!(c.cmd(&["DBSIZE"]), ":1\r\n");
    assert_eq!(c.cmd(&["SET", "after", "1"]), "+OK\r\n");
}

/// Under baton with `--listen kv=unix:PATH`, kv-server serves the inherited Unix listener
/// although `--listen-fallback` names a TCP address: the inherited socket's kind wins, and
/// the flag only matters standalone.
#[test]
fn an_inherited_unix_listener_is_served_whatever_the_fallback() {
    let dir = TempDir::new();
    let path = dir.0.join("kv.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut g = Generation::spawn_with(1, 2, &[], Some(OwnedFd::from(listener)));
    g.fresh();
    g.wait_ready();
    assert_eq!(g.listen, format!("unix:{}", path.display()));
    assert_eq!(g.addr, None, "nothing was bound on TCP");
    let s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    w.write_all(b"SET k v\r\nGET k\r\n").unwrap();
    let mut got = String::new();
    for _ in 0..3 {
        r.read_line(&mut got).unwrap();
    }
    assert_eq!(got, "+OK\r\n$1\r\nv\r\n");
}

/// A TCP connection pair: the client's end, and the server's end to pass as an adopted fd.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    (client, server)
}

/// A connection handed over by the previous generation that arrives while this one is
/// quiesced waits in the SDK's queue (the accept loop is paused). On commit it must end like
/// every other connection: closed at a command boundary when the successor does not adopt
/// (an orderly FIN, not a reset, although unread bytes wait in its receive queue; the
/// held-back command does not run), handed on when it does (same socket, same unread bytes).
#[test]
fn queued_adopted_connections_are_closed_cleanly_or_handed_on() {
    for migrate in [false, true] {
        let mut g = Generation::spawn(1, 2);
        g.fresh();
        g.wait_ready();
        g.quiesce();

        let (mut client, server_end) = tcp_pair();
        // Unread by anybody: a plain close of the server's end would reset the connection.
        client.write_all(b"PING\r\n").unwrap();
        let held = b"INCR n\r\n";
        let conn = Migrated {
            listener: "kv".into(),
            buffered: held.to_vec(),
            meta: json!({"name": "q1", "db": 0}),
            fd: OwnedFd::from(server_end),
        };
        g.rt.block_on(g.sup.adopt(conn)).unwrap();
        g.commit(migrate);
        g.wait_log("took queued connections while draining");
        if migrate {
            let m = g.rt.block_on(g.sup.migrated()).unwrap();
            assert_eq!(m.listener, "kv");
            assert_eq!(m.buffered, held, "held back, not run");
            assert_eq!(m.meta["name"], "q1");
            // The same connection, with the unread bytes still in it.
            let mut same = TcpStream::from(m.fd);
            same.set_read_timeout(Some(T)).unwrap();
            let mut unread = [0u8; 6];
            same.read_exact(&mut unread).unwrap();
            assert_eq!(&unread, b"PING\r\n");
            same.write_all(b"+hi\r\n").unwrap();
            let mut hi = [0u8; 5];
            client.read_exact(&mut hi).unwrap();
            assert_eq!(&hi, b"+hi\r\n");
        } else {
            let mut buf = [0u8; 64];
            match client.read(&mut buf) {
                Ok(0) => {}
                other => panic!("expected an orderly close without a reply, got {other:?}"),
            }
        }
        drop(client);
        let status = g.wait_exit();
        assert!(status.success(), "migrate {migrate}: exit {status}");
    }
}

/// Old-generation snapshot faults fire once per process: after the damaged (or missing)
/// snapshot and a resume, the next quiesce sends a good snapshot holding every write.
#[test]
fn old_generation_faults_fire_once_per_process() {
    for fault in [
        "corrupt-snapshot",
        "truncate-snapshot",
        "hang-during-snapshot",
    ] {
        let mut g = Generation::spawn_with(1, 2, &["--fault", fault], None);
        g.fresh();
        g.wait_ready();
        let mut c = g.connect();
        assert_eq!(c.cmd(&["SET", "k", "v"]), "+OK\r\n");

        g.rt.block_on(g.sup.quiesce_async()).unwrap();
        if fault == "hang-during-snapshot" {
            g.wait_log("fault hang-during-snapshot");
        } else {
            let snap = g.rt.block_on(g.sup.snapshot()).unwrap();
            let bytes = snap.bytes().unwrap();
            assert!(
                serde_json::from_slice::<Value>(&bytes).is_err(),
                "{fault}: the first snapshot must be damaged"
            );
        }
        g.resume("aborted");
        assert_eq!(c.cmd(&["SET", "k2", "v2"]), "+OK\r\n", "{fault}");

        let (_, snapshot) = g.quiesce();
        let mut keys: Vec<&str> = snapshot["state"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["k"].as_str().unwrap())
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["k", "k2"], "{fault}: {snapshot}");
    }
}

/// `--fault die-during-snapshot`: the old generation quiesces and aborts before it sends a
/// snapshot. baton then reports the state as lost (tested end to end in `tests/`).
#[test]
fn die_during_snapshot_aborts_before_sending_it() {
    use std::os::unix::process::ExitStatusExt;
    let mut g = Generation::spawn_with(1, 2, &["--fault", "die-during-snapshot"], None);
    g.fresh();
    g.wait_ready();
    assert_eq!(g.connect().cmd(&["SET", "k", "v"]), "+OK\r\n");
    g.rt.block_on(g.sup.quiesce_async()).unwrap();
    // Nothing but connection counts before the end: the socket closes with the process.
    let end = g.rt.block_on(g.sup.next_message());
    assert!(
        matches!(&end, Err(e) if e.to_string().contains("closed")),
        "expected the socket to close, got {:?}",
        end.map(|(m, _)| m)
    );
    let status = g.wait_exit();
    assert_eq!(status.signal(), Some(6), "SIGABRT: {status}");
}
