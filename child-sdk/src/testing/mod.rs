//! A fake supervisor for an app's own tests (feature `testing`), like
//! tableflip's `testing` package: it plays baton's side of the control and
//! notify sockets, so a test can drive ready, drain, quiesce and snapshot,
//! restore and adoption without the real supervisor.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
//! use baton_child::testing::{FakeSupervisor, Restore};
//! use baton_child::{Baton, Event};
//!
//! // The old generation, in this process.
//! let mut old_sup = FakeSupervisor::new(1)?;
//! let old = Baton::builder().stateful(1).start(old_sup.env()?).unwrap();
//! let no_migration = |v: u32, _| Err(format!("no migration from {v}"));
//! let (restored, fresh) = tokio::join!(old.restore::<Vec<u32>, _, _>(no_migration), old_sup.fresh());
//! assert_eq!((restored.unwrap(), fresh?), (None, ()));
//! old.ready().unwrap();
//! old_sup.ready().await?;
//!
//! old_sup.quiesce_async().await?;
//! assert_eq!(old.next_event().await, Event::Quiesce);
//! old.snapshot(&vec![1u32, 2, 3]).unwrap();
//! let snap = old_sup.snapshot().await?;
//!
//! // The candidate restores it.
//! let mut new_sup = FakeSupervisor::new(2)?;
//! let new = Baton::builder().stateful(1).start(new_sup.env()?).unwrap();
//! let (restored, outcome) = tokio::join!(
//!     new.restore::<Vec<u32>, _, _>(no_migration),
//!     new_sup.restore(&snap),
//! );
//! assert_eq!(restored.unwrap(), Some(vec![1, 2, 3]));
//! assert_eq!(outcome?, Restore::Restored { from_version: 1 });
//! # Ok(()) }
//! ```

mod precopy;
mod received;

pub use precopy::Round;
pub use received::{Migrated, Restore, Snapshot};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_protocol::wire::{self, FrameReader};
use baton_protocol::{ChildMsg, Feature, SupervisorMsg};
use tokio::net::{UnixDatagram, UnixStream};

use crate::adopt;
use crate::env::Env;
use crate::sys;

/// Every wait of the fake gives up after this long, with `TimedOut`.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// baton's side of one child's sockets.
#[derive(Debug)]
pub struct FakeSupervisor {
    generation: u64,
    control: UnixStream,
    child_end: Option<OwnedFd>,
    notify: UnixDatagram,
    notify_name: String,
    frames: FrameReader,
    backlog: VecDeque<(ChildMsg, Vec<OwnedFd>)>,
    listeners: Vec<(String, OwnedFd)>,
    connections: Option<u64>,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("fake supervisor: no {what} within {TIMEOUT:?}"),
    )
}

fn protocol(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("fake supervisor: {what}"),
    )
}

