//! Test helpers: an SDK child wired to a fake supervisor over a real
//! socketpair.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::net::UnixStream;

use crate::env::Env;
use crate::{Baton, Builder};
use baton_protocol::wire::{self, FrameReader};
use baton_protocol::{ChildMsg, SupervisorMsg};

pub(crate) const BOUND: Duration = Duration::from_secs(10);

/// Starts `builder` as generation `generation` with a control socket; the
/// returned stream is the supervisor's end.
pub(crate) fn child(builder: Builder, generation: u64) -> (Baton, UnixStream) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let env = Env {
        generation: Some(generation),
        listeners: Vec::new(),
        notify_socket: None,
        control: Some(OwnedFd::from(ours)),
    };
    let baton = builder.handle_signals(false).start(env).unwrap();
    (baton, UnixStream::from_std(theirs).unwrap())
}

/// Reads child messages until one that is not a connection count.
pub(crate) async fn recv(r: &mut FrameReader, s: &UnixStream) -> (ChildMsg, Vec<OwnedFd>) {
    loop {
        let f = tokio::time::timeout(BOUND, r.next(s))
            .await
            .expect("timed out")
            .unwrap()
            .expect("eof");
        let msg: ChildMsg = f.parse().unwrap();
        if !matches!(msg, ChildMsg::Connections { .. }) {
            return (msg, f.fds);
        }
    }
}

/// Sends a supervisor message, with an fd if given.
pub(crate) async fn send(s: &UnixStream, msg: &SupervisorMsg, fd: Option<&OwnedFd>) {
    let line = wire::encode(msg).unwrap();
    let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
    wire::write_line(s, &line, &fds).await.unwrap();
}
