//! Connection migration: the old generation hands live connections over
//! (`migrate`), the new one adopts them (`adopt`) next to fresh accepts.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::control::ControlTx;
use crate::error::{Error, Result};
use crate::protocol::ChildMsg;
use crate::sys;

/// A live connection handed over by the previous generation.
#[derive(Debug)]
pub(crate) struct AdoptedConn {
    pub(crate) fd: OwnedFd,
    pub(crate) buffered: Vec<u8>,
    pub(crate) meta: serde_json::Value,
}

/// Per listener name, the channel adopted connections wait in until the app
/// takes the receiving side with [`Baton::tcp_incoming`](crate::Baton::tcp_incoming).
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

/// Decodes the `buffered` field of `adopt`.
pub(crate) fn decode_buffered(b64: &str) -> std::result::Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("buffered is not base64: {e}"))
}

/// Hands live connections to the next generation (old side). Cloneable.
///
/// Use it when [`DrainInfo::migrate`](crate::DrainInfo::migrate) is true, at
/// a request boundary of each connection.
#[derive(Debug, Clone)]
pub struct Migrator {
    control: Option<ControlTx>,
}

impl Migrator {
    pub(crate) fn new(control: Option<ControlTx>) -> Self {
        Migrator { control }
    }

    /// Whether hand-over is possible at all (a control socket is open).
    pub fn is_available(&self) -> bool {
        self.control.is_some()
    }

    /// Sends the connection `fd` (accepted on `listener`) with the bytes read
    /// from it but not processed, and app metadata, to the supervisor, which
    /// relays it to the newest generation. Resolves once the message is
    /// written, so the process may exit right after; our copy of the fd is
    /// closed then.
    ///
    /// # Errors
    ///
    /// [`Error::ControlClosed`] if there is no supervisor to hand over to
    /// (the connection is closed; the client sees a clean close).
    pub async fn hand_over(
        &self,
        fd: OwnedFd,
        listener: &str,
        buffered: &[u8],
        meta: serde_json::Value,
    ) -> Result<()> {
        let control = self.control.as_ref().ok_or(Error::ControlClosed)?;
        let msg = ChildMsg::Migrate {
            fds: 1,
            listener: listener.to_owned(),
            buffered: base64::engine::general_purpose::STANDARD.encode(buffered),
            meta,
        };
        control.send_and_wait(&msg, Some(fd)).await
    }

    /// [`hand_over`](Self::hand_over) for a tokio TCP stream.
    ///
    /// # Errors
    ///
    /// As [`hand_over`](Self::hand_over), or [`Error::Io`] if the stream
    /// cannot be taken out of tokio.
    pub async fn hand_over_tcp(
        &self,
        stream: TcpStream,
        listener: &str,
        buffered: &[u8],
        meta: serde_json::Value,
    ) -> Result<()> {
        let std = stream
            .into_std()
            .map_err(|e| Error::io("taking the connection out of tokio", e))?;
        self.hand_over(OwnedFd::from(std), listener, buffered, meta)
            .await
    }
}

