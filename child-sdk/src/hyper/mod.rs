//! Serve a hyper 1 service, and so an axum `Router`, under baton (feature
//! `hyper`): drain and connection migration built in. See [`serve`].

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming as HyperBody};
use hyper::{Request, Response};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower_service::Service;

use crate::baton::Baton;
use crate::error::Result;
use crate::events::Event;
use crate::incoming::Incoming;
use crate::stream::Stream;

mod conn;
mod snapshot;

use conn::{Member, Mode, Tally, connection};
pub use snapshot::Snapshot;
use snapshot::send_round_or_fail;

/// How long to drain when the drain carries no deadline (a signal).
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Close what is left this long before the supervisor's SIGKILL, so the
/// process still exits on its own.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// The error type services and bodies are boxed into.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What [`serve`] serves: a tower service of hyper requests, cloned per request (an axum
/// `Router`, or `tower::service_fn(...)`). Implemented for every such service.
pub trait HttpService<B>:
    Service<
        Request<HyperBody>,
        Response = Response<B>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<
            Request<HyperBody>,
            Response = Response<B>,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A response body [`serve`] can write. Implemented for every such body.
pub trait HttpBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> HttpBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// Serves `service` on `incoming` until a drain has finished, then returns:
/// [`Server::serve`] with the defaults.
///
/// - Fresh and adopted connections are served alike (HTTP/1.1 keep-alive).
/// - On a drain whose successor adopts connections (`migrate`), each
///   connection is handed over at its next request boundary: an idle
///   keep-alive connection at once, a busy one when its response is done,
///   with any bytes of the next request hyper had read. The client keeps
///   its TCP connection.
/// - When the successor cannot adopt, every response after the drain
///   carries `Connection: close`, and idle connections stay open until the
///   deadline (closing one earlier races with a client sending on it).
/// - Connections still open 250 ms before the drain deadline are closed, so
///   the process exits on its own before baton's SIGKILL.
///
/// `service` is a tower service, cloned per request: an axum `Router`, or
/// `tower::service_fn(...)`.
///
/// # Errors
///
/// None today: accept errors are logged and retried after a pause.
///
/// # Example
///
/// ```no_run
/// # async fn f(env: baton_child::Env) -> Result<(), baton_child::Error> {
/// let baton = baton_child::Baton::builder().adopt().start(env)?;
/// let incoming = baton.incoming("http", "127.0.0.1:8080")?;
/// baton.ready()?;
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
/// baton_child::hyper::serve(baton, incoming, app).await?;
/// # Ok(()) }
/// ```
pub async fn serve<S, B>(baton: Baton, incoming: Incoming, service: S) -> Result<()>
where
    S: HttpService<B>,
    B: HttpBody,
{
    Server::new().serve(baton, incoming, service).await
}

/// [`serve`] with options.
///
/// # Example
///
/// ```no_run
/// # async fn f(baton: baton_child::Baton, incoming: baton_child::Incoming, app: axum::Router) -> Result<(), baton_child::Error> {
/// baton_child::hyper::Server::new()
///     .drain_timeout(std::time::Duration::from_secs(5))
///     .serve(baton, incoming, app)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    drain_timeout: Duration,
    state: Option<Arc<dyn Snapshot>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("drain_timeout", &self.drain_timeout)
            .field("stateful", &self.state.is_some())
            .finish()
    }
}

impl Default for Server {
    fn default() -> Self {
        Server {
            drain_timeout: DEFAULT_DRAIN,
            state: None,
        }
    }
}

