//! The control socket: `baton status|upgrade|stop` talk to a running baton here.
//!
//! Unix stream, mode 0600 (0660 with `--control-group`), peer checked with
//! `SO_PEERCRED`/`SO_PEERGROUPS`; one JSON request line in, one JSON reply line out
//! (types in `baton_protocol`). At most [`MAX_CLIENTS`] connections are served
//! at once, at most [`MAX_IDLE`] of them before their request (the oldest is evicted),
//! and one that has not sent its request within [`REQUEST_TIMEOUT`] is closed.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_protocol::{ControlReply, ControlRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::access;
use crate::daemon::io::events::EventLog;
use crate::sys;

/// Control connections open at once (most are `upgrade --wait`s); more are
/// closed at accept.
pub const MAX_CLIENTS: usize = 1024;
/// Connections that have not sent their request yet; a new one over this evicts
/// the oldest, so idle connections can never lock an operator out.
pub const MAX_IDLE: usize = 32;
/// A client must send its request line within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request from a client, with the way to answer it.
pub struct Incoming {
    /// What was asked.
    pub request: ControlRequest,
    /// Where the answer goes.
    pub reply: oneshot::Sender<ControlReply>,
    /// The client's connection (a duplicate), so that a reexec can hand a waiting
    /// client over to the new image.
    pub conn: Option<OwnedFd>,
    /// For a snapshot: where its memfd goes, before the reply that announces it.
    pub body: Option<oneshot::Sender<OwnedFd>>,
}

/// The listening control socket; the file is removed on drop.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
}

impl ControlServer {
    /// The socket a reexec handed over, already bound at `path`.
    ///
    /// # Errors
    /// It cannot be registered with the runtime.
    pub fn from_handover(fd: OwnedFd, path: PathBuf, group: Option<u32>) -> io::Result<Self> {
        let std = std::os::unix::net::UnixListener::from(fd);
        std.set_nonblocking(true)?;
        Ok(ControlServer {
            listener: UnixListener::from_std(std)?,
            path,
            group,
        })
    }

    /// The listening socket, its path and group (for a reexec).
    pub fn parts(&self) -> (BorrowedFd<'_>, &Path, Option<u32>) {
        (self.listener.as_fd(), &self.path, self.group)
    }

