//! [`Baton`], the SDK's entry point, and its [`Builder`].

use std::fmt;
use std::net::ToSocketAddrs;
use std::os::fd::OwnedFd;
use std::path::Path;

use crate::conns::{ConnGuard, Connections};
use crate::control::{self, ControlTx, Dispatch};
use crate::drain::{self, Drain, DrainTrigger};
use crate::env::Env;
use crate::error::{Error, Result};
use crate::listeners::{ListenerKind, Listeners};
use crate::migrate::{AdoptRoutes, Migrator, TcpIncoming, UnixIncoming};
use crate::notify::Notifier;
use crate::state::{StateHandle, StateMsg};
use baton_protocol::{ChildMsg, Feature, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

/// Configures a [`Baton`] before it says hello to the supervisor.
#[derive(Debug, Clone)]
pub struct Builder {
    features: Vec<Feature>,
    signals: bool,
    exit_on_second_signal: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            features: Vec::new(),
            signals: true,
            exit_on_second_signal: true,
        }
    }
}

impl Builder {
    /// Announces the `state` feature: this program takes part in stateful
    /// upgrades (`baton run --state`) through [`Baton::state`]. A stateful
    /// candidate must call [`StateHandle::restore`] before it becomes ready.
    pub fn stateful(mut self) -> Self {
        if !self.features.contains(&Feature::State) {
            self.features.push(Feature::State);
        }
        self
    }

    /// Announces the `adopt` feature: connections the previous generation
    /// hands over arrive through [`Baton::tcp_incoming`] or
    /// [`Baton::unix_incoming`], next to fresh accepts.
    pub fn adopt(mut self) -> Self {
        if !self.features.contains(&Feature::Adopt) {
            self.features.push(Feature::Adopt);
        }
        self
    }

    /// Whether SIGTERM and SIGINT start a drain (default: yes). Turn it off
    /// if the application handles these signals itself.
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.signals = yes;
        self
    }

    /// Whether a second SIGTERM/SIGINT exits the process at once (default:
    /// yes), so an operator can stop a process that waits for idle
    /// keep-alive connections.
    pub fn exit_on_second_signal(mut self, yes: bool) -> Self {
        self.exit_on_second_signal = yes;
        self
    }

    /// [`Env::take`] followed by [`start`](Self::start). See [`Env::take`]
    /// about changing the environment while other threads run.
    ///
    /// # Errors
    ///
    /// As [`Env::take`] and [`start`](Self::start).
    pub fn from_env(self) -> Result<Baton> {
        let env = Env::take()?;
        self.start(env)
    }

    /// Starts the SDK on an environment taken earlier: says hello on the
    /// control socket (if any), spawns the control reader, the connection
    /// reporter and the signal handler.
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] outside a tokio runtime; [`Error::Notify`] for an
    /// unusable `NOTIFY_SOCKET` address; [`Error::Io`] if the control socket
    /// or the signal handlers cannot be set up.
    pub fn start(self, env: Env) -> Result<Baton> {
        tokio::runtime::Handle::try_current().map_err(|e| Error::NoRuntime(e.to_string()))?;
        let Env {
            generation,
            listeners,
            notify_socket,
            control,
        } = env;
        let notify = notify_socket.as_deref().map(Notifier::new).transpose()?;
        let trigger = DrainTrigger::new();
        let drain = trigger.drain();
        let conns = Connections::new();
        let stateful = self.features.contains(&Feature::State);
        let adopt = self
            .features
            .contains(&Feature::Adopt)
            .then(AdoptRoutes::default);
        let mut state_rx = None;
        let control = match control {
            None => None,
            Some(fd) => {
                let hello = ChildMsg::Hello {
                    protocol: PROTOCOL_VERSION,
                    features: self.features.clone(),
                };
                let state_tx = stateful.then(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    state_rx = Some(rx);
                    tx
                });
                let dispatch = Dispatch {
                    drain: trigger.clone(),
                    state: state_tx,
                    adopt: adopt.clone(),
                };
                let tx = control::start(fd, &hello, dispatch)?;
                conns.spawn_reporter(tx.clone());
                Some(tx)
            }
        };
        if self.signals {
            drain::spawn_signal_task(trigger, self.exit_on_second_signal)?;
        }
        tracing::debug!(
            generation = generation.unwrap_or(0),
            supervised = generation.is_some(),
            listeners = listeners.len(),
            notify = notify.is_some(),
            control = control.is_some(),
            "baton-child started"
        );
        Ok(Baton {
            generation,
            listeners: Listeners::new(listeners),
            notify,
            control,
            drain,
            conns,
            stateful,
            state_rx,
            state_taken: false,
            adopt,
        })
    }
}

