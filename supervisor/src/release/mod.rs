//! What a generation runs, and whether it is good: the executable (checked at every
//! exec), the release store, the checks that gate a release (preflight and health),
//! and the release lifecycle (install, probation, permanent, rollback).

pub mod exe;
pub mod health;
pub mod lifecycle;
pub mod store;
