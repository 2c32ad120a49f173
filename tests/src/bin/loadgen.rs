//! `baton-loadgen`: closed-loop HTTP/1.1 load with honest failure accounting.
//!
//! ```text
//! baton-loadgen --addr 127.0.0.1:8080 --keepalive 4 --fresh 4 --duration 10s [--json]
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use baton_tests::load::{LoadGen, LoadOpts};
use clap::Parser;

/// Closed-loop HTTP/1.1 load generator: counts every request, ok or failed by kind.
#[derive(Debug, Parser)]
#[command(name = "baton-loadgen", version)]
struct Args {
    /// Target address, HOST:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// Keep-alive clients (one connection each, request after request).
    #[arg(long, default_value_t = 4)]
    keepalive: usize,
    /// Connection-per-request clients.
    #[arg(long, default_value_t = 4)]
    fresh: usize,
    /// How long to run, e.g. 10s, 500ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Per-request timeout (connect included).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().context("building the tokio runtime")?;
    let report = rt.block_on(async {
        let load = LoadGen::start(
            args.addr,
            LoadOpts {
                keepalive: args.keepalive,
                fresh: args.fresh,
                request_timeout: args.timeout,
                path: args.path.clone(),
                ..LoadOpts::default()
            },
        );
        tokio::time::sleep(args.duration).await;
        load.stop().await
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
