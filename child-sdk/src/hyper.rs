//! Serve a hyper 1 service, and so an axum `Router`, under baton (feature
//! `hyper`): drain and connection migration built in. See [`serve`].

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming as HyperBody};
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower_service::Service;

use crate::baton::Baton;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::incoming::Incoming;
use crate::stream::Stream;

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

/// The app's state, written when baton asks for it ([`Server::state`]): at that moment no
/// request is in flight and none will reach the app until the upgrade is decided.
///
/// Implemented for every `Fn() -> T` where `T: Serialize` (a closure that reads the
/// state); implement it yourself to write an older schema for a successor that restores
/// only that one ([`Baton::successor_restores`], [`Baton::snapshot_as`]).
pub trait Snapshot: Send + Sync + 'static {
    /// Writes the snapshot, with [`Baton::snapshot`] (or [`Baton::snapshot_as`]).
    ///
    /// # Errors
    ///
    /// As [`Baton::snapshot`]; serve then reports the failure to baton, which
    /// aborts the upgrade, and serving goes on.
    fn write(&self, baton: &Baton) -> Result<()>;

    /// Pre-copy (announced with [`Builder::precopy`](crate::Builder::precopy)): sends
    /// round `round` with [`Baton::chunks`], then [`Chunks::finish`](crate::Chunks::finish).
    /// Round 0 is the whole state (start recording what changes before reading any of
    /// it); round N what changed since round N-1 began. Called on a blocking thread, while
    /// requests are served, except for the last round, which runs paused.
    ///
    /// # Errors
    ///
    /// As [`Chunks::send`](crate::Chunks::send); serve then reports it to baton, which
    /// aborts the upgrade. The default has no chunks to send.
    fn send_round(&self, baton: &Baton, round: u32) -> Result<()> {
        let _ = (baton, round);
        Err(Error::Feature {
            feature: "precopy",
            reason: "this state sends no chunks: implement Snapshot::send_round",
        })
    }
}

/// Sends a pre-copy round; a failure other than an aborted upgrade is reported, and
/// baton aborts the upgrade.
fn send_round_or_fail(state: &dyn Snapshot, baton: &Baton, round: u32) {
    match state.send_round(baton, round) {
        Ok(()) | Err(Error::Precopy(_)) => {}
        Err(e) => {
            tracing::warn!(round, error = %e, "pre-copy round not sent");
            if let Err(e) = baton.precopy_failed(&e.to_string()) {
                tracing::warn!(error = %e, "cannot report the failed round");
            }
        }
    }
}

impl<F, T> Snapshot for F
where
    F: Fn() -> T + Send + Sync + 'static,
    T: serde::Serialize,
{
    fn write(&self, baton: &Baton) -> Result<()> {
        baton.snapshot(&self())
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

/// What the server tells its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Serve requests.
    Serve,
    /// Quiesced: stop at the next request boundary, and wait for the outcome.
    Pause,
    /// Drained: hand over at the next request boundary (`migrate`), or serve on with
    /// `Connection: close` (a paused connection is closed).
    Drain {
        /// The successor adopts connections.
        migrate: bool,
    },
}

/// Connections alive, and how many of them are stopped at a request boundary.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    live: usize,
    paused: usize,
}

/// A connection's place in the [`Tally`], from before its task runs to its end.
struct Member {
    tally: Arc<watch::Sender<Tally>>,
    paused: bool,
}

impl Member {
    fn join(tally: &Arc<watch::Sender<Tally>>) -> Self {
        tally.send_modify(|t| t.live += 1);
        Member {
            tally: Arc::clone(tally),
            paused: false,
        }
    }

