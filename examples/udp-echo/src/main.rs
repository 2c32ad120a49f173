//! udp-echo: a UDP responder for baton.
//!
//! Serves the UDP socket named `udp` (`baton run --listen udp=udp:HOST:PORT`, or
//! systemd's `ListenDatagram=`, or `--listen-fallback` standalone). Every datagram is
//! answered, from the same socket, with its own bytes followed by
//! ` pid=<pid> generation=<n>`.
//!
//! Drain: stop reading at once. Every generation reads the one kernel receive buffer
//! and the successor has been reading since before it said READY, so a datagram this
//! process does not read is read there; the one being answered is finished first.

use std::io::IsTerminal;

use anyhow::Context;
use baton_child::{Baton, Env};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// The socket this responder serves.
const SOCKET: &str = "udp";

/// A UDP echo responder for baton.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to bind when no socket named `udp` is inherited.
    #[arg(long, default_value = "127.0.0.1:5353")]
    listen_fallback: String,
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
    #[allow(unsafe_code)] // Env::take is unsafe by contract (no other thread).
    // SAFETY: still single-threaded: nothing else reads the environment.
    let env = unsafe { Env::take() }.context("reading the baton environment")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args, env))
}

async fn run(args: Args, env: Env) -> anyhow::Result<()> {
    let baton = Baton::builder()
        .start(env)
        .context("starting baton-child")?;
    let udp = baton
        .udp_socket(SOCKET, &args.listen_fallback)
        .context("taking the udp socket")?;
    let suffix = format!(
        " pid={} generation={}",
        std::process::id(),
        baton.generation()
    );
    tracing::info!(
        addr = %udp.local_addr().context("socket address")?,
        generation = baton.generation(),
        supervised = baton.is_supervised(),
        "serving"
    );
    baton.ready().context("sending READY")?;
    let mut buf = vec![0u8; 65536];
    let mut answered: u64 = 0;
    loop {
        tokio::select! {
            // recv_from is cancel-safe: a datagram is either read here or left
            // in the shared buffer for the successor.
            r = udp.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(x) => x,
                    // An ICMP error for an earlier reply: nothing to answer.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e).context("receiving"),
                };
                let mut reply = Vec::with_capacity(n + suffix.len());
                reply.extend_from_slice(&buf[..n]);
                reply.extend_from_slice(suffix.as_bytes());
                if let Err(e) = udp.send_to(&reply, peer).await {
                    tracing::warn!(%peer, error = %e, "cannot answer");
                }
                answered += 1;
            }
            d = baton.wait_drain() => {
                tracing::info!(cause = ?d.cause, answered, "draining: stopped reading");
                break;
            }
        }
    }
    Ok(())
}