impl FakeSupervisor {
    /// A fake for generation `generation`. Call inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// Creating or registering the sockets failed.
    pub fn new(generation: u64) -> io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let name = format!(
            "baton-fake-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let notify = std::os::unix::net::UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(
            name.as_bytes(),
        )?)?;
        notify.set_nonblocking(true)?;
        Ok(FakeSupervisor {
            generation,
            control: UnixStream::from_std(ours)?,
            child_end: Some(theirs.into()),
            notify: UnixDatagram::from_std(notify)?,
            notify_name: format!("@{name}"),
            frames: FrameReader::new(),
            backlog: VecDeque::new(),
            listeners: Vec::new(),
            connections: None,
        })
    }

    /// Passes `socket` as the inherited listener `name` (in-process only).
    pub fn listener(mut self, name: &str, socket: impl Into<OwnedFd>) -> Self {
        self.listeners.push((name.to_owned(), socket.into()));
        self
    }

    /// The environment for a [`Baton`](crate::Baton) in this process.
    ///
    /// # Errors
    ///
    /// The child's end was given away already.
    pub fn env(&mut self) -> io::Result<Env> {
        Ok(Env {
            generation: Some(self.generation),
            listeners: std::mem::take(&mut self.listeners),
            notify_socket: Some(self.notify_name.clone()),
            control: Some(self.take_child_end()?),
        })
    }

    /// Sets up `cmd` to run a child under this fake: the control socket at
    /// fd 3 (`BATON_CONTROL_FD=3`), `NOTIFY_SOCKET` and `BATON_GENERATION`.
    /// The child binds its listeners' fallbacks (listeners are not passed:
    /// `LISTEN_PID` cannot be known before the fork).
    ///
    /// # Errors
    ///
    /// The child's end was given away already.
    pub fn command(&mut self, cmd: &mut std::process::Command) -> io::Result<()> {
        self.command_at(cmd, 3)?;
        cmd.env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        Ok(())
    }

    /// [`command`](Self::command) with the control socket at fd `fd`, for a
    /// test that passes listeners at 3.. itself (and sets `LISTEN_FDS`,
    /// `LISTEN_FDNAMES` and, from the child's own pid, `LISTEN_PID`).
    ///
    /// # Errors
    ///
    /// The child's end was given away already.
    pub fn command_at(&mut self, cmd: &mut std::process::Command, fd: i32) -> io::Result<()> {
        let end = self.take_child_end()?;
        cmd.env("BATON_GENERATION", self.generation.to_string())
            .env("NOTIFY_SOCKET", &self.notify_name)
            .env("BATON_CONTROL_FD", fd.to_string());
        sys::pass_fd_as(cmd, end, fd);
        Ok(())
    }

    fn take_child_end(&mut self) -> io::Result<OwnedFd> {
        self.child_end.take().ok_or_else(|| {
            protocol("the child's end of the control socket was given away already".into())
        })
    }

    /// Waits for the child's `hello`; returns its features.
    ///
    /// # Errors
    ///
    /// Timed out, the child closed the socket, or sent something else first.
    pub async fn hello(&mut self) -> io::Result<Vec<Feature>> {
        match self.next_message().await? {
            (ChildMsg::Hello { features, .. }, _) => Ok(features),
            (other, _) => Err(protocol(format!("expected hello, got {other:?}"))),
        }
    }

    /// Waits for `READY=1` on the notify socket.
    ///
    /// # Errors
    ///
    /// Timed out, or the socket failed.
    pub async fn ready(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let n = self.notify.recv(&mut buf).await?;
                let text = String::from_utf8_lossy(&buf[..n]);
                if text.lines().any(|l| l == "READY=1") {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| timed_out("READY=1"))?
    }

    /// The last connection count the child reported, if any. Reports are
    /// read while waiting for other messages; see
    /// [`wait_connections`](Self::wait_connections).
    pub fn connections(&self) -> Option<u64> {
        self.connections
    }

    /// Waits until the child reports `n` live connections.
    ///
    /// # Errors
    ///
    /// Timed out, or the child closed the socket.
    pub async fn wait_connections(&mut self, n: u64) -> io::Result<()> {
        tokio::time::timeout(TIMEOUT, async {
            while self.connections != Some(n) {
                if let Some(msg) = self.read_any().await? {
                    self.backlog.push_back(msg);
                }
            }
            Ok(())
        })
        .await
        .map_err(|_| timed_out(&format!("report of {n} connections")))?
    }

    /// Sends any supervisor message (without fds).
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub async fn send(&self, msg: &SupervisorMsg) -> io::Result<()> {
        self.send_with(msg, &[]).await
    }

    /// Sends `line` as it is (one JSON object and its newline) with `fds`: a
    /// message type the SDK does not know, or a malformed one, to test that the
    /// child skips it (and closes its fds) or stops at it.
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub async fn send_raw(&self, line: &[u8], fds: &[&OwnedFd]) -> io::Result<()> {
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        wire::write_line(&self.control, line, &fds).await
    }

    async fn send_with(&self, msg: &SupervisorMsg, fds: &[&OwnedFd]) -> io::Result<()> {
        let line = wire::encode(msg).map_err(io::Error::other)?;
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        wire::write_line(&self.control, &line, &fds).await
    }

    /// Tells the child to drain, with a SIGKILL `deadline` and whether the
    /// successor adopts connections.
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub async fn drain(&self, deadline: Duration, migrate: bool) -> io::Result<()> {
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        self.send(&SupervisorMsg::Drain {
            deadline_ms,
            migrate,
        })
        .await
    }

    /// Sends `quiesce` without waiting for the snapshot (for a child in
    /// this task); take it with [`snapshot`](Self::snapshot).
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub async fn quiesce_async(&self) -> io::Result<()> {
        self.send(&SupervisorMsg::Quiesce {
            accept: None,
            dry_run: false,
        })
        .await
    }

    /// Sends `quiesce` for a successor that restores only `versions` (a
    /// downgrade), and waits for the snapshot.
    ///
    /// # Errors
    ///
    /// As [`snapshot`](Self::snapshot): a child that cannot write one of
    /// `versions` answers `snapshot_failed`.
    pub async fn quiesce_for(&mut self, versions: &[u32]) -> io::Result<Snapshot> {
        self.send(&SupervisorMsg::Quiesce {
            accept: Some(versions.to_vec()),
            dry_run: false,
        })
        .await?;
        self.snapshot().await
    }

    /// Sends `quiesce` and waits for the snapshot.
    ///
    /// # Errors
    ///
    /// As [`snapshot`](Self::snapshot).
    pub async fn quiesce(&mut self) -> io::Result<Snapshot> {
        self.quiesce_async().await?;
        self.snapshot().await
    }

    /// A dry-run snapshot, as `baton snapshot` takes one: quiesce (marked as a dry
    /// run), the snapshot, then resume. The child serves again afterwards.
    ///
    /// # Errors
    ///
    /// As [`snapshot`](Self::snapshot), or the resume could not be sent.
    pub async fn dry_run_snapshot(&mut self) -> io::Result<Snapshot> {
        self.send(&SupervisorMsg::Quiesce {
            accept: None,
            dry_run: true,
        })
        .await?;
        let snap = self.snapshot().await;
        self.resume("dry-run snapshot taken").await?;
        snap
    }

    /// Waits for the child's snapshot.
    ///
    /// # Errors
    ///
    /// Timed out, the child sent `snapshot_failed` (the reason is in the
    /// error), or a snapshot without its fd.
    pub async fn snapshot(&mut self) -> io::Result<Snapshot> {
        let (msg, mut fds) = self
            .expect("snapshot", |m| {
                matches!(
                    m,
                    ChildMsg::Snapshot { .. } | ChildMsg::SnapshotFailed { .. }
                )
            })
            .await?;
        match (msg, fds.pop()) {
            (
                ChildMsg::Snapshot {
                    version,
                    size,
                    dropped,
                    ..
                },
                Some(fd),
            ) => Ok(Snapshot {
                version,
                dropped,
                size,
                fd,
            }),
            (ChildMsg::SnapshotFailed { reason }, _) => {
                Err(protocol(format!("snapshot failed: {reason}")))
            }
            (other, _) => Err(protocol(format!("bad snapshot message {other:?}"))),
        }
    }

    /// Tells the quiesced child the upgrade was aborted.
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub async fn resume(&self, reason: &str) -> io::Result<()> {
        self.send(&SupervisorMsg::Resume {
            reason: reason.to_owned(),
        })
        .await
    }

    /// Tells the quiesced child its successor was promoted.
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub async fn commit(&self, deadline: Duration, migrate: bool) -> io::Result<()> {
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        self.send(&SupervisorMsg::Commit {
            deadline_ms,
            migrate,
        })
        .await
    }

    /// Waits for the candidate's `prepared`, answers `fresh`.
    ///
    /// # Errors
    ///
    /// Timed out, or writing failed.
    pub async fn fresh(&mut self) -> io::Result<()> {
        self.expect("prepared", |m| matches!(m, ChildMsg::Prepared))
            .await?;
        self.send(&SupervisorMsg::Fresh {
            reason: "first generation".to_owned(),
        })
        .await
    }

    /// Waits for the candidate's `prepared`, sends it `snapshot` and
    /// returns its answer.
    ///
    /// # Errors
    ///
    /// Timed out, or the socket failed.
    pub async fn restore(&mut self, snapshot: &Snapshot) -> io::Result<Restore> {
        self.expect("prepared", |m| matches!(m, ChildMsg::Prepared))
            .await?;
        let msg = SupervisorMsg::Restore {
            fds: 1,
            size: snapshot.size,
        };
        self.send_with(&msg, &[&snapshot.fd]).await?;
        self.restore_answer().await
    }

    /// The candidate's `restored` or `rejected`.
    async fn restore_answer(&mut self) -> io::Result<Restore> {
        let (answer, _) = self
            .expect("restored or rejected", |m| {
                matches!(m, ChildMsg::Restored { .. } | ChildMsg::Rejected { .. })
            })
            .await?;
        Ok(match answer {
            ChildMsg::Restored { from_version, .. } => Restore::Restored { from_version },
            ChildMsg::Rejected { reason } => Restore::Rejected { reason },
            other => return Err(protocol(format!("unexpected {other:?}"))),
        })
    }

    /// Waits for a connection the child hands over.
    ///
    /// # Errors
    ///
    /// Timed out, or a `migrate` without its fd or with bad `buffered`.
    pub async fn migrated(&mut self) -> io::Result<Migrated> {
        let (msg, fds) = self
            .expect("migrate", |m| matches!(m, ChildMsg::Migrate { .. }))
            .await?;
        Migrated::from_message(msg, fds)
    }
}

