//! The network side: accept loop, one task per connection, and the run modes an upgrade
//! drives (running, paused for a snapshot, closing, handing connections over).
//!
//! Consistency rule for stateful upgrades: every command runs while holding the keyspace
//! lock, and the lock also guards the `frozen` flag. `quiesce` sets `frozen`; from then on
//! no command runs and the keyspace cannot change, so the snapshot taken afterwards holds
//! exactly the commands that ran, and those never run again in this process. Replies of
//! commands that ran are always written before a connection closes.
//!
//! Connection migration: when the successor adopts connections, each connection (TCP or Unix)
//! is handed over at a command boundary: every command that ran here has its reply fully
//! written (into the kernel's send buffer, which goes with the socket), and the bytes read but
//! not run (a partial command, or commands held back by a quiesce) travel with the fd, so the
//! successor runs them next, exactly once. Bytes the client sent that were never read stay in the
//! socket's receive queue, which also goes with the fd.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use baton_child::{Incoming, Stream};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio::sync::watch;

use crate::cmd::{self, After, Info, Session};
use crate::db::Db;
use crate::resp::{self, Parsed};
use crate::state::Schema;

/// Initial read buffer per connection.
const READ_BUF: usize = 16 * 1024;
/// Output buffers above this are released after a flush instead of kept for reuse.
const OUT_KEEP: usize = 64 * 1024;
/// Commands run per lock hold, so one deep pipeline cannot stall every other client.
const MAX_BATCH: usize = 1024;
/// After sending FIN, how long a closing connection waits for the client's FIN. Reading
/// (and discarding) until then keeps the kernel from answering late bytes with a reset.
const LINGER: Duration = Duration::from_secs(1);
/// Pause after an accept error that a retry cannot fix at once (EMFILE, ENOBUFS, ...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the process is doing with its listeners and connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Accepting and serving.
    Running,
    /// Stateful quiesce: not accepting, commands held back, connections kept open.
    Paused,
    /// Draining: not accepting; each connection closes at its next command boundary.
    Closing,
    /// Draining into a successor that adopts connections: not accepting; each connection is
    /// handed over at its next command boundary.
    Migrating,
}

/// The listener the server accepts on (TCP or Unix, fresh and adopted connections). The fd
/// is shared with the supervisor and other generations, so it is never shut down or switched
/// to blocking: it is only dropped.
#[derive(Debug)]
pub struct Listener(pub Incoming);

impl Listener {
    /// `HOST:PORT` or `unix:PATH`, for logs.
    pub fn describe(&self) -> String {
        self.0
            .local_addr()
            .unwrap_or_else(|| "(stopped)".to_owned())
    }

    /// A connection the previous generation handed over that has arrived and not been taken
    /// yet; never a fresh one from the listener.
    fn try_accept_adopted(&mut self) -> Option<Conn> {
        self.0.try_accept_adopted().map(Conn::from_stream)
    }
}

/// A client connection of either kind, as it is handed over.
pub type Client = Stream;

/// Something that lives as long as one client connection (the SDK's connection counter).
pub type ConnToken = Box<dyn Send + Sync>;
/// Called for every accepted connection; the token is dropped when the connection closes.
pub type ConnHook = Box<dyn Fn() -> Option<ConnToken> + Send + Sync>;

/// The future of one [`HandOver::hand_over`].
pub type HandOverFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Hands a live connection to the next generation: the SDK's migrator under baton.
pub trait HandOver: Send + Sync {
    /// Sends `stream` with the bytes read from it but not run, and the session metadata.
    /// Resolves once this process may forget the connection (its fd copy is closed).
    fn hand_over(
        &self,
        stream: Client,
        buffered: Vec<u8>,
        meta: serde_json::Value,
    ) -> HandOverFuture<'_>;
}

struct Gate {
    db: Db,
    /// Set by quiesce: no command may run until resume.
    frozen: bool,
}

/// The shared server state. Cheap to clone handles via `Arc`.
pub struct Server {
    gate: Mutex<Gate>,
    /// Mirrors `Gate::frozen` (written under the lock) so that connections skip the lock
    /// while a snapshot is being serialised under it.
    frozen_hint: AtomicBool,
    mode: watch::Sender<Mode>,
    conns: watch::Sender<u64>,
    total_conns: AtomicU64,
    /// 0 until a snapshot is restored.
    restored_from: AtomicU32,
    /// Batches that found the keyspace frozen and waited (observability and tests).
    held_back: AtomicU64,
    /// Connections handed over to the successor.
    handed_over: AtomicU64,
    /// Connections adopted from the predecessor.
    adopted: AtomicU64,
    schema: Schema,
    generation: u64,
    started: Instant,
    conn_hook: Option<ConnHook>,
    /// Set when connections can be handed over (under baton, with migration support).
    hand_over: Option<Arc<dyn HandOver>>,
}

