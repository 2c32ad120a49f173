//! The tasks behind a generation's handle: its exit watch, and
//! its control channel's read and write loops.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use baton_protocol::wire::{self, FrameReader};
use baton_protocol::{ChildMsg, SupervisorMsg};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::event::{BAD_LIMIT, Dropped, GenEvent, NO_COUNT, Outgoing, RELAY_SLOTS, STALL_BOUND};
use baton_machine::GenId;

pub(super) async fn wait_exit(
    gen_id: GenId,
    mut child: tokio::process::Child,
    events: mpsc::UnboundedSender<GenEvent>,
) {
    let how = match child.wait().await {
        Ok(st) => crate::text::exit_status(st),
        Err(e) => format!("wait failed: {e}"),
    };
    let _ = events.send(GenEvent::Exited { gen_id, how });
}

/// A cloned child: learns from its error pipe whether the exec worked (then closes
/// the pipe, which must not outlive the exec), then waits for the exit.
pub(super) async fn wait_cloned(
    gen_id: GenId,
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
    pipe: tokio::io::unix::AsyncFd<OwnedFd>,
    events: mpsc::UnboundedSender<GenEvent>,
) {
    let failed = loop {
        let Ok(mut guard) = pipe.readable().await else {
            break None;
        };
        match crate::sys::exec_outcome(pipe.get_ref().as_fd()) {
            crate::sys::ExecOutcome::Pending => guard.clear_ready(),
            crate::sys::ExecOutcome::Execed => break None,
            crate::sys::ExecOutcome::Failed(e) => break Some(e),
        }
    };
    drop(pipe);
    wait_pidfd(gen_id, fd, failed, events).await;
}

/// Waits for a child's exit through its pidfd, and reaps it; `exec_failed` names why
/// a cloned child could not exec.
pub(super) async fn wait_pidfd(
    gen_id: GenId,
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
    exec_failed: Option<std::io::Error>,
    events: mpsc::UnboundedSender<GenEvent>,
) {
    let how = loop {
        match fd.readable().await {
            Ok(mut guard) => match crate::sys::try_reap_pidfd(fd.get_ref().as_fd()) {
                Ok(Some(how)) => break how,
                Ok(None) => guard.clear_ready(),
                Err(e) => break format!("wait failed: {e}"),
            },
            Err(e) => break format!("wait failed: {e}"),
        }
    };
    let how = match exec_failed {
        Some(e) => format!("could not exec: {e}"),
        None => how,
    };
    let _ = events.send(GenEvent::Exited { gen_id, how });
}

