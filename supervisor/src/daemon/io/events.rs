//! The event stream: every state change, kept for late subscribers (the last
//! [`RECENT`]) and broadcast to `baton events --follow` clients.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use baton_protocol::Event;
use tokio::sync::broadcast;

/// Events kept for a client that connects later.
pub const RECENT: usize = 256;

/// Shared between the driver (which emits) and the control server (which streams).
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    recent: Mutex<VecDeque<Event>>,
    tx: broadcast::Sender<Event>,
}

impl Default for EventLog {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(RECENT);
        EventLog {
            inner: Arc::new(Inner {
                recent: Mutex::new(VecDeque::with_capacity(RECENT)),
                tx,
            }),
        }
    }
}

impl EventLog {
    /// Records `e` and sends it to every follower.
    pub fn emit(&self, e: Event) {
        let mut recent = self
            .inner
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(e.clone());
        // No follower is not an error.
        let _ = self.inner.tx.send(e);
    }

    /// The recent events and, atomically with them, a receiver of every later one.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let recent = self
            .inner
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let rx = self.inner.tx.subscribe();
        (recent.iter().cloned().collect(), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::EventKind;

    fn ev(n: u64) -> Event {
        Event {
            at_ms: n,
            generation: n,
            pid: None,
            kind: EventKind::Ready,
        }
    }

    #[test]
    fn keeps_the_last_ones_and_streams_the_rest() {
        let log = EventLog::default();
        for i in 0..(RECENT as u64 + 10) {
            log.emit(ev(i));
        }
        let (recent, mut rx) = log.subscribe();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].generation, 10);
        log.emit(ev(999));
        assert_eq!(rx.try_recv().unwrap().generation, 999);
    }
}