impl Server {
    /// A server with an empty keyspace. Without `hand_over`, [`Server::migrate`] falls back
    /// to closing connections.
    pub fn new(
        schema: Schema,
        generation: u64,
        conn_hook: Option<ConnHook>,
        hand_over: Option<Arc<dyn HandOver>>,
    ) -> Arc<Self> {
        Arc::new(Server {
            gate: Mutex::new(Gate {
                db: Db::new(),
                frozen: false,
            }),
            frozen_hint: AtomicBool::new(false),
            mode: watch::Sender::new(Mode::Running),
            conns: watch::Sender::new(0),
            total_conns: AtomicU64::new(0),
            restored_from: AtomicU32::new(0),
            held_back: AtomicU64::new(0),
            handed_over: AtomicU64::new(0),
            adopted: AtomicU64::new(0),
            schema,
            generation,
            started: Instant::now(),
            conn_hook,
            hand_over,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        // A panic while holding the lock would be a bug in a command; the keyspace is still
        // structurally sound (HashMap operations are not left half-done), so keep serving.
        self.gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the keyspace with a restored snapshot of schema `from_version`.
    pub fn install(&self, db: Db, from_version: u32) {
        self.lock().db = db;
        self.restored_from.store(from_version, Ordering::Relaxed);
    }

    /// Runs `f` on the keyspace under its lock (the snapshot serialises through this).
    pub fn with_db<R>(&self, f: impl FnOnce(&Db) -> R) -> R {
        f(&self.lock().db)
    }

    /// Runs `f` on the keyspace under its lock, mutably (pre-copy's change tracking).
    pub fn with_db_mut<R>(&self, f: impl FnOnce(&mut Db) -> R) -> R {
        f(&mut self.lock().db)
    }

    /// Stateful quiesce: stop accepting, let the command running on each connection finish,
    /// and hold back every later one. When this returns, the keyspace is final until
    /// [`Server::resume`]; take the snapshot with [`Server::with_db`].
    pub fn quiesce(&self) {
        {
            let mut gate = self.lock();
            gate.frozen = true;
            self.frozen_hint.store(true, Ordering::Release);
        }
        // Wake the accept loop and the connections after the freeze, so a connection that
        // still sees Running and tries to run a command finds the flag set.
        self.mode.send_replace(Mode::Paused);
    }

    /// Undo [`Server::quiesce`]: accept again and let held-back commands run.
    pub fn resume(&self) {
        {
            let mut gate = self.lock();
            gate.frozen = false;
            self.frozen_hint.store(false, Ordering::Release);
        }
        self.mode.send_replace(Mode::Running);
    }

    /// Drain: stop accepting and close every connection at its next command boundary.
    /// After a quiesce (stateful commit) the keyspace stays frozen: the successor owns the
    /// state now, so commands held back here are never run.
    pub fn close(&self) {
        self.mode.send_replace(Mode::Closing);
    }

    /// Drain into a successor that adopts connections: stop accepting and hand every
    /// connection over at its next command boundary. After a quiesce (stateful commit) the
    /// keyspace stays frozen, so held-back commands travel with their connection and run in
    /// the successor, against the state it restored. Returns false (and closes instead) when
    /// this server cannot hand connections over.
    pub fn migrate(&self) -> bool {
        if self.hand_over.is_none() {
            self.close();
            return false;
        }
        self.mode.send_replace(Mode::Migrating);
        true
    }

    /// Connections handed over to the successor so far.
    pub fn handed_over(&self) -> u64 {
        self.handed_over.load(Ordering::Relaxed)
    }

    /// Client connections open now.
    pub fn connections(&self) -> u64 {
        *self.conns.borrow()
    }

    fn info(&self) -> Info {
        let restored = self.restored_from.load(Ordering::Relaxed);
        Info {
            pid: std::process::id(),
            generation: self.generation,
            schema: self.schema.version(),
            restored_from: (restored != 0).then_some(restored),
            uptime_secs: self.started.elapsed().as_secs(),
            connected_clients: self.connections(),
            total_connections: self.total_conns.load(Ordering::Relaxed),
        }
    }

    /// Accepts on `listener` until [`Server::close`], then waits until every connection has
    /// closed. The listener fd is dropped (never shut down) as soon as accepting stops.
    pub async fn run(self: &Arc<Self>, mut listener: Listener) {
        let addr = listener.describe();
        tracing::info!(%addr, "accepting");
        let mut mode = self.mode.subscribe();
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Closing | Mode::Migrating => break,
                Mode::Paused => {
                    // Keep the fd; connections wait in the shared kernel queue, where the
                    // candidate (or this process, after resume) picks them up.
                    if mode.changed().await.is_err() {
                        break;
                    }
                    continue;
                }
                Mode::Running => {}
            }
            tokio::select! {
                biased;
                changed = mode.changed() => if changed.is_err() { break },
                accepted = accept(&mut listener) => match accepted {
                    Ok(conn) => self.spawn_connection(conn),
                    Err(e) => accept_error(e).await,
                },
            }
        }
        self.take_queued(&mut listener);
        drop(listener);
        tracing::info!(%addr, connections = self.connections(), "stopped accepting");
        let mut conns = self.conns.subscribe();
        // Every connection holds a guard that decrements the count on drop, and the accept
        // loop (the only place that increments) has ended, so this terminates.
        let _ = conns.wait_for(|&n| n == 0).await;
        tracing::info!(
            adopted = self.adopted.load(Ordering::Relaxed),
            handed_over = self.handed_over(),
            "all connections closed or handed over"
        );
    }

    /// Takes the connections the predecessor handed over that the accept loop has not picked
    /// up yet (they queue while this process is paused for a snapshot, e.g. when two upgrades
    /// run back to back), so that they end like every other connection, handed on (migrating)
    /// or closed at a command boundary (closing), instead of being dropped with the listener,
    /// which would reset them if the client had sent anything unread.
    ///
    /// Complete: baton relays a hand-over only to the active generation, on the same control
    /// stream as (and so before) the drain or commit that ends it, and the SDK queues adopted
    /// connections before it reports the drain. The queue is therefore final by now.
    ///
    /// Adopted connections only: fresh ones stay in the shared kernel queue for the successor.
    fn take_queued(self: &Arc<Self>, listener: &mut Listener) {
        let mut taken = 0u64;
        while let Some(conn) = listener.try_accept_adopted() {
            taken += 1;
            self.spawn_connection(conn);
        }
        if taken > 0 {
            tracing::info!(
                connections = taken,
                "took queued connections while draining"
            );
        }
    }

    fn spawn_connection(self: &Arc<Self>, conn: Conn) {
        self.conns.send_modify(|n| *n += 1);
        self.total_conns.fetch_add(1, Ordering::Relaxed);
        let guard = ConnGuard {
            server: Arc::clone(self),
            _token: self.conn_hook.as_ref().and_then(|hook| hook()),
        };
        let mode = self.mode.subscribe();
        let Conn {
            stream,
            buffered,
            session,
        } = conn;
        if session.is_some() {
            self.adopted.fetch_add(1, Ordering::Relaxed);
        }
        let session = session.unwrap_or_default();
        tokio::spawn(serve_client(guard, stream, buffered, session, mode));
    }
}

/// An accepted or adopted connection, before its task starts.
struct Conn {
    stream: Client,
    /// Read by the previous generation but not run (empty for a fresh connection).
    buffered: Vec<u8>,
    /// `Some` for an adopted connection.
    session: Option<Session>,
}

impl Conn {
    fn from_stream(stream: Stream) -> Conn {
        let session = stream.adopted().map(Session::from_meta);
        // Replies are flushed once per batch, so Nagle only adds latency. (An adopted socket
        // already has it: socket options travel with the fd. Setting it again is harmless.)
        if let Some(Err(e)) = stream.tcp().map(|s| s.set_nodelay(true)) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        // An adopted stream reads the bytes the previous generation had read first.
        Conn {
            stream,
            buffered: Vec::new(),
            session,
        }
    }
}

async fn accept(listener: &mut Listener) -> io::Result<Conn> {
    Ok(Conn::from_stream(listener.0.accept().await?))
}

async fn accept_error(e: io::Error) {
    match e.kind() {
        // The client gave up before we accepted: nothing to do.
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => tracing::debug!(error = %e, "accept"),
        // Out of fds or memory, or the listener is unusable: retrying at once would spin.
        _ => {
            tracing::warn!(error = %e, "accept failed; backing off");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
        }
    }
}

/// Keeps the connection count right however the connection task ends.
struct ConnGuard {
    server: Arc<Server>,
    _token: Option<ConnToken>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.server.conns.send_modify(|n| *n = n.saturating_sub(1));
    }
}

