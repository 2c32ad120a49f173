//! Reading and writing frames on a Unix stream (tokio) and a blocking fd: the
//! part of the framing that needs a runtime and syscalls (feature `io`, on by
//! default).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::UnixStream;

use super::{Frame, LineDecoder, WireError};
use crate::sys;

/// Bytes read per `recvmsg`.
const READ_CHUNK: usize = 64 * 1024;

/// Writes one encoded line with `fds` attached to its first byte.
///
/// Not cancel-safe: dropping the future mid-line corrupts the stream, so run
/// it to completion (the SDK uses a single writer task).
///
/// # Errors
///
/// The I/O error (`EPIPE` when the peer is gone).
pub async fn write_line(
    stream: &UnixStream,
    line: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot send an empty line",
        ));
    }
    let mut off = 0;
    let mut fds = fds;
    while off < line.len() {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || {
            sys::send_with_fds(stream.as_fd(), &line[off..], fds)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                off += n;
                // The kernel attached the fds to the bytes just written.
                fds = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one encoded line without a runtime (no fds), waiting at most a
/// second at a time for room. For the first line on a fresh socket (the
/// child's `hello`), which must be on the socket before the child can say
/// READY.
///
/// # Errors
///
/// The I/O error, or `TimedOut` if the socket stays full.
pub fn write_line_blocking(fd: BorrowedFd<'_>, line: &[u8]) -> io::Result<()> {
    sys::write_all_blocking(fd, line)
}

/// Reads [`Frame`]s from a Unix stream socket.
#[derive(Debug)]
pub struct FrameReader {
    decoder: LineDecoder,
    chunk: Vec<u8>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new() -> Self {
        FrameReader {
            decoder: LineDecoder::new(),
            chunk: vec![0; READ_CHUNK],
        }
    }

    /// A reader that continues where another left off: the bytes of a partial
    /// line and the fds received with them, from [`FrameReader::into_parts`].
    pub fn from_parts(bytes: &[u8], fds: Vec<OwnedFd>) -> Self {
        let mut r = FrameReader::new();
        r.decoder.push(bytes, fds);
        r
    }

    /// What this reader holds that the stream no longer does: buffered bytes
    /// and the fds not yet claimed by a message (for handing the stream over).
    pub fn into_parts(self) -> (Vec<u8>, Vec<OwnedFd>) {
        (self.decoder.buf, self.decoder.fds.into_iter().collect())
    }

    /// The next message; `Ok(None)` at a clean end of stream.
    ///
    /// Cancel-safe: received data is buffered before any await point, so it
    /// can be used in `tokio::select!`.
    ///
    /// # Errors
    ///
    /// See [`WireError`]; after a fatal one ([`WireError::is_fatal`]) stop
    /// reading.
    pub async fn next(&mut self, stream: &UnixStream) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            stream.readable().await?;
            let mut fds = Vec::new();
            let chunk = &mut self.chunk;
            match stream.try_io(Interest::READABLE, || {
                sys::recv_with_fds(stream.as_fd(), chunk, &mut fds)
            }) {
                Ok(0) => {
                    if self.decoder.buffered() > 0
                        || self.decoder.queued_fds() > 0
                        || !fds.is_empty()
                    {
                        return Err(WireError::Truncated);
                    }
                    return Ok(None);
                }
                Ok(n) => self.decoder.push(&self.chunk[..n], fds),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
