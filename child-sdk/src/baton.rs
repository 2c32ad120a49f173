//! [`Baton`], the SDK's entry point, and its [`Builder`].

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use baton_protocol::{ChildMsg, Feature, PROTOCOL_VERSION};
use tokio::sync::mpsc;

use crate::adopt::AdoptRoutes;
use crate::conns::{ConnGuard, Connections};
use crate::credit::Credit;
use crate::dispatch::{self, Dispatch, StateMsg};
use crate::drain::{self, Drain, DrainInfo, DrainTrigger};
use crate::env::Env;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::incoming::Incoming;
use crate::listeners::Listeners;
use crate::notify::Notifier;
use crate::send::ControlTx;

/// Configures a [`Baton`] before it says hello to the supervisor.
#[derive(Debug, Clone)]
pub struct Builder {
    adopt: bool,
    precopy: bool,
    state_version: Option<u32>,
    restores: Option<Vec<u32>>,
    signals: bool,
    exit_on_second_signal: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            adopt: false,
            precopy: false,
            state_version: None,
            restores: None,
            signals: true,
            exit_on_second_signal: true,
        }
    }
}

impl Builder {
    /// Announces the `state` feature with this program's schema `version`:
    /// it takes part in stateful upgrades (`baton run --state`). A stateful
    /// candidate calls [`Baton::restore`] before it becomes ready, and the
    /// old generation answers [`Event::Quiesce`] with [`Baton::snapshot`].
    pub fn stateful(mut self, version: u32) -> Self {
        self.state_version = Some(version);
        self
    }

    /// The schema versions [`Baton::restore`] can read, announced so that a
    /// predecessor of a newer schema can write one of them (a downgrade, as
    /// in a revert to this release) or refuse. Default: 1 to the version
    /// given to [`stateful`](Self::stateful).
    pub fn restores(mut self, versions: impl IntoIterator<Item = u32>) -> Self {
        self.restores = Some(versions.into_iter().collect());
        self
    }

    /// Announces the `precopy` feature (with [`stateful`](Self::stateful)):
    /// as the old generation, answer [`Event::Precopy`] and
    /// [`Event::PrecopyFinal`] with [`Baton::chunks`]; as a candidate,
    /// restore with [`Baton::restore_chunked`]. baton then moves the state
    /// while the old generation serves, and pauses it only for the last
    /// changes.
    pub fn precopy(mut self) -> Self {
        self.precopy = true;
        self
    }

    /// Announces the `adopt` feature: connections the previous generation
    /// hands over arrive through [`Baton::incoming`], next to fresh
    /// accepts.
    pub fn adopt(mut self) -> Self {
        self.adopt = true;
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

    fn features(&self) -> Vec<Feature> {
        let mut f = Vec::new();
        if self.state_version.is_some() {
            f.push(Feature::State);
        }
        if self.adopt {
            f.push(Feature::Adopt);
        }
        if self.precopy && self.state_version.is_some() {
            f.push(Feature::Precopy);
        }
        f
    }

    /// Starts the SDK on an environment from [`Env::take`] (or
    /// [`Env::standalone`]): says hello on the control socket (if any) and
    /// spawns the control reader, the connection reporter and the signal
    /// handler.
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] outside a tokio runtime; [`Error::Notify`] for an
    /// unusable `NOTIFY_SOCKET` address; [`Error::Io`] if the control socket
    /// or the signal handlers cannot be set up.
    ///
    /// # Example
    ///
    /// ```no_run
    /// fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     // SAFETY: no other thread exists yet.
    ///     let env = unsafe { baton_child::Env::take() }?;
    ///     let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    ///     rt.block_on(async {
    ///         let baton = baton_child::Baton::builder().adopt().start(env)?;
    ///         println!("generation {}", baton.generation());
    ///         Ok(())
    ///     })
    /// }
    /// ```
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
        // Adoption needs a supervisor to relay connections.
        let adopt = (self.adopt && control.is_some()).then(AdoptRoutes::default);
        let mut state_rx = None;
        let credit = Arc::new(Credit::default());
        let control = match control {
            None => None,
            Some(fd) => {
                let hello = ChildMsg::Hello {
                    protocol: PROTOCOL_VERSION,
                    features: self.features(),
                    restores: self
                        .state_version
                        .map(|v| self.restores.clone().unwrap_or_else(|| (1..=v).collect())),
                };
                let state_tx = self.state_version.map(|_| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    state_rx = Some(rx);
                    tx
                });
                let dispatch = Dispatch {
                    drain: trigger.clone(),
                    state: state_tx,
                    adopt: adopt.clone(),
                    credit: Arc::clone(&credit),
                };
                let tx = dispatch::start(fd, &hello, dispatch)?;
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
            inner: Arc::new(Inner {
                generation,
                listeners: Mutex::new(Listeners::new(listeners).supervised(generation.is_some())),
                notify,
                control,
                drain,
                conns,
                state_version: self.state_version,
                state: tokio::sync::Mutex::new(StateRx {
                    rx: state_rx,
                    pending: VecDeque::new(),
                    restored: false,
                    drain_told: false,
                }),
                successor: Mutex::new(None),
                adopt,
                credit,
            }),
        })
    }
}

