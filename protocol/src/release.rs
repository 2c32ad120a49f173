//! The release lifecycle on baton's control socket (`baton release ...`), and the
//! record of one release, which is also what the store's `releases.json` holds.

use serde::{Deserialize, Serialize};

use crate::report::UpgradeReport;

/// Where a release is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Added to the store, never installed.
    Unpacked,
    /// Installed and promoted, on probation (not yet permanent).
    Current,
    /// Confirmed: what baton boots and what a revert returns to.
    Permanent,
    /// Was permanent (or current) once, replaced since.
    Old,
    /// Failed its preflight, its readiness gate or its probation.
    Failed,
}

impl ReleaseStatus {
    /// The lower-case name, as `release list` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseStatus::Unpacked => "unpacked",
            ReleaseStatus::Current => "current",
            ReleaseStatus::Permanent => "permanent",
            ReleaseStatus::Old => "old",
            ReleaseStatus::Failed => "failed",
        }
    }
}

/// The outcome of one lifecycle step, kept with the release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResult {
    /// Unix time in seconds.
    pub at: u64,
    /// What was done: `add`, `check`, `install`, `permanent`, `revert`, ...
    pub action: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// Details (the reason of a failure, the preflight's output).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One release in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Its version: the directory name under the store.
    pub version: String,
    /// Where it is in its life.
    pub status: ReleaseStatus,
    /// sha256 of its executable (PROGRAM inside it), lower-case hex.
    pub sha256: String,
    /// Unix time in seconds when it was added.
    pub added: u64,
    /// The most recent results, oldest first (bounded).
    #[serde(default)]
    pub results: Vec<ReleaseResult>,
}

impl Release {
    /// The most recent result, if any.
    pub fn last_result(&self) -> Option<&ReleaseResult> {
        self.results.last()
    }
}

/// What `baton release install --wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitFor {
    /// Answer at once.
    Nothing,
    /// Answer at promotion (probation has started).
    Promoted,
    /// Answer once the release is permanent, or reverted.
    Permanent,
}

/// A `baton release ...` request for a running baton.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ReleaseRequest {
    /// Every release, newest first.
    List,
    /// Run the preflight of VERSION without starting anything that serves.
    Check {
        /// The release.
        version: String,
    },
    /// Check, then upgrade to VERSION; probation follows promotion.
    Install {
        /// The release.
        version: String,
        /// When to answer.
        wait: WaitFor,
    },
    /// make_permanent by hand.
    Permanent {
        /// The release (must be the current one).
        version: String,
    },
    /// Revert a release on probation, else install the previous permanent one.
    Rollback {
        /// When to answer.
        wait: WaitFor,
    },
    /// Delete VERSION from the store.
    Remove {
        /// The release.
        version: String,
    },
}

/// How a lifecycle request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseResultKind {
    /// Done (list, check, permanent, remove), or an install that was not waited for.
    Ok,
    /// Promoted and on probation.
    Promoted,
    /// Permanent.
    Permanent,
    /// Failed before promotion (preflight, readiness, restore); the old one carries on.
    RolledBack,
    /// Failed during probation; baton went back to the permanent release.
    Reverted,
    /// Failed during probation, but the revert itself was refused (e.g. the live
    /// generation cannot write its state in a schema the old release restores).
    RevertRefused,
    /// Promoted, but probation ended without a verdict (baton stopped, or another
    /// install superseded it).
    Interrupted,
}

/// Reply to a [`ReleaseRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseReply {
    /// How it ended.
    pub result: ReleaseResultKind,
    /// The release concerned, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why it failed, or the preflight's output.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The store after the request (for `list`, and after every change).
    #[serde(default)]
    pub releases: Vec<Release>,
    /// The upgrade behind an install, rollback or revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeReport>,
}
