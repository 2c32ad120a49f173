//! Framing of the control socket: one JSON object per line, with file
//! descriptors passed as `SCM_RIGHTS`.
//!
//! A message that carries fds says how many in its `fds` field, and the
//! sender attaches them to the `sendmsg` that carries the first byte of the
//! message's line. The receiver therefore queues every fd it receives, in
//! order, and pops `fds` of them for each complete line it parses: by the
//! time a line's newline has arrived, its fds have arrived too, and fds
//! belonging to later lines stay queued. Unknown message types are still
//! framed correctly (their `fds` are popped and dropped), so a newer peer
//! cannot desynchronise an older one.
//!
//! Both ends use it: the SDKs for the child's end, the supervisor for its
//! end of every generation's socket.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "io")]
mod io;
#[cfg(feature = "io")]
pub use crate::sys::{Received, recv_msg};
#[cfg(feature = "io")]
pub use io::{FrameReader, write_line, write_line_blocking};

/// Longest accepted line. Larger data (snapshots) travels in fds, never
/// inline, so this only guards against a broken peer.
pub const MAX_LINE: usize = 1 << 20;

/// Most fds that may wait for the rest of their line. Every protocol message
/// carries at most one, so a peer over this is broken or hostile.
pub const MAX_QUEUED_FDS: usize = 64;

/// A framing error on the control socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Reading or writing the socket failed.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A line grew beyond [`MAX_LINE`] without a newline.
    #[error("line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// The peer closed the socket in the middle of a line.
    #[error("peer closed the socket in the middle of a message")]
    Truncated,
    /// A line is not a JSON object. The line is consumed; the stream may
    /// continue, but fds it carried (if any) can no longer be matched.
    #[error("malformed message {line:?}: {reason}")]
    Malformed {
        /// The offending line (lossily decoded, at most 200 bytes).
        line: String,
        /// Why it was rejected.
        reason: String,
    },
    /// More than [`MAX_QUEUED_FDS`] fds arrived for lines not yet complete.
    /// They are closed, and the stream cannot be trusted any more.
    #[error("peer sent more than {MAX_QUEUED_FDS} fds ahead of their messages")]
    TooManyFds,
    /// A message announced more fds than were received with it: the peer
    /// broke the protocol and the stream cannot be trusted any more.
    #[error("message announces {wanted} fds but only {queued} were received")]
    MissingFds {
        /// The message's `fds` field.
        wanted: u64,
        /// Fds queued.
        queued: usize,
    },
}

impl WireError {
    /// Whether the stream is unusable after this error (everything except a
    /// malformed line).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, WireError::Malformed { .. })
    }
}

/// One received message: the JSON object and the fds that came with it.
#[derive(Debug)]
pub struct Frame {
    /// The parsed line.
    pub value: serde_json::Value,
    /// The fds the message's `fds` field announced, in order.
    pub fds: Vec<OwnedFd>,
}

impl Frame {
    /// Deserialises the message into a protocol type (e.g.
    /// [`SupervisorMsg`](crate::SupervisorMsg)).
    ///
    /// # Errors
    ///
    /// The serde error when the object is not a `T` (for example a message
    /// type this version does not know).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.value)
    }

    /// The message's `type` field, for logging.
    pub fn kind(&self) -> &str {
        self.value
            .get("type")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
    }
}

/// Reassembles lines from a byte stream and pairs them with the fds received
/// alongside (see the module docs). Pure: feed it with [`push`](Self::push).
#[derive(Debug, Default)]
pub struct LineDecoder {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl LineDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes and the fds received with them.
    pub fn push(&mut self, bytes: &[u8], fds: impl IntoIterator<Item = OwnedFd>) {
        self.buf.extend_from_slice(bytes);
        self.fds.extend(fds);
    }

    /// Fds received but not yet claimed by a message.
    pub fn queued_fds(&self) -> usize {
        self.fds.len()
    }

    /// Bytes of an incomplete line buffered.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, if one is buffered. Empty lines are
    /// skipped.
    ///
    /// # Errors
    ///
    /// [`WireError::LineTooLong`], [`WireError::Malformed`] (the line is
    /// consumed), or [`WireError::MissingFds`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        loop {
            let Some(nl) = self.buf.iter().position(|b| *b == b'\n') else {
                if self.buf.len() > MAX_LINE {
                    self.buf.clear();
                    self.fds.clear();
                    return Err(WireError::LineTooLong);
                }
                if self.buf.is_empty() {
                    // Fds travel with the first byte of their line, so with no partial
                    // line buffered, nothing can claim these any more: close them now
                    // (a message that announces no fds but carries some, say).
                    self.fds.clear();
                } else if self.fds.len() > MAX_QUEUED_FDS {
                    self.fds.clear();
                    return Err(WireError::TooManyFds);
                }
                return Ok(None);
            };
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = &line[..nl];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if line.len() > MAX_LINE {
                return Err(WireError::LineTooLong);
            }
            let malformed = |reason: String| WireError::Malformed {
                line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
                reason,
            };
            let value: serde_json::Value =
                serde_json::from_slice(line).map_err(|e| malformed(e.to_string()))?;
            if !value.is_object() {
                return Err(malformed("not a JSON object".to_owned()));
            }
            let wanted = match value.get("fds") {
                None | Some(serde_json::Value::Null) => 0,
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| malformed(format!("\"fds\" is {v}, not a count")))?,
            };
            if wanted > self.fds.len() as u64 {
                return Err(WireError::MissingFds {
                    wanted,
                    queued: self.fds.len(),
                });
            }
            // `wanted` <= queue length, so it fits in usize.
            let fds = self.fds.drain(..wanted as usize).collect();
            return Ok(Some(Frame { value, fds }));
        }
    }
}

/// Serialises a message as one line (JSON + `\n`).
///
/// # Errors
///
/// The serde error (not expected for the protocol types).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    Ok(line)
}

#[cfg(all(test, feature = "io"))]
mod tests;
