//! hello-http: a stateless HTTP/1.1 keep-alive server for baton.
//!
//! Serves the listener named `http` (inherited from baton or systemd, or the
//! `--listen-fallback` address standalone). `GET /` answers
//! `hello from pid=<pid> generation=<n> label=<label>`; `GET /sleep?ms=N`
//! answers the same after N milliseconds, so tests can hold a request in
//! flight across an upgrade.
//!
//! Drain (from baton, or SIGTERM/SIGINT): stop accepting, finish in-flight
//! requests, answer the next request of every keep-alive connection with
//! `Connection: close`, and exit once no connection is left. Idle keep-alive
//! connections are closed only at the drain deadline: closing one earlier
//! races with a client that is sending on it right now.
//!
//! When the drain says `migrate` (the successor adopts connections), every
//! connection is instead handed over to the next generation at its next
//! request boundary, with the bytes already read, and the client keeps its
//! TCP connection. Connections handed over by the previous generation are
//! served like fresh ones.

use std::convert::Infallible;
use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_child::{Baton, ConnGuard, Env, Stream};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Close what is left this long before the supervisor's SIGKILL, so the
/// process still exits on its own, with status 0.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// Longest accepted `/sleep`.
const MAX_SLEEP_MS: u64 = 10 * 60 * 1000;

/// A stateless HTTP/1.1 keep-alive server for baton.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to bind when no listener named `http` is inherited.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen_fallback: String,

    /// Version label shown in every response.
    #[arg(long, env = "HELLO_LABEL", default_value = "unlabeled")]
    label: String,

    /// Wait this long after listening before telling the supervisor READY
    /// (e.g. "2s"; for tests of slow candidates).
    #[arg(long, value_parser = humantime::parse_duration)]
    ready_delay: Option<Duration>,

    /// How long to drain when the request carries no deadline (SIGTERM).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    drain_timeout: Duration,

    /// For tests: ignore drain requests and SIGTERM and keep serving, so the
    /// supervisor has to SIGKILL this process at the drain deadline.
    #[arg(long)]
    ignore_drain: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Still single-threaded: taking the environment (which removes the
    // contract variables) cannot race with another thread reading it.
    // SAFETY: no other thread exists yet.
    let env = unsafe { Env::take() }.context("reading the baton environment")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    // Returning drops the runtime, which closes any connection still open.
    runtime.block_on(run(args, env))
}

/// The listener this server serves.
const LISTENER: &str = "http";

/// What every connection and request handler needs.
#[derive(Debug)]
struct App {
    body: Bytes,
    baton: Baton,
    ignore_drain: bool,
}

async fn run(args: Args, env: Env) -> anyhow::Result<()> {
    let baton = Baton::builder()
        .adopt()
        .exit_on_second_signal(!args.ignore_drain)
        .start(env)
        .context("starting baton-child")?;
    let mut incoming = baton
        .incoming(LISTENER, &args.listen_fallback)
        .context("taking the http listener")?;
    let addr = incoming.local_addr().context("listener address")?;
    tracing::info!(
        %addr,
        generation = baton.generation(),
        supervised = baton.is_supervised(),
        label = %args.label,
        "listening"
    );
    if let Some(delay) = args.ready_delay {
        tracing::info!(?delay, "delaying READY");
        tokio::time::sleep(delay).await;
    }
    baton.ready().context("sending READY")?;
    tracing::info!("ready");

    let app = Arc::new(App {
        body: Bytes::from(format!(
            "hello from pid={} generation={} label={}\n",
            std::process::id(),
            baton.generation(),
            args.label
        )),
        baton: baton.clone(),
        ignore_drain: args.ignore_drain,
    });

    if args.ignore_drain {
        tracing::warn!("--ignore-drain: serving until killed");
        loop {
            accept_one(&mut incoming, &baton, &app).await;
        }
    }

    let info = loop {
        tokio::select! {
            biased;
            info = baton.wait_drain() => break info,
            () = accept_one(&mut incoming, &baton, &app) => {}
        }
    };
    // Stop accepting. Only our fd closes: the socket itself stays open in
    // the supervisor, and the next generation accepts from the same queue.
    incoming.stop();
    let deadline = info.deadline_or(args.drain_timeout);
    let close_at = deadline
        .checked_sub(DEADLINE_MARGIN)
        .unwrap_or(deadline)
        .max(Instant::now());
    tracing::info!(
        active = baton.connections(),
        deadline_in_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis(),
        "draining: stopped accepting"
    );
    match tokio::time::timeout_at(close_at.into(), baton.idle()).await {
        Ok(()) => tracing::info!("drained: all connections done, exiting"),
        Err(_) => tracing::info!(
            remaining = baton.connections(),
            "drain deadline: closing the remaining connections, exiting"
        ),
    }
    Ok(())
}