impl Server {
    /// The defaults: a 30 s drain when the drain names no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long to drain when the drain names no deadline (a SIGTERM
    /// outside baton). Under baton the supervisor's deadline applies.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Serves a stateful app (announced with
    /// [`Builder::stateful`](crate::Builder::stateful); restore first, with
    /// [`Baton::restore`]). On a stateful upgrade the server, not the app, answers
    /// baton, and guarantees:
    ///
    /// - from the quiesce to the outcome, no request reaches the app: new
    ///   connections wait in the listener's backlog, each live connection stops at
    ///   its next request boundary (keeping what it read of the next request),
    ///   and `snapshot` runs once the requests in flight have finished;
    /// - on the commit, every connection is handed to the successor with its unread
    ///   bytes, so a request that waited is answered there, on the new state (announce
    ///   [`Builder::adopt`](crate::Builder::adopt)); a successor that cannot adopt
    ///   gets none, and they are closed rather than served on a state that moved on;
    /// - on a resume (the upgrade was aborted), the connections carry on from where
    ///   they stopped: nothing is lost or answered twice.
    ///
    /// The server takes [`Baton::next_event`]: the app must not call it as well.
    /// Pre-copy is not driven by the server.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: baton_child::Baton, incoming: baton_child::Incoming, app: axum::Router) -> Result<(), baton_child::Error> {
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// let hits: u64 = baton.restore(|v, _| Err(format!("no schema {v}"))).await?.unwrap_or(0);
    /// let hits = Arc::new(AtomicU64::new(hits));
    /// baton.ready()?;
    /// let read = Arc::clone(&hits);
    /// baton_child::hyper::Server::new()
    ///     .state(move || read.load(Ordering::SeqCst))
    ///     .serve(baton, incoming, app)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn state(mut self, snapshot: impl Snapshot) -> Self {
        self.state = Some(Arc::new(snapshot));
        self
    }

    /// As [`serve`].
    ///
    /// # Errors
    ///
    /// As [`serve`].
    pub async fn serve<S, B>(self, baton: Baton, mut incoming: Incoming, service: S) -> Result<()>
    where
        S: HttpService<B>,
        B: HttpBody,
    {
        let mut conns = JoinSet::new();
        let mode = watch::Sender::new(Mode::Serve);
        let tally = Arc::new(watch::Sender::new(Tally::default()));
        let mut tally_rx = tally.subscribe();
        let spawn = |conns: &mut JoinSet<()>, stream: Stream| {
            // Counted before the task runs, so that a quiesce waits for it too.
            let member = Member::join(&tally);
            let (baton, mode) = (baton.clone(), mode.subscribe());
            conns.spawn(connection(baton, stream, service.clone(), mode, member));
        };
        let mut accepting = true;
        let mut quiescing = false;
        // Pre-copy's last round, sent once every connection is paused.
        let mut final_round: Option<u32> = None;
        let mut last_round: Option<(Arc<dyn Snapshot>, u32)> = None;
        let stateful = self.state.is_some();
        let info = loop {
            tokio::select! {
                biased;
                event = baton.next_event(), if stateful => match event {
                    Event::Quiesce => {
                        // Stop accepting (the backlog keeps new connections) and stop
                        // each connection at its next request boundary.
                        accepting = false;
                        quiescing = true;
                        mode.send_replace(Mode::Pause);
                    }
                    Event::Precopy { round } => {
                        // Live: requests go on being served while the round is sent.
                        if let Some(state) = self.state.clone() {
                            let baton = baton.clone();
                            tokio::task::spawn_blocking(move || send_round_or_fail(&*state, &baton, round));
                        }
                    }
                    Event::PrecopyFinal { round } => {
                        accepting = false;
                        quiescing = true;
                        final_round = Some(round);
                        mode.send_replace(Mode::Pause);
                    }
                    Event::Resume { reason } => {
                        tracing::info!(%reason, "upgrade aborted: serving again");
                        final_round = None;
                        quiescing = false;
                        accepting = true;
                        mode.send_replace(Mode::Serve);
                    }
                    Event::Drain(info) => break info,
                },
                info = baton.wait_drain(), if !stateful => break info,
                // The watch's `Ref` is dropped in here: held in `select!`'s output it would
                // make this future `!Send` (it could not be `tokio::spawn`ed).
                _ = async { tally_rx.wait_for(|t| t.paused >= t.live).await.map(drop) }, if quiescing => {
                    quiescing = false;
                    let live = tally.borrow().live;
                    if let (Some(state), Some(round)) = (self.state.clone(), final_round.take()) {
                        tracing::info!(connections = live, round, "quiesced: every connection at a request boundary; sending the last round");
                        // Sent below, out of `select!` (whose output holds the tally's lock).
                        last_round = Some((state, round));
                    } else if let Some(state) = &self.state {
                        tracing::info!(connections = live, "quiesced: every connection at a request boundary; writing the snapshot");
                        if let Err(e) = state.write(&baton) {
                            tracing::warn!(error = %e, "snapshot failed");
                            if let Err(e) = baton.snapshot_failed(&e.to_string()) {
                                tracing::warn!(error = %e, "cannot report the failed snapshot");
                            }
                        }
                    }
                }
                res = incoming.accept(), if accepting => match res {
                    Ok(stream) => spawn(&mut conns, stream),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning; the
                        // connection stays queued in the kernel.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
            if let Some((state, round)) = last_round.take() {
                let b = baton.clone();
                let sent =
                    tokio::task::spawn_blocking(move || send_round_or_fail(&*state, &b, round))
                        .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "the last pre-copy round panicked");
                }
            }
        };
        mode.send_replace(Mode::Drain {
            migrate: info.migrate,
        });
        // Connections relayed to us before the drain are queued already: serve
        // them to a boundary too (and so hand them on), rather than drop them.
        while let Some(stream) = incoming.try_accept_adopted() {
            spawn(&mut conns, stream);
        }
        // Only our fd closes: the socket stays open in baton for the successor.
        incoming.stop();
        let deadline = info.deadline_or(self.drain_timeout);
        let close_at = deadline
            .checked_sub(DEADLINE_MARGIN)
            .unwrap_or(deadline)
            .max(Instant::now());
        tracing::info!(
            connections = baton.connections(),
            migrate = info.migrate,
            "draining: stopped accepting"
        );
        let all_done = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout_at(close_at.into(), all_done)
            .await
            .is_ok()
        {
            tracing::info!("drained: all connections done");
        } else {
            tracing::info!(
                remaining = conns.len(),
                "drain deadline: closing the remaining connections"
            );
            conns.shutdown().await;
        }
        Ok(())
    }
}