enum Batch {
    /// Ran what was complete; `close` after QUIT or a protocol error, `more` when the batch
    /// limit cut it short.
    Ran { close: bool, more: bool },
    /// The keyspace is frozen; nothing ran.
    Frozen,
}

/// Runs the complete commands at the front of `buf` under one lock hold.
fn run_batch(
    server: &Server,
    session: &mut Session,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
) -> Batch {
    if buf.is_empty() {
        return Batch::Ran {
            close: false,
            more: false,
        };
    }
    let frozen = |server: &Server| {
        if matches!(resp::parse(buf), Ok(Parsed::Frame { .. })) {
            server.held_back.fetch_add(1, Ordering::Relaxed);
        }
        Batch::Frozen
    };
    // Fast path without the lock, which a snapshot may hold for a while; the flag is
    // checked again under the lock, where it is authoritative.
    if server.frozen_hint.load(Ordering::Acquire) {
        return frozen(server);
    }
    let mut gate = server.lock();
    if gate.frozen {
        drop(gate);
        return frozen(server);
    }
    let info = || server.info();
    let mut pos = 0;
    let mut close = false;
    let mut more = false;
    let mut ran = 0;
    loop {
        if ran == MAX_BATCH {
            more = true;
            break;
        }
        match resp::parse(&buf[pos..]) {
            Ok(Parsed::Incomplete) => break,
            Ok(Parsed::Frame { args, len }) => {
                pos += len;
                ran += 1;
                if cmd::execute(&mut gate.db, session, &args, out, &info) == After::Close {
                    close = true;
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "closing connection");
                resp::error(out, &format!("ERR {e}"));
                close = true;
                pos = buf.len();
                break;
            }
        }
    }
    drop(gate);
    buf.advance(pos);
    Batch::Ran { close, more }
}

