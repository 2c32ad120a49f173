//! axum-counter: a stateful axum app. Its counter survives upgrades, and no increment is
//! lost or counted twice: `hyper::Server::state` pauses requests at a boundary from the
//! snapshot to the commit, then hands every connection to the new process.
//!
//! `baton run --state --listen http=127.0.0.1:3000 -- axum-counter`; `GET /incr` adds one
//! and answers the new value, `GET /count` reads it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use axum::{Router, extract::State, routing::get};
use baton_child::{Baton, Env, Event, hyper::Server};

fn main() -> anyhow::Result<()> {
    baton_child::run(serve)?
}

async fn serve(env: Env) -> anyhow::Result<()> {
    let baton = Baton::builder().adopt().stateful(1).start(env)?;
    let incoming = baton.incoming("http", "127.0.0.1:3000")?;
    let count: u64 = baton
        .restore(|v, _| Err(format!("no schema {v}")))
        .await?
        .unwrap_or(0);
    test_hooks();
    let counter = Arc::new(AtomicU64::new(count));
    let me = format!(
        "pid={} generation={}",
        std::process::id(),
        baton.generation()
    );
    let app = Router::new()
        .route(
            "/incr",
            get(move |State(c): State<Arc<AtomicU64>>| {
                let me = me.clone();
                async move { format!("{} {me}\n", c.fetch_add(1, SeqCst) + 1) }
            }),
        )
        .route(
            "/count",
            get(|State(c): State<Arc<AtomicU64>>| async move { format!("{}\n", c.load(SeqCst)) }),
        )
        .with_state(Arc::clone(&counter));
    baton.ready()?;
    if std::env::args().any(|a| a == "--naive") {
        return naive(baton, incoming, app, counter).await;
    }
    let read = Arc::clone(&counter);
    Server::new()
        .state(move || read.load(SeqCst))
        .serve(baton, incoming, app)
        .await?;
    Ok(())
}

/// For the tests: `--crash-if-exists PATH` makes a candidate die after its restore once.
fn test_hooks() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(path) = args
        .iter()
        .position(|a| a == "--crash-if-exists")
        .and_then(|i| args.get(i + 1))
    {
        if std::fs::remove_file(path).is_ok() {
            std::process::exit(3);
        }
    }
}

/// For the tests: the obvious code without `Server::state`, which loses increments. The
/// stateless `serve` keeps serving between the snapshot and the commit, and what it
/// serves then changes a state that has already been sent.
async fn naive(
    baton: Baton,
    incoming: baton_child::Incoming,
    app: Router,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let events = baton.clone();
    tokio::spawn(async move {
        loop {
            match events.next_event().await {
                Event::Quiesce => {
                    let _ = events.snapshot(&counter.load(SeqCst));
                }
                Event::Drain(_) => break,
                _ => {}
            }
        }
    });
    baton_child::hyper::serve(baton, incoming, app).await?;
    Ok(())
}
