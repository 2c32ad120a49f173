//! Connection migration: the old generation hands live connections over
//! (`migrate`), the new one adopts them (`adopt`) next to fresh accepts.
//! TCP and Unix stream connections both work: the hand-over is an fd, and the
//! adopting side checks it is a connected stream of its listener's kind.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use base64::Engine;
use nix::sys::socket::{AddressFamily, SockType};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::control::ControlTx;
use crate::error::{Error, Result};
use crate::sys;
use baton_protocol::ChildMsg;

/// A live connection handed over by the previous generation.
#[derive(Debug)]
pub(crate) struct AdoptedConn {
    pub(crate) fd: OwnedFd,
    pub(crate) buffered: Vec<u8>,
    pub(crate) meta: serde_json::Value,
}

/// Per listener name, the channel adopted connections wait in until the app
/// takes the receiving side with [`Baton::tcp_incoming`](crate::Baton::tcp_incoming)
/// or [`Baton::unix_incoming`](crate::Baton::unix_incoming).
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

    /// [`hand_over`](Self::hand_over) for a tokio Unix stream.
    ///
    /// # Errors
    ///
    /// As [`hand_over`](Self::hand_over), or [`Error::Io`] if the stream
    /// cannot be taken out of tokio.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # use baton_child::{Baton, Error};
    /// # async fn f(baton: &Baton, conn: tokio::net::UnixStream) -> Result<(), Error> {
    /// // At a request boundary, with nothing read that was not processed:
    /// baton
    ///     .migrator()
    ///     .hand_over_unix(conn, "admin", b"", serde_json::json!({"user": "alice"}))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn hand_over_unix(
        &self,
        stream: UnixStream,
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

/// A connection from [`TcpIncoming`] or [`UnixIncoming`] (`S` is the
/// tokio stream type: [`TcpStream`] by default, or
/// [`UnixStream`](tokio::net::UnixStream)).
#[derive(Debug)]
pub struct Accepted<S = TcpStream> {
    /// The connection; for an adopted one, the bytes the previous generation
    /// had read come first.
    pub stream: PrefixedStream<S>,
    /// `Some(meta)` when the connection was adopted from the previous
    /// generation (`meta` is what it sent), `None` when freshly accepted.
    pub adopted: Option<serde_json::Value>,
}

/// A stream type an adopted fd can become, after checking the fd is one.
trait Adoptable: Sized {
    /// What the fd must be, for the log when it is not.
    const WHAT: &'static str;
    /// Whether a socket of address family `family` can be this kind.
    fn family_ok(family: Option<AddressFamily>) -> bool;
    /// Registers the checked, non-blocking fd with tokio.
    fn register(fd: OwnedFd) -> io::Result<Self>;
}

impl Adoptable for TcpStream {
    const WHAT: &'static str = "a connected TCP stream";
    fn family_ok(family: Option<AddressFamily>) -> bool {
        matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6))
    }
    fn register(fd: OwnedFd) -> io::Result<Self> {
        TcpStream::from_std(std::net::TcpStream::from(fd))
    }
}

impl Adoptable for UnixStream {
    const WHAT: &'static str = "a connected Unix stream";
    fn family_ok(family: Option<AddressFamily>) -> bool {
        family == Some(AddressFamily::Unix)
    }
    fn register(fd: OwnedFd) -> io::Result<Self> {
        UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
    }
}

/// Checks an adopted fd is a connected stream socket of kind `S` and
/// registers it.
fn adopted_stream<S: Adoptable>(fd: OwnedFd) -> io::Result<S> {
    let info = sys::socket_info(fd.as_fd())?;
    let connected = info.ty == SockType::Stream
        && !info.listening
        && S::family_ok(info.family)
        && sys::has_peer(fd.as_fd())?;
    if !connected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not {}: {info:?}", S::WHAT),
        ));
    }
    // The previous owner closed its copy after sending, so nobody else uses
    // this open file description.
    sys::ensure_nonblocking(fd.as_fd())?;
    S::register(fd)
}

/// The connections handed over for one listener, as the app takes them.
#[derive(Debug)]
struct AdoptQueue {
    name: String,
    /// `None` when this process does not adopt, or stopped.
    rx: Option<mpsc::UnboundedReceiver<AdoptedConn>>,
}