/// A stream that first yields bytes read earlier (by the previous
/// generation, or by an HTTP library before a hand-over), then reads from
/// the socket. Writes go straight to the socket.
#[derive(Debug)]
pub struct PrefixedStream<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> PrefixedStream<S> {
    /// Wraps `inner`, to be read after `prefix`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        PrefixedStream {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream and the prefix bytes not read yet.
    pub fn into_parts(mut self) -> (S, Vec<u8>) {
        let rest = self.prefix.split_off(self.pos);
        (self.inner, rest)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
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
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A connection from [`TcpIncoming::accept`].
#[derive(Debug)]
pub struct Accepted {
    /// The connection; for an adopted one, the bytes the previous generation
    /// had read come first.
    pub stream: PrefixedStream<TcpStream>,
    /// `Some(meta)` when the connection was adopted from the previous
    /// generation (`meta` is what it sent), `None` when freshly accepted.
    pub adopted: Option<serde_json::Value>,
}

/// Fresh connections from a listener merged with connections adopted from
/// the previous generation (see [`Baton::tcp_incoming`](crate::Baton::tcp_incoming)).
#[derive(Debug)]
pub struct TcpIncoming {
    name: String,
    listener: Option<TcpListener>,
    adopted: Option<mpsc::UnboundedReceiver<AdoptedConn>>,
}

impl TcpIncoming {
    pub(crate) fn new(
        name: &str,
        listener: TcpListener,
        adopted: Option<mpsc::UnboundedReceiver<AdoptedConn>>,
    ) -> Self {
        TcpIncoming {
            name: name.to_owned(),
            listener: Some(listener),
            adopted,
        }
    }

    /// The listener, while accepting.
    pub fn listener(&self) -> Option<&TcpListener> {
        self.listener.as_ref()
    }

    /// Stops accepting: closes this process's listener fd (the socket stays
    /// open in the supervisor and the other generations) and stops adopting.
    pub fn stop(&mut self) {
        self.listener = None;
        self.adopted = None;
    }

    /// The next connection, fresh or adopted. Cancel-safe. Never resolves
    /// after [`stop`](Self::stop).
    ///
    /// # Errors
    ///
    /// The `accept` error (e.g. `EMFILE`); the caller decides whether to
    /// back off. An adopted fd that is not a connected TCP socket is logged
    /// and skipped.
    pub async fn accept(&mut self) -> io::Result<Accepted> {
        loop {
            let adopted = async {
                match &mut self.adopted {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let fresh = async {
                match &self.listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                res = fresh => {
                    let (stream, _) = res?;
                    return Ok(Accepted { stream: PrefixedStream::new(Vec::new(), stream), adopted: None });
                }
                conn = adopted => {
                    let Some(conn) = conn else {
                        self.adopted = None;
                        continue;
                    };
                    match adopted_tcp(conn.fd) {
                        Ok(stream) => {
                            tracing::debug!(listener = %self.name, buffered = conn.buffered.len(), "adopted a connection");
                            return Ok(Accepted {
                                stream: PrefixedStream::new(conn.buffered, stream),
                                adopted: Some(conn.meta),
                            });
                        }
                        Err(e) => tracing::warn!(listener = %self.name, error = %e, "skipping an unusable adopted connection"),
                    }
                }
            }
        }
    }
}

/// Checks an adopted fd is a connected TCP stream and registers it.
fn adopted_tcp(fd: OwnedFd) -> io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockType};
    let info = sys::socket_info(fd.as_fd())?;
    if info.ty != SockType::Stream
        || info.listening
        || !matches!(
            info.family,
            Some(AddressFamily::Inet | AddressFamily::Inet6)
        )
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a connected TCP stream: {info:?}"),
        ));
    }
    // The previous owner closed its copy after sending, so nobody else uses
    // this open file description.
    sys::ensure_nonblocking(fd.as_fd())?;
    TcpStream::from_std(std::net::TcpStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Feature, SupervisorMsg};
    use crate::testutil::{child, recv, send, BOUND};
    use crate::wire::FrameReader;
    use crate::Baton;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A live TCP connection goes from one SDK child to another through a
    /// relaying "supervisor"; the client never notices.
    #[tokio::test]
    async fn a_live_connection_moves_between_generations() {
        let (old, old_sup) = child(Baton::builder(), 1);
        let (mut new, new_sup) = child(Baton::builder().adopt(), 2);
        let (mut old_r, mut new_r) = (FrameReader::new(), FrameReader::new());
        recv(&mut old_r, &old_sup).await;
        let (hello, _) = recv(&mut new_r, &new_sup).await;
        assert_eq!(
            hello,
            ChildMsg::Hello {
                protocol: 1,
                features: vec![Feature::Adopt]
            }
        );
        let mut incoming = new.tcp_incoming("http", "127.0.0.1:0").unwrap();

        // The old generation's connection, with half a request read.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        client.write_all(b"GET / HT").await.unwrap();
        let mut head = [0u8; 8];
        let mut server_side = server_side;
        server_side.read_exact(&mut head).await.unwrap();
        old.migrator()
            .hand_over_tcp(
                server_side,
                "http",
                &head,
                serde_json::json!({"requests": 2}),
            )
            .await
            .unwrap();

        // The relay: migrate from the old one becomes adopt for the new one.
        let (msg, mut fds) = recv(&mut old_r, &old_sup).await;
        let ChildMsg::Migrate {
            fds: 1,
            listener,
            buffered,
            meta,
        } = msg
        else {
            panic!("expected migrate, got {msg:?}");
        };
        assert_eq!(listener, "http");
        let fd = fds.remove(0);
        send(
            &new_sup,
            &SupervisorMsg::Adopt {
                fds: 1,
                listener,
                buffered,
                meta,
            },
            Some(&fd),
        )
        .await;
        drop(fd);

        let conn = tokio::time::timeout(BOUND, incoming.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(conn.adopted, Some(serde_json::json!({"requests": 2})));
        let mut stream = conn.stream;
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        let mut got = [0u8; 16];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        stream.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }

    #[tokio::test]
    async fn adoption_without_the_feature_or_supervisor() {
        // Not announced: no adopted connections are routed.
        let (mut plain, sup) = child(Baton::builder(), 2);
        let mut r = FrameReader::new();
        recv(&mut r, &sup).await;
        let incoming = plain.tcp_incoming("http", "127.0.0.1:0").unwrap();
        assert!(incoming.adopted.is_none());
        // Standalone: there is nobody to hand over to.
        let standalone = Baton::builder()
            .handle_signals(false)
            .start(crate::Env::standalone())
            .unwrap();
        let m = standalone.migrator();
        assert!(!m.is_available());
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            m.hand_over(f.into(), "http", b"", serde_json::Value::Null)
                .await,
            Err(Error::ControlClosed)
        ));
    }

    #[tokio::test]
    async fn prefixed_stream_reads_the_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut s = PrefixedStream::new(b"hello".to_vec(), a);
        let mut one = [0u8; 3];
        s.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"hel");
        let (inner, rest) = s.into_parts();
        assert_eq!(rest, b"lo");
        let mut s = PrefixedStream::new(rest, inner);
        let mut all = String::new();
        s.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "lo world");
    }

    #[test]
    fn buffered_base64() {
        assert_eq!(decode_buffered("aGk=").unwrap(), b"hi");
        assert_eq!(decode_buffered("").unwrap(), b"");
        assert!(decode_buffered("***").is_err());
    }
}
