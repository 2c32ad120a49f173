//! What a generation's tasks tell the main loop, what the loop sends them, and the
//! bounds both keep.

use std::os::fd::OwnedFd;
use std::time::Duration;

use baton_protocol::{ChildMsg, SupervisorMsg};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use baton_machine::GenId;

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
    /// The control channel was read to its end: every message before this one
    /// was passed on, except `dropped`, discarded when the stall bound ran out.
    Closed {
        /// Generation.
        gen_id: GenId,
        /// What was discarded unread (see [`STALL_BOUND`]).
        dropped: Dropped,
    },
    /// The generation broke the protocol past every tolerance (a flood of malformed
    /// lines): its channel is no longer read, and it is to be killed.
    Hostile {
        /// Generation.
        gen_id: GenId,
        /// Why.
        why: String,
    },
    /// Adopt messages queued for this generation were all written out, or some
    /// could not be (`lost`): the generation is gone or stopped reading.
    Relayed {
        /// The receiving generation.
        gen_id: GenId,
        /// Connections written to it since the last such event.
        written: u64,
        /// Connections that were queued for it and never written.
        lost: u64,
    },
}

/// What a generation sent that never reached its destination.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Migrated connections (each closed, so its client sees a close).
    pub connections: u64,
    /// Other messages with fds (snapshots, pre-copy chunks).
    pub other: u64,
}

impl Dropped {
    /// Whether anything was dropped.
    pub fn any(&self) -> bool {
        self.connections + self.other > 0
    }
}

/// Messages a generation may have passed to the main loop and not yet handled. A
/// child that sends faster waits: baton stops reading its channel, so its writes
/// block, and baton's memory stays bounded whatever it sends.
pub const QUEUE_BOUND: usize = 256;

/// Malformed lines a generation may send before it is killed as hostile.
pub const BAD_LIMIT: u32 = 64;

/// `connections` not reported yet.
pub(super) const NO_COUNT: u64 = u64::MAX;

/// After a generation exited, how long its channel may wait for a relay slot
/// (its successor not reading) before the rest is discarded, counted and reported.
pub const STALL_BOUND: Duration = Duration::from_secs(5);

/// Fds from children that baton may hold at once, waiting to be relayed. A child
/// that sends more waits (its control channel is not read) until some are written
/// out, so no child can pin baton's fd table or grow its queues without bound.
pub const RELAY_SLOTS: usize = 256;

/// An outgoing control message, or a marker acknowledged once everything
/// queued before it is written.
pub(super) enum Outgoing {
    Msg {
        msg: SupervisorMsg,
        fds: Vec<OwnedFd>,
        _slots: Option<OwnedSemaphorePermit>,
    },
    Flushed(oneshot::Sender<()>),
}