/// Reads protocol messages with the SDK's framing (`baton_protocol::wire`), so both ends
/// pair fds with lines the same way, to the channel's end: a handle dropped meanwhile
/// does not stop it, since what the child sent must reach its destination.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read_loop(
    gen_id: GenId,
    mut reader: FrameReader,
    stream: Arc<UnixStream>,
    events: mpsc::UnboundedSender<GenEvent>,
    slots: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    mut pause: mpsc::UnboundedReceiver<oneshot::Sender<FrameReader>>,
    mut exited: watch::Receiver<bool>,
    connections: Arc<AtomicU64>,
    room: Arc<Semaphore>,
) {
    // False once the handle dropped its end: no pause can come any more.
    let mut pausable = true;
    let mut dropped = Dropped::default();
    let mut bad = 0u32;
    let mut frames = 0u32;
    loop {
        // `next` is cancel-safe: a pause loses nothing it had read.
        let next = tokio::select! {
            biased;
            p = pause.recv(), if pausable => {
                match p {
                    Some(back) => match back.send(reader) {
                        Ok(()) => return,
                        // Nobody waits for it any more (a reexec gave up): read on.
                        Err(r) => {
                            reader = r;
                            continue;
                        }
                    },
                    None => {
                        pausable = false;
                        continue;
                    }
                }
            }
            n = reader.next(&stream) => n,
        };
        // A flood is read from a buffer without awaiting: yield now and then, so the
        // main loop (status, upgrades) is never starved by one child.
        frames = frames.wrapping_add(1);
        if frames % 64 == 0 {
            tokio::task::yield_now().await;
        }
        let fatal = matches!(&next, Err(e) if e.is_fatal());
        let ev = match next {
            Ok(None) => break,
            Ok(Some(frame)) => match frame.parse::<ChildMsg>() {
                Ok(ChildMsg::Connections { active }) => {
                    // Only the latest count matters: stored, not queued.
                    connections.store(active.min(NO_COUNT - 1), Ordering::Relaxed);
                    continue;
                }
                Ok(msg) => {
                    let permit = if frame.fds.is_empty() || dropped.any() {
                        None
                    } else {
                        // Back-pressure: wait for room before reading on.
                        let n = u32::try_from(frame.fds.len().min(RELAY_SLOTS)).unwrap_or(1);
                        match acquire(&slots, n, &mut exited).await {
                            Some(p) => Some(p),
                            None => {
                                tracing::error!(
                                    generation = gen_id,
                                    bound = ?STALL_BOUND,
                                    "the generation exited and its successor takes no more fds; \
                                     discarding the rest of its channel"
                                );
                                None
                            }
                        }
                    };
                    if permit.is_none() && !frame.fds.is_empty() {
                        // The bound ran out (now or before): closed, and counted.
                        if matches!(msg, ChildMsg::Migrate { .. }) {
                            dropped.connections += 1;
                        } else {
                            dropped.other += 1;
                        }
                        continue;
                    }
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
            Err(e) => GenEvent::BadMessage {
                gen_id,
                why: e.to_string(),
            },
        };
        if let GenEvent::BadMessage { why, .. } = &ev {
            bad += 1;
            if bad > BAD_LIMIT {
                let why = format!("{bad} malformed control messages, the last: {why}");
                let _ = events.send(GenEvent::Hostile { gen_id, why });
                // Abandoned: its exit need not wait for the rest.
                let _ = events.send(GenEvent::Closed { gen_id, dropped });
                return;
            }
        }
        // Back-pressure: wait until the main loop has room for this generation.
        match room.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return,
        }
        // Counted before it is sent, so that it is never handled uncounted.
        queued.fetch_add(1, Ordering::AcqRel);
        if events.send(ev).is_err() {
            return;
        }
        if fatal {
            break;
        }
    }
    let _ = events.send(GenEvent::Closed { gen_id, dropped });
}

/// Waits for `n` relay slots; once the generation has exited, for at most
/// [`STALL_BOUND`] (`None`: the bound ran out).
async fn acquire(
    slots: &Arc<Semaphore>,
    n: u32,
    exited: &mut watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    let acquire = slots.clone().acquire_many_owned(n);
    tokio::pin!(acquire);
    loop {
        if *exited.borrow_and_update() {
            return tokio::time::timeout(STALL_BOUND, &mut acquire)
                .await
                .ok()
                .and_then(Result::ok);
        }
        tokio::select! {
            p = &mut acquire => return p.ok(),
            changed = exited.changed() => {
                if changed.is_err() {
                    // The handle is gone, so the exit was handled: no bound.
                    return acquire.await.ok();
                }
            }
        }
    }
}

/// Writes messages to the child in order. Adopt messages it cannot write (the
/// child is gone or its socket failed) are counted and reported as lost.
pub(super) async fn write_loop(
    gen_id: GenId,
    stream: Arc<UnixStream>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    adopts: Arc<AtomicUsize>,
    events: mpsc::UnboundedSender<GenEvent>,
) {
    let mut failed = false;
    let (mut written, mut lost) = (0u64, 0u64);
    while let Some(out) = rx.recv().await {
        // The permit lives until the fds are written out.
        let (msg, out_fds, _permit) = match out {
            Outgoing::Msg { msg, fds, _slots } => (msg, fds, _slots),
            Outgoing::Flushed(ack) => {
                let _ = ack.send(());
                continue;
            }
        };
        let is_adopt = matches!(msg, SupervisorMsg::Adopt { .. });
        if !failed {
            let written = match wire::encode(&msg) {
                Ok(line) => {
                    let fds: Vec<BorrowedFd<'_>> = out_fds.iter().map(AsFd::as_fd).collect();
                    wire::write_line(&stream, &line, &fds).await
                }
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            if let Err(e) = written {
                tracing::debug!(generation = gen_id, error = %e, "control write failed");
                failed = true;
            }
        }
        // `out_fds` drop here: the child holds its own copies now (or never will).
        if is_adopt {
            if failed {
                lost += 1;
            } else {
                written += 1;
            }
            if adopts.fetch_sub(1, Ordering::AcqRel) == 1 {
                let _ = events.send(GenEvent::Relayed {
                    gen_id,
                    written,
                    lost,
                });
                (written, lost) = (0, 0);
            }
        }
    }
}
