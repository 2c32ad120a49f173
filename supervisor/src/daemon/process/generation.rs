//! The driver's side of one running generation: its process and control channel.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use baton_protocol::SupervisorMsg;
use baton_protocol::wire::FrameReader;
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

pub use super::event::{GenEvent, QUEUE_BOUND, RELAY_SLOTS, STALL_BOUND};
use super::event::{NO_COUNT, Outgoing};
use super::tasks::{read_loop, wait_cloned, wait_exit, wait_pidfd, write_loop};
use baton_machine::GenId;

/// How a generation's exit is noticed: its `Child` (spawned by this image), or
/// a pidfd (adopted from the image before a reexec).
pub enum ExitWatch {
    /// Spawned here.
    Child(tokio::process::Child),
    /// Adopted.
    Pidfd(OwnedFd),
    /// Spawned here by clone3, with the read end of its exec-error pipe.
    Cloned {
        /// The child's pidfd.
        pidfd: OwnedFd,
        /// Its errno if the exec failed.
        exec_error: OwnedFd,
    },
}

/// A running generation as the driver holds it.
pub struct GenHandle {
    /// Process id.
    pub pid: u32,
    /// Unix time (ms) it was spawned.
    pub started_at: u64,
    /// Connection count reported by its SDK, stored by the read task: a flood of
    /// `connections` lines costs no queue.
    connections: Arc<AtomicU64>,
    /// Room in the main loop's queue for this generation's messages.
    room: Arc<Semaphore>,
    /// Last `STATUS=` it sent.
    pub status_text: Option<String>,
    /// Its snapshot, held only between receipt and hand-over (never read by baton).
    pub snapshot: Option<(OwnedFd, u64)>,
    /// The schema version of that snapshot.
    pub snapshot_version: u32,
    /// What the app declared that snapshot loses (a down-migration).
    pub snapshot_dropped: Vec<String>,
    /// A pre-copy chunk, held the same way, with the relay slot it holds until the
    /// candidate's channel has written it (see [`RELAY_SLOTS`]).
    pub chunk: Option<(OwnedFd, Option<OwnedSemaphorePermit>)>,
    /// READY arrived while a message (its SDK's hello) was still unread.
    pub ready_deferred: bool,
    /// How it exited, once it has: its exit is handled when its channel is
    /// read to the end too ([`GenEvent::Closed`]).
    pub exited: Option<String>,
    /// Its channel was read to the end.
    pub closed: bool,
    /// Why baton killed it, if it did (said with its exit).
    pub kill_reason: Option<String>,
    /// Messages the read task has passed on that the main loop has not handled yet.
    queued: Arc<AtomicUsize>,
    /// Adopt messages queued for the child and not yet written.
    adopts: Arc<AtomicUsize>,
    /// Tells the read task the process has exited (the stall bound applies).
    exit_tx: watch::Sender<bool>,
    tx: mpsc::UnboundedSender<Outgoing>,
    stream: Arc<UnixStream>,
    /// Asks the read task to stop and hand its reader back (a reexec). It lives as
    /// long as the task: a request nobody waits for any more leaves it reading.
    pause: Option<mpsc::UnboundedSender<oneshot::Sender<FrameReader>>>,
    gen_id: GenId,
    events: mpsc::UnboundedSender<GenEvent>,
    slots: Arc<Semaphore>,
}

