//! Live connection tracking, reported to the supervisor as
//! `{"type":"connections","active":N}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::send::ControlTx;
use baton_protocol::ChildMsg;

/// Reports are coalesced: at most one per this interval, and the final count
/// is always sent.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Counts live connections. Cloneable; every clone shares the count.
#[derive(Debug, Clone)]
pub(crate) struct Connections {
    inner: Arc<Inner>,
}

/// A plain atomic: counting a connection in or out is one `fetch_add`, with no lock and
/// no wake-up on the accept path. The reporter samples it on a timer instead.
#[derive(Debug, Default)]
struct Inner {
    active: AtomicU64,
    /// Woken when the count drops to zero (for `wait_idle`).
    idle: Notify,
}

impl Connections {
    /// A tracker at zero that reports nowhere until
    /// [`spawn_reporter`](Self::spawn_reporter).
    pub(crate) fn new() -> Self {
        Connections {
            inner: Arc::new(Inner::default()),
        }
    }

    /// Counts one connection until the returned guard is dropped.
    pub(crate) fn track(&self) -> ConnGuard {
        self.inner.active.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Connections open now.
    pub(crate) fn active(&self) -> u64 {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// Resolves when no connection is open (at once if none is). Cancel-safe.
    pub(crate) async fn wait_idle(&self) {
        loop {
            // Register before checking, so a drop to zero in between is not missed.
            let notified = self.inner.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Sends the count to the supervisor whenever it changes, coalesced.
    pub(crate) fn spawn_reporter(&self, control: ControlTx) {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(REPORT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let n = inner.active.load(Ordering::Relaxed);
                if last != Some(n) {
                    if control
                        .send(&ChildMsg::Connections { active: n }, None)
                        .is_err()
                    {
                        return;
                    }
                    last = Some(n);
                }
            }
        });
    }
}

/// Keeps one connection counted; dropping it uncounts it.
#[derive(Debug)]
#[must_use = "the connection is uncounted as soon as the guard is dropped"]
pub struct ConnGuard {
    inner: Arc<Inner>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.inner.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guards_count_and_wait_idle_resolves_when_the_last_one_drops() {
        let c = Connections::new();
        c.wait_idle().await;
        let a = c.track();
        let b = c.clone().track();
        assert_eq!(c.active(), 2);
        drop(a);
        assert_eq!(c.active(), 1);
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.active(), 0);
    }
}
