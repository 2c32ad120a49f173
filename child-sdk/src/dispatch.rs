//! The receiving half of the control socket: a reader task that routes
//! each supervisor message to the drain trigger, the state queue or the
//! adoption routes. [`start`] says hello and spawns both halves.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_protocol::wire::{self, Frame, FrameReader};
use baton_protocol::{ChildMsg, SupervisorMsg};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::adopt::{self, AdoptRoutes, AdoptedConn};
use crate::credit::Credit;
use crate::drain::{DrainCause, DrainInfo, DrainTrigger};
use crate::error::{Error, Result};
use crate::send::ControlTx;

/// What the reader forwards to the stateful side of [`Baton`](crate::Baton).
#[derive(Debug)]
pub(crate) enum StateMsg {
    Restore {
        fd: OwnedFd,
        size: u64,
    },
    Fresh {
        reason: String,
    },
    Quiesce {
        accept: Option<Vec<u32>>,
    },
    Resume {
        reason: String,
    },
    Precopy {
        round: u32,
    },
    PrecopyFinal {
        round: u32,
    },
    Chunk {
        fd: OwnedFd,
        size: u64,
        round: u32,
        seq: u64,
    },
    Complete {
        chunks: u64,
    },
}

/// Where the reader delivers what the supervisor says.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub(crate) drain: DrainTrigger,
    /// Set when the child announced `state`.
    pub(crate) state: Option<mpsc::UnboundedSender<StateMsg>>,
    /// Set when the child announced `adopt`.
    pub(crate) adopt: Option<AdoptRoutes>,
    /// Pre-copy flow control (acks from the candidate, via baton).
    pub(crate) credit: Arc<Credit>,
}

impl Dispatch {
    fn frame(&self, mut frame: Frame) {
        let msg = match frame.parse::<SupervisorMsg>() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(kind = frame.kind(), error = %e, "ignoring unknown control message");
                return;
            }
        };
        tracing::debug!(?msg, "control message");
        match msg {
            SupervisorMsg::Drain {
                deadline_ms,
                migrate,
            } => self.drain_by(DrainCause::Supervisor, deadline_ms, migrate),
            SupervisorMsg::Quiesce { accept, dry_run } => {
                // A dry run pauses and snapshots all the same; only the follow-up differs
                // (always a resume), which the state side handles as any resume.
                if dry_run {
                    tracing::debug!("dry-run snapshot requested");
                }
                self.to_state(StateMsg::Quiesce { accept })
            }
            SupervisorMsg::Resume { reason } => {
                // A pre-copy round in progress stops: its senders are blocked on credit.
                self.credit.abort(&reason);
                self.to_state(StateMsg::Resume { reason })
            }
            SupervisorMsg::Precopy { round } => {
                if round == 0 {
                    self.credit.reset();
                }
                self.to_state(StateMsg::Precopy { round })
            }
            SupervisorMsg::PrecopyFinal { round } => {
                if round == 0 {
                    self.credit.reset();
                }
                self.to_state(StateMsg::PrecopyFinal { round })
            }
            SupervisorMsg::Acked { seq } => self.credit.ack(seq),
            SupervisorMsg::Chunk {
                size, round, seq, ..
            } => match frame.fds.pop() {
                Some(fd) if frame.fds.is_empty() => self.to_state(StateMsg::Chunk {
                    fd,
                    size,
                    round,
                    seq,
                }),
                _ => tracing::error!("chunk must carry exactly one fd; ignored"),
            },
            SupervisorMsg::Complete { chunks } => self.to_state(StateMsg::Complete { chunks }),
            SupervisorMsg::Commit {
                deadline_ms,
                migrate,
                // Commit reaches the app once: as a drain with cause Commit.
            } => self.drain_by(DrainCause::Commit, deadline_ms, migrate),
            SupervisorMsg::Fresh { reason } => self.to_state(StateMsg::Fresh { reason }),
            SupervisorMsg::Restore { size, .. } => match frame.fds.pop() {
                Some(fd) if frame.fds.is_empty() => self.to_state(StateMsg::Restore { fd, size }),
                _ => tracing::error!("restore must carry exactly one fd; ignored"),
            },
            SupervisorMsg::Adopt {
                listener,
                buffered,
                meta,
                ..
            } => {
                let Some(routes) = &self.adopt else {
                    // Only sent to children that announced `adopt`; the
                    // connection closes when the fd drops.
                    tracing::warn!(
                        listener,
                        "adopt, but this child did not announce the adopt feature; connection closed"
                    );
                    return;
                };
                let mut fds = std::mem::take(&mut frame.fds).into_iter();
                let (Some(fd), spilled, None) = (fds.next(), fds.next(), fds.next()) else {
                    tracing::error!("adopt must carry one or two fds; ignored");
                    return;
                };
                match adopt::decode_buffered(&buffered, spilled) {
                    Ok(buffered) => routes.deliver(&listener, AdoptedConn { fd, buffered, meta }),
                    Err(e) => {
                        tracing::error!(listener, error = %e, "bad adopt message; connection closed")
                    }
                }
            }
        }
    }

    fn drain_by(&self, cause: DrainCause, deadline_ms: u64, migrate: bool) {
        let now = Instant::now();
        self.drain.trigger(DrainInfo {
            deadline: Some(now + Duration::from_millis(deadline_ms)),
            migrate,
            cause,
            started: now,
        });
    }

    fn to_state(&self, msg: StateMsg) {
        match &self.state {
            Some(tx) => {
                if tx.send(msg).is_err() {
                    tracing::warn!("state message arrived but the state handle was dropped");
                }
            }
            None => tracing::warn!(
                ?msg,
                "state message, but this child did not announce the state feature; ignored"
            ),
        }
    }
}

