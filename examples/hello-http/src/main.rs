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
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use baton_child::{Baton, Env};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing_subscriber::EnvFilter;

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

    /// For tests: exit with status 3 this long after READY (a release that fails
    /// after it went live).
    #[arg(long, value_parser = humantime::parse_duration)]
    exit_after: Option<Duration>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        // A closed or full stderr loses a line; it must not panic the app.
        .log_internal_errors(false)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Still single-threaded: taking the environment (which removes the
    // contract variables) cannot race with another thread reading it.
    #[allow(unsafe_code)] // Env::take is unsafe by contract (no other thread).
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

/// What every request handler needs.
#[derive(Debug)]
struct App {
    body: Bytes,
}

/// The app as a tower service, which is what `baton_child::hyper` serves.
#[derive(Debug, Clone)]
struct Hello(Arc<App>);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower_service::Service<Request<Incoming>> for Hello {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let app = Arc::clone(&self.0);
        Box::pin(async move { Ok(app.handle(req).await) })
    }
}

async fn run(args: Args, env: Env) -> anyhow::Result<()> {
    let baton = Baton::builder()
        .adopt()
        .exit_on_second_signal(!args.ignore_drain)
        .start(env)
        .context("starting baton-child")?;
    let incoming = baton
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
    if let Some(after) = args.exit_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tracing::error!(?after, "--exit-after: exiting with status 3");
            std::process::exit(3);
        });
    }

    let app = Hello(Arc::new(App {
        body: Bytes::from(format!(
            "hello from pid={} generation={} label={}\n",
            std::process::id(),
            baton.generation(),
            args.label
        )),
    }));
    if args.ignore_drain {
        tracing::warn!("--ignore-drain: serving until killed");
        return serve_forever(incoming, app).await;
    }
    // Drains, hands connections over when the successor adopts them, and
    // returns once every connection is done or the deadline is near.
    baton_child::hyper::Server::new()
        .drain_timeout(args.drain_timeout)
        .serve(baton, incoming, app)
        .await
        .context("serving")?;
    tracing::info!("exiting");
    Ok(())
}

/// `--ignore-drain`: plain hyper, no drain and no hand-over.
async fn serve_forever(mut incoming: baton_child::Incoming, app: Hello) -> anyhow::Result<()> {
    loop {
        let stream = match incoming.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = Arc::clone(&app.0);
        let service = service_fn(move |req| {
            let app = Arc::clone(&app);
            async move { Ok::<_, Infallible>(app.handle(req).await) }
        });
        tokio::spawn(async move {
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

impl App {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        tracing::debug!(method = %req.method(), path = req.uri().path(), "request");
        match (req.method(), req.uri().path()) {
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
        }
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
