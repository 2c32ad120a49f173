//! Hand-over, old generation: a live connection goes to the successor at a
//! request boundary, with the bytes read from it but not processed.

use baton_protocol::ChildMsg;
use serde::Serialize;

use crate::adopt;
use crate::baton::Baton;
use crate::error::{Error, Result};
use crate::stream::Stream;

impl Baton {
    /// Hands `stream` to the next generation: the supervisor relays it, and
    /// it comes out of the successor's [`Incoming`](crate::Incoming) for the
    /// same listener, reading `already_read` first (after any bytes of its
    /// own prefix not read yet), with `meta` as
    /// [`Stream::adopted`]. Resolves once the message is on the socket, so
    /// the process may exit right after; our copy of the socket is closed.
    ///
    /// Call it when [`DrainInfo::migrate`](crate::DrainInfo::migrate) is
    /// true, at a request boundary.
    ///
    /// # Errors
    ///
    /// [`Error::ControlClosed`] if there is no supervisor to hand over to
    /// (the connection is closed; the client sees a clean close),
    /// [`Error::Protocol`] if `meta` cannot be serialised, [`Error::Io`] if
    /// the socket cannot be taken out of tokio.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: baton_child::Baton, stream: baton_child::Stream) -> Result<(), baton_child::Error> {
    /// // At a request boundary, with nothing read that was not processed:
    /// baton.hand_over(stream, b"", &serde_json::json!({"user": "alice"})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn hand_over(
        &self,
        stream: Stream,
        already_read: &[u8],
        meta: &impl Serialize,
    ) -> Result<()> {
        let control = self.inner.control.as_ref().ok_or(Error::ControlClosed)?;
        let meta = serde_json::to_value(meta).map_err(|e| Error::Protocol(e.to_string()))?;
        let listener = stream.listener().to_owned();
        let (fd, mut buffered) = stream
            .into_fd()
            .map_err(|e| Error::io("taking the connection out of tokio", e))?;
        buffered.extend_from_slice(already_read);
        let (buffered, spilled) = adopt::spill_buffered(buffered)?;
        let fds: Vec<_> = std::iter::once(fd).chain(spilled).collect();
        let msg = ChildMsg::Migrate {
            fds: fds.len() as u32,
            listener,
            buffered,
            meta,
        };
        control.send_fds_and_wait(&msg, fds).await
    }
}