/// Takes over the control socket: writes `hello` (so it is the first line
/// the supervisor reads) and spawns the writer and reader tasks.
///
/// `hello` is written synchronously, before this returns, so that it is in
/// the socket before the app can send `READY=1` on the notify socket: the
/// supervisor decides things at READY time (e.g. whether the new generation
/// adopts connections) from the features `hello` announced.
pub(crate) fn start(fd: OwnedFd, hello: &ChildMsg, dispatch: Dispatch) -> Result<ControlTx> {
    let line = wire::encode(hello).map_err(|e| Error::Protocol(e.to_string()))?;
    baton_protocol::wire::write_line_blocking(fd.as_fd(), &line)
        .map_err(|e| Error::io("control socket: sending hello", e))?;
    let std = std::os::unix::net::UnixStream::from(fd);
    // Our end of the per-generation socketpair: no other process shares this
    // open file description, so setting O_NONBLOCK affects nobody else.
    std.set_nonblocking(true)
        .map_err(|e| Error::io("control socket: setting O_NONBLOCK", e))?;
    let stream = Arc::new(
        UnixStream::from_std(std).map_err(|e| Error::io("control socket: registering", e))?,
    );
    let control = ControlTx::spawn(Arc::clone(&stream));
    tokio::spawn(reader(stream, dispatch));
    Ok(control)
}

async fn reader(stream: Arc<UnixStream>, dispatch: Dispatch) {
    let mut frames = FrameReader::new();
    loop {
        match frames.next(&stream).await {
            Ok(Some(frame)) => dispatch.frame(frame),
            Ok(None) => {
                // The supervisor is gone or dropped us. If it died, the
                // kernel sends our parent-death signal, which drains.
                tracing::warn!("control socket closed by the supervisor");
                dispatch.credit.abort("the supervisor is gone");
                return;
            }
            Err(e) if !e.is_fatal() => {
                tracing::warn!(error = %e, "skipping malformed control message");
            }
            Err(e) => {
                tracing::error!(error = %e, "control socket unusable; no more supervisor messages");
                dispatch.credit.abort("the control socket is unusable");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::PROTOCOL_VERSION;
    use std::time::Duration;

    #[tokio::test]
    async fn hello_goes_first_and_drain_is_dispatched() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let theirs = UnixStream::from_std(theirs).unwrap();
        let trigger = DrainTrigger::new();
        let drain = trigger.drain();
        let hello = ChildMsg::Hello {
            protocol: PROTOCOL_VERSION,
            features: vec![],
            restores: None,
        };
        let tx = start(
            OwnedFd::from(ours),
            &hello,
            Dispatch {
                drain: trigger,
                state: None,
                adopt: None,
                credit: Arc::default(),
            },
        )
        .unwrap();
        tx.send(&ChildMsg::Connections { active: 1 }, None).unwrap();

        let mut r = FrameReader::new();
        let bound = Duration::from_secs(5);
        let first = tokio::time::timeout(bound, r.next(&theirs)).await.unwrap();
        assert_eq!(first.unwrap().unwrap().parse::<ChildMsg>().unwrap(), hello);
        let second = tokio::time::timeout(bound, r.next(&theirs)).await.unwrap();
        assert_eq!(
            second.unwrap().unwrap().parse::<ChildMsg>().unwrap(),
            ChildMsg::Connections { active: 1 }
        );

        // Garbage and unknown messages are skipped, then drain arrives.
        let before = Instant::now();
        for line in [
            &b"garbage\n"[..],
            b"{\"type\":\"brand_new\"}\n",
            b"{\"type\":\"drain\",\"deadline_ms\":3000,\"migrate\":true}\n",
        ] {
            wire::write_line(&theirs, line, &[]).await.unwrap();
        }
        let info = tokio::time::timeout(bound, drain.wait()).await.unwrap();
        assert!(info.migrate);
        assert_eq!(info.cause, DrainCause::Supervisor);
        let d = info.deadline.unwrap();
        assert!(d >= before + Duration::from_millis(3000));
        assert!(d <= Instant::now() + Duration::from_millis(3000));
    }

    #[tokio::test]
    async fn hello_is_in_the_socket_when_start_returns() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let hello = ChildMsg::Hello {
            protocol: PROTOCOL_VERSION,
            features: vec![baton_protocol::Feature::Adopt],
            restores: None,
        };
        let dispatch = Dispatch {
            drain: DrainTrigger::new(),
            state: None,
            adopt: None,
            credit: Arc::default(),
        };
        let _tx = start(OwnedFd::from(ours), &hello, dispatch).unwrap();
        // No await point since start(): a non-blocking read must find it.
        theirs.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(&mut &theirs, &mut buf).unwrap();
        let got: ChildMsg = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(got, hello);
        assert_eq!(buf[n - 1], b'\n');
    }

    #[tokio::test]
    async fn send_fails_once_the_supervisor_is_gone() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let hello = ChildMsg::Hello {
            protocol: PROTOCOL_VERSION,
            features: vec![],
            restores: None,
        };
        let tx = start(
            OwnedFd::from(ours),
            &hello,
            Dispatch {
                drain: DrainTrigger::new(),
                state: None,
                adopt: None,
                credit: Arc::default(),
            },
        )
        .unwrap();
        drop(theirs);
        // The writer hits EPIPE on the next message and stops; later sends
        // then fail.
        tx.send(&ChildMsg::Connections { active: 1 }, None).unwrap();
        tokio::time::timeout(Duration::from_secs(5), tx.tx.closed())
            .await
            .unwrap();
        assert!(matches!(
            tx.send(&ChildMsg::Connections { active: 0 }, None),
            Err(Error::ControlClosed)
        ));
    }
}
