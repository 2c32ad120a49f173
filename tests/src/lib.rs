//! End-to-end test support for baton: the load generator, a RESP client and the harness
//! that runs the real `baton` binary around the example apps.

pub mod chaos;
pub mod conformance;
pub mod fleet;
pub mod harness;
pub mod hog;
pub mod http;
pub mod idle;
pub mod kv;
pub mod load;
pub mod metrics;
pub mod packaging;
pub mod python;
pub mod readme;
pub mod rehearse;
pub mod releases;
pub mod resp;
mod sys;
pub mod systemd;
pub mod udp;
pub mod upgrade;
pub mod venv;
