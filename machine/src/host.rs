//! What the machine needs from the world, and how it is configured.

use std::time::Duration;

use baton_protocol::{EventKind, SupervisorMsg, UpgradeReport};

use super::probation::Probation;
use super::{GenId, Image, ProbationOutcome, ReleaseEvent, WaiterId};

/// How to ask a process to go away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// The configured stop signal (a child without the SDK drains on it).
    Stop,
    /// SIGKILL.
    Now,
}

/// What baton tells systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdEvent {
    /// `READY=1` (+ status).
    Ready,
    /// `RELOADING=1` (an upgrade started).
    Reloading,
    /// `STOPPING=1`.
    Stopping,
    /// Only a new `STATUS=`.
    Status,
}

/// Starts and stops generations' processes.
pub trait Processes {
    /// Starts generation `gen_id` running `image` (`None`: what a plain upgrade
    /// runs), returning its pid and the image it runs, or why it could not start.
    fn spawn(&mut self, gen_id: GenId, image: Option<&Image>) -> Result<(u32, Image), String>;

    /// Signals generation `gen_id` (pid `pid`).
    fn kill(&mut self, gen_id: GenId, pid: u32, how: Kill);

    /// The peak resident memory of generation `gen_id`, in bytes, if known.
    fn peak_rss(&mut self, gen_id: GenId) -> Option<u64> {
        let _ = gen_id;
        None
    }
}

/// Talks to an SDK child on its control socket: messages, and the snapshot and
/// chunk fds baton relays.
pub trait Channel {
    /// Sends a control message to an SDK child.
    fn send(&mut self, gen_id: GenId, msg: SupervisorMsg);

    /// Hands the snapshot received from `from` to `to` (a `Restore` message with the
    /// fd). Returns an error if there is no snapshot to pass.
    fn pass_snapshot(&mut self, from: GenId, to: GenId) -> Result<(), String>;

    /// Pre-copy: forwards chunk `seq` of `round` received from `from` to `to`
    /// (a `Chunk` message with the fd). Returns an error if there is none to pass.
    fn pass_chunk(
        &mut self,
        from: GenId,
        to: GenId,
        round: u32,
        seq: u64,
        size: u64,
    ) -> Result<(), String>;
}

/// Answers the clients waiting for an outcome.
pub trait Answers {
    /// An upgrade finished; answer these waiters.
    fn finished(&mut self, report: &mut UpgradeReport, waiters: Vec<WaiterId>);

    /// A probation ended; answer these waiters.
    fn probation_over(&mut self, outcome: &ProbationOutcome, waiters: Vec<WaiterId>);

    /// A dry-run snapshot of `gen_id` ended: its size in bytes (the host holds the
    /// snapshot it received), or why there is none.
    fn dry_run_done(&mut self, gen_id: GenId, outcome: Result<u64, String>);
}

/// Tells the world outside: systemd, the release store, the event stream, and
/// baton's own exit.
pub trait Outside {
    /// Notifies systemd; `status` is the new `STATUS=` text.
    fn systemd(&mut self, event: SdEvent, status: &str);

    /// baton should exit with this code (after everything has stopped).
    fn exit(&mut self, code: i32, reason: &str);

    /// A release changed state (the host persists it).
    fn release(&mut self, event: ReleaseEvent<'_>);

    /// Something happened to generation `gen_id` (for `baton events`, history and
    /// metrics).
    fn event(&mut self, gen_id: GenId, pid: u32, kind: EventKind) {
        let _ = (gen_id, pid, kind);
    }
}

/// The world as the machine sees it: four small seams, each a test can record on
/// its own.
pub trait Host: Processes + Channel + Answers + Outside {}

impl<T: Processes + Channel + Answers + Outside> Host for T {}

/// How readiness is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReadyMode {
    /// The child sends `READY=1`.
    Notify,
    /// The child is ready once it has been alive this long.
    Delay(Duration),
}

/// Timeouts and modes.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// Readiness mode.
    pub ready: ReadyMode,
    /// A candidate must be ready this soon after spawning.
    pub ready_timeout: Duration,
    /// A draining generation is SIGKILLed this long after the drain starts.
    pub drain_timeout: Duration,
    /// Two-phase stateful upgrades.
    pub stateful: bool,
    /// The old generation must deliver its snapshot this soon after quiesce.
    pub snapshot_timeout: Duration,
    /// The candidate must restore this soon after it gets the snapshot.
    pub restore_timeout: Duration,
    /// First delay before replacing a crashed generation; doubles per crash.
    pub backoff_min: Duration,
    /// Cap on that delay.
    pub backoff_max: Duration,
    /// How long a newly promoted image stays on probation.
    pub probation: Probation,
    /// Consecutive failed health checks that revert a generation on probation.
    pub health_failures: u32,
    /// Pre-copy, when both generations support it.
    #[serde(default)]
    pub precopy: PrecopySettings,
}

impl Settings {
    /// How long the live pre-copy rounds may run before the upgrade is given up: no new
    /// round starts after `--precopy-timeout`, and the one under way has a snapshot's time.
    pub fn precopy_deadline(&self) -> Duration {
        self.precopy.timeout + self.snapshot_timeout
    }
}

/// `--precopy`, `--precopy-rounds`, `--precopy-timeout`.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct PrecopySettings {
    /// Off: chunked apps send their whole state while quiesced (one-shot).
    pub enabled: bool,
    /// Delta rounds after the full copy, at most.
    pub rounds: u32,
    /// No new live round starts once pre-copy has run this long.
    pub timeout: Duration,
}

impl Default for PrecopySettings {
    fn default() -> Self {
        PrecopySettings {
            enabled: true,
            rounds: 8,
            timeout: Duration::from_secs(60),
        }
    }
}