/// The running SDK: inherited listeners, readiness, drain, connection
/// counts, and (when announced) state hand-over and connection migration.
///
/// Cheap to clone: every clone is the same SDK, so pass one to each
/// connection task. Works without baton too (standalone): listeners bind
/// their fallbacks, readiness is a no-op, drain comes from SIGTERM / SIGINT.
///
/// # Example
///
/// ```no_run
/// # async fn f(env: baton_child::Env) -> Result<(), baton_child::Error> {
/// let baton = baton_child::Baton::builder().start(env)?;
/// let mut incoming = baton.incoming("http", "127.0.0.1:8080")?;
/// baton.ready()?;
/// loop {
///     tokio::select! {
///         _ = baton.wait_drain() => break,
///         conn = incoming.accept() => {
///             let Ok(stream) = conn else { continue };
///             let guard = baton.track();
///             tokio::spawn(async move { let _guard = guard; drop(stream); });
///         }
///     }
/// }
/// incoming.stop(); // stop accepting; the supervisor keeps the socket open
/// baton.idle().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Baton {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    generation: Option<u64>,
    listeners: Mutex<Listeners>,
    notify: Option<Notifier>,
    pub(crate) control: Option<ControlTx>,
    drain: Drain,
    conns: Connections,
    pub(crate) state_version: Option<u32>,
    pub(crate) state: tokio::sync::Mutex<StateRx>,
    /// The schema versions the successor restores, from the last quiesce.
    pub(crate) successor: Mutex<Option<Vec<u32>>>,
    adopt: Option<AdoptRoutes>,
    pub(crate) credit: Arc<Credit>,
}

/// The stateful side's queue, and what has been handed to the app.
#[derive(Debug)]
pub(crate) struct StateRx {
    pub(crate) rx: Option<mpsc::UnboundedReceiver<StateMsg>>,
    /// Events that arrived while `restore` waited.
    pub(crate) pending: VecDeque<Event>,
    pub(crate) restored: bool,
    /// Whether `next_event` returned the drain already.
    pub(crate) drain_told: bool,
}

impl Baton {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The generation number baton gave this process (0 standalone).
    pub fn generation(&self) -> u64 {
        self.inner.generation.unwrap_or(0)
    }

    /// Whether this process runs under baton.
    pub fn is_supervised(&self) -> bool {
        self.inner.generation.is_some()
    }