/// The running SDK: inherited listeners, readiness, drain and connection
/// reporting. Works without baton too (standalone mode): listeners fall back
/// to binding, readiness is a no-op, drain comes from SIGTERM / SIGINT.
///
/// # Example
///
/// ```no_run
/// # async fn f() -> Result<(), baton_child::Error> {
/// let mut baton = baton_child::Baton::from_env()?;
/// let listener = baton.tcp_listener("http", "127.0.0.1:8080")?;
/// baton.ready()?;
/// let drain = baton.drain();
/// loop {
///     tokio::select! {
///         _ = drain.wait() => break,
///         conn = listener.accept() => {
///             let Ok((stream, _)) = conn else { continue };
///             let guard = baton.track_connection();
///             tokio::spawn(async move { let _guard = guard; drop(stream); });
///         }
///     }
/// }
/// drop(listener); // stop accepting; the supervisor keeps the socket open
/// baton.connections().wait_idle().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Baton {
    generation: Option<u64>,
    listeners: Listeners,
    notify: Option<Notifier>,
    control: Option<ControlTx>,
    drain: Drain,
    conns: Connections,
    stateful: bool,
    state_rx: Option<mpsc::UnboundedReceiver<StateMsg>>,
    state_taken: bool,
    adopt: Option<AdoptRoutes>,
}

impl Baton {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// `Baton::builder().from_env()`: takes the environment and starts.
    ///
    /// # Errors
    ///
    /// See [`Builder::from_env`].
    pub fn from_env() -> Result<Baton> {
        Builder::default().from_env()
    }

    /// The generation number baton gave this process (0 standalone).
    pub fn generation(&self) -> u64 {
        self.generation.unwrap_or(0)
    }

    /// Whether this process runs under baton.
    pub fn is_supervised(&self) -> bool {
        self.generation.is_some()
    }

    /// Whether a control socket to the supervisor is open (drain messages
    /// and connection reports flow over it).
    pub fn has_control(&self) -> bool {
        self.control.is_some()
    }

    /// Names of the inherited listeners, in fd order (taken ones included).
    pub fn listener_names(&self) -> impl Iterator<Item = &str> {
        self.listeners.names()
    }

