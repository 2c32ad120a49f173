//! The driver's side of one running generation: its process and control channel.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::SystemTime;

use baton_child::protocol::{ChildMsg, SupervisorMsg};
use sendfd::{RecvWithFd, SendWithFd};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::sys;
use crate::upgrade::GenId;

/// Something that happened to a generation, for the main loop.
pub enum GenEvent {
    /// The process exited; the text describes how.
    Exited {
        /// Generation.
        gen: GenId,
        /// e.g. "exit status 3" or "signal 9 (SIGKILL)".
        how: String,
    },
    /// A control message, with any fds it carried.
    Message {
        /// Generation.
        gen: GenId,
        /// The message.
        msg: ChildMsg,
        /// Its fds, already close-on-exec.
        fds: Vec<OwnedFd>,
    },
    /// The control channel sent something that is not protocol.
    BadMessage {
        /// Generation.
        gen: GenId,
        /// Why.
        why: String,
    },
}

/// An outgoing control message.
pub struct Outgoing {
    msg: SupervisorMsg,
    fds: Vec<OwnedFd>,
}

/// A running generation as the driver holds it.
pub struct GenHandle {
    /// Process id.
    pub pid: u32,
    /// Unix time (ms) it was spawned.
    pub started_at: u64,
    /// Connection count reported by its SDK.
    pub connections: Option<u64>,
    /// Last `STATUS=` it sent.
    pub status_text: Option<String>,
    /// Its snapshot, held only between receipt and hand-over (never read by baton).
    pub snapshot: Option<(OwnedFd, u64)>,
    tx: mpsc::UnboundedSender<Outgoing>,
}

impl GenHandle {
    /// Starts the tasks that watch `child` and run its control channel.
    pub fn start(
        gen: GenId,
        child: tokio::process::Child,
        pid: u32,
        control: OwnedFd,
        events: mpsc::UnboundedSender<GenEvent>,
    ) -> std::io::Result<Self> {
        let std_stream = std::os::unix::net::UnixStream::from(control);
        std_stream.set_nonblocking(true)?;
        let stream = Arc::new(UnixStream::from_std(std_stream)?);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(wait_exit(gen, child, events.clone()));
        tokio::spawn(read_loop(gen, stream.clone(), events));
        tokio::spawn(write_loop(gen, stream, rx));
        let started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(GenHandle {
            pid,
            started_at,
            connections: None,
            status_text: None,
            snapshot: None,
            tx,
        })
    }

    /// Queues a message (with fds) for the child.
    pub fn send(&self, msg: SupervisorMsg, fds: Vec<OwnedFd>) {
        let _ = self.tx.send(Outgoing { msg, fds });
    }
}

async fn wait_exit(
    gen: GenId,
    mut child: tokio::process::Child,
    events: mpsc::UnboundedSender<GenEvent>,
) {
    let how = match child.wait().await {
        Ok(st) => describe(st),
        Err(e) => format!("wait failed: {e}"),
    };
    let _ = events.send(GenEvent::Exited { gen, how });
}

/// "exit status 3" / "signal 9 (SIGKILL)".
pub fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => format!("signal {s} ({sig})"),
            Err(_) => format!("signal {s}"),
        },
        _ => "unknown status".into(),
    }
}

/// Reads JSON lines; fds received are queued in order and handed to the messages
/// that declare them (see `baton_child::protocol`).
async fn read_loop(gen: GenId, stream: Arc<UnixStream>, events: mpsc::UnboundedSender<GenEvent>) {
    let mut buf = Vec::<u8>::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut fd_queue: std::collections::VecDeque<OwnedFd> = Default::default();
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut raw: [RawFd; 8] = [-1; 8];
        let (n, nfds) = match stream.recv_with_fd(&mut chunk, &mut raw) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        fd_queue.extend(sys::own_received_fds(&raw[..nfds]));
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let ev = match serde_json::from_slice::<ChildMsg>(&line) {
                Ok(msg) => {
                    let want = declared_fds(&msg);
                    let fds: Vec<OwnedFd> =
                        (0..want).filter_map(|_| fd_queue.pop_front()).collect();
                    if fds.len() < want {
                        GenEvent::BadMessage {
                            gen,
                            why: format!("message declares {want} fd(s) but carried {}", fds.len()),
                        }
                    } else {
                        GenEvent::Message { gen, msg, fds }
                    }
                }
                Err(e) => GenEvent::BadMessage {
                    gen,
                    why: format!("{e}: {}", String::from_utf8_lossy(&line).trim_end()),
                },
            };
            if events.send(ev).is_err() {
                return;
            }
        }
        if buf.len() > 1 << 20 {
            let _ = events.send(GenEvent::BadMessage {
                gen,
                why: "control line longer than 1 MiB".into(),
            });
            return;
        }
    }
}

fn declared_fds(msg: &ChildMsg) -> usize {
    match msg {
        ChildMsg::Snapshot { fds, .. } | ChildMsg::Migrate { fds, .. } => *fds as usize,
        _ => 0,
    }
}

async fn write_loop(
    gen: GenId,
    stream: Arc<UnixStream>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    while let Some(out) = rx.recv().await {
        let mut line = match serde_json::to_vec(&out.msg) {
            Ok(l) => l,
            Err(_) => continue,
        };
        line.push(b'\n');
        let raw: Vec<RawFd> = out.fds.iter().map(|f| f.as_raw_fd()).collect();
        if let Err(e) = send_all(&stream, &line, &raw).await {
            tracing::debug!(generation = gen, error = %e, "control write failed");
            return;
        }
        // `out.fds` drop here: the child has its own copies now.
    }
}

/// Writes all of `bytes`, the fds riding with the first chunk.
async fn send_all(stream: &UnixStream, mut bytes: &[u8], mut fds: &[RawFd]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.send_with_fd(bytes, fds) {
            Ok(n) => {
                bytes = &bytes[n..];
                fds = &[];
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
