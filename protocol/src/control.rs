//! baton's own control socket: what `baton status`, `baton upgrade` and
//! `baton stop` send, and what they get back (one JSON line each way).

use serde::{Deserialize, Serialize};

use crate::report::UpgradeReport;

/// A request on the supervisor's control socket (`baton status|upgrade|stop`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Report [`Status`].
    Status,
    /// Start an upgrade. With `wait`, the reply comes once it is promoted or
    /// rolled back; otherwise at once.
    Upgrade {
        /// Wait for the outcome.
        #[serde(default)]
        wait: bool,
    },
    /// Drain every generation and exit.
    Stop,
    /// A release lifecycle step (needs `baton run --releases`).
    Release(crate::release::ReleaseRequest),
    /// Re-execute baton's executable in place (same pid, same children). With
    /// `wait`, the reply comes from the new executable once it supervises, or
    /// from the old one if it did not take over.
    Reexec {
        /// Wait for the outcome.
        #[serde(default)]
        wait: bool,
    },
    /// The recent events, one [`crate::Event`] per line; with `follow`, then every
    /// new one as it happens (the reply never ends).
    Events {
        /// Keep streaming.
        #[serde(default)]
        follow: bool,
    },
    /// A dry-run snapshot of the active generation: it quiesces, snapshots and
    /// resumes; nothing is committed. Answered by [`ControlReply::Snapshot`], then
    /// exactly `size` bytes of the snapshot on the same connection.
    Snapshot {
        /// Ask for this schema version (a down-migration) instead of the app's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema: Option<u32>,
    },
    /// The last upgrades, oldest first.
    History {
        /// At most this many (all kept: 100).
        #[serde(default)]
        n: Option<usize>,
    },
}

/// A reply on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ControlReply {
    /// Answer to [`ControlRequest::Status`].
    Status(Status),
    /// An upgrade was queued (no `wait`).
    Queued,
    /// Outcome of an upgrade that was waited for.
    Upgrade(UpgradeReport),
    /// Stop accepted; baton is draining.
    Stopping,
    /// Answer to [`ControlRequest::Release`].
    Release(crate::release::ReleaseReply),
    /// Answer to [`ControlRequest::Reexec`].
    Reexec(crate::reexec::ReexecReport),
    /// Answer to [`ControlRequest::Snapshot`]: `size` bytes of the snapshot follow
    /// this line (`{"version": V, "state": ...}`, as the app wrote it).
    Snapshot {
        /// The generation that took it.
        generation: u64,
        /// Its schema version.
        version: u32,
        /// Its size in bytes.
        size: u64,
        /// What the app declared its down-migration loses (JSON pointers into the
        /// state); empty for its own schema.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dropped: Vec<String>,
    },
    /// Answer to [`ControlRequest::History`].
    History {
        /// Oldest first.
        entries: Vec<crate::events::HistoryEntry>,
        /// Where it is persisted, if anywhere.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
    },
    /// The request could not be served.
    Error {
        /// Why.
        message: String,
    },
}

/// The phase of one generation, as shown in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Spawned, not yet ready (a candidate, or the first generation).
    Starting,
    /// Stateful candidate that said prepared, waiting for or restoring state.
    Restoring,
    /// Accepting new connections.
    Active,
    /// Stateful old generation, quiesced, waiting for commit or abort.
    Quiesced,
    /// No longer accepting; finishing or handing over connections.
    Draining,
}

/// One generation in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStatus {
    /// Generation number.
    pub generation: u64,
    /// Process id.
    pub pid: u32,
    /// Current phase.
    pub phase: Phase,
    /// Unix time in milliseconds when it was spawned.
    pub started_at: u64,
    /// Live connections, when the child reports them (SDK children).
    pub connections: Option<u64>,
    /// The release it runs (with `--releases`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// The release on probation, in [`ReleasesStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbationStatus {
    /// Its version.
    pub version: String,
    /// Seconds until it is permanent (`None`: until made permanent by hand).
    pub seconds_left: Option<u64>,
    /// Failed health checks in a row so far.
    pub health_failures: u32,
}

/// The release lifecycle, in [`Status`] (with `--releases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasesStatus {
    /// The store's directory.
    pub store: String,
    /// The permanent release.
    pub permanent: Option<String>,
    /// The release on probation.
    pub probation: Option<ProbationStatus>,
    /// Which release baton booted, and why.
    pub boot: String,
    /// The last write to the store failed (a full disk, say): the store does not
    /// say what runs, and a restart would boot what it says. Cleared by the next
    /// write that succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
}

/// One listener in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// The listener's name (`LISTEN_FDNAMES`).
    pub name: String,
    /// `HOST:PORT` or `unix:PATH`.
    pub addr: String,
    /// Whether it came from systemd (socket activation or the fd store).
    pub inherited: bool,
}

/// What `baton status --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// baton's own pid.
    pub supervisor_pid: u32,
    /// The active generation number (0 before the first is ready).
    pub generation: u64,
    /// The active generation's pid, if any.
    pub pid: Option<u32>,
    /// Every running generation, oldest first.
    pub generations: Vec<GenerationStatus>,
    /// The last finished upgrade.
    pub last_upgrade: Option<UpgradeReport>,
    /// Whether an upgrade is running now.
    pub upgrading: bool,
    /// Upgrade requests waiting behind the running one (0 or 1: they coalesce).
    pub queued_upgrades: u32,
    /// Unexpected exits of the active generation so far.
    pub crashes: u64,
    /// The listeners baton holds.
    pub listeners: Vec<ListenerStatus>,
    /// baton's resident memory in KiB.
    pub rss_kb: u64,
    /// How generations are contained: `cgroup`, or `process group` with the reason
    /// cgroups are not used.
    #[serde(default)]
    pub containment: String,
    /// Processes that outlived their generation's main process (a `setsid()`
    /// grandchild, say) and were killed with its cgroup.
    #[serde(default)]
    pub strays_killed: u64,
    /// Without cgroups: processes outside every generation that still hold one of the
    /// listeners (left behind by a retired generation), which baton cannot contain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub strays: Vec<u32>,
    /// The release lifecycle, with `--releases`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub releases: Option<Box<ReleasesStatus>>,
    /// baton's own executable and its reexecs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<Box<crate::reexec::SupervisorInfo>>,
}