/// Accepts one connection (fresh or adopted) and spawns its task.
/// Cancel-safe, so it can race the drain in `select!`.
async fn accept_one(incoming: &mut baton_child::Incoming, baton: &Baton, app: &Arc<App>) {
    match incoming.accept().await {
        Ok(conn) => {
            let guard = baton.track();
            tokio::spawn(serve_connection(conn, Arc::clone(app), guard));
        }
        Err(e) => {
            // EMFILE and friends: back off instead of spinning. The
            // connection stays queued in the kernel.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Counts a request as in flight on its connection until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn new(busy: &Arc<watch::Sender<usize>>) -> Self {
        busy.send_modify(|n| *n += 1);
        InFlight(Arc::clone(busy))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn serve_connection(conn: Stream, app: Arc<App>, guard: ConnGuard) {
    let _guard = guard;
    if let Some(Err(e)) = conn.tcp().map(|s| s.set_nodelay(true)) {
        tracing::debug!(error = %e, "TCP_NODELAY");
    }
    // Requests served on this TCP connection, across generations.
    let served = conn
        .adopted()
        .and_then(|m| m.get("requests"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if conn.adopted().is_some() {
        tracing::debug!(served, "serving an adopted connection");
    }
    let served = Arc::new(AtomicU64::new(served));
    let busy = Arc::new(watch::Sender::new(0usize));
    let service = {
        let (app, served, busy) = (Arc::clone(&app), Arc::clone(&served), Arc::clone(&busy));
        service_fn(move |req| -> BoxFuture<Result<_, Infallible>> {
            // Counted from the moment hyper has the request, so a hand-over
            // never cuts into it.
            let in_flight = InFlight::new(&busy);
            served.fetch_add(1, Ordering::Relaxed);
            let app = Arc::clone(&app);
            Box::pin(async move {
                let resp = app.handle(req).await;
                drop(in_flight);
                Ok(resp)
            })
        })
    };
    let mut http = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(conn), service);

    let mut busy_rx = busy.subscribe();
    let mut handing_over = false;
    let result = loop {
        tokio::select! {
            // hyper first: a response that just completed is encoded (without
            // `Connection: close`) before the hand-over starts.
            biased;
            res = std::future::poll_fn(|cx| http.poll_without_shutdown(cx)) => break res,
            () = hand_over_point(&app, &mut busy_rx), if !handing_over => {
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
    let meta = serde_json::json!({ "requests": served.load(Ordering::Relaxed) });
    let buffered = parts.read_buf.len();
    match app
        .baton
        .hand_over(parts.io.into_inner(), &parts.read_buf, &meta)
        .await
    {
        Ok(()) => tracing::debug!(buffered, "connection handed over"),
        Err(e) => tracing::warn!(error = %e, "hand-over failed; connection closed"),
    }
}

/// Resolves when this connection should be handed over: the drain asked for
/// migration and no request is in flight on it.
async fn hand_over_point(app: &App, busy: &mut watch::Receiver<usize>) {
    if app.ignore_drain || !app.baton.is_supervised() {
        return std::future::pending().await;
    }
    if !app.baton.wait_drain().await.migrate {
        return std::future::pending().await;
    }
    // The sender lives as long as the connection's service.
    let _ = busy.wait_for(|n| *n == 0).await;
}

impl App {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        tracing::debug!(method = %req.method(), path = req.uri().path(), "request");
        let mut resp = match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/") => self.hello(),
            (&Method::GET | &Method::HEAD, "/sleep") => match sleep_ms(req.uri().query()) {
                Some(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    self.hello()
                }
                None => text(
                    StatusCode::BAD_REQUEST,
                    format!("expected /sleep?ms=N with N <= {MAX_SLEEP_MS}\n"),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        };
        // Decided when the response is built, i.e. after any in-flight wait:
        // a request that started before the drain still gets the close.
        // With migration the connection lives on in the next generation.
        if !self.ignore_drain {
            if let Some(info) = self.baton.draining() {
                if !(info.migrate && self.baton.is_supervised()) {
                    resp.headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
            }
        }
        resp
    }

    fn hello(&self) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(self.body.clone()));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `ms=N` from a query string.
fn sleep_ms(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .filter(|ms| *ms <= MAX_SLEEP_MS)
}

#[cfg(test)]
mod tests {
    use super::sleep_ms;

    #[test]
    fn sleep_query_parsing() {
        assert_eq!(sleep_ms(Some("ms=250")), Some(250));
        assert_eq!(sleep_ms(Some("x=1&ms=7")), Some(7));
        assert_eq!(sleep_ms(Some("ms=abc")), None);
        assert_eq!(sleep_ms(Some("ms=99999999999")), None);
        assert_eq!(sleep_ms(None), None);
    }
}
