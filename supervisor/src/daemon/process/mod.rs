//! A generation's process: spawned (into its own cgroup where it can be), watched
//! until it exits, and everything it left behind found or killed.

pub mod cgroup;
mod event;
pub mod generation;
pub mod spawn;
pub mod strays;
mod tasks;
