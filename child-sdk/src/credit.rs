//! Flow control of pre-copy chunks: the old generation sends at most
//! [`PRECOPY_WINDOW`] chunks the candidate has not applied yet. A leaf: the
//! dispatcher acks and aborts it, the sender waits on it.

use std::sync::{Condvar, Mutex, PoisonError};

use baton_protocol::PRECOPY_WINDOW;

use crate::error::{Error, Result};

/// Flow control for the old generation: at most [`PRECOPY_WINDOW`] chunks
/// the candidate has not applied yet.
#[derive(Debug, Default)]
pub(crate) struct Credit {
    state: Mutex<CreditState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct CreditState {
    /// Chunks applied (acks arrive in order).
    applied: u64,
    /// The next chunk's sequence number.
    next_seq: u64,
    /// Set when the upgrade was aborted: blocked senders give up.
    aborted: Option<String>,
}

impl Credit {
    /// A new hand-over starts: sequence numbers from 0, no abort.
    pub(crate) fn reset(&self) {
        *self.lock() = CreditState::default();
        self.changed.notify_all();
    }

    pub(crate) fn ack(&self, seq: u64) {
        let mut s = self.lock();
        s.applied = s.applied.max(seq + 1);
        self.changed.notify_all();
    }

    pub(crate) fn abort(&self, reason: &str) {
        self.lock().aborted = Some(reason.to_owned());
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CreditState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for room, then hands out the next sequence number to `send`
    /// (called under the lock, so chunks go out in `seq` order).
    pub(crate) fn send_next(&self, send: impl FnOnce(u64) -> Result<()>) -> Result<()> {
        let mut s = self.lock();
        loop {
            if let Some(why) = &s.aborted {
                return Err(Error::Precopy(format!("aborted: {why}")));
            }
            if s.next_seq < s.applied + PRECOPY_WINDOW {
                break;
            }
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        send(s.next_seq)?;
        s.next_seq += 1;
        Ok(())
    }
}