    /// Binds at `path` (creating its directory 0700 if missing, and refusing one
    /// another user controls). A leftover socket nobody answers on is replaced; a
    /// live one is an error. With `group`, members of that group may connect too.
    ///
    /// # Errors
    /// The directory is unsafe, the path is in use by a running baton, is not a
    /// socket, or cannot be bound.
    pub fn bind(path: &Path, group: Option<u32>) -> io::Result<Self> {
        access::prepare_dir(path, group)?;
        match sys::path_is_socket(path)? {
            Some(true) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "control socket {} is in use by another baton",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Some(false) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "control socket path {} exists and is not a socket",
                        path.display()
                    ),
                ));
            }
            None => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        })?;
        let mode = if group.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = group {
            sys::chown_group(path, gid)?;
        }
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            group,
        })
    }

    /// Accepts clients forever, passing their requests to `tx`; `events` requests
    /// are streamed from `events` here, without the main loop.
    pub async fn serve(&self, tx: mpsc::Sender<Incoming>, events: EventLog) {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        // Eviction handles of the connections still waiting for their request line;
        // a handle whose receiver is gone belongs to one that has moved on.
        let mut idle: std::collections::VecDeque<oneshot::Sender<()>> = Default::default();
        let mut backoff = Duration::from_millis(10);
        // A flood of refused connections logs a line every 10 s, with a count.
        let (mut not_allowed, mut too_many) = (Throttle::default(), Throttle::default());
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(s) => {
                    backoff = Duration::from_millis(10);
                    s
                }
                Err(e) => {
                    // EMFILE and friends: wait, doubling up to a second, and say so
                    // once per wait rather than in a tight loop.
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "control accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let (uid, gids) = sys::peer_ids(&stream);
            if !access::peer_allowed(uid, &gids, self.group) {
                if let Some(n) = not_allowed.hit() {
                    tracing::warn!(
                        uid,
                        refused = n,
                        "control connection from a user not allowed; closed"
                    );
                }
                continue;
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(n) = too_many.hit() {
                    tracing::warn!(
                        max = MAX_CLIENTS,
                        refused = n,
                        "too many control connections; closing new ones"
                    );
                }
                continue;
            };
            idle.retain(|h| !h.is_closed());
            if idle.len() >= MAX_IDLE {
                if let Some(oldest) = idle.pop_front() {
                    let _ = oldest.send(());
                }
            }
            let (evict, evicted) = oneshot::channel();
            idle.push_back(evict);
            let tx = tx.clone();
            let events = events.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, tx, evicted, events).await {
                    tracing::debug!(error = %e, "control client");
                }
                drop(slot);
            });
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn handle(
    stream: UnixStream,
    tx: mpsc::Sender<Incoming>,
    mut evicted: oneshot::Receiver<()>,
    events: EventLog,
) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = tokio::io::BufReader::new(r).take_lines_limit();
    // Read first: a client whose request has arrived is not idle, and is never evicted
    // for a flood of connections that came after it.
    tokio::select! {
        biased;
        read = tokio::time::timeout(REQUEST_TIMEOUT, r.read_line(&mut line)) => match read {
            Ok(read) => read?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no request in time")),
        },
        _ = &mut evicted => {
            return Err(io::Error::other("evicted: too many idle control connections"));
        }
    };
    drop(evicted);
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Err(e) => ControlReply::Error {
            message: format!("bad request: {e}"),
        },
        Ok(ControlRequest::Events { follow }) => {
            return stream_events(&mut r, w, &events, follow).await;
        }
        Ok(request) => {
            // Only a client that may wait for an outcome can outlive this image.
            let conn = may_wait(&request)
                .then(|| w.as_ref().as_fd().try_clone_to_owned().ok())
                .flatten();
            let (reply, rx) = oneshot::channel();
            let (body, body_rx) = match request {
                ControlRequest::Snapshot { .. } => {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                }
                _ => (None, None),
            };
            if tx
                .send(Incoming {
                    request,
                    reply,
                    conn,
                    body,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            match rx.await {
                Ok(ControlReply::Snapshot {
                    generation,
                    version,
                    size,
                    dropped,
                }) => {
                    let fd = match body_rx {
                        Some(rx) => rx.await.ok(),
                        None => None,
                    };
                    let Some(fd) = fd else {
                        return Err(io::Error::other("snapshot without its memfd"));
                    };
                    let head = ControlReply::Snapshot {
                        generation,
                        version,
                        size,
                        dropped,
                    };
                    let mut out = serde_json::to_vec(&head).map_err(io::Error::other)?;
                    out.push(b'\n');
                    w.write_all(&out).await?;
                    send_body(fd, size, &mut w).await?;
                    return w.shutdown().await;
                }
                Ok(r) => r,
                Err(_) => ControlReply::Error {
                    message: "baton is exiting".into(),
                },
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// Copies `size` bytes of the snapshot memfd to the client, from offset 0 (positioned
/// reads: a duplicate shares no offset with the others), in 1 MiB pieces.
async fn send_body(
    fd: OwnedFd,
    size: u64,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::sync::Arc::new(std::fs::File::from(fd));
    let mut at = 0u64;
    while at < size {
        let want = (size - at).min(1 << 20) as usize;
        let f = file.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; want];
            f.read_exact_at(&mut buf, at).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)??;
        w.write_all(&buf).await?;
        at += want as u64;
    }
    Ok(())
}

/// Whether the reply to `r` may wait for an outcome (so a reexec hands the client
/// over).
fn may_wait(r: &ControlRequest) -> bool {
    use baton_protocol::ReleaseRequest as R;
    match r {
        ControlRequest::Upgrade { wait } | ControlRequest::Reexec { wait } => *wait,
        ControlRequest::Release(R::Install { .. } | R::Rollback { .. }) => true,
        _ => false,
    }
}

/// Writes the recent events, then (with `follow`) every new one, a JSON line each.
async fn stream_events(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    mut w: tokio::net::unix::OwnedWriteHalf,
    events: &EventLog,
    follow: bool,
) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    let (recent, mut rx) = events.subscribe();
    let mut out = Vec::new();
    for e in &recent {
        serde_json::to_writer(&mut out, e).map_err(io::Error::other)?;
        out.push(b'\n');
    }
    w.write_all(&out).await?;
    if !follow {
        return w.shutdown().await;
    }
    let mut scratch = [0u8; 256];
    loop {
        // A follower that went away frees its slot now, not at the next event.
        let next = tokio::select! {
            n = r.read(&mut scratch) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
            e = rx.recv() => e,
        };
        let e = match next {
            Ok(e) => e,
            // A follower too slow for the stream misses some; it is told how many.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                w.write_all(format!("{{\"event\":\"lagged\",\"missed\":{n}}}\n").as_bytes())
                    .await?;
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        let mut line = serde_json::to_vec(&e).map_err(io::Error::other)?;
        line.push(b'\n');
        w.write_all(&line).await?;
    }
    w.shutdown().await
}

/// Answers a client handed over by a reexec (it sent its request to the image
/// before): the reply sent on the returned channel is written to `conn`.
pub fn adopt_waiter(conn: OwnedFd) -> oneshot::Sender<ControlReply> {
    let (tx, rx) = oneshot::channel::<ControlReply>();
    tokio::spawn(async move {
        let Ok(reply) = rx.await else { return };
        let std = std::os::unix::net::UnixStream::from(conn);
        if std.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut s) = UnixStream::from_std(std) else {
            return;
        };
        let Ok(mut out) = serde_json::to_vec(&reply) else {
            return;
        };
        out.push(b'\n');
        let _ = s.write_all(&out).await;
        let _ = s.shutdown().await;
    });
    tx
}

/// Caps a request line at 64 KiB.
trait TakeLinesLimit: Sized {
    fn take_lines_limit(self) -> tokio::io::BufReader<tokio::io::Take<Self>>;
}

impl<R: tokio::io::AsyncRead + Unpin> TakeLinesLimit for tokio::io::BufReader<R> {
    fn take_lines_limit(self) -> tokio::io::BufReader<tokio::io::Take<Self>> {
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(self, 64 * 1024))
    }
}

/// Lets one warning through now and then: the first at once, then one every 10 s,
/// each saying how many it stands for.
#[derive(Default)]
struct Throttle {
    last: Option<std::time::Instant>,
    count: u64,
}

impl Throttle {
    fn hit(&mut self) -> Option<u64> {
        self.count += 1;
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if !due {
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.count))
    }
}
