//! The sending half of the control socket: a cloneable queue in front of
//! one writer task, so messages keep their order and fds their lines.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use baton_protocol::ChildMsg;
use baton_protocol::wire;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// One queued outgoing line and the fd that travels with it.
#[derive(Debug)]
pub(crate) struct Outgoing {
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Told once the line is written (dropped unsent if writing fails).
    written: Option<oneshot::Sender<()>>,
}

/// Sends messages to the supervisor. Cloneable; messages keep their order
/// (one writer task).
#[derive(Debug, Clone)]
pub(crate) struct ControlTx {
    pub(crate) tx: mpsc::UnboundedSender<Outgoing>,
}

impl ControlTx {
    /// Queues `msg`, with `fd` attached when the message carries one.
    pub(crate) fn send(&self, msg: &ChildMsg, fd: Option<OwnedFd>) -> Result<()> {
        self.queue(msg, fd.into_iter().collect(), None)
    }

    /// Like [`send`](Self::send), but resolves once the message is written
    /// to the socket (so the process may exit right after).
    pub(crate) async fn send_and_wait(&self, msg: &ChildMsg, fd: Option<OwnedFd>) -> Result<()> {
        self.send_fds_and_wait(msg, fd.into_iter().collect()).await
    }

    /// [`send_and_wait`](Self::send_and_wait) with several fds, in order.
    pub(crate) async fn send_fds_and_wait(&self, msg: &ChildMsg, fds: Vec<OwnedFd>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.queue(msg, fds, Some(tx))?;
        rx.await.map_err(|_| Error::ControlClosed)
    }

    fn queue(
        &self,
        msg: &ChildMsg,
        fds: Vec<OwnedFd>,
        written: Option<oneshot::Sender<()>>,
    ) -> Result<()> {
        let line = wire::encode(msg).map_err(|e| Error::Protocol(e.to_string()))?;
        self.tx
            .send(Outgoing { line, fds, written })
            .map_err(|_| Error::ControlClosed)
    }
}

impl ControlTx {
    /// Spawns the writer task on `stream`.
    pub(crate) fn spawn(stream: Arc<UnixStream>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(stream, rx));
        ControlTx { tx }
    }
}

async fn writer(stream: Arc<UnixStream>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let fds: Vec<_> = out.fds.iter().map(AsFd::as_fd).collect();
        if let Err(e) = wire::write_line(&stream, &out.line, &fds).await {
            // Closing the receiver makes later sends fail with ControlClosed.
            tracing::warn!(error = %e, "control socket write failed; no more reports to the supervisor");
            return;
        }
        if let Some(done) = out.written {
            // The waiter may have given up; nothing to do then.
            let _ = done.send(());
        }
    }
}
