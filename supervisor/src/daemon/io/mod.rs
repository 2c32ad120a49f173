//! What the daemon talks through: the listening sockets it holds, the control server,
//! the notify socket, the metrics endpoint, the event stream and the history file.

pub mod control;
pub mod events;
pub mod history;
pub mod listeners;
pub mod metrics;
pub mod notify;