impl FakeSupervisor {
    /// Hands `conn` to this child, as baton relays a migrated connection.
    ///
    /// # Errors
    ///
    /// Writing failed.
    pub async fn adopt(&self, conn: Migrated) -> io::Result<()> {
        let (buffered, spilled) = adopt::spill_buffered(conn.buffered).map_err(io::Error::other)?;
        let msg = SupervisorMsg::Adopt {
            fds: 1 + u32::from(spilled.is_some()),
            listener: conn.listener,
            buffered,
            meta: conn.meta,
        };
        let fds: Vec<&OwnedFd> = std::iter::once(&conn.fd).chain(spilled.as_ref()).collect();
        self.send_with(&msg, &fds).await
    }

    /// The next message other than a connection count, with its fds.
    ///
    /// # Errors
    ///
    /// Timed out, or the child closed the socket.
    pub async fn next_message(&mut self) -> io::Result<(ChildMsg, Vec<OwnedFd>)> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        tokio::time::timeout(TIMEOUT, self.read_one())
            .await
            .map_err(|_| timed_out("message"))?
    }

    /// Waits for the first message matching `want`; others are kept for
    /// later calls.
    async fn expect(
        &mut self,
        what: &str,
        want: impl Fn(&ChildMsg) -> bool,
    ) -> io::Result<(ChildMsg, Vec<OwnedFd>)> {
        if let Some(i) = self.backlog.iter().position(|(m, _)| want(m)) {
            if let Some(m) = self.backlog.remove(i) {
                return Ok(m);
            }
        }
        tokio::time::timeout(TIMEOUT, async {
            loop {
                let m = self.read_one().await?;
                if want(&m.0) {
                    return Ok(m);
                }
                self.backlog.push_back(m);
            }
        })
        .await
        .map_err(|_| timed_out(what))?
    }

    /// Reads one message, absorbing connection counts.
    async fn read_one(&mut self) -> io::Result<(ChildMsg, Vec<OwnedFd>)> {
        loop {
            if let Some(m) = self.read_any().await? {
                return Ok(m);
            }
        }
    }

    /// Reads one message; `None` for a connection count (recorded).
    async fn read_any(&mut self) -> io::Result<Option<(ChildMsg, Vec<OwnedFd>)>> {
        let frame = self
            .frames
            .next(&self.control)
            .await
            .map_err(|e| protocol(e.to_string()))?
            .ok_or_else(|| protocol("the child closed the control socket".to_owned()))?;
        let msg: ChildMsg = frame.parse().map_err(|e| protocol(e.to_string()))?;
        if let ChildMsg::Connections { active } = msg {
            self.connections = Some(active);
            return Ok(None);
        }
        Ok(Some((msg, frame.fds)))
    }
}