    /// The stream listener called `name`, TCP or Unix, whichever the
    /// operator configured (`--listen http=127.0.0.1:8080` or `--listen
    /// http=unix:/run/app.sock`), merged with the connections the previous
    /// generation hands over on it (when [`Builder::adopt`] was announced).
    ///
    /// When no listener of that name is inherited, `fallback` is bound:
    /// `unix:PATH` for a Unix socket (a stale socket file is replaced, a
    /// live one is an error), anything else as `HOST:PORT`. An inherited
    /// socket is checked (a listening TCP or Unix stream socket) and never
    /// has its file-status flags cleared: they are shared with the
    /// supervisor and the other generations.
    ///
    /// # Errors
    ///
    /// [`Error::ListenerTaken`] on a second call for the same name,
    /// [`Error::InheritedFd`] if the inherited fd is not a listening TCP or
    /// Unix stream socket, [`Error::Bind`] if the fallback cannot be bound,
    /// [`Error::Io`] if tokio cannot register it.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: baton_child::Baton) -> Result<(), baton_child::Error> {
    /// let web = baton.incoming("http", "127.0.0.1:8080")?;
    /// let admin = baton.incoming("admin", "unix:/run/myapp/admin.sock")?;
    /// println!("serving {:?} and {:?}", web.local_addr(), admin.local_addr());
    /// # Ok(()) }
    /// ```
    pub fn incoming(&self, name: &str, fallback: &str) -> Result<Incoming> {
        let listening = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .listen(name, fallback)?;
        let adopted = self.inner.adopt.as_ref().and_then(|r| r.take(name));
        Incoming::new(name, listening, adopted)
    }

    /// The UDP socket called `name` (`baton run --listen NAME=udp:HOST:PORT`, or
    /// systemd's `ListenDatagram=`), for tokio; when none is inherited,
    /// `fallback` (`HOST:PORT`) is bound.
    ///
    /// Every generation shares the one socket and so the one kernel receive
    /// buffer: a datagram waits there until some generation reads it. To drain,
    /// stop reading (drop the socket) when [`wait_drain`](Self::wait_drain)
    /// fires, after answering what was read already: the successor has been
    /// reading since before it said READY. Never `connect()` the shared socket.
    ///
    /// # Errors
    ///
    /// [`Error::ListenerTaken`] on a second call for the same name,
    /// [`Error::InheritedFd`] if the inherited fd is not a UDP socket,
    /// [`Error::Bind`] if the fallback cannot be bound, [`Error::Io`] if
    /// tokio cannot register it (outside a runtime).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: baton_child::Baton) -> Result<(), Box<dyn std::error::Error>> {
    /// let udp = baton.udp_socket("dns", "127.0.0.1:5353")?;
    /// baton.ready()?;
    /// let mut buf = [0u8; 1500];
    /// loop {
    ///     tokio::select! {
    ///         r = udp.recv_from(&mut buf) => {
    ///             let (n, peer) = r?;
    ///             udp.send_to(&buf[..n], peer).await?;
    ///         }
    ///         _ = baton.wait_drain() => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn udp_socket(&self, name: &str, fallback: &str) -> Result<tokio::net::UdpSocket> {
        let s = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .udp(name, fallback)?;
        tokio::net::UdpSocket::from_std(s)
            .map_err(|e| Error::io(format!("registering UDP socket {name:?} with tokio"), e))
    }

    /// The raw inherited listener called `name`, unchecked, for socket kinds
    /// [`incoming`](Self::incoming) does not cover. `Ok(None)` if none of
    /// that name is inherited.
    ///
    /// # Errors
    ///
    /// [`Error::ListenerTaken`] if it was taken already.
    pub fn take_listener_fd(&self, name: &str) -> Result<Option<OwnedFd>> {
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(name)
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
        match &self.inner.notify {
            Some(n) => n.send(state),
            None => Ok(()),
        }
    }

    /// Resolves when draining starts (at once if it has): the supervisor
    /// said `drain` or `commit`, or SIGTERM / SIGINT arrived. Cancel-safe.
    pub async fn wait_drain(&self) -> DrainInfo {
        self.inner.drain.wait().await
    }

    /// The drain request, once draining has started.
    pub fn draining(&self) -> Option<DrainInfo> {
        self.inner.drain.get()
    }

    /// Counts one live connection until the guard is dropped. The count
    /// goes to the supervisor as `{"type":"connections"}`, coalesced to at
    /// most ten reports a second, the last one always sent.
    pub fn track(&self) -> ConnGuard {
        self.inner.conns.track()
    }

    /// Live connections now (those [`track`](Self::track)ed).
    pub fn connections(&self) -> u64 {
        self.inner.conns.active()
    }

    /// Resolves when no tracked connection is left (at once if none is).
    /// Cancel-safe.
    pub async fn idle(&self) {
        self.inner.conns.wait_idle().await;
    }
}
