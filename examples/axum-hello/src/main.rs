//! axum-hello: an axum app under baton. `baton_child::hyper::serve` drains it and hands
//! every keep-alive connection to the next generation at a request boundary, so clients
//! keep their connections across upgrades.
//!
//! `baton run --listen http=127.0.0.1:3000 -- axum-hello`; outside baton it binds the
//! address given as its first argument (default 127.0.0.1:3000).

use axum::Router;
use axum::routing::get;
use baton_child::{Baton, Env};

fn main() -> anyhow::Result<()> {
    #[allow(unsafe_code)] // Env::take is unsafe by contract (no other thread).
    // SAFETY: no other thread exists yet.
    let env = unsafe { Env::take() }?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(env))
}

async fn run(env: Env) -> anyhow::Result<()> {
    let fallback = std::env::args().nth(1);
    let baton = Baton::builder().adopt().start(env)?;
    let incoming = baton.incoming("http", fallback.as_deref().unwrap_or("127.0.0.1:3000"))?;

    let hello = format!(
        "hello from axum pid={} generation={}\n",
        std::process::id(),
        baton.generation()
    );
    let app = Router::new()
        .route("/", get(move || async move { hello }))
        .route("/health", get(|| async { "ok\n" }));

    baton.ready()?;
    baton_child::hyper::serve(baton, incoming, app).await?;
    Ok(())
}
