//! `baton-child`: the child-side SDK for the baton supervisor.
//!
//! An app linked with this crate takes its listening sockets from baton (or
//! from systemd socket activation) by name, tells baton when it is ready,
//! learns when to drain, and reports its live connections. When it asks, it
//! also hands its state and its live connections to the next generation.
//! Without a supervisor everything still works: listeners bind their
//! fallbacks and drain comes from SIGTERM / SIGINT.
//!
//! ```no_run
//! # async fn f(env: baton_child::Env) -> Result<(), baton_child::Error> {
//! use baton_child::{Baton, Event};
//!
//! // 1. start, announcing what this app supports
//! let baton = Baton::builder().adopt().stateful(1).start(env)?;
//! // 2. one listener call for TCP and Unix; the fallback is used outside baton
//! let mut incoming = baton.incoming("kv", "127.0.0.1:6379")?;
//! // 3. state, typed at the call, migrated or rejected by the app
//! let db: Vec<String> = baton
//!     .restore(|version, _json| Err(format!("no migration from {version}")))
//!     .await?
//!     .unwrap_or_default();
//! // 4. ready
//! baton.ready()?;
//! loop {
//!     tokio::select! {
//!         stream = incoming.accept() => {
//!             let Ok(stream) = stream else { continue }; // fresh or adopted
//!             let guard = baton.track();
//!             tokio::spawn(async move { let _guard = guard; drop(stream); });
//!         }
//!         event = baton.next_event() => match event {
//!             Event::Quiesce => baton.snapshot(&db)?,
//!             Event::Resume { .. } => {}
//!             Event::Drain(_) => break,
//!             _ => {}
//!         },
//!     }
//! }
//! // 5. hand live connections over at a request boundary with
//! //    `baton.hand_over(stream, already_read, &meta)`, or close them
//! incoming.stop();
//! baton.idle().await;
//! # Ok(()) }
//! ```
//!
//! For hyper and axum apps, `baton_child::hyper::serve` (feature `hyper`)
//! does the whole drain and hand-over dance in one call.
//! `baton_child::testing` (feature `testing`) has a fake supervisor for an
//! app's own tests.
//!
//! The wire protocol is in the `baton-protocol` crate, and described for
//! other languages in `PROTOCOL.md`.
#![deny(missing_docs)]

mod adopt;
mod baton;
mod codec;
mod conns;
mod credit;
mod dispatch;
mod drain;
mod env;
mod error;
mod events;
mod handover;
#[cfg(feature = "hyper")]
pub mod hyper;
mod incoming;
mod listeners;
mod notify;
mod precopy;
mod send;
mod state;
mod stream;
mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// Starts an app under baton without `unsafe`: takes the environment while this process
/// is still single-threaded ([`Env::take_checked`]), builds a multi-threaded tokio
/// runtime, and runs `app(env)` on it to its end. Returns what `app` returned.
///
/// # Errors
///
/// The environment cannot be taken (malformed, or threads are running already), or
/// the runtime cannot be built. The app's own errors are in its return value.
///
/// # Example
///
/// ```no_run
/// fn main() -> Result<(), baton_child::Error> {
///     baton_child::run(|env| async move {
///         let baton = baton_child::Baton::builder().start(env)?;
///         let mut incoming = baton.incoming("http", "127.0.0.1:8080")?;
///         baton.ready()?;
///         let _ = incoming.accept().await;
///         Ok(())
///     })?
/// }
/// ```
pub fn run<F, Fut>(app: F) -> Result<Fut::Output>
where
    F: FnOnce(Env) -> Fut,
    Fut: std::future::Future,
{
    let env = Env::take_checked()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("building the tokio runtime", e))?;
    Ok(rt.block_on(app(env)))
}

/// The README's SDK example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// This crate's README example, compiled as a doctest (it uses the `hyper` feature).
#[cfg(all(doctest, feature = "hyper"))]
#[doc = include_str!("../README.md")]
pub struct CrateReadmeDoctests;

pub use crate::baton::{Baton, Builder};
pub use crate::conns::ConnGuard;
pub use crate::drain::{DrainCause, DrainInfo};
pub use crate::env::Env;
pub use crate::error::{Error, Result};
pub use crate::events::Event;
pub use crate::incoming::Incoming;
pub use crate::precopy::{Chunked, Chunks};
pub use crate::stream::Stream;
