//! [`Stream`]: one connection type for TCP and Unix, fresh or adopted.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// The socket under a [`Stream`].
#[derive(Debug)]
pub(crate) enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A connection from an [`Incoming`](crate::Incoming): freshly accepted, or
/// adopted from the previous generation with the bytes it had read.
///
/// Reading yields those bytes first, then reads the socket; writes go
/// straight to the socket. Hand it to the next generation with
/// [`Baton::hand_over`](crate::Baton::hand_over).
#[derive(Debug)]
pub struct Stream {
    prefix: Vec<u8>,
    pos: usize,
    io: Io,
    listener: Arc<str>,
    adopted: Option<serde_json::Value>,
}

impl Stream {
    pub(crate) fn new(
        io: Io,
        listener: Arc<str>,
        prefix: Vec<u8>,
        adopted: Option<serde_json::Value>,
    ) -> Self {
        Stream {
            prefix,
            pos: 0,
            io,
            listener,
            adopted,
        }
    }

    /// A fresh TCP connection the app accepted itself (on a socket from
    /// [`Baton::take_listener_fd`](crate::Baton::take_listener_fd), say), to
    /// serve and hand over like one from an [`Incoming`](crate::Incoming)
    /// called `listener`.
    pub fn from_tcp(listener: &str, stream: TcpStream) -> Self {
        Stream::new(Io::Tcp(stream), Arc::from(listener), Vec::new(), None)
    }

    /// [`from_tcp`](Self::from_tcp) for a Unix connection.
    pub fn from_unix(listener: &str, stream: UnixStream) -> Self {
        Stream::new(Io::Unix(stream), Arc::from(listener), Vec::new(), None)
    }

    /// The name of the listener this connection came in on.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// The metadata the previous generation sent with it, when adopted;
    /// `None` for a fresh connection.
    pub fn adopted(&self) -> Option<&serde_json::Value> {
        self.adopted.as_ref()
    }

    /// The TCP socket, for options such as `set_nodelay`; `None` for Unix.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match &self.io {
            Io::Tcp(s) => Some(s),
            Io::Unix(_) => None,
        }
    }

    /// The Unix socket, for `peer_cred` and friends; `None` for TCP.
    pub fn unix(&self) -> Option<&UnixStream> {
        match &self.io {
            Io::Unix(s) => Some(s),
            Io::Tcp(_) => None,
        }
    }

    /// Puts `bytes` back in front of what is left to read: a server that stopped at a
    /// request boundary with part of the next request read resumes with it.
    #[cfg_attr(not(feature = "hyper"), allow(dead_code))]
    pub(crate) fn unread(mut self, bytes: &[u8]) -> Stream {
        if !bytes.is_empty() {
            let mut prefix = bytes.to_vec();
            prefix.extend_from_slice(&self.prefix[self.pos..]);
            self.prefix = prefix;
            self.pos = 0;
        }
        self
    }

    /// The socket out of tokio, and the prefix bytes not read yet.
    pub(crate) fn into_fd(mut self) -> io::Result<(OwnedFd, Vec<u8>)> {
        let rest = self.prefix.split_off(self.pos);
        let fd = match self.io {
            Io::Tcp(s) => OwnedFd::from(s.into_std()?),
            Io::Unix(s) => OwnedFd::from(s.into_std()?),
        };
        Ok((fd, rest))
    }

    fn io(self: Pin<&mut Self>) -> Pin<&mut (dyn AsyncRw + Unpin)> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s as &mut (dyn AsyncRw + Unpin)),
            Io::Unix(s) => Pin::new(s as &mut (dyn AsyncRw + Unpin)),
        }
    }
}

trait AsyncRw: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncRw for T {}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_the_prefix_first_then_the_socket() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Stream::new(Io::Unix(a), "t".into(), b"hel".to_vec(), None);
        b.write_all(b"lo").await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
        assert!(s.unix().is_some() && s.tcp().is_none());
    }

    #[tokio::test]
    async fn into_fd_keeps_the_unread_prefix() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Stream::new(Io::Unix(a), "t".into(), b"abcd".to_vec(), None);
        let mut two = [0u8; 2];
        s.read_exact(&mut two).await.unwrap();
        let (_fd, rest) = s.into_fd().unwrap();
        assert_eq!(rest, b"cd");
    }

    #[tokio::test]
    async fn unread_bytes_come_back_first_then_the_rest() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Stream::new(Io::Unix(a), "t".into(), b"abcd".to_vec(), None);
        let mut two = [0u8; 2];
        s.read_exact(&mut two).await.unwrap();
        let mut s = s.unread(b"XY");
        tokio::io::AsyncWriteExt::write_all(&mut b, b"ef")
            .await
            .unwrap();
        let mut six = [0u8; 6];
        s.read_exact(&mut six).await.unwrap();
        assert_eq!(&six, b"XYcdef");
    }
}
