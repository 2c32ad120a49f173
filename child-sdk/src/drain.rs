//! The drain signal: "stop accepting, finish what you have, exit".
//!
//! It comes from the supervisor (`{"type":"drain"}` or, in a stateful
//! upgrade, `{"type":"commit"}`) or from SIGTERM / SIGINT, which also works
//! standalone and under plain systemd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::error::{Error, Result};

/// Why draining started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DrainCause {
    /// The supervisor sent `drain` (a stateless upgrade or `baton stop`).
    Supervisor,
    /// The supervisor sent `commit` (the end of a stateful upgrade).
    Commit,
    /// A signal arrived (the number, e.g. 15 for SIGTERM).
    Signal(i32),
}

/// What a drain request said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainInfo {
    /// When the supervisor will SIGKILL this process; `None` when unknown
    /// (a signal), in which case the app picks its own limit, e.g. with
    /// [`deadline_or`](Self::deadline_or).
    pub deadline: Option<Instant>,
    /// Whether the successor adopts live connections: hand idle ones over
    /// instead of closing them.
    pub migrate: bool,
    /// Why.
    pub cause: DrainCause,
    /// When the request arrived.
    pub started: Instant,
}

impl DrainInfo {
    /// The deadline, or `started + default` when none was given.
    pub fn deadline_or(&self, default: Duration) -> Instant {
        self.deadline.unwrap_or(self.started + default)
    }
}

/// A cloneable handle that resolves when draining starts.
#[derive(Debug, Clone)]
pub(crate) struct Drain {
    rx: watch::Receiver<Option<DrainInfo>>,
}

impl Drain {
    /// Waits until draining starts (returns at once if it already has).
    /// Cancel-safe.
    pub(crate) async fn wait(&self) -> DrainInfo {
        let mut rx = self.rx.clone();
        let res = rx.wait_for(Option::is_some).await.map(|g| *g);
        match res {
            Ok(Some(info)) => info,
            // The trigger lives as long as the signal task, which lives as
            // long as the runtime; if it is gone nothing can start a drain.
            _ => std::future::pending().await,
        }
    }

    /// The drain request, if draining has started.
    pub(crate) fn get(&self) -> Option<DrainInfo> {
        *self.rx.borrow()
    }
}

/// The sending side, shared by the control reader and the signal task.
#[derive(Debug, Clone)]
pub(crate) struct DrainTrigger {
    tx: Arc<watch::Sender<Option<DrainInfo>>>,
}

impl DrainTrigger {
    pub(crate) fn new() -> Self {
        DrainTrigger {
            tx: Arc::new(watch::Sender::new(None)),
        }
    }

    pub(crate) fn drain(&self) -> Drain {
        Drain {
            rx: self.tx.subscribe(),
        }
    }

    /// Starts draining. A repeated request keeps the first one's cause and
    /// `migrate` but may bring the deadline forward (e.g. `baton stop` during
    /// an upgrade's drain).
    pub(crate) fn trigger(&self, new: DrainInfo) {
        self.tx.send_if_modified(|cur| match cur {
            None => {
                tracing::info!(
                    cause = ?new.cause,
                    migrate = new.migrate,
                    deadline_in_ms = new.deadline.map(|d| d.saturating_duration_since(Instant::now()).as_millis()),
                    "drain requested"
                );
                *cur = Some(new);
                true
            }
            Some(cur) => match (cur.deadline, new.deadline) {
                (old, Some(nd)) if old.is_none_or(|od| nd < od) => {
                    tracing::info!(cause = ?new.cause, "drain deadline brought forward");
                    cur.deadline = Some(nd);
                    true
                }
                _ => false,
            },
        });
    }
}

/// Turns SIGTERM and SIGINT into a drain. With `exit_on_second`, a second
/// signal exits at once (status 128 + signal), so an operator can still stop
/// a process that waits for idle keep-alive connections.
pub(crate) fn spawn_signal_task(trigger: DrainTrigger, exit_on_second: bool) -> Result<()> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("installing the SIGINT handler", e))?;
    tokio::spawn(async move {
        let mut seen = 0u32;
        loop {
            let signo = tokio::select! {
                Some(()) = term.recv() => nix::libc::SIGTERM,
                Some(()) = int.recv() => nix::libc::SIGINT,
                else => return,
            };
            seen += 1;
            tracing::debug!(signal = signo, count = seen, "signal received");
            if seen > 1 && exit_on_second {
                tracing::warn!(signal = signo, "second signal while draining: exiting now");
                std::process::exit(128 + signo);
            }
            trigger.trigger(DrainInfo {
                deadline: None,
                migrate: false,
                cause: DrainCause::Signal(signo),
                started: Instant::now(),
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(deadline: Option<Instant>, cause: DrainCause) -> DrainInfo {
        DrainInfo {
            deadline,
            migrate: cause == DrainCause::Supervisor,
            cause,
            started: Instant::now(),
        }
    }

    #[tokio::test]
    async fn first_request_wins_but_deadline_only_moves_earlier() {
        let t = DrainTrigger::new();
        let d = t.drain();
        assert!(d.get().is_none());
        let now = Instant::now();
        t.trigger(info(
            Some(now + Duration::from_secs(10)),
            DrainCause::Supervisor,
        ));
        let got = d.wait().await;
        assert_eq!(got.cause, DrainCause::Supervisor);
        assert!(got.migrate);

        t.trigger(info(None, DrainCause::Signal(15)));
        t.trigger(info(
            Some(now + Duration::from_secs(20)),
            DrainCause::Commit,
        ));
        assert_eq!(
            d.get().unwrap().deadline,
            Some(now + Duration::from_secs(10))
        );

        t.trigger(info(Some(now + Duration::from_secs(1)), DrainCause::Commit));
        let got = d.get().unwrap();
        assert_eq!(got.deadline, Some(now + Duration::from_secs(1)));
        assert_eq!(got.cause, DrainCause::Supervisor);
    }

    #[test]
    fn deadline_or_uses_the_default_only_without_a_deadline() {
        let i = info(None, DrainCause::Signal(15));
        assert_eq!(
            i.deadline_or(Duration::from_secs(3)),
            i.started + Duration::from_secs(3)
        );
        let d = Instant::now() + Duration::from_secs(1);
        let i = info(Some(d), DrainCause::Supervisor);
        assert_eq!(i.deadline_or(Duration::from_secs(3)), d);
    }
}