impl GenHandle {
    /// Starts the tasks that watch the process and run its control channel,
    /// reading on from `reader` (a new one, or one handed over by a reexec).
    pub fn start(
        gen_id: GenId,
        exit: ExitWatch,
        pid: u32,
        control: OwnedFd,
        reader: FrameReader,
        events: mpsc::UnboundedSender<GenEvent>,
        slots: Arc<Semaphore>,
    ) -> std::io::Result<Self> {
        let std_stream = std::os::unix::net::UnixStream::from(control);
        std_stream.set_nonblocking(true)?;
        let stream = Arc::new(UnixStream::from_std(std_stream)?);
        let (tx, rx) = mpsc::unbounded_channel();
        let adopts = Arc::new(AtomicUsize::new(0));
        match exit {
            ExitWatch::Child(child) => {
                tokio::spawn(wait_exit(gen_id, child, events.clone()));
            }
            ExitWatch::Pidfd(fd) => {
                let fd = crate::sys::async_pidfd(fd)?;
                tokio::spawn(wait_pidfd(gen_id, fd, None, events.clone()));
            }
            ExitWatch::Cloned { pidfd, exec_error } => {
                let fd = crate::sys::async_pidfd(pidfd)?;
                let pipe = crate::sys::async_readable(exec_error)?;
                tokio::spawn(wait_cloned(gen_id, fd, pipe, events.clone()));
            }
        }
        tokio::spawn(write_loop(
            gen_id,
            stream.clone(),
            rx,
            Arc::clone(&adopts),
            events.clone(),
        ));
        let started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut h = GenHandle {
            pid,
            started_at,
            connections: Arc::new(AtomicU64::new(NO_COUNT)),
            room: Arc::new(Semaphore::new(QUEUE_BOUND)),
            status_text: None,
            snapshot: None,
            snapshot_version: 0,
            snapshot_dropped: Vec::new(),
            chunk: None,
            ready_deferred: false,
            exited: None,
            closed: false,
            kill_reason: None,
            queued: Arc::new(AtomicUsize::new(0)),
            adopts,
            exit_tx: watch::Sender::new(false),
            tx,
            stream,
            pause: None,
            gen_id,
            events,
            slots,
        };
        h.resume(reader);
        Ok(h)
    }

    /// (Re)starts the read task on `reader`.
    pub fn resume(&mut self, reader: FrameReader) {
        let (pause_tx, pause_rx) = mpsc::unbounded_channel();
        self.pause = Some(pause_tx);
        tokio::spawn(read_loop(
            self.gen_id,
            reader,
            self.stream.clone(),
            self.events.clone(),
            self.slots.clone(),
            Arc::clone(&self.queued),
            pause_rx,
            self.exit_tx.subscribe(),
            Arc::clone(&self.connections),
            Arc::clone(&self.room),
        ));
    }

    /// The connection count its SDK reported last.
    pub fn connections(&self) -> Option<u64> {
        let n = self.connections.load(Ordering::Relaxed);
        (n != NO_COUNT).then_some(n)
    }

    /// Sets the count (a reexec carries it over).
    pub fn set_connections(&self, n: Option<u64>) {
        self.connections
            .store(n.unwrap_or(NO_COUNT), Ordering::Relaxed);
    }

    /// The process exited. From now on its channel ends at what is queued in it
    /// (a grandchild that kept the fd cannot hold it open), and the stall bound
    /// applies. Returns whether the channel was read to the end already, so the
    /// exit can be handled now.
    pub fn mark_exited(&mut self, how: String) -> bool {
        if let Err(e) = crate::sys::shut_rd(self.stream.as_fd()) {
            tracing::debug!(generation = self.gen_id, error = %e, "shutting down the channel's read side");
        }
        self.exited = Some(how);
        self.exit_tx.send_replace(true);
        self.closed
    }

    /// Whether the process is known to be gone (its pid may be reused: never
    /// signal it).
    pub fn is_gone(&self) -> bool {
        self.exited.is_some()
    }

    /// Whether connections handed over to it are still queued, not yet written.
    pub fn relaying(&self) -> bool {
        self.adopts.load(Ordering::Acquire) > 0
    }

    /// Whether its exit or a relay to it is still under way: a reexec waits.
    pub fn settling(&self) -> bool {
        self.exited.is_some() || self.relaying()
    }

    /// Stops the read task between messages; the receiver gets its reader, with
    /// whatever it buffered (nothing if the task had already ended).
    pub fn pause(&mut self) -> oneshot::Receiver<FrameReader> {
        let (tx, rx) = oneshot::channel();
        if let Some(p) = &self.pause {
            let _ = p.send(tx);
        }
        rx
    }

    /// Resolves once every message queued so far is written to the child.
    pub fn flushed(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Outgoing::Flushed(tx));
        rx
    }

    /// baton's end of the control socket.
    pub fn control_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
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
        if self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            self.room.add_permits(1);
        }
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
        if matches!(msg, SupervisorMsg::Adopt { .. }) {
            self.adopts.fetch_add(1, Ordering::AcqRel);
        }
        let _ = self.tx.send(Outgoing::Msg {
            msg,
            fds,
            _slots: slots,
        });
    }
}
