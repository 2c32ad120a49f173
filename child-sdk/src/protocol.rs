//! The wire protocol between `baton` and its children, defined once.
//!
//! The supervisor imports these types; other languages implement the same JSON
//! (see `PROTOCOL.md` at the repository root).
//!
//! Transport: the child inherits a Unix stream socket at the fd named by
//! [`ENV_CONTROL_FD`]. Each message is one JSON object on one line. A message
//! that carries file descriptors says how many in its `fds` field; the fds travel
//! as `SCM_RIGHTS` in the same `sendmsg` as the first byte of that line, so a
//! reader that queues received fds in order and pops `fds` of them per parsed
//! line always pairs them correctly.

use serde::{Deserialize, Serialize};

/// Number of inherited listening sockets, starting at fd 3 (systemd convention).
pub const ENV_LISTEN_FDS: &str = "LISTEN_FDS";
/// Colon-separated names of the inherited listeners, in fd order.
pub const ENV_LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The pid the listeners are meant for; a process ignores them if it is not its own.
pub const ENV_LISTEN_PID: &str = "LISTEN_PID";
/// Path of the supervisor's sd_notify datagram socket (`@` prefix = abstract).
pub const ENV_NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The generation number baton gave this child (1, 2, 3, ...).
pub const ENV_GENERATION: &str = "BATON_GENERATION";
/// The fd number of the control socket for SDK-aware children.
pub const ENV_CONTROL_FD: &str = "BATON_CONTROL_FD";
/// The first inherited listener fd (systemd's `SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// Protocol version spoken by this crate. Bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// What an SDK child can do beyond the basics; announced in [`ChildMsg::Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Takes part in the two-phase stateful upgrade (snapshot / restore).
    State,
    /// Adopts live connections handed over by the previous generation.
    Adopt,
}

/// A message from the supervisor to a child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SupervisorMsg {
    /// Stop accepting, finish in-flight work and exit. The supervisor sends
    /// SIGKILL after `deadline_ms`. When `migrate` is true the next generation
    /// adopts connections: hand each over at a request boundary with
    /// [`ChildMsg::Migrate`] instead of closing it.
    Drain {
        /// Milliseconds until SIGKILL.
        deadline_ms: u64,
        /// Whether the successor accepts migrated connections.
        #[serde(default)]
        migrate: bool,
    },
    /// Stateful upgrade, old generation: stop accepting, finish in-flight work,
    /// pause connections and answer with [`ChildMsg::Snapshot`] (or
    /// [`ChildMsg::SnapshotFailed`]).
    Quiesce,
    /// Stateful upgrade, candidate: restore this snapshot (one fd: a sealed
    /// memfd holding `{"version": V, "state": ...}`), then answer
    /// [`ChildMsg::Restored`] or [`ChildMsg::Rejected`]. `fds` is 1.
    Restore {
        /// Number of fds attached (always 1).
        fds: u32,
        /// Size of the snapshot in bytes.
        size: u64,
    },
    /// Stateful candidate: there is no predecessor state (first generation, or
    /// the predecessor is gone); start with empty state.
    Fresh {
        /// Why there is no state (e.g. "first generation").
        reason: String,
    },
    /// Stateful upgrade, old generation: the upgrade was aborted; start
    /// accepting again with state intact.
    Resume {
        /// Why the upgrade was aborted.
        reason: String,
    },
    /// Stateful upgrade, old generation: the candidate was promoted. Hand over
    /// (when `migrate`) or close the paused connections, then exit.
    Commit {
        /// Milliseconds until SIGKILL.
        deadline_ms: u64,
        /// Whether the successor accepts migrated connections.
        #[serde(default)]
        migrate: bool,
    },
    /// Connection migration, new generation: adopt this live connection (one
    /// fd) as if it had just been accepted on `listener`.
    Adopt {
        /// Number of fds attached (always 1).
        fds: u32,
        /// Name of the listener the connection was accepted on.
        listener: String,
        /// Bytes already read from the connection but not yet processed (base64).
        #[serde(default)]
        buffered: String,
        /// Application metadata, opaque to baton.
        #[serde(default)]
        meta: serde_json::Value,
    },
}

/// A message from a child to the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChildMsg {
    /// First message on the control socket: protocol version and features.
    Hello {
        /// [`PROTOCOL_VERSION`] of the child's SDK.
        protocol: u32,
        /// Optional capabilities.
        #[serde(default)]
        features: Vec<Feature>,
    },
    /// Live connection count, sent when it changes (rate-limited by the SDK).
    Connections {
        /// Connections currently open.
        active: u64,
    },
    /// Stateful candidate: initialised everything except state; waiting for
    /// [`SupervisorMsg::Restore`].
    Prepared,
    /// Stateful old generation: the snapshot (one fd, a sealed memfd). `fds` is 1.
    Snapshot {
        /// Number of fds attached (always 1).
        fds: u32,
        /// Schema version of the state.
        version: u32,
        /// Size of the snapshot in bytes.
        size: u64,
    },
    /// Stateful old generation: could not write a snapshot; the upgrade aborts.
    SnapshotFailed {
        /// Why.
        reason: String,
    },
    /// Stateful candidate: the snapshot was restored (and migrated if older).
    Restored {
        /// Schema version found in the snapshot.
        from_version: u32,
        /// Milliseconds spent restoring.
        restore_ms: u64,
    },
    /// Stateful candidate: the snapshot was rejected; the upgrade aborts.
    Rejected {
        /// Why; shown in `baton status`.
        reason: String,
    },
    /// Old generation: hand this live connection (one fd) to the successor.
    Migrate {
        /// Number of fds attached (always 1).
        fds: u32,
        /// Name of the listener the connection was accepted on.
        listener: String,
        /// Bytes already read but not processed (base64).
        #[serde(default)]
        buffered: String,
        /// Application metadata, opaque to baton.
        #[serde(default)]
        meta: serde_json::Value,
    },
}

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
}

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
    /// Connections handed over from the old generation(s) to this one.
    #[serde(default)]
    pub migrated_connections: u64,
    /// baton's own share of the upgrade, in ms: spawning the candidate (fork + exec)
    /// plus the time from its READY to the old generation being told to drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_ms: Option<f64>,
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
}
