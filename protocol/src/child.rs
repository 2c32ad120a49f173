//! The child contract: the environment variables and the messages on each
//! child's control socket.
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
    /// Pre-copy, version 1 (with `state`): sends its state in chunks and
    /// deltas while it serves, and restores from them as a candidate.
    Precopy,
}

/// Chunks a pre-copying generation may send before the candidate has applied
/// them ([`SupervisorMsg::Acked`] returns credit): bounds the memfds in flight.
pub const PRECOPY_WINDOW: u64 = 4;

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
    Quiesce {
        /// The schema versions the candidate restores, when it said so in its
        /// hello: the snapshot must be in one of them (a downgrade writes an older
        /// schema), or the child answers `snapshot_failed`. Absent: its own schema.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accept: Option<Vec<u32>>,
        /// A dry run (`baton snapshot`, `baton rehearse`): a [`SupervisorMsg::Resume`]
        /// always follows the snapshot, never a commit. A child may ignore it; it
        /// must pause as for an upgrade all the same, so the snapshot is consistent.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dry_run: bool,
    },
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
    /// Pre-copy, old generation: keep serving and send round `round` as
    /// [`ChildMsg::Chunk`]s, then [`ChildMsg::RoundDone`]. Round 0 is the whole
    /// state (start tracking changes first); round `n` is what changed since
    /// round `n - 1` started (values written, keys deleted).
    Precopy {
        /// The round to send.
        round: u32,
    },
    /// Pre-copy, old generation: quiesce as for [`SupervisorMsg::Quiesce`],
    /// then send what changed since the last round as round `round`
    /// (chunks, then `round_done`). `round` 0: nothing was sent yet, so this
    /// is the whole state, chunked (the one-shot path for chunked apps).
    PrecopyFinal {
        /// The round to send.
        round: u32,
    },
    /// Pre-copy, old generation: the candidate applied chunk `seq`; one more
    /// may be sent (at most [`PRECOPY_WINDOW`] unapplied).
    Acked {
        /// The chunk's sequence number.
        seq: u64,
    },
    /// Pre-copy, candidate: apply this chunk (one fd: a sealed memfd holding
    /// `{"version": V, "state": ...}`, with `state` the app's chunk), in
    /// `seq` order, then answer [`ChildMsg::Applied`]. `fds` is 1.
    Chunk {
        /// Number of fds attached (always 1).
        fds: u32,
        /// Size in bytes.
        size: u64,
        /// The round it belongs to.
        round: u32,
        /// 0, 1, 2, ... across all rounds.
        seq: u64,
    },
    /// Pre-copy, candidate: every chunk was sent (`chunks` in all); finish
    /// and answer [`ChildMsg::Restored`] (or [`ChildMsg::Rejected`]).
    Complete {
        /// How many chunks were sent.
        chunks: u64,
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
        /// Stateful children: the schema versions this one can restore (its own
        /// and the older ones it migrates up from).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restores: Option<Vec<u32>>,
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
        /// A down-migration: JSON pointers (into the state) of what it loses, as the
        /// app declares them. `baton rehearse` lists them and leaves them out when it
        /// compares states.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dropped: Vec<String>,
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
    /// Pre-copy, old generation: one chunk of the current round (one fd, a
    /// sealed memfd as in [`SupervisorMsg::Chunk`]). `fds` is 1.
    Chunk {
        /// Number of fds attached (always 1).
        fds: u32,
        /// Size in bytes.
        size: u64,
        /// The round it belongs to.
        round: u32,
        /// 0, 1, 2, ... across all rounds.
        seq: u64,
    },
    /// Pre-copy, old generation: round `round` is complete.
    RoundDone {
        /// The round.
        round: u32,
        /// Chunks in it.
        chunks: u64,
        /// Their total size in bytes.
        bytes: u64,
    },
    /// Pre-copy, old generation: could not send a round; the upgrade aborts.
    PrecopyFailed {
        /// Why.
        reason: String,
    },
    /// Pre-copy, candidate: chunk `seq` is applied.
    Applied {
        /// The chunk's sequence number.
        seq: u64,
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
