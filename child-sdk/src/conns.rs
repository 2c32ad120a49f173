//! Live connection tracking, reported to the supervisor as
//! `{"type":"connections","active":N}`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::control::ControlTx;
use crate::protocol::ChildMsg;

/// Reports are coalesced: at most one per this interval, and the final count
/// is always sent.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Counts live connections. Cloneable; every clone shares the count.
///
/// # Example
///
/// ```no_run
/// # async fn f(baton: &baton_child::Baton, listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// let (stream, _) = listener.accept().await?;
/// let guard = baton.track_connection();
/// tokio::spawn(async move {
///     let _guard = guard; // counted until the task ends
///     drop(stream);
/// });
/// baton.connections().wait_idle().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connections {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for Connections {
    fn default() -> Self {
        Self::new()
    }
}

impl Connections {
    /// A tracker at zero that reports nowhere (see
    /// [`Baton::connections`](crate::Baton::connections) for the reporting
    /// one).
    pub fn new() -> Self {
        Connections {
            tx: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Counts one connection until the returned guard is dropped.
    pub fn track(&self) -> ConnGuard {
        self.tx.send_modify(|n| *n += 1);
        ConnGuard {
            tx: Arc::clone(&self.tx),
        }
    }

    /// Connections open now.
    pub fn active(&self) -> u64 {
        *self.tx.borrow()
    }

    /// Resolves when no connection is open (at once if none is). Cancel-safe.
    pub async fn wait_idle(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Sends the count to the supervisor whenever it changes, coalesced.
    pub(crate) fn spawn_reporter(&self, control: ControlTx) {
        let mut rx = self.tx.subscribe();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let n = *rx.borrow_and_update();
                if last != Some(n) {
                    if control
                        .send(&ChildMsg::Connections { active: n }, None)
                        .is_err()
                    {
                        return;
                    }
                    last = Some(n);
                    tokio::time::sleep(REPORT_INTERVAL).await;
                    // Changes during the sleep mark the value as changed,
                    // so the next round sends the latest count.
                    continue;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Keeps one connection counted; dropping it uncounts it.
#[derive(Debug)]
#[must_use = "the connection is uncounted as soon as the guard is dropped"]
pub struct ConnGuard {
    tx: Arc<watch::Sender<u64>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.tx.send_modify(|n| *n = n.saturating_sub(1));
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
