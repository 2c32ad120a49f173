//! [`Incoming`]: one listener, TCP or Unix, merged with the connections the
//! previous generation hands over on it.

use std::io;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use crate::adopt::{AdoptQueue, AdoptedConn, Kind};
use crate::error::{Error, Result};
use crate::listeners::Listening;
use crate::stream::{Io, Stream};

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Fresh connections from one listener merged with connections adopted
/// from the previous generation. Get it from
/// [`Baton::incoming`](crate::Baton::incoming).
///
/// # Example
///
/// ```no_run
/// # async fn f(baton: baton_child::Baton) -> Result<(), baton_child::Error> {
/// let mut incoming = baton.incoming("http", "127.0.0.1:8080")?;
/// baton.ready()?;
/// while let Ok(stream) = incoming.accept().await {
///     // `stream` reads the bytes the previous generation had read first;
///     // `stream.adopted()` is its metadata, or `None` when fresh.
///     # drop(stream);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Incoming {
    listener: Option<Listener>,
    adopted: AdoptQueue,
}

impl Incoming {
    pub(crate) fn new(
        name: &str,
        listening: Listening,
        adopted: Option<mpsc::UnboundedReceiver<AdoptedConn>>,
    ) -> Result<Self> {
        let register = |e| Error::io(format!("listener {name:?}: registering with tokio"), e);
        let (listener, kind) = match listening {
            Listening::Tcp(l) => (
                Listener::Tcp(TcpListener::from_std(l).map_err(register)?),
                Kind::Tcp,
            ),
            Listening::Unix(l) => (
                Listener::Unix(UnixListener::from_std(l).map_err(register)?),
                Kind::Unix,
            ),
        };
        Ok(Incoming {
            listener: Some(listener),
            adopted: AdoptQueue {
                name: Arc::from(name),
                kind,
                rx: adopted,
            },
        })
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.adopted.name
    }

    /// The address this listener is bound to, in the fallback syntax:
    /// `HOST:PORT`, or `unix:PATH` (`unix:` alone for an unnamed socket).
    /// `None` after [`stop`](Self::stop) or if the socket cannot say.
    pub fn local_addr(&self) -> Option<String> {
        match self.listener.as_ref()? {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.to_string()),
            Listener::Unix(l) => {
                let a = l.local_addr().ok()?;
                let path = a.as_pathname().map(|p| p.display().to_string());
                Some(format!("unix:{}", path.unwrap_or_default()))
            }
        }
    }

    /// Whether connections handed over by the previous generation arrive
    /// here: the `adopt` feature was announced, a supervisor is there, and
    /// [`stop`](Self::stop) was not called.
    pub fn adopts(&self) -> bool {
        self.adopted.rx.is_some()
    }

    /// Stops accepting: closes this process's listener fd (the socket stays
    /// open in the supervisor and the other generations) and stops adopting.
    /// Adopted connections not taken yet are closed as their fds drop; to
    /// serve them (or close them at a request boundary), take them first
    /// with [`try_accept_adopted`](Self::try_accept_adopted).
    pub fn stop(&mut self) {
        self.listener = None;
        self.adopted.rx = None;
    }

    /// The next connection, fresh or adopted. Cancel-safe. Never resolves
    /// after [`stop`](Self::stop).
    ///
    /// # Errors
    ///
    /// The `accept` error (e.g. `EMFILE`); the caller decides whether to
    /// back off. An adopted fd that is not a connected stream socket of this
    /// listener's kind is logged and skipped.
    pub async fn accept(&mut self) -> io::Result<Stream> {
        let name = Arc::clone(&self.adopted.name);
        let fresh = async {
            match &self.listener {
                Some(Listener::Tcp(l)) => l.accept().await.map(|(s, _)| Io::Tcp(s)),
                Some(Listener::Unix(l)) => l.accept().await.map(|(s, _)| Io::Unix(s)),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            io = fresh => Ok(Stream::new(io?, name, Vec::new(), None)),
            Some(stream) = self.adopted.next() => Ok(stream),
        }
    }

    /// The next connection handed over by the previous generation, waiting
    /// for one; never a fresh one. Cancel-safe. `None` when none can come:
    /// see [`adopts`](Self::adopts).
    pub async fn accept_adopted(&mut self) -> Option<Stream> {
        self.adopted.next().await
    }

    /// An adopted connection that has already arrived, without waiting;
    /// never a fresh one. `None` when none is queued.
    ///
    /// For a drain: once the drain (or commit) is seen, every connection the
    /// supervisor handed to this process is queued already (it relays them
    /// on the same control stream, before the drain), so taking them until
    /// `None` gets them all, to hand on or close at a request boundary,
    /// while fresh connections stay in the kernel queue for the successor.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(mut incoming: baton_child::Incoming) {
    /// while let Some(stream) = incoming.try_accept_adopted() {
    ///     // Serve `stream` to its next request boundary, then close it or
    ///     // hand it on.
    ///     # drop(stream);
    /// }
    /// incoming.stop();
    /// # }
    /// ```
    pub fn try_accept_adopted(&mut self) -> Option<Stream> {
        self.adopted.try_next()
    }
}
