//! Adoption, new generation: connections the previous generation handed
//! over arrive per listener name, are checked to be connected streams of
//! the listener's kind, and join fresh accepts.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine;
use nix::sys::socket::{AddressFamily, SockType};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

use crate::stream::{Io, Stream};
use crate::sys;

/// A live connection handed over by the previous generation.
#[derive(Debug)]
pub(crate) struct AdoptedConn {
    pub(crate) fd: OwnedFd,
    pub(crate) buffered: Vec<u8>,
    pub(crate) meta: serde_json::Value,
}

/// Per listener name, the channel adopted connections wait in until the app
/// takes the receiving side with [`Baton::incoming`](crate::Baton::incoming).
#[derive(Debug, Default, Clone)]
pub(crate) struct AdoptRoutes {
    inner: Arc<Mutex<HashMap<String, Route>>>,
}

#[derive(Debug)]
struct Route {
    tx: mpsc::UnboundedSender<AdoptedConn>,
    rx: Option<mpsc::UnboundedReceiver<AdoptedConn>>,
}

impl Route {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Route { tx, rx: Some(rx) }
    }
}

impl AdoptRoutes {
    /// Queues a connection for `listener` (buffered until the app asks).
    pub(crate) fn deliver(&self, listener: &str, conn: AdoptedConn) {
        // The lock only guards map updates; a panic while holding it leaves
        // the map consistent, so poisoning is ignored.
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let route = map.entry(listener.to_owned()).or_insert_with(Route::new);
        if route.tx.send(conn).is_err() {
            tracing::warn!(
                listener,
                "adopted connection dropped: the app stopped taking them"
            );
        }
    }

    /// The receiving side for `listener`, once.
    pub(crate) fn take(&self, listener: &str) -> Option<mpsc::UnboundedReceiver<AdoptedConn>> {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(listener.to_owned())
            .or_insert_with(Route::new)
            .rx
            .take()
    }
}

/// Encodes bytes for the `buffered` field of `migrate` and `adopt`.
pub(crate) fn encode_buffered(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bytes read and not processed above this travel in a sealed memfd, not in the line
/// (lines are at most 1 MiB, and base64 grows them by a third).
pub(crate) const INLINE_BUFFERED: usize = 64 * 1024;

/// The `buffered` field for `bytes`, and the sealed memfd that carries them instead when
/// they are more than [`INLINE_BUFFERED`].
pub(crate) fn spill_buffered(bytes: Vec<u8>) -> crate::Result<(String, Option<OwnedFd>)> {
    if bytes.len() <= INLINE_BUFFERED {
        return Ok((encode_buffered(&bytes), None));
    }
    let (fd, _) = crate::codec::write_memfd(|w| {
        std::io::Write::write_all(w, &bytes).map_err(|e| format!("writing buffered bytes: {e}"))
    })?;
    Ok((String::new(), Some(fd)))
}

/// Decodes the `buffered` field of `migrate` and `adopt`, followed by the bytes of the
/// memfd that carries the rest when there were many.
pub(crate) fn decode_buffered(
    b64: &str,
    spilled: Option<OwnedFd>,
) -> std::result::Result<Vec<u8>, String> {
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("buffered is not base64: {e}"))?;
    if let Some(fd) = spilled {
        let seals = crate::sys::seals(fd.as_fd()).map_err(|e| format!("buffered memfd: {e}"))?;
        if !seals.contains(crate::sys::immutable_seals()) {
            return Err("buffered memfd is not sealed".into());
        }
        let mut file = std::fs::File::from(fd);
        // The writer's offset is at the end: the open file description is shared.
        std::io::Seek::rewind(&mut file)
            .and_then(|()| std::io::Read::read_to_end(&mut file, &mut bytes))
            .map_err(|e| format!("reading the buffered memfd: {e}"))?;
    }
    Ok(bytes)
}

/// Which kind of stream a listener yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcp,
    Unix,
}

/// Checks an adopted fd is a connected stream socket of `kind` and
/// registers it with tokio.
fn adopted_io(fd: OwnedFd, kind: Kind) -> io::Result<Io> {
    let info = sys::socket_info(fd.as_fd())?;
    let family_ok = match kind {
        Kind::Tcp => matches!(
            info.family,
            Some(AddressFamily::Inet | AddressFamily::Inet6)
        ),
        Kind::Unix => info.family == Some(AddressFamily::Unix),
    };
    let connected =
        info.ty == SockType::Stream && !info.listening && family_ok && sys::has_peer(fd.as_fd())?;
    if !connected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a connected {kind:?} stream: {info:?}"),
        ));
    }
    // The previous owner closed its copy after sending, so nobody else uses
    // this open file description.
    sys::ensure_nonblocking(fd.as_fd())?;
    Ok(match kind {
        Kind::Tcp => Io::Tcp(TcpStream::from_std(std::net::TcpStream::from(fd))?),
        Kind::Unix => Io::Unix(UnixStream::from_std(std::os::unix::net::UnixStream::from(
            fd,
        ))?),
    })
}

/// The connections handed over for one listener, as the app takes them.
#[derive(Debug)]
pub(crate) struct AdoptQueue {
    pub(crate) name: Arc<str>,
    pub(crate) kind: Kind,
    /// `None` when this process does not adopt, or stopped.
    pub(crate) rx: Option<mpsc::UnboundedReceiver<AdoptedConn>>,
}

impl AdoptQueue {
    /// The next usable adopted connection, waiting for one; `None` once none
    /// can come. Cancel-safe: a connection is only taken off the channel in
    /// the poll that returns it.
    pub(crate) async fn next(&mut self) -> Option<Stream> {
        loop {
            let rx = self.rx.as_mut()?;
            let Some(conn) = rx.recv().await else {
                self.rx = None;
                return None;
            };
            if let Some(stream) = self.check(conn) {
                return Some(stream);
            }
        }
    }

    /// The next usable adopted connection already queued, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Stream> {
        loop {
            let rx = self.rx.as_mut()?;
            match rx.try_recv() {
                Ok(conn) => {
                    if let Some(stream) = self.check(conn) {
                        return Some(stream);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.rx = None;
                    return None;
                }
            }
        }
    }

    /// An unusable fd is logged and dropped: it cannot be served, and the
    /// peer (if any) sees the close.
    fn check(&self, conn: AdoptedConn) -> Option<Stream> {
        match adopted_io(conn.fd, self.kind) {
            Ok(io) => {
                tracing::debug!(listener = %self.name, buffered = conn.buffered.len(), "adopted a connection");
                Some(Stream::new(
                    io,
                    Arc::clone(&self.name),
                    conn.buffered,
                    Some(conn.meta),
                ))
            }
            Err(e) => {
                tracing::warn!(listener = %self.name, error = %e, "skipping an unusable adopted connection");
                None
            }
        }
    }
}
