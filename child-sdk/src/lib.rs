//! `baton-child`: the child-side SDK for the baton supervisor.
//!
//! An application linked with this crate takes its listening sockets from
//! baton (or from systemd socket activation) by name, tells baton when it is
//! ready, learns when to drain, and reports its live connections. Without a
//! supervisor everything still works: listeners fall back to binding, drain
//! comes from SIGTERM / SIGINT.
//!
//! ```no_run
//! # async fn f() -> Result<(), baton_child::Error> {
//! let mut baton = baton_child::Baton::from_env()?;
//! let listener = baton.tcp_listener("http", "127.0.0.1:8080")?;
//! baton.ready()?;
//! let info = baton.drain().wait().await;
//! drop(listener);
//! # let _ = info; Ok(()) }
//! ```
//!
//! Beyond that, announced with the [`Builder`]:
//!
//! - stateful upgrades ([`Builder::stateful`], [`Baton::state`],
//!   [`StateHandle`]): a versioned snapshot in a sealed memfd, restored (and
//!   migrated from older schema versions) by the next generation;
//! - connection migration ([`Builder::adopt`], [`Baton::tcp_incoming`],
//!   [`Baton::unix_incoming`], [`Baton::migrator`]): live TCP and Unix
//!   stream connections move to the next generation at a request boundary,
//!   with the bytes already read.
//!
//! The wire protocol is in [`protocol`] (types) and [`wire`] (framing), and
//! is described for other languages in `PROTOCOL.md`.
#![deny(missing_docs)]

mod baton;
mod conns;
mod control;
mod drain;
mod env;
mod error;
mod listeners;
mod migrate;
mod notify;
mod state;
mod sys;
#[cfg(test)]
mod testutil;

pub use crate::baton::{Baton, Builder};
pub use crate::conns::{ConnGuard, Connections};
pub use crate::drain::{Drain, DrainCause, DrainInfo};
pub use crate::env::Env;
pub use crate::error::{Error, Result};
pub use crate::listeners::ListenerKind;
pub use crate::migrate::{Accepted, Migrator, PrefixedStream, TcpIncoming, UnixIncoming};
pub use crate::state::{StateEvent, StateHandle};
