//! What happens to generations, as a stream (`baton events`) and as history
//! (`baton history`).

use serde::{Deserialize, Serialize};

use crate::report::UpgradeReport;

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time in ms.
    pub at_ms: u64,
    /// The generation it is about (0: baton itself).
    pub generation: u64,
    /// Its pid, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Why a generation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartReason {
    /// baton's first generation.
    Initial,
    /// An upgrade was asked for.
    Upgrade,
    /// The active generation died; this replaces it.
    Replace,
    /// A release on probation failed; this goes back to the permanent one.
    Revert,
    /// A rollback asked for by hand, to a release that was permanent before.
    Rollback,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A generation was started.
    Spawned {
        /// Why.
        why: StartReason,
        /// The release (or executable label) it runs.
        image: String,
    },
    /// It said READY (or its delay passed).
    Ready,
    /// The state snapshot arrived from the old generation.
    Snapshot {
        /// Its size.
        bytes: u64,
        /// From quiesce to the snapshot, in ms.
        ms: f64,
    },
    /// A pre-copy round arrived whole from the old generation.
    Precopy {
        /// The round (0: the full copy).
        round: u32,
        /// Its size.
        bytes: u64,
        /// Its chunks.
        chunks: u64,
        /// How long the round took, in ms: for the last one, from the decision to stop
        /// the live rounds, which includes waiting for the candidate to catch up.
        ms: f64,
        /// Sent while the old generation was quiesced (the last one).
        #[serde(default)]
        quiesced: bool,
        /// The last round only: how much of it the old generation was paused, in ms
        /// (from its quiesce to the round's end). The pause clients see is this plus the
        /// candidate's restore: the upgrade's accept gap.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paused_ms: Option<f64>,
    },
    /// The candidate restored the snapshot.
    Restored {
        /// From handing it over to `restored`, in ms.
        ms: f64,
    },
    /// It became the active generation.
    Promoted {
        /// Why it was started.
        why: StartReason,
        /// The release (or executable label) it runs.
        image: String,
        /// The upgrade's figures.
        report: UpgradeReport,
    },
    /// It was rolled back.
    RolledBack {
        /// Why it was started.
        why: StartReason,
        /// The release (or executable label) it would have run.
        image: String,
        /// The upgrade's figures, with the reason.
        report: UpgradeReport,
    },
    /// It was told to drain.
    Draining {
        /// Connections it reported last.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connections: Option<u64>,
    },
    /// It exited as expected (drained, rolled back, stopped).
    Exited {
        /// "exit status 0", "signal 9 (SIGKILL)".
        how: String,
    },
    /// The active generation died.
    Crashed {
        /// How.
        how: String,
    },
    /// A release became permanent.
    Permanent {
        /// The release.
        release: String,
    },
    /// A release failed its readiness or its probation.
    ReleaseFailed {
        /// The release.
        release: String,
        /// Why.
        reason: String,
    },
    /// An upgrade's figures are final: every older generation has exited and
    /// everything it handed over was delivered or counted as lost. Its history
    /// line is written now.
    Settled {
        /// The upgrade's final figures.
        report: UpgradeReport,
    },
    /// baton re-executed itself (or tried to).
    Reexec {
        /// The outcome.
        report: crate::reexec::ReexecReport,
    },
}

/// One upgrade in `baton history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix time in ms of the outcome.
    pub at_ms: u64,
    /// Why the generation was started.
    pub why: StartReason,
    /// The release (or executable label) it ran.
    pub release: String,
    /// The figures: result, reason, durations, accept gap, snapshot bytes, migrated
    /// connections.
    pub report: UpgradeReport,
}
