//! `baton-protocol`: the wire protocol of the baton supervisor, defined once.
//!
//! - [`child`]: the child contract (environment variables, and the messages
//!   on each child's control socket);
//! - [`control`]: baton's own control socket (`baton status|upgrade|stop`);
//! - [`events`]: what happens to generations (`baton events`, `baton history`);
//! - [`release`]: the release lifecycle (`baton release ...`);
//! - [`reexec`]: baton re-executing itself in place (`baton reexec`);
//! - [`wire`]: the framing both use (one JSON object per line, fds as
//!   `SCM_RIGHTS`), with every received fd owned on every path.
//!
//! The supervisor, the SDK, the tests and the bench depend on this crate;
//! other languages implement the same JSON from `PROTOCOL.md`.
//!
//! ```
//! use baton_protocol::{ChildMsg, Feature, PROTOCOL_VERSION};
//!
//! let hello = ChildMsg::Hello { protocol: PROTOCOL_VERSION, features: vec![Feature::Adopt], restores: None };
//! let line = baton_protocol::wire::encode(&hello)?;
//! assert_eq!(line, b"{\"type\":\"hello\",\"protocol\":1,\"features\":[\"adopt\"]}\n");
//! # Ok::<(), serde_json::Error>(())
//! ```
#![deny(missing_docs)]

pub mod child;
pub mod control;
pub mod events;
pub mod reexec;
pub mod release;
pub mod report;
#[cfg(feature = "io")]
mod sys;
pub mod wire;

pub use crate::child::*;
pub use crate::control::*;
pub use crate::events::*;
pub use crate::reexec::*;
pub use crate::release::*;
pub use crate::report::*;
