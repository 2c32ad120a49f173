//! One connection of the server: served until the client closes, handed over at a
//! request boundary, or paused there while quiesced; requests in flight counted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::Incoming as HyperBody;
use hyper::header::{CONNECTION, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tower_service::Service;

use super::{BoxError, HttpBody, HttpService};
use crate::baton::Baton;
use crate::stream::Stream;

/// What the server tells its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
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
pub(super) struct Tally {
    pub(super) live: usize,
    pub(super) paused: usize,
}

/// A connection's place in the [`Tally`], from before its task runs to its end.
pub(super) struct Member {
    tally: Arc<watch::Sender<Tally>>,
    paused: bool,
}

impl Member {
    pub(super) fn join(tally: &Arc<watch::Sender<Tally>>) -> Self {
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
pub(super) async fn connection<S, B>(
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