/// Serves a client connection; hands it over when [`serve_connection`] stops at a boundary
/// for migration.
async fn serve_client<S>(
    guard: ConnGuard,
    mut stream: S,
    buffered: Vec<u8>,
    session: Session,
    mode: watch::Receiver<Mode>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Into<Client>,
{
    let server = &guard.server;
    let mut buf = BytesMut::with_capacity(READ_BUF.max(buffered.len()));
    buf.extend_from_slice(&buffered);
    drop(buffered);
    let Some(hand_over) = server.hand_over.clone() else {
        serve_connection(server, &mut stream, buf, session, mode, false).await;
        return;
    };
    let Some((rest, session)) =
        serve_connection(server, &mut stream, buf, session, mode, true).await
    else {
        return;
    };
    let buffered = rest.len();
    match hand_over
        .hand_over(stream.into(), rest.to_vec(), session.to_meta())
        .await
    {
        Ok(()) => {
            server.handed_over.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(buffered, "connection handed over");
        }
        // The fd is gone with the failed message: the client sees the connection close
        // (no reply was lost: every command that ran here was answered).
        Err(e) => tracing::warn!(error = %e, buffered, "hand-over failed; connection closed"),
    }
}

/// Serves one connection until it closes, or, when `can_migrate` and the server is
/// [`Mode::Migrating`], until a command boundary: then it returns the bytes read but not run
/// and the session, for the hand-over.
async fn serve_connection<S>(
    server: &Server,
    stream: &mut S,
    mut buf: BytesMut,
    mut session: Session,
    mut mode: watch::Receiver<Mode>,
    can_migrate: bool,
) -> Option<(BytesMut, Session)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(READ_BUF);
    loop {
        // Run everything that is complete, and write every reply.
        let mut frozen = false;
        let mut close = false;
        loop {
            match run_batch(server, &mut session, &mut buf, &mut out) {
                Batch::Frozen => {
                    frozen = true;
                    break;
                }
                Batch::Ran { close: c, more } => {
                    close = c;
                    if c || !more {
                        break;
                    }
                    // A deep pipeline: flush large reply batches as we go rather than
                    // buffering every reply of the whole read.
                    if out.len() >= OUT_KEEP {
                        if stream.write_all(&out).await.is_err() {
                            return None;
                        }
                        out.clear();
                    }
                }
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return None;
            }
            out.clear();
            if out.capacity() > OUT_KEEP {
                out = Vec::with_capacity(READ_BUF);
            }
        }
        if close {
            close_gracefully(stream).await;
            return None;
        }
        // A command boundary: every command that ran has its reply written.
        let current = *mode.borrow_and_update();
        match current {
            Mode::Migrating if can_migrate => {
                // What is left in `buf` never ran here: a partial command (stateless), or
                // commands held back by the freeze (stateful commit). The successor runs them.
                return Some((buf, session));
            }
            Mode::Closing | Mode::Migrating => {
                // Frozen + closing is a stateful commit: held-back commands belong to the
                // successor now (they never ran here), so close without running them.
                // Otherwise close once no partial command is mid-flight; if one is, read the
                // rest, run it, and close after its reply.
                if frozen || buf.is_empty() {
                    close_gracefully(stream).await;
                    return None;
                }
            }
            Mode::Paused => {
                // Stop reading, so held-back commands stay in the kernel buffer, and wait for
                // resume, close or hand-over.
                if mode.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            Mode::Running if frozen => {
                // Frozen a moment before Paused was published: wait for it (or its undoing).
                if mode.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            Mode::Running => {}
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(READ_BUF);
        }
        tokio::select! {
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
            changed = mode.changed() => if changed.is_err() { return None },
        }
    }
}

/// Sends FIN after the last reply, then discards input until the client's FIN (bounded by
/// [`LINGER`]), so the close is orderly rather than a reset.
async fn close_gracefully<S>(stream: &mut S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpStream, UnixStream};

    const T: Duration = Duration::from_secs(10);

    /// A TCP listener on a free port, through the SDK as in production (standalone here).
    fn incoming() -> Incoming {
        let baton = baton_child::Baton::builder()
            .handle_signals(false)
            .start(baton_child::Env::standalone())
            .unwrap();
        baton.incoming("kv", "127.0.0.1:0").unwrap()
    }

    async fn start(server: &Arc<Server>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let incoming = incoming();
        let addr = incoming.local_addr().unwrap().parse().unwrap();
        let s = Arc::clone(server);
        let task = tokio::spawn(async move { s.run(Listener(incoming)).await });
        (addr, task)
    }

    async fn line(r: &mut BufReader<TcpStream>) -> String {
        let mut s = String::new();
        tokio::time::timeout(T, r.read_line(&mut s))
            .await
            .unwrap()
            .unwrap();
        s
    }

    async fn send(r: &mut BufReader<TcpStream>, data: &[u8]) {
        r.get_mut().write_all(data).await.unwrap();
    }

    #[test]
    fn frozen_gate_runs_nothing() {
        let server = Server::new(Schema::V2, 0, None, None);
        let mut buf = BytesMut::from(&b"SET a 1\r\nINCR n\r\n"[..]);
        let mut out = Vec::new();
        server.quiesce();
        assert!(matches!(
            run_batch(&server, &mut Session::default(), &mut buf, &mut out),
            Batch::Frozen
        ));
        assert_eq!(
            &buf[..],
            b"SET a 1\r\nINCR n\r\n",
            "held-back bytes are kept"
        );
        assert!(out.is_empty());
        assert!(server.lock().db.is_empty());
        assert_eq!(server.held_back.load(Ordering::Relaxed), 1);

        server.resume();
        assert!(matches!(
            run_batch(&server, &mut Session::default(), &mut buf, &mut out),
            Batch::Ran {
                close: false,
                more: false
            }
        ));
        assert_eq!(out, b"+OK\r\n:1\r\n");
        assert!(buf.is_empty());
        assert_eq!(server.lock().db.len(), 2);
    }

    #[test]
    fn batch_limit_yields_and_quit_closes() {
        let server = Server::new(Schema::V2, 0, None, None);
        let mut buf = BytesMut::from(b"PING\r\n".repeat(MAX_BATCH + 1).as_slice());
        let mut out = Vec::new();
        assert!(matches!(
            run_batch(&server, &mut Session::default(), &mut buf, &mut out),
            Batch::Ran {
                close: false,
                more: true
            }
        ));
        assert_eq!(out.len(), MAX_BATCH * 7);
        assert_eq!(&buf[..], b"PING\r\n");
        let mut buf = BytesMut::from(&b"QUIT\r\nSET x 1\r\n"[..]);
        out.clear();
        assert!(matches!(
            run_batch(&server, &mut Session::default(), &mut buf, &mut out),
            Batch::Ran { close: true, .. }
        ));
        assert_eq!(out, b"+OK\r\n");
        assert!(!server.lock().db.contains(b"x"), "nothing after QUIT runs");
    }

    async fn wait_conns(server: &Server, n: u64) {
        let mut rx = server.conns.subscribe();
        tokio::time::timeout(T, rx.wait_for(|&c| c == n))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn drain_finishes_partial_command_then_closes() {
        let server = Server::new(Schema::V2, 0, None, None);
        let (addr, task) = start(&server).await;
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        // Half a command in flight when the drain starts. It shares a write with a complete
        // command, so once that reply arrives the server holds the half in its buffer.
        send(&mut c, b"SET k v\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n").await;
        assert_eq!(line(&mut c).await, "+OK\r\n");
        // An idle second connection is closed at once.
        let mut idle = BufReader::new(TcpStream::connect(addr).await.unwrap());
        wait_conns(&server, 2).await;
        server.close();
        assert_eq!(line(&mut idle).await, "", "idle connection sees EOF");
        drop(idle);
        send(&mut c, b"$2\r\nv2\r\n").await;
        assert_eq!(
            line(&mut c).await,
            "+OK\r\n",
            "the in-flight command completes"
        );
        assert_eq!(line(&mut c).await, "", "then EOF");
        drop(c);
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(server.lock().db.get(b"k"), Some(&b"v2"[..]));
    }

    #[tokio::test]
    async fn quiesce_holds_commands_and_resume_runs_them() {
        let server = Server::new(Schema::V2, 0, None, None);
        let (addr, task) = start(&server).await;
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        send(&mut c, b"SET a 1\r\n").await;
        assert_eq!(line(&mut c).await, "+OK\r\n");

        server.quiesce();
        assert_eq!(server.with_db(Db::len), 1);

        // Sent while paused: must not run until resume. (The deterministic check of the
        // gate is `frozen_gate_runs_nothing`; this one checks the connection wiring.)
        send(&mut c, b"SET b 2\r\n").await;
        let probe = tokio::time::timeout(Duration::from_millis(200), line(&mut c)).await;
        assert!(probe.is_err(), "a command ran while quiesced: {probe:?}");
        assert!(!server.lock().db.contains(b"b"));

        server.resume();
        assert_eq!(line(&mut c).await, "+OK\r\n");
        assert!(server.lock().db.contains(b"b"));
        server.close();
        drop(c);
        tokio::time::timeout(T, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn commit_closes_paused_connections_without_running_held_commands() {
        let server = Server::new(Schema::V2, 0, None, None);
        let (addr, task) = start(&server).await;
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        send(&mut c, b"PING\r\n").await;
        assert_eq!(line(&mut c).await, "+PONG\r\n");
        server.quiesce();
        send(&mut c, b"SET late 1\r\n").await;
        server.close();
        assert_eq!(line(&mut c).await, "", "closed without a reply");
        drop(c);
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert!(!server.lock().db.contains(b"late"));
    }

    #[tokio::test]
    async fn paused_server_does_not_accept_until_resume() {
        let server = Server::new(Schema::V2, 0, None, None);
        let (addr, task) = start(&server).await;
        server.quiesce();
        // The kernel completes the handshake (backlog) but nobody serves it yet.
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        send(&mut c, b"PING\r\n").await;
        let probe = tokio::time::timeout(Duration::from_millis(200), line(&mut c)).await;
        assert!(probe.is_err(), "served while paused: {probe:?}");
        assert_eq!(server.connections(), 0);
        server.resume();
        assert_eq!(line(&mut c).await, "+PONG\r\n");
        server.close();
        drop(c);
        tokio::time::timeout(T, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn protocol_error_replies_then_closes() {
        let server = Server::new(Schema::V2, 0, None, None);
        let (addr, task) = start(&server).await;
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        send(&mut c, b"PING\r\n*1\r\n+x\r\n").await;
        assert_eq!(line(&mut c).await, "+PONG\r\n");
        assert_eq!(
            line(&mut c).await,
            "-ERR Protocol error: expected '$', got '+'\r\n"
        );
        assert_eq!(line(&mut c).await, "");
        drop(c);
        server.close();
        tokio::time::timeout(T, task).await.unwrap().unwrap();
    }

    /// Plays the supervisor's relay: what the old server hands over is queued here, and the
    /// test gives it to the new server the way its accept loop would.
    struct Relay(tokio::sync::mpsc::UnboundedSender<(Client, Vec<u8>, serde_json::Value)>);

    impl HandOver for Relay {
        fn hand_over(
            &self,
            stream: Client,
            buffered: Vec<u8>,
            meta: serde_json::Value,
        ) -> HandOverFuture<'_> {
            let sent = self.0.send((stream, buffered, meta));
            Box::pin(async move { sent.map_err(|_| "relay gone".to_owned()) })
        }
    }

    type Relayed = tokio::sync::mpsc::UnboundedReceiver<(Client, Vec<u8>, serde_json::Value)>;

    fn relay() -> (Arc<dyn HandOver>, Relayed) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Arc::new(Relay(tx)), rx)
    }

    /// Takes the next handed-over connection and lets `to` adopt it.
    async fn adopt_next(relayed: &mut Relayed, to: &Arc<Server>) -> (Vec<u8>, serde_json::Value) {
        let (stream, buffered, meta) = tokio::time::timeout(T, relayed.recv())
            .await
            .unwrap()
            .unwrap();
        to.spawn_connection(Conn {
            stream,
            buffered: buffered.clone(),
            session: Some(Session::from_meta(&meta)),
        });
        (buffered, meta)
    }

    #[tokio::test]
    async fn migration_hands_over_at_a_command_boundary_with_unread_bytes_and_session() {
        let (hand_over, mut relayed) = relay();
        let old = Server::new(Schema::V2, 1, None, Some(hand_over));
        let new = Server::new(Schema::V2, 2, None, None);
        let (addr, task) = start(&old).await;
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        let local = c.get_ref().local_addr().unwrap();
        // Two complete commands and half of a third, in one segment.
        send(
            &mut c,
            b"CLIENT SETNAME c1\r\nSET k v\r\n*2\r\n$4\r\nECHO\r\n$5\r\nhel",
        )
        .await;
        assert_eq!(line(&mut c).await, "+OK\r\n");
        assert_eq!(line(&mut c).await, "+OK\r\n");

        assert!(old.migrate());
        let (buffered, meta) = adopt_next(&mut relayed, &new).await;
        assert_eq!(
            buffered, b"*2\r\n$4\r\nECHO\r\n$5\r\nhel",
            "the unread half travels"
        );
        assert_eq!(meta, serde_json::json!({"name": "c1", "db": 0}));
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(old.handed_over(), 1);
        assert!(
            old.lock().db.contains(b"k"),
            "what ran, ran in the old server"
        );

        // Same connection, now served by the new server: the half command completes there,
        // and pipelined commands after it run in order.
        send(&mut c, b"lo\r\nCLIENT GETNAME\r\nINCR n\r\nINFO\r\n").await;
        assert_eq!(line(&mut c).await, "$5\r\n");
        assert_eq!(line(&mut c).await, "hello\r\n");
        assert_eq!(line(&mut c).await, "$2\r\n");
        assert_eq!(line(&mut c).await, "c1\r\n");
        assert_eq!(line(&mut c).await, ":1\r\n");
        let mut info = String::new();
        while !info.contains("baton_generation:") {
            info.push_str(&line(&mut c).await);
        }
        assert!(info.contains("baton_generation:2\r\n"), "{info}");
        assert_eq!(c.get_ref().local_addr().unwrap(), local);
        assert!(new.lock().db.contains(b"n"));
        assert!(!old.lock().db.contains(b"n"));
        new.close();
        drop(c);
    }

    #[tokio::test]
    async fn commit_with_migration_hands_held_back_commands_to_the_successor() {
        let (hand_over, mut relayed) = relay();
        let old = Server::new(Schema::V2, 1, None, Some(hand_over));
        let new = Server::new(Schema::V2, 2, None, None);
        let (addr, task) = start(&old).await;
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        send(&mut c, b"SET n 40\r\n").await;
        assert_eq!(line(&mut c).await, "+OK\r\n");
        old.quiesce();
        send(&mut c, b"INCR n\r\nINCR n\r\n").await;
        // The successor restores the snapshot (n = 40), then the old server commits.
        let mut restored = Db::new();
        restored.set(b"n", b"40");
        new.install(restored, 2);
        assert!(old.migrate());
        adopt_next(&mut relayed, &new).await;
        assert_eq!(line(&mut c).await, ":41\r\n");
        assert_eq!(line(&mut c).await, ":42\r\n");
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(
            old.lock().db.get(b"n"),
            Some(&b"40"[..]),
            "held-back commands never ran in the old server"
        );
        new.close();
        drop(c);
    }

    #[tokio::test]
    async fn frozen_bytes_already_read_are_handed_over_not_run() {
        let (hand_over, _relayed) = relay();
        let server = Server::new(Schema::V2, 1, None, Some(hand_over));
        server.quiesce();
        server.migrate();
        let (mut stream, _peer) = tokio::io::duplex(1024);
        let buf = BytesMut::from(&b"INCR n\r\nGET"[..]);
        let session = Session {
            name: Some("x".into()),
        };
        let mode = server.mode.subscribe();
        let (rest, session) = tokio::time::timeout(
            T,
            serve_connection(&server, &mut stream, buf, session, mode, true),
        )
        .await
        .unwrap()
        .expect("handed over, not closed");
        assert_eq!(&rest[..], b"INCR n\r\nGET");
        assert_eq!(session.name.as_deref(), Some("x"));
        assert!(server.lock().db.is_empty());
    }

    /// The Unix listener goes through the same path: a connection on it is handed over at a
    /// command boundary with its unread bytes and session, and the successor serves it.
    #[tokio::test]
    async fn unix_connections_migrate_like_tcp_ones() {
        let dir = std::env::temp_dir().join(format!("kv-server-unix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kv.sock");
        let baton = baton_child::Baton::builder()
            .handle_signals(false)
            .start(baton_child::Env::standalone())
            .unwrap();
        let fallback = format!("unix:{}", path.display());
        let listener = Listener(baton.incoming("kv", &fallback).unwrap());
        assert_eq!(listener.describe(), format!("unix:{}", path.display()));

        let (hand_over, mut relayed) = relay();
        let old = Server::new(Schema::V2, 1, None, Some(hand_over));
        let new = Server::new(Schema::V2, 2, None, None);
        let task = tokio::spawn({
            let old = Arc::clone(&old);
            async move { old.run(listener).await }
        });
        let mut c = BufReader::new(UnixStream::connect(&path).await.unwrap());
        c.get_mut()
            .write_all(b"CLIENT SETNAME u1\r\nINCR n\r\nINCR")
            .await
            .unwrap();
        let mut got = String::new();
        for _ in 0..2 {
            tokio::time::timeout(T, c.read_line(&mut got))
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(got, "+OK\r\n:1\r\n");

        assert!(old.migrate());
        let (stream, buffered, meta) = tokio::time::timeout(T, relayed.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(stream.unix().is_some(), "{stream:?}");
        assert_eq!(buffered, b"INCR", "the unread half travels");
        assert_eq!(meta, serde_json::json!({"name": "u1", "db": 0}));
        tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert_eq!(old.handed_over(), 1);

        new.install(old.with_db(|db| db.clone()), 2);
        new.spawn_connection(Conn {
            stream,
            buffered,
            session: Some(Session::from_meta(&meta)),
        });
        c.get_mut()
            .write_all(b" n\r\nCLIENT GETNAME\r\n")
            .await
            .unwrap();
        let mut got = String::new();
        for _ in 0..3 {
            tokio::time::timeout(T, c.read_line(&mut got))
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(got, ":2\r\n$2\r\nu1\r\n", "same connection, new server");
        assert_eq!(new.lock().db.get(b"n"), Some(&b"2"[..]));
        new.close();
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn without_migration_support_migrating_closes_at_a_boundary() {
        // A server without a hand-over cannot migrate: it closes as in a plain drain, after
        // finishing the partial command.
        let server = Server::new(Schema::V2, 1, None, None);
        assert!(!server.migrate(), "falls back to closing");
        assert_eq!(*server.mode.borrow(), Mode::Closing);
        let server = Server::new(Schema::V2, 1, None, Some(relay().0));
        server.migrate();
        let (mut stream, mut peer) = tokio::io::duplex(1024);
        let mode = server.mode.subscribe();
        let task = tokio::spawn({
            let server = Arc::clone(&server);
            async move {
                let buf = BytesMut::from(&b"SET a"[..]);
                serve_connection(&server, &mut stream, buf, Session::default(), mode, false)
                    .await
                    .is_none()
            }
        });
        peer.write_all(b" 1\r\n").await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(T, peer.read_to_string(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, "+OK\r\n", "partial command finished, then EOF");
        drop(peer);
        assert!(tokio::time::timeout(T, task).await.unwrap().unwrap());
    }
}
