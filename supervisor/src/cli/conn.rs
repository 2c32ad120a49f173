//! Talking to a running baton: its control socket, one request and one reply, and
//! how a client command reports an error.

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use baton_protocol::{ControlReply, ControlRequest};

use crate::{access, sys};

/// Runs a client command: its error, or a failed write to stdout, is one line and
/// exit 1, never a panic.
pub fn run(f: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    sys::default_sigpipe();
    // Our own output failing (a full disk, `> /dev/full`) is an error to say in one
    // line, not a panic: `println!` panics on it.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let line = match msg.strip_prefix("failed printing to stdout: ") {
            Some(why) => format!("baton: error: cannot write to stdout: {why}"),
            None => format!("baton: internal error: {info}"),
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    }));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let _ = writeln!(std::io::stderr(), "baton: error: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// The control socket to use: the one given, else the default.
pub fn control_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(access::default_control_path)
}

/// Sends `req` and returns the reply; an error reply is an error.
///
/// # Errors
/// baton cannot be reached, or it answered with an error.
pub fn ask(
    path: Option<PathBuf>,
    req: ControlRequest,
    timeout: Option<Duration>,
) -> anyhow::Result<ControlReply> {
    let path = control_path(path);
    let reply = request(&path, &req, timeout)?;
    if let ControlReply::Error { message } = &reply {
        anyhow::bail!("baton at {}: {message}", path.display());
    }
    Ok(reply)
}

/// `baton status`, parsed: what every command that looks before it acts asks first.
///
/// # Errors
/// As [`ask`], or a reply that is not a status.
pub fn status(path: Option<PathBuf>, timeout: Duration) -> anyhow::Result<baton_protocol::Status> {
    match ask(path, ControlRequest::Status, Some(timeout))? {
        ControlReply::Status(s) => Ok(s),
        other => anyhow::bail!("unexpected reply to status: {other:?}"),
    }
}

/// Client errors, each naming the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("cannot reach baton at {path}: {err} (is `baton run` running with this --control?)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        err: io::Error,
    },
    /// The socket or its directory could be another user's.
    #[error(transparent)]
    Unsafe(#[from] access::CheckError),
    /// Connection broke or the reply was not understood.
    #[error("control socket {path}: {why}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
}

/// Connects to the control socket at `path` (checked first) and sends `req`.
///
/// # Errors
/// The socket is unsafe, cannot be reached, or the request cannot be written.
pub fn connect(
    path: &Path,
    req: &ControlRequest,
) -> Result<std::os::unix::net::UnixStream, ClientError> {
    let perr = |why: String| ClientError::Protocol {
        path: path.to_path_buf(),
        why,
    };
    access::check_client(path)?;
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|err| ClientError::Connect {
            path: path.to_path_buf(),
            err,
        })?;
    let mut line = serde_json::to_vec(req).map_err(|e| perr(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| perr(e.to_string()))?;
    Ok(s)
}

/// Sends one request and waits for the reply (`timeout` None = wait as long as it takes).
///
/// # Errors
/// [`ClientError`] when baton cannot be reached or answers nonsense.
pub fn request(
    path: &Path,
    req: &ControlRequest,
    timeout: Option<Duration>,
) -> Result<ControlReply, ClientError> {
    let perr = |why: String| ClientError::Protocol {
        path: path.to_path_buf(),
        why,
    };
    let s = connect(path, req)?;
    s.set_read_timeout(timeout)
        .map_err(|e| perr(e.to_string()))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| perr(e.to_string()))?;
    if reply.is_empty() {
        return Err(perr("baton closed the connection without answering".into()));
    }
    serde_json::from_str(&reply).map_err(|e| perr(format!("bad reply: {e}")))
}

/// Sends `req` and hands every reply line to `each` until the connection ends or
/// `each` returns false (`baton events --follow`).
///
/// # Errors
/// [`ClientError`] when baton cannot be reached.
pub fn stream(
    path: &Path,
    req: &ControlRequest,
    mut each: impl FnMut(&str) -> bool,
) -> Result<(), ClientError> {
    let perr = |why: String| ClientError::Protocol {
        path: path.to_path_buf(),
        why,
    };
    let s = connect(path, req)?;
    for l in BufReader::new(s).lines() {
        let l = l.map_err(|e| perr(e.to_string()))?;
        if !each(&l) {
            break;
        }
    }
    Ok(())
}
