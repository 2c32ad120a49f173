//! The client side of `baton`: every command but `run` talks to a running baton
//! through its control socket (or, for `release` with `--releases`, to a store).

pub mod args;
pub mod conn;
pub mod generate;
pub mod observe;
pub mod release;
pub mod snapshot;
pub mod status;
pub mod upgrade;
