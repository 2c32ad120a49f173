//! What one upgrade did: its outcome and figures. Status, events, history and
//! release replies all carry it, so it has a module of its own.

use serde::{Deserialize, Serialize};

/// How an upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeResult {
    /// The candidate became active.
    Promoted,
    /// The candidate failed; the old generation carries on.
    RolledBack,
}

/// The outcome and timings of one upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// Promoted or rolled back.
    pub result: UpgradeResult,
    /// Why it rolled back (or `None` when promoted).
    pub reason: Option<String>,
    /// From the upgrade request to promotion or rollback.
    pub duration_ms: u64,
    /// The candidate's generation number.
    pub generation: u64,
    /// The candidate's pid, if it was spawned.
    pub pid: Option<u32>,
    /// Stateful only: old generation stopped accepting until the candidate accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_gap_ms: Option<f64>,
    /// Stateful only: snapshot size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_bytes: Option<u64>,
    /// Stateful only: quiesce to snapshot received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ms: Option<f64>,
    /// Stateful only: snapshot handed to the candidate until restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<f64>,
    /// Connections handed over from the old generation(s) to this one: written
    /// to its control socket.
    #[serde(default)]
    pub migrated_connections: u64,
    /// Connections the old generation(s) sent to baton for this one:
    /// `migrated_connections + lost_connections`.
    #[serde(default)]
    pub handed_over_connections: u64,
    /// Connections handed over that never reached this generation (each one was
    /// closed, and logged at ERROR with the reason).
    #[serde(default)]
    pub lost_connections: u64,
    /// baton's own share of the upgrade, in ms: spawning the candidate (fork + exec)
    /// plus the time from its READY to the old generation being told to drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_ms: Option<f64>,
    /// Of `supervisor_ms`: creating the candidate's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_ms: Option<f64>,
    /// Of `supervisor_ms`: fork + exec of the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn_ms: Option<f64>,
    /// Of `supervisor_ms`: from the candidate's READY to the old generation told to drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_drain_ms: Option<f64>,
    /// Pre-copy: rounds sent while the old generation served (round 0, the
    /// full copy, included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_rounds: Option<u32>,
    /// Pre-copy: bytes sent in those rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_bytes: Option<u64>,
    /// Pre-copy: why the live rounds stopped ("converged", "round limit",
    /// "timeout", "not converging ...").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_stop: Option<String>,
    /// Pre-copy: bytes of the last round, sent while quiesced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_delta_bytes: Option<u64>,
    /// Stateful: peak resident memory (VmHWM) of the old generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_peak_rss_bytes: Option<u64>,
    /// Stateful: peak resident memory (VmHWM) of the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_peak_rss_bytes: Option<u64>,
}

impl UpgradeReport {
    /// A report with no timings yet.
    pub fn new(result: UpgradeResult, generation: u64, pid: Option<u32>) -> Self {
        UpgradeReport {
            result,
            reason: None,
            duration_ms: 0,
            generation,
            pid,
            accept_gap_ms: None,
            snapshot_bytes: None,
            snapshot_ms: None,
            restore_ms: None,
            migrated_connections: 0,
            handed_over_connections: 0,
            lost_connections: 0,
            supervisor_ms: None,
            cgroup_ms: None,
            spawn_ms: None,
            ready_to_drain_ms: None,
            precopy_rounds: None,
            precopy_bytes: None,
            precopy_stop: None,
            final_delta_bytes: None,
            old_peak_rss_bytes: None,
            new_peak_rss_bytes: None,
        }
    }
}
