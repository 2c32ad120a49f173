//! The control socket: `baton status|upgrade|stop` talk to a running baton here.
//!
//! Unix stream, mode 0600, peer uid checked with `SO_PEERCRED`; one JSON request
//! line in, one JSON reply line out (types in `baton_child::protocol`).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_child::protocol::{ControlReply, ControlRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::sys;

/// A request from a client, with the way to answer it.
pub struct Incoming {
    /// What was asked.
    pub request: ControlRequest,
    /// Where the answer goes.
    pub reply: oneshot::Sender<ControlReply>,
}

/// The listening control socket; the file is removed on drop.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

/// The default control socket path.
pub fn default_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("baton.sock"),
        _ => PathBuf::from(format!("/tmp/baton-{}/baton.sock", sys::getuid())),
    }
}

impl ControlServer {
    /// Binds at `path` (creating its directory 0700 if missing). A leftover socket
    /// nobody answers on is replaced; a live one is an error.
    ///
    /// # Errors
    /// The path is in use by a running baton, is not a socket, or cannot be bound.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        match sys::path_is_socket(path)? {
            Some(true) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "control socket {} is in use by another baton",
                            path.display()
                        ),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Some(false) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "control socket path {} exists and is not a socket",
                        path.display()
                    ),
                ))
            }
            None => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Accepts clients forever, passing their requests to `tx`.
    pub async fn serve(&self, tx: mpsc::Sender<Incoming>) {
        let me = sys::getuid();
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
            if uid != me && uid != 0 {
                tracing::warn!(uid, "control connection from another user refused");
                continue;
            }
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, tx).await {
                    tracing::debug!(error = %e, "control client");
                }
            });
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<Incoming>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = tokio::io::BufReader::new(r).take_lines_limit();
    r.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Err(e) => ControlReply::Error {
            message: format!("bad request: {e}"),
        },
        Ok(request) => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Incoming { request, reply }).await.is_err() {
                return Ok(());
            }
            match rx.await {
                Ok(r) => r,
                Err(_) => ControlReply::Error {
                    message: "baton is exiting".into(),
                },
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// Caps a request line at 64 KiB.
trait TakeLinesLimit: Sized {
    fn take_lines_limit(self) -> tokio::io::BufReader<tokio::io::Take<Self>>;
}

impl<R: tokio::io::AsyncRead + Unpin> TakeLinesLimit for tokio::io::BufReader<R> {
    fn take_lines_limit(self) -> tokio::io::BufReader<tokio::io::Take<Self>> {
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(self, 64 * 1024))
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
    /// Connection broke or the reply was not understood.
    #[error("control socket {path}: {why}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
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
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|err| ClientError::Connect {
            path: path.to_path_buf(),
            err,
        })?;
    s.set_read_timeout(timeout)
        .map_err(|e| perr(e.to_string()))?;
    let mut line = serde_json::to_vec(req).map_err(|e| perr(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| perr(e.to_string()))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| perr(e.to_string()))?;
    if reply.is_empty() {
        return Err(perr("baton closed the connection without answering".into()));
    }
    serde_json::from_str(&reply).map_err(|e| perr(format!("bad reply: {e}")))
}