impl AdoptQueue {
    /// The next usable adopted connection, waiting for one; `None` once none
    /// can come. Cancel-safe: a connection is only taken off the channel in
    /// the poll that returns it.
    async fn next<S: Adoptable>(&mut self) -> Option<Accepted<S>> {
        loop {
            let rx = self.rx.as_mut()?;
            let Some(conn) = rx.recv().await else {
                self.rx = None;
                return None;
            };
            if let Some(accepted) = self.check(conn) {
                return Some(accepted);
            }
        }
    }

    /// The next usable adopted connection already queued, without waiting.
    fn try_next<S: Adoptable>(&mut self) -> Option<Accepted<S>> {
        loop {
            let rx = self.rx.as_mut()?;
            match rx.try_recv() {
                Ok(conn) => {
                    if let Some(accepted) = self.check(conn) {
                        return Some(accepted);
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
    fn check<S: Adoptable>(&self, conn: AdoptedConn) -> Option<Accepted<S>> {
        match adopted_stream::<S>(conn.fd) {
            Ok(stream) => {
                tracing::debug!(
                    listener = %self.name,
                    buffered = conn.buffered.len(),
                    "adopted a connection"
                );
                Some(Accepted {
                    stream: PrefixedStream::new(conn.buffered, stream),
                    adopted: Some(conn.meta),
                })
            }
            Err(e) => {
                tracing::warn!(
                    listener = %self.name,
                    error = %e,
                    "skipping an unusable adopted connection"
                );
                None
            }
        }
    }
}

/// Defines `TcpIncoming` and `UnixIncoming`, which differ only in the socket
/// types, so that their behaviour (and documentation) cannot drift apart.
macro_rules! incoming {
    (
        $(#[$doc:meta])*
        $name:ident, $listener:ty, $stream:ty
    ) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name {
            listener: Option<$listener>,
            adopted: AdoptQueue,
        }

        impl $name {
            pub(crate) fn new(
                name: &str,
                listener: $listener,
                adopted: Option<mpsc::UnboundedReceiver<AdoptedConn>>,
            ) -> Self {
                $name {
                    listener: Some(listener),
                    adopted: AdoptQueue {
                        name: name.to_owned(),
                        rx: adopted,
                    },
                }
            }

            /// The listener, while accepting.
            pub fn listener(&self) -> Option<&$listener> {
                self.listener.as_ref()
            }

            /// Whether connections handed over by the previous generation
            /// arrive here (the `adopt` feature was announced, a supervisor
            /// is there, and [`stop`](Self::stop) was not called).
            pub fn adopts(&self) -> bool {
                self.adopted.rx.is_some()
            }

            /// Stops accepting: closes this process's listener fd (the
            /// socket stays open in the supervisor and the other
            /// generations) and stops adopting. Adopted connections not
            /// taken yet are closed as their fds drop; to serve them (or
            /// close them at a request boundary), take them first with
            /// [`try_accept_adopted`](Self::try_accept_adopted).
            pub fn stop(&mut self) {
                self.listener = None;
                self.adopted.rx = None;
            }

            /// The next connection, fresh or adopted. Cancel-safe. Never
            /// resolves after [`stop`](Self::stop).
            ///
            /// # Errors
            ///
            /// The `accept` error (e.g. `EMFILE`); the caller decides
            /// whether to back off. An adopted fd that is not a connected
            /// stream socket of this kind is logged and skipped.
            pub async fn accept(&mut self) -> io::Result<Accepted<$stream>> {
                let fresh = async {
                    match &self.listener {
                        Some(l) => l.accept().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    res = fresh => {
                        let (stream, _) = res?;
                        let stream = PrefixedStream::new(Vec::new(), stream);
                        Ok(Accepted { stream, adopted: None })
                    }
                    Some(accepted) = self.adopted.next::<$stream>() => Ok(accepted),
                }
            }

            /// The next connection handed over by the previous generation,
            /// waiting for one; never a fresh one from the listener.
            /// Cancel-safe. `None` when none can come: see
            /// [`adopts`](Self::adopts).
            pub async fn accept_adopted(&mut self) -> Option<Accepted<$stream>> {
                self.adopted.next().await
            }

            /// An adopted connection that has already arrived, without
            /// waiting; never a fresh one. `None` when none is queued.
            ///
            /// For a drain: once the drain (or commit) message is seen,
            /// every connection the supervisor handed to this process is
            /// queued already (it relays them on the same control stream,
            /// before the drain), so taking them until `None` gets them
            /// all, to hand on or close at a request boundary, while fresh
            /// connections stay in the kernel queue for the successor.
            ///
            /// # Example
            ///
            /// ```no_run
            #[doc = concat!("# async fn f(mut incoming: baton_child::", stringify!($name), ") {")]
            /// while let Some(conn) = incoming.try_accept_adopted() {
            ///     // Serve `conn` to its next request boundary, then close it
            ///     // or hand it on.
            ///     # drop(conn);
            /// }
            /// incoming.stop();
            /// # }
            /// ```
            pub fn try_accept_adopted(&mut self) -> Option<Accepted<$stream>> {
                self.adopted.try_next()
            }
        }
    };
}

incoming! {
    /// Fresh TCP connections from a listener merged with connections adopted
    /// from the previous generation (see [`Baton::tcp_incoming`](crate::Baton::tcp_incoming)).
    TcpIncoming, TcpListener, TcpStream
}

incoming! {
    /// Fresh Unix stream connections from a listener merged with connections
    /// adopted from the previous generation (see
    /// [`Baton::unix_incoming`](crate::Baton::unix_incoming)).
    UnixIncoming, UnixListener, UnixStream
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{child, recv, send, BOUND};
    use crate::Baton;
    use baton_protocol::wire::FrameReader;
    use baton_protocol::{Feature, SupervisorMsg};
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
        assert!(!incoming.adopts());
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

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("baton-migrate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The Unix counterpart of `a_live_connection_moves_between_generations`:
    /// through the real control sockets, with a half-read request and
    /// metadata, onto a listener the new generation binds itself.
    #[tokio::test]
    async fn a_live_unix_connection_moves_between_generations() {
        let dir = tmpdir("unix-move");
        let (old, old_sup) = child(Baton::builder(), 1);
        let (mut new, new_sup) = child(Baton::builder().adopt(), 2);
        let (mut old_r, mut new_r) = (FrameReader::new(), FrameReader::new());
        recv(&mut old_r, &old_sup).await;
        recv(&mut new_r, &new_sup).await;
        let mut incoming = new.unix_incoming("kv", dir.join("new.sock")).unwrap();
        assert!(incoming.adopts());

        // The old generation's listener and connection, with half a command read.
        let listener = UnixListener::bind(dir.join("old.sock")).unwrap();
        let mut client = UnixStream::connect(dir.join("old.sock")).await.unwrap();
        let (mut server_side, _) = listener.accept().await.unwrap();
        client.write_all(b"*1\r\n$4\r\nPI").await.unwrap();
        let mut head = [0u8; 10];
        server_side.read_exact(&mut head).await.unwrap();
        old.migrator()
            .hand_over_unix(server_side, "kv", &head, serde_json::json!({"name": "c1"}))
            .await
            .unwrap();
        drop(listener);

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
        assert_eq!(listener, "kv");
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

        // Only adopted connections: the adopted one comes, although a fresh
        // client waits on the new listener too.
        let _fresh = UnixStream::connect(dir.join("new.sock")).await.unwrap();
        let conn = tokio::time::timeout(BOUND, incoming.accept_adopted())
            .await
            .unwrap()
            .expect("adopted connection");
        assert_eq!(conn.adopted, Some(serde_json::json!({"name": "c1"})));
        let mut stream = conn.stream;
        client.write_all(b"NG\r\n").await.unwrap();
        let mut got = [0u8; 14];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"*1\r\n$4\r\nPING\r\n");
        stream.write_all(b"+PONG\r\n").await.unwrap();
        let mut pong = [0u8; 7];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
        // The fresh client is still there for `accept`.
        let fresh = tokio::time::timeout(BOUND, incoming.accept())
            .await
            .unwrap()
            .unwrap();
        assert!(fresh.adopted.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Routes adopted connections for `kv` into a fresh incoming of each kind.
    fn routed(dir: &std::path::Path) -> (AdoptRoutes, TcpIncoming, UnixIncoming) {
        let tcp_routes = AdoptRoutes::default();
        let tcp = TcpIncoming::new(
            "web",
            TcpListener::from_std({
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .unwrap(),
            tcp_routes.take("web"),
        );
        let unix = UnixIncoming::new(
            "kv",
            UnixListener::bind(dir.join("kv.sock")).unwrap(),
            tcp_routes.take("kv"),
        );
        (tcp_routes, tcp, unix)
    }

    fn adopted(fd: impl Into<OwnedFd>, buffered: &[u8]) -> AdoptedConn {
        AdoptedConn {
            fd: fd.into(),
            buffered: buffered.to_vec(),
            meta: serde_json::json!(buffered.len()),
        }
    }

    /// Each incoming takes only connected stream sockets of its own kind;
    /// anything else is closed and skipped, and the next good one comes.
    #[tokio::test]
    async fn adopted_fds_are_checked_for_kind_and_connection() {
        let dir = tmpdir("unix-check");
        let (routes, mut tcp, mut unix) = routed(&dir);

        // Unusable for `kv` (Unix): a TCP connection, a listening Unix
        // socket, a never-connected Unix stream socket, a datagram pair, a
        // file. Then a good one.
        let tl = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_conn = std::net::TcpStream::connect(tl.local_addr().unwrap()).unwrap();
        let unix_listener = std::os::unix::net::UnixListener::bind(dir.join("l.sock")).unwrap();
        let lone = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let (dgram, _dgram_peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let (good, mut good_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        for conn in [
            adopted(tcp_conn, b"a"),
            adopted(unix_listener, b"bb"),
            adopted(lone, b"ccc"),
            adopted(dgram, b"dddd"),
            adopted(file, b"eeeee"),
            adopted(good, b"ffffff"),
        ] {
            routes.deliver("kv", conn);
        }
        let conn = unix.try_accept_adopted().expect("the good one");
        assert_eq!(conn.adopted, Some(serde_json::json!(6)));
        assert!(unix.try_accept_adopted().is_none());
        // It is usable, prefix first.
        let mut stream = conn.stream;
        std::io::Write::write_all(&mut good_peer, b"!").unwrap();
        let mut got = [0u8; 7];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ffffff!");

        // Unusable for `web` (TCP): a Unix stream, a listening TCP socket.
        // Then a good one.
        let (u, _u_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let tcp_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good = std::net::TcpStream::connect(tl.local_addr().unwrap()).unwrap();
        routes.deliver("web", adopted(u, b"1"));
        routes.deliver("web", adopted(tcp_listener, b"22"));
        routes.deliver("web", adopted(good, b"333"));
        let conn = tokio::time::timeout(BOUND, tcp.accept())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(conn.adopted, Some(serde_json::json!(3)));
        assert!(tcp.try_accept_adopted().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `try_accept_adopted` never takes a fresh connection, and never
    /// waits; `accept_adopted` waits for the next adopted one; after `stop`
    /// (or without the feature) there are none.
    #[tokio::test]
    async fn adopted_only_accepts_leave_fresh_connections_queued() {
        let dir = tmpdir("unix-adopted-only");
        let (routes, _tcp, mut unix) = routed(&dir);
        let path = dir.join("kv.sock");
        let _fresh = UnixStream::connect(&path).await.unwrap();
        assert!(
            unix.try_accept_adopted().is_none(),
            "fresh ones stay queued"
        );

        // accept_adopted waits for one, and only that one arrives.
        let (a, _a_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let waiting = tokio::spawn(async move {
            let got = unix.accept_adopted().await.map(|c| c.adopted);
            (unix, got)
        });
        routes.deliver("kv", adopted(a, b"x"));
        let (mut unix, got) = tokio::time::timeout(BOUND, waiting).await.unwrap().unwrap();
        assert_eq!(got, Some(Some(serde_json::json!(1))));

        // Several queued: all of them, in order, then None.
        let mut peers = Vec::new();
        for i in 0..3 {
            let (s, p) = std::os::unix::net::UnixStream::pair().unwrap();
            peers.push(p);
            routes.deliver("kv", adopted(s, &vec![b'q'; i + 1]));
        }
        for i in 0..3 {
            let c = unix
                .try_accept_adopted()
                .expect("queued adopted connection");
            assert_eq!(c.adopted, Some(serde_json::json!(i + 1)));
        }
        assert!(unix.try_accept_adopted().is_none());

        // The fresh client is still in the kernel queue.
        let fresh = tokio::time::timeout(BOUND, unix.accept())
            .await
            .unwrap()
            .unwrap();
        assert!(fresh.adopted.is_none());

        unix.stop();
        assert!(!unix.adopts());
        assert!(unix.listener().is_none());
        assert!(unix.try_accept_adopted().is_none());
        assert!(unix.accept_adopted().await.is_none());
        let _ = std::fs::remove_dir_all(&dir);
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
