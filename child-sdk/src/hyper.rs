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
use crate::error::Result;
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
#[derive(Debug, Clone)]
pub struct Server {
    drain_timeout: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            drain_timeout: DEFAULT_DRAIN,
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
        let info = loop {
            tokio::select! {
                biased;
                info = baton.wait_drain() => break info,
                res = incoming.accept() => match res {
                    Ok(stream) => {
                        conns.spawn(connection(baton.clone(), stream, service.clone()));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning; the
                        // connection stays queued in the kernel.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        };
        // Connections relayed to us before the drain are queued already: serve
        // them to a boundary too (and so hand them on), rather than drop them.
        while let Some(stream) = incoming.try_accept_adopted() {
            conns.spawn(connection(baton.clone(), stream, service.clone()));
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

/// One connection: serve until the client closes or a hand-over point.
async fn connection<S, B>(baton: Baton, stream: Stream, service: S)
where
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
    let busy = Arc::new(watch::Sender::new(0usize));
    let svc = Counted {
        inner: Arc::new(service),
        busy: Arc::clone(&busy),
        baton: baton.clone(),
    };
    let mut http = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    let mut busy_rx = busy.subscribe();
    let mut handing_over = false;
    let result = loop {
        tokio::select! {
            // hyper first: a response that just completed is written
            // (without `Connection: close`) before the hand-over starts.
            biased;
            res = std::future::poll_fn(|cx| http.poll_without_shutdown(cx)) => break res,
            () = hand_over_point(&baton, &mut busy_rx), if !handing_over => {
                // Idle now: hyper stops at once, keeping the socket and any
                // bytes of the next request it has read.
                Pin::new(&mut http).graceful_shutdown();
                handing_over = true;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
        return;
    }
    if !handing_over {
        // The client closed, or a response said `Connection: close`.
        return;
    }
    let parts = http.into_parts();
    let (io, read_buf) = (parts.io, parts.read_buf);
    let buffered = read_buf.len();
    match baton
        .hand_over(io.into_inner(), &read_buf, &serde_json::Value::Null)
        .await
    {
        Ok(()) => tracing::debug!(buffered, "connection handed over"),
        Err(e) => tracing::warn!(error = %e, "hand-over failed; connection closed"),
    }
}

/// Resolves when this connection should be handed over: the drain says the
/// successor adopts, and no request is in flight on it.
async fn hand_over_point(baton: &Baton, busy: &mut watch::Receiver<usize>) {
    // Standalone there is no successor, and no drain will ever say `migrate`.
    if !baton.is_supervised() || !baton.wait_drain().await.migrate {
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