    fn set_paused(&mut self, paused: bool) {
        if self.paused != paused {
            self.paused = paused;
            self.tally.send_modify(|t| {
                if paused {
                    t.paused += 1;
                } else {
                    t.paused -= 1;
                }
            });
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let paused = self.paused;
        self.tally.send_modify(|t| {
            t.live -= 1;
            if paused {
                t.paused -= 1;
            }
        });
    }
}

/// One connection: serve until the client closes, a hand-over, or a close after a
/// commit; stopped at request boundaries while quiesced, and resumed after.
async fn connection<S, B>(
    baton: Baton,
    mut stream: Stream,
    service: S,
    mut mode: watch::Receiver<Mode>,
    mut member: Member,
) where
    S: HttpService<B>,
    B: HttpBody,
{
    let _guard = baton.track();
    if let Some(Err(e)) = stream.tcp().map(|s| s.set_nodelay(true)) {
        tracing::debug!(error = %e, "TCP_NODELAY");
    }
    if stream.adopted().is_some() {
        tracing::debug!(
            listener = stream.listener(),
            "serving an adopted connection"
        );
    }
    let service = Arc::new(service);
    loop {
        let busy = Arc::new(watch::Sender::new(0usize));
        let svc = Counted {
            inner: Arc::clone(&service),
            busy: Arc::clone(&busy),
            baton: baton.clone(),
        };
        let mut http = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc);
        let mut busy_rx = busy.subscribe();
        let mut stopping = false;
        let result = loop {
            tokio::select! {
                // hyper first: a response that just completed is written
                // (without `Connection: close`) before the connection stops.
                biased;
                res = std::future::poll_fn(|cx| http.poll_without_shutdown(cx)) => break res,
                () = stop_point(&mut mode, &mut busy_rx), if !stopping => {
                    // Idle now: hyper stops at once, keeping the socket and any
                    // bytes of the next request it has read.
                    Pin::new(&mut http).graceful_shutdown();
                    stopping = true;
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
            return;
        }
        if !stopping {
            // The client closed, or a response said `Connection: close`.
            return;
        }
        let parts = http.into_parts();
        let buffered = parts.read_buf.len();
        stream = parts.io.into_inner().unread(&parts.read_buf);
        // At a request boundary: wait for the outcome while quiesced.
        member.set_paused(true);
        let next = mode.wait_for(|m| *m != Mode::Pause).await.map(|m| *m);
        member.set_paused(false);
        match next {
            Ok(Mode::Serve) => continue,
            Ok(Mode::Drain { migrate: true }) => {
                match baton.hand_over(stream, b"", &serde_json::Value::Null).await {
                    Ok(()) => tracing::debug!(buffered, "connection handed over"),
                    Err(e) => tracing::warn!(error = %e, "hand-over failed; connection closed"),
                }
                return;
            }
            _ => {
                // Committed to a successor that does not adopt: what waits here must
                // not be served on a state that moved on.
                tracing::debug!(
                    "connection closed: the state moved to a successor that does not adopt"
                );
                return;
            }
        }
    }
}

/// Resolves when this connection should stop: quiesced, or drained towards a successor
/// that adopts, and no request in flight on it.
async fn stop_point(mode: &mut watch::Receiver<Mode>, busy: &mut watch::Receiver<usize>) {
    // The sender lives as long as the server.
    if mode
        .wait_for(|m| matches!(m, Mode::Pause | Mode::Drain { migrate: true }))
        .await
        .is_err()
    {
        return std::future::pending().await;
    }
    // The sender lives as long as the connection's service.
    let _ = busy.wait_for(|n| *n == 0).await;
}

/// The app's service, counting requests in flight on this connection and
/// closing the connection after a drain that does not migrate.
#[derive(Clone)]
struct Counted<S> {
    // In an Arc so that the connection future is Unpin whatever `S` is.
    inner: Arc<S>,
    busy: Arc<watch::Sender<usize>>,
    baton: Baton,
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<Request<HyperBody>> for Counted<S>
where
    S: Service<Request<HyperBody>, Response = Response<B>> + HttpService<B>,
    B: HttpBody,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<std::result::Result<Response<B>, BoxError>>;

    fn call(&self, req: Request<HyperBody>) -> Self::Future {
        // Counted from the moment hyper has the request, so a hand-over
        // never cuts into it.
        self.busy.send_modify(|n| *n += 1);
        let in_flight = InFlight(Arc::clone(&self.busy));
        let mut inner = S::clone(&self.inner);
        let baton = self.baton.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx: &mut Context<'_>| -> Poll<_> { inner.poll_ready(cx) })
                .await
                .map_err(Into::into)?;
            let mut resp = inner.call(req).await.map_err(Into::into)?;
            // Decided when the response is built, i.e. after any wait in the
            // handler: a request that started before the drain gets it too.
            if baton.draining().is_some_and(|d| !d.migrate) {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            drop(in_flight);
            Ok(resp)
        })
    }
}
