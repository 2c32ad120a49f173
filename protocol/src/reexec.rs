//! baton re-executing itself in place (`baton reexec`, SIGUSR2): the request,
//! and what it reports.

use serde::{Deserialize, Serialize};

/// One baton executable, as a reexec report names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatonBuild {
    /// Its version (`baton --version`).
    pub version: String,
    /// Its GNU build id (hex), else the first 20 bytes of its sha256.
    pub build_id: String,
    /// Where it was exec'd from.
    pub exe: String,
}

/// The outcome of a reexec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReexecResult {
    /// Accepted; not waited for.
    Accepted,
    /// The new executable runs and supervises.
    Done,
    /// It did not take over; the previous executable carries on.
    Failed,
}

/// What [`crate::ControlRequest::Reexec`] reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReexecReport {
    /// Outcome.
    pub result: ReexecResult,
    /// The executable that ran before.
    pub old: BatonBuild,
    /// The one that runs now (`Done`), or the one that was tried (`Failed`, when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<BatonBuild>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// From the request to the new executable supervising, in ms.
    #[serde(default)]
    pub duration_ms: f64,
}

/// baton itself, for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorInfo {
    /// The executable running now.
    pub build: BatonBuild,
    /// Unix time (ms) this baton started (the first exec, not the last reexec).
    pub started_at: u64,
    /// Successful reexecs so far.
    pub reexecs: u32,
    /// The last reexec, successful or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reexec: Option<ReexecReport>,
    /// baton's nice value (`--nice`; its children run at the one it started with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nice: Option<i32>,
}
