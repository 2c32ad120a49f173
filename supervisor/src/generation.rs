//! The driver's side of one running generation: its process and control channel.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use baton_protocol::wire::{self, FrameReader};
use baton_protocol::{ChildMsg, SupervisorMsg};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::upgrade::GenId;

/// Something that happened to a generation, for the main loop.
pub enum GenEvent {
    /// The process exited; the text describes how.
    Exited {
        /// Generation.
        gen_id: GenId,
        /// e.g. "exit status 3" or "signal 9 (SIGKILL)".
        how: String,
    },
    /// A control message, with any fds it carried.
    Message {
        /// Generation.
        gen_id: GenId,
        /// The message.
        msg: ChildMsg,
        /// Its fds, already close-on-exec.
        fds: Vec<OwnedFd>,
        /// The relay slots those fds hold; pass it on with them (see [`RELAY_SLOTS`]).
        slots: Option<OwnedSemaphorePermit>,
    },
    /// The control channel sent something that is not protocol.
    BadMessage {
        /// Generation.
        gen_id: GenId,
        /// Why.
        why: String,
    },
}

/// Fds from children that baton may hold at once, waiting to be relayed. A child
/// that sends more waits (its control channel is not read) until some are written
/// out, so no child can pin baton's fd table or grow its queues without bound.
pub const RELAY_SLOTS: usize = 256;

/// An outgoing control message.
pub struct Outgoing {
    msg: SupervisorMsg,
    fds: Vec<OwnedFd>,
    _slots: Option<OwnedSemaphorePermit>,
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
    /// READY arrived while a message (its SDK's hello) was still unread.
    pub ready_deferred: bool,
    /// Messages the read task has passed on that the main loop has not handled yet.
    queued: Arc<AtomicUsize>,
    tx: mpsc::UnboundedSender<Outgoing>,
    stream: Arc<UnixStream>,
}

impl GenHandle {
    /// Starts the tasks that watch `child` and run its control channel.
    pub fn start(
        gen_id: GenId,
        child: tokio::process::Child,
        pid: u32,
        control: OwnedFd,
        events: mpsc::UnboundedSender<GenEvent>,
        slots: Arc<Semaphore>,
    ) -> std::io::Result<Self> {
        let std_stream = std::os::unix::net::UnixStream::from(control);
        std_stream.set_nonblocking(true)?;
        let stream = Arc::new(UnixStream::from_std(std_stream)?);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(wait_exit(gen_id, child, events.clone()));
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(read_loop(
            gen_id,
            stream.clone(),
            events,
            slots,
            Arc::clone(&queued),
        ));
        tokio::spawn(write_loop(gen_id, stream.clone(), rx));
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
            ready_deferred: false,
            queued,
            tx,
            stream,
        })
    }

    /// Whether the child has written something baton has not handled yet: bytes still
    /// in the socket, or messages the read task passed on that wait in the main loop's
    /// queue.
    ///
    /// The SDK writes `hello` before it can send READY, so a READY from a child that
    /// has not said hello yet but has unhandled messages means: its hello is in flight.
    pub fn has_unread(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
            || crate::sys::pending_bytes(self.stream.as_fd()) > 0
    }

    /// The main loop took one of this generation's messages off the queue.
    pub fn handled_one(&self) {
        // Saturating: a message read before the handle existed is not counted.
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Queues a message (with fds) for the child.
    pub fn send(&self, msg: SupervisorMsg, fds: Vec<OwnedFd>) {
        self.relay(msg, fds, None);
    }

    /// Queues a message whose fds came from another child; `slots` are released
    /// once they are written out.
    pub fn relay(
        &self,
        msg: SupervisorMsg,
        fds: Vec<OwnedFd>,
        slots: Option<OwnedSemaphorePermit>,
    ) {
        let _ = self.tx.send(Outgoing {
            msg,
            fds,
            _slots: slots,
        });
    }
}

async fn wait_exit(
    gen_id: GenId,
    mut child: tokio::process::Child,
    events: mpsc::UnboundedSender<GenEvent>,
) {
    let how = match child.wait().await {
        Ok(st) => describe(st),
        Err(e) => format!("wait failed: {e}"),
    };
    let _ = events.send(GenEvent::Exited { gen_id, how });
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

/// Reads protocol messages with the SDK's framing (`baton_protocol::wire`), so both ends
/// pair fds with lines the same way.
async fn read_loop(
    gen_id: GenId,
    stream: Arc<UnixStream>,
    events: mpsc::UnboundedSender<GenEvent>,
    slots: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
) {
    let mut reader = FrameReader::new();
    loop {
        let ev = match reader.next(&stream).await {
            Ok(None) => return,
            Ok(Some(frame)) => match frame.parse::<ChildMsg>() {
                Ok(msg) => {
                    let permit = if frame.fds.is_empty() {
                        None
                    } else {
                        // Back-pressure: wait for room before reading on.
                        let n = u32::try_from(frame.fds.len().min(RELAY_SLOTS)).unwrap_or(1);
                        match slots.clone().acquire_many_owned(n).await {
                            Ok(p) => Some(p),
                            Err(_) => return,
                        }
                    };
                    GenEvent::Message {
                        gen_id,
                        msg,
                        fds: frame.fds,
                        slots: permit,
                    }
                }
                Err(e) => GenEvent::BadMessage {
                    gen_id,
                    why: format!("unknown message '{}': {e}", frame.kind()),
                },
            },
            Err(e) => {
                let fatal = e.is_fatal();
                queued.fetch_add(1, Ordering::AcqRel);
                let _ = events.send(GenEvent::BadMessage {
                    gen_id,
                    why: e.to_string(),
                });
                if fatal {
                    return;
                }
                continue;
            }
        };
        // Counted before it is sent, so that it is never handled uncounted.
        queued.fetch_add(1, Ordering::AcqRel);
        if events.send(ev).is_err() {
            return;
        }
    }
}

async fn write_loop(
    gen_id: GenId,
    stream: Arc<UnixStream>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    while let Some(out) = rx.recv().await {
        let Ok(line) = wire::encode(&out.msg) else {
            continue;
        };
        let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(AsFd::as_fd).collect();
        if let Err(e) = wire::write_line(&stream, &line, &fds).await {
            tracing::debug!(generation = gen_id, error = %e, "control write failed");
            return;
        }
        // `out.fds` drop here: the child holds its own copies now.
    }
}
