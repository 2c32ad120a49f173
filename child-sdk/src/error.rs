//! The SDK's error type.

use std::io;
use std::os::fd::RawFd;

/// Everything that can go wrong in `baton-child`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A contract environment variable is malformed (e.g. `LISTEN_FDS=abc`).
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable's name.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An fd the environment says we inherited is unusable (closed, not a
    /// socket, wrong type or family).
    #[error("inherited fd {fd} ({what}): {reason}")]
    InheritedFd {
        /// The fd number.
        fd: RawFd,
        /// What the fd was supposed to be (e.g. `listener "http"`).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Under baton, the app asked for a listener baton did not pass (a name that differs
    /// from `--listen NAME=...`). The fallback address is only for running outside baton.
    #[error(
        "listener {name:?} was not passed by baton (it passed {passed}): give baton --listen {name}=ADDR, or use one of those names"
    )]
    UnknownListener {
        /// The name asked for.
        name: String,
        /// The names baton passed.
        passed: String,
    },
    /// A listener was asked for twice.
    #[error("listener {0:?} was already taken")]
    ListenerTaken(String),
    /// Binding the fallback address of a listener failed.
    #[error("listener {name:?}: cannot bind fallback {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The fallback address.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending to `NOTIFY_SOCKET` failed.
    #[error("sd_notify to {socket}: {source}")]
    Notify {
        /// The `NOTIFY_SOCKET` value.
        socket: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The control socket to the supervisor is closed (the supervisor went
    /// away, or the connection failed earlier).
    #[error("control socket to the supervisor is closed")]
    ControlClosed,
    /// The peer broke the control protocol (see `PROTOCOL.md`).
    #[error("control protocol: {0}")]
    Protocol(String),
    /// An optional feature was used without announcing it in `hello` (see
    /// the [`Builder`](crate::Builder) methods), or its handle was taken twice.
    #[error("feature {feature}: {reason}")]
    Feature {
        /// The feature (`state`, `adopt`).
        feature: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// Writing a state snapshot failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A pre-copy round could not be sent (aborted, or the supervisor is
    /// gone).
    #[error("pre-copy: {0}")]
    Precopy(String),
    /// The predecessor's snapshot was rejected (and `rejected` was sent):
    /// the upgrade aborts and the supervisor kills this process.
    #[error("snapshot rejected: {0}")]
    SnapshotRejected(String),
    /// The call needs a tokio runtime (it spawns tasks or registers sockets
    /// with the reactor) but was made outside one.
    #[error("baton-child must be used inside a tokio runtime: {0}")]
    NoRuntime(String),
    /// Any other I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