    /// The kind of the inherited listener called `name` that the next
    /// `*_listener` / `*_incoming` call for `name` would take; `None` when
    /// none of that name is left (not inherited, or taken). Lets an app serve
    /// a listener as whatever the operator configured (`--listen
    /// kv=127.0.0.1:6379` or `--listen kv=unix:/run/kv.sock`) and use its
    /// own fallback only when standalone.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: &mut baton_child::Baton) -> Result<(), baton_child::Error> {
    /// use baton_child::ListenerKind;
    /// match baton.inherited_kind("kv") {
    ///     Some(ListenerKind::Unix) => {
    ///         let unix = baton.unix_incoming("kv", "/run/kv.sock")?;
    ///         # drop(unix);
    ///     }
    ///     _ => {
    ///         // TCP, or standalone: the fallback is TCP.
    ///         let tcp = baton.tcp_incoming("kv", "127.0.0.1:6379")?;
    ///         # drop(tcp);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn inherited_kind(&self, name: &str) -> Option<ListenerKind> {
        self.listeners.kind(name)
    }

    /// The TCP listener called `name`: the inherited one, or else `fallback`
    /// freshly bound (with `SO_REUSEADDR`).
    ///
    /// An inherited socket is checked (a listening TCP stream socket) and
    /// never has its file-status flags cleared: they are shared with the
    /// supervisor and the other generations.
    ///
    /// # Errors
    ///
    /// [`Error::ListenerTaken`] on a second call for the same name,
    /// [`Error::InheritedFd`] if the inherited fd is not a listening TCP
    /// socket, [`Error::Bind`] if the fallback cannot be bound,
    /// [`Error::Io`] if tokio cannot register it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: &mut baton_child::Baton) -> Result<(), baton_child::Error> {
    /// let listener = baton.tcp_listener("http", "127.0.0.1:8080")?;
    /// println!("listening on {:?}", listener.local_addr());
    /// # Ok(()) }
    /// ```
    pub fn tcp_listener<A>(&mut self, name: &str, fallback: A) -> Result<tokio::net::TcpListener>
    where
        A: ToSocketAddrs + fmt::Display,
    {
        let std = self.listeners.tcp(name, fallback)?;
        tokio::net::TcpListener::from_std(std)
            .map_err(|e| Error::io(format!("listener {name:?}: registering with tokio"), e))
    }

    /// The Unix stream listener called `name`: the inherited one, or else a
    /// new socket at `fallback` (a stale socket file is replaced).
    ///
    /// # Errors
    ///
    /// As [`tcp_listener`](Self::tcp_listener).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: &mut baton_child::Baton) -> Result<(), baton_child::Error> {
    /// let admin = baton.unix_listener("admin", "/run/myapp/admin.sock")?;
    /// # Ok(()) }
    /// ```
    pub fn unix_listener(
        &mut self,
        name: &str,
        fallback: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixListener> {
        let std = self.listeners.unix(name, fallback.as_ref())?;
        tokio::net::UnixListener::from_std(std)
            .map_err(|e| Error::io(format!("listener {name:?}: registering with tokio"), e))
    }

    /// The raw inherited listener called `name`, unchecked, for socket kinds
    /// the typed helpers do not cover. `Ok(None)` if not inherited.
    ///
    /// # Errors
    ///
    /// [`Error::ListenerTaken`] if it was taken already.
    pub fn take_listener_fd(&mut self, name: &str) -> Result<Option<OwnedFd>> {
        self.listeners.take(name)
    }

    /// Tells the supervisor this process is ready (`READY=1` to
    /// `NOTIFY_SOCKET`). Call it once every listener is taken and the app can
    /// serve. A no-op without `NOTIFY_SOCKET`.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] if the datagram cannot be sent.
    pub fn ready(&self) -> Result<()> {
        self.notify("READY=1")
    }

    /// Sends any sd_notify state string (`STATUS=...`, `STOPPING=1`, ...).
    /// A no-op without `NOTIFY_SOCKET`.
    ///
    /// # Errors
    ///
    /// [`Error::Notify`] if the datagram cannot be sent.
    pub fn notify(&self, state: &str) -> Result<()> {
        match &self.notify {
            Some(n) => n.send(state),
            None => Ok(()),
        }
    }

    /// A handle that resolves when draining starts.
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// The live-connection tracker (reported to the supervisor).
    pub fn connections(&self) -> Connections {
        self.conns.clone()
    }

    /// Counts one connection until the guard is dropped. The count goes to
    /// the supervisor as `{"type":"connections"}`, coalesced to at most ten
    /// reports a second, the last one always sent.
    pub fn track_connection(&self) -> ConnGuard {
        self.conns.track()
    }

    /// The handle for stateful upgrades of state `T` at schema `version`.
    /// Requires [`Builder::stateful`]. Standalone it works too: there is
    /// nothing to restore and no event ever comes.
    ///
    /// # Errors
    ///
    /// [`Error::Feature`] if `state` was not announced or the handle was
    /// already taken.
    pub fn state<T>(&mut self, version: u32) -> Result<StateHandle<T>>
    where
        T: Serialize + DeserializeOwned,
    {
        if !self.stateful {
            return Err(Error::Feature {
                feature: "state",
                reason: "not announced: use Baton::builder().stateful()",
            });
        }
        if self.state_taken {
            return Err(Error::Feature {
                feature: "state",
                reason: "the state handle was already taken",
            });
        }
        self.state_taken = true;
        Ok(StateHandle::new(
            version,
            self.control.clone(),
            self.state_rx.take(),
        ))
    }

    /// Hands live connections to the next generation when a drain says
    /// `migrate` (see [`Migrator`]).
    pub fn migrator(&self) -> Migrator {
        Migrator::new(self.control.clone())
    }

    /// The TCP listener called `name` (as [`tcp_listener`](Self::tcp_listener))
    /// merged with the connections the previous generation hands over on
    /// that listener, if [`Builder::adopt`] was announced.
    ///
    /// # Errors
    ///
    /// As [`tcp_listener`](Self::tcp_listener).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), baton_child::Error> {
    /// let mut baton = baton_child::Baton::builder().adopt().from_env()?;
    /// let mut incoming = baton.tcp_incoming("http", "127.0.0.1:8080")?;
    /// baton.ready()?;
    /// while let Ok(conn) = incoming.accept().await {
    ///     // conn.stream yields the bytes the previous generation had read
    ///     // first; conn.adopted carries its metadata.
    ///     # drop(conn);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn tcp_incoming<A>(&mut self, name: &str, fallback: A) -> Result<TcpIncoming>
    where
        A: ToSocketAddrs + fmt::Display,
    {
        let listener = self.tcp_listener(name, fallback)?;
        let adopted = self.adopt.as_ref().and_then(|r| r.take(name));
        Ok(TcpIncoming::new(name, listener, adopted))
    }

    /// The Unix stream listener called `name` (as
    /// [`unix_listener`](Self::unix_listener)) merged with the connections
    /// the previous generation hands over on that listener, if
    /// [`Builder::adopt`] was announced.
    ///
    /// # Errors
    ///
    /// As [`unix_listener`](Self::unix_listener).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), baton_child::Error> {
    /// let mut baton = baton_child::Baton::builder().adopt().from_env()?;
    /// let mut incoming = baton.unix_incoming("kv", "/run/kv/kv.sock")?;
    /// baton.ready()?;
    /// while let Ok(conn) = incoming.accept().await {
    ///     // As with TCP: conn.stream yields the bytes the previous
    ///     // generation had read first; conn.adopted carries its metadata.
    ///     # drop(conn);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn unix_incoming(
        &mut self,
        name: &str,
        fallback: impl AsRef<Path>,
    ) -> Result<UnixIncoming> {
        let listener = self.unix_listener(name, fallback)?;
        let adopted = self.adopt.as_ref().and_then(|r| r.take(name));
        Ok(UnixIncoming::new(name, listener, adopted))
    }
}
