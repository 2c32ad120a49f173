//! The upgrade state machine, pure: no processes, no sockets, no clock.
//!
//! The driver feeds it events (a request, READY, an exit, a control message, the
//! time) and it acts through the [`Host`] trait. Time is always passed in, and
//! [`Machine::next_deadline`] tells the driver when to call [`Machine::tick`], so
//! every timeout is unit-testable without sleeping or forking.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use baton_protocol::{Feature, Phase, SupervisorMsg, UpgradeReport, UpgradeResult};

/// A generation number (1, 2, 3, ...).
pub type GenId = u64;
/// Identifies a client waiting for an upgrade's outcome (`baton upgrade --wait`).
pub type WaiterId = u64;

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
}

/// The world as the machine sees it.
pub trait Host {
    /// Starts generation `gen_id`, returning its pid or why it could not start.
    fn spawn(&mut self, gen_id: GenId) -> Result<u32, String>;
    /// Signals generation `gen_id` (pid `pid`).
    fn kill(&mut self, gen_id: GenId, pid: u32, how: Kill);
    /// Sends a control message to an SDK child.
    fn send(&mut self, gen_id: GenId, msg: SupervisorMsg);
    /// Hands the snapshot received from `from` to `to` (a `Restore` message with the
    /// fd). Returns an error if there is no snapshot to pass.
    fn pass_snapshot(&mut self, from: GenId, to: GenId) -> Result<(), String>;
    /// Notifies systemd; `status` is the new `STATUS=` text.
    fn systemd(&mut self, event: SdEvent, status: &str);
    /// An upgrade finished; answer these waiters.
    fn finished(&mut self, report: &mut UpgradeReport, waiters: Vec<WaiterId>);
    /// baton should exit with this code (after everything has stopped).
    fn exit(&mut self, code: i32, reason: &str);
}

/// How readiness is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    /// The child sends `READY=1`.
    Notify,
    /// The child is ready once it has been alive this long.
    Delay(Duration),
}

/// Timeouts and modes.
#[derive(Debug, Clone, Copy)]
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
}

/// One running child.
#[derive(Debug, Clone)]
pub struct Gen {
    /// Process id.
    pub pid: u32,
    /// Phase.
    pub phase: Phase,
    /// Features announced by its SDK (`None` until it says hello: no SDK).
    pub features: Option<Vec<Feature>>,
    /// When it is SIGKILLed (draining, or a rolled-back candidate).
    pub kill_at: Option<Instant>,
    /// SIGKILL was sent.
    pub killed: bool,
    /// Becomes ready at this time (`--ready delay=`).
    ready_at: Option<Instant>,
    /// Must be ready by this time.
    ready_by: Option<Instant>,
    /// When it became active.
    promoted_at: Option<Instant>,
}

impl Gen {
    fn has(&self, f: Feature) -> bool {
        self.features.as_ref().is_some_and(|v| v.contains(&f))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The first generation at startup.
    Initial,
    /// Requested (HUP, `baton upgrade`, `systemctl reload`).
    Upgrade,
    /// The active generation died; this replaces it.
    Replace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for READY (stateless) or `prepared` (stateful).
    Starting,
    /// Old generation quiesced; waiting for its snapshot.
    Snapshotting,
    /// Candidate has the snapshot; waiting for `restored`.
    Restoring,
    /// Candidate restored (or told to start fresh); waiting for READY.
    Restored,
}

#[derive(Debug)]
struct Upgrade {
    why: Why,
    candidate: GenId,
    pid: Option<u32>,
    started: Instant,
    waiters: Vec<WaiterId>,
    stage: Stage,
    stage_deadline: Option<Instant>,
    /// The generation that was quiesced for this upgrade.
    quiesced: Option<GenId>,
    quiesced_at: Option<Instant>,
    snapshot_ms: Option<f64>,
    snapshot_bytes: Option<u64>,
    restore_sent_at: Option<Instant>,
    restore_ms: Option<f64>,
    /// READY arrived while still restoring (datagrams can overtake the stream).
    ready_early: bool,
    /// Set when the old generation died with its state.
    state_lost: Option<String>,
}

impl Upgrade {
    /// The outcome of this upgrade, with the timings gathered so far.
    fn report(&self, result: UpgradeResult, reason: Option<String>, now: Instant) -> UpgradeReport {
        UpgradeReport {
            result,
            reason,
            duration_ms: ms(now - self.started),
            generation: self.candidate,
            pid: self.pid,
            accept_gap_ms: self.quiesced_at.map(|t| ms_f(now - t)),
            snapshot_bytes: self.snapshot_bytes,
            snapshot_ms: self.snapshot_ms,
            restore_ms: self.restore_ms,
            migrated_connections: 0,
            supervisor_ms: None,
            cgroup_ms: None,
            spawn_ms: None,
            ready_to_drain_ms: None,
        }
    }
}

/// The supervisor's generations and its upgrade in progress.
pub struct Machine {
    s: Settings,
    gens: BTreeMap<GenId, Gen>,
    next_gen: GenId,
    active: Option<GenId>,
    upgrade: Option<Upgrade>,
    /// A request arrived during an upgrade; these waiters get the next one.
    queued: Option<Vec<WaiterId>>,
    stopping: bool,
    crashes: u64,
    consecutive_crashes: u32,
    restart_at: Option<Instant>,
    last: Option<UpgradeReport>,
    exited: bool,
}

/// A generation active this long resets the crash back-off.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// `now + d`, saturating instead of panicking when `d` is absurdly large (config
/// caps durations, but the machine must never panic on time arithmetic).
fn later(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Machine {
    /// A machine with no generations; call [`Machine::start`].
    pub fn new(s: Settings) -> Self {
        Machine {
            s,
            gens: BTreeMap::new(),
            next_gen: 1,
            active: None,
            upgrade: None,
            queued: None,
            stopping: false,
            crashes: 0,
            consecutive_crashes: 0,
            restart_at: None,
            last: None,
            exited: false,
        }
    }

    /// Every running generation, oldest first.
    pub fn gens(&self) -> impl Iterator<Item = (GenId, &Gen)> {
        self.gens.iter().map(|(k, v)| (*k, v))
    }

    /// A generation, if running.
    pub fn generation(&self, id: GenId) -> Option<&Gen> {
        self.gens.get(&id)
    }

    /// The active generation.
    pub fn active(&self) -> Option<GenId> {
        self.active
    }

    /// The last finished upgrade.
    pub fn last_upgrade(&self) -> Option<&UpgradeReport> {
        self.last.as_ref()
    }

    /// Whether an upgrade (or a replacement) is under way.
    pub fn upgrading(&self) -> bool {
        self.upgrade.is_some()
    }

    /// Whether a request waits behind the running upgrade.
    pub fn queued(&self) -> bool {
        self.queued.is_some()
    }

    /// Unexpected exits of the active generation.
    pub fn crashes(&self) -> u64 {
        self.crashes
    }

    /// The generation whose pid is `pid`.
    pub fn gen_by_pid(&self, pid: u32) -> Option<GenId> {
        self.gens
            .iter()
            .find(|(_, g)| g.pid == pid)
            .map(|(k, _)| *k)
    }

    /// The text for systemd's `STATUS=`.
    pub fn status_line(&self) -> String {
        let mut s = match self
            .active
            .and_then(|a| self.gens.get(&a).map(|g| (a, g.pid)))
        {
            Some((a, pid)) => format!("generation {a} pid {pid}"),
            None => "no active generation".to_string(),
        };
        if let Some(u) = &self.upgrade {
            if u.why == Why::Upgrade {
                s.push_str(&format!("; upgrading to generation {}", u.candidate));
            }
        }
        if let Some(l) = &self.last {
            match l.result {
                UpgradeResult::Promoted => s.push_str(&format!(
                    "; last upgrade: promoted generation {} in {} ms",
                    l.generation, l.duration_ms
                )),
                UpgradeResult::RolledBack => s.push_str(&format!(
                    "; last upgrade: rolled back generation {} ({})",
                    l.generation,
                    l.reason.as_deref().unwrap_or("?")
                )),
            }
        }
        if self.crashes > 0 {
            s.push_str(&format!("; {} crash(es)", self.crashes));
        }
        s
    }

    /// The earliest time [`Machine::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let gens = self
            .gens
            .values()
            .flat_map(|g| [g.kill_at.filter(|_| !g.killed), g.ready_at, g.ready_by]);
        let up = self.upgrade.as_ref().and_then(|u| u.stage_deadline);
        gens.chain([up, self.restart_at]).flatten().min()
    }

    /// Starts the first generation.
    pub fn start(&mut self, host: &mut impl Host, now: Instant) {
        self.begin(host, now, Why::Initial, Vec::new());
    }

    /// An upgrade was requested. Coalesced with a pending one while one runs.
    pub fn request_upgrade(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        waiter: Option<WaiterId>,
    ) {
        if self.stopping {
            if let Some(w) = waiter {
                let mut report = self.report_for_refusal("baton is stopping");
                host.finished(&mut report, vec![w]);
            }
            return;
        }
        let waiters: Vec<WaiterId> = waiter.into_iter().collect();
        if self.upgrade.is_some() || self.restart_at.is_some() {
            self.queued.get_or_insert_with(Vec::new).extend(waiters);
            tracing::info!("upgrade requested during another; queued");
            return;
        }
        self.begin(host, now, Why::Upgrade, waiters);
    }

    fn report_for_refusal(&self, reason: &str) -> UpgradeReport {
        UpgradeReport {
            result: UpgradeResult::RolledBack,
            reason: Some(reason.to_string()),
            duration_ms: 0,
            generation: self.next_gen,
            pid: None,
            accept_gap_ms: None,
            snapshot_bytes: None,
            snapshot_ms: None,
            restore_ms: None,
            migrated_connections: 0,
            supervisor_ms: None,
            cgroup_ms: None,
            spawn_ms: None,
            ready_to_drain_ms: None,
        }
    }

    fn begin(&mut self, host: &mut impl Host, now: Instant, why: Why, waiters: Vec<WaiterId>) {
        let id = self.next_gen;
        self.next_gen += 1;
        self.restart_at = None;
        self.upgrade = Some(Upgrade {
            why,
            candidate: id,
            pid: None,
            started: now,
            waiters,
            stage: Stage::Starting,
            stage_deadline: None,
            quiesced: None,
            quiesced_at: None,
            snapshot_ms: None,
            snapshot_bytes: None,
            restore_sent_at: None,
            restore_ms: None,
            ready_early: false,
            state_lost: None,
        });
        if why == Why::Upgrade {
            host.systemd(SdEvent::Reloading, &self.status_line());
        }
        match host.spawn(id) {
            Ok(pid) => {
                tracing::info!(generation = id, pid, "spawned");
                let (ready_at, ready_by) = match self.s.ready {
                    ReadyMode::Notify => (None, Some(later(now, self.s.ready_timeout))),
                    ReadyMode::Delay(d) => (Some(later(now, d)), None),
                };
                self.gens.insert(
                    id,
                    Gen {
                        pid,
                        phase: Phase::Starting,
                        features: None,
                        kill_at: None,
                        killed: false,
                        ready_at,
                        ready_by,
                        promoted_at: None,
                    },
                );
                if let Some(u) = self.upgrade.as_mut() {
                    u.pid = Some(pid);
                }
            }
            Err(e) => self.fail(host, now, format!("spawn failed: {e}")),
        }
    }

    /// The child's SDK said hello.
    pub fn on_hello(&mut self, gen_id: GenId, features: Vec<Feature>) {
        if let Some(g) = self.gens.get_mut(&gen_id) {
            g.features = Some(features);
        }
    }

    /// `READY=1` from generation `gen_id` (or its delay elapsed).
    pub fn on_ready(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        if u.candidate != gen_id {
            return;
        }
        if let Some(g) = self.gens.get_mut(&gen_id) {
            g.ready_at = None;
        }
        match u.stage {
            Stage::Restored => self.promote(host, now),
            Stage::Snapshotting | Stage::Restoring => u.ready_early = true,
            Stage::Starting => {
                let needs_state = self.s.stateful
                    && self
                        .active
                        .and_then(|a| self.gens.get(&a))
                        .is_some_and(|g| g.has(Feature::State));
                if needs_state {
                    self.fail(
                        host,
                        now,
                        "candidate became ready without restoring the state (it does not support state hand-over)".into(),
                    );
                } else {
                    self.promote(host, now);
                }
            }
        }
    }

    /// Stateful candidate: initialised, waiting for state.
    pub fn on_prepared(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        if u.candidate != gen_id || u.stage != Stage::Starting {
            return;
        }
        if let Some(g) = self.gens.get_mut(&gen_id) {
            g.phase = Phase::Restoring;
        }
        let old = self
            .active
            .filter(|a| self.gens.get(a).is_some_and(|g| g.has(Feature::State)));
        match (self.s.stateful, old) {
            (true, Some(old)) => {
                u.stage = Stage::Snapshotting;
                u.stage_deadline = Some(later(now, self.s.snapshot_timeout));
                u.quiesced = Some(old);
                u.quiesced_at = Some(now);
                if let Some(g) = self.gens.get_mut(&old) {
                    g.phase = Phase::Quiesced;
                }
                tracing::info!(generation = old, "quiescing for snapshot");
                host.send(old, SupervisorMsg::Quiesce);
            }
            (stateful, _) => {
                let reason = if !stateful {
                    "baton runs without --state"
                } else if u.why == Why::Initial {
                    "first generation"
                } else if let Some(lost) = &u.state_lost {
                    lost.as_str()
                } else {
                    "no running generation holds state"
                };
                host.send(
                    gen_id,
                    SupervisorMsg::Fresh {
                        reason: reason.to_string(),
                    },
                );
                u.stage = Stage::Restored;
            }
        }
    }

    /// Stateful old generation delivered its snapshot (the driver holds the fd).
    pub fn on_snapshot(&mut self, host: &mut impl Host, now: Instant, from: GenId, size: u64) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        if u.stage != Stage::Snapshotting || u.quiesced != Some(from) {
            return;
        }
        u.snapshot_ms = u.quiesced_at.map(|t| ms_f(now - t));
        u.snapshot_bytes = Some(size);
        let to = u.candidate;
        match host.pass_snapshot(from, to) {
            Ok(()) => {
                u.stage = Stage::Restoring;
                u.stage_deadline = Some(later(now, self.s.restore_timeout));
                u.restore_sent_at = Some(now);
            }
            Err(e) => self.fail(host, now, format!("cannot pass the snapshot: {e}")),
        }
    }

    /// Stateful old generation could not write a snapshot.
    pub fn on_snapshot_failed(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        why: &str,
    ) {
        if self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.quiesced == Some(from))
        {
            self.fail(
                host,
                now,
                format!("old generation failed to snapshot: {why}"),
            );
        }
    }

    /// Stateful candidate restored the snapshot.
    pub fn on_restored(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        if u.candidate != gen_id || u.stage != Stage::Restoring {
            return;
        }
        u.restore_ms = u.restore_sent_at.map(|t| ms_f(now - t));
        u.stage = Stage::Restored;
        u.stage_deadline = None;
        // The ready timeout restarts: restoring a large state is not a hang.
        if let Some(g) = self.gens.get_mut(&gen_id) {
            if g.ready_by.is_some() {
                g.ready_by = Some(later(now, self.s.ready_timeout));
            }
        }
        if u.ready_early {
            self.promote(host, now);
        }
    }

    /// Stateful candidate rejected the snapshot.
    pub fn on_rejected(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId, why: &str) {
        if self.upgrade.as_ref().is_some_and(|u| u.candidate == gen_id) {
            self.fail(host, now, format!("candidate rejected the snapshot: {why}"));
        }
    }

    /// Connections were handed over to the active generation since the last upgrade.
    pub fn note_migrated(&mut self, n: u64) {
        if let Some(l) = self.last.as_mut() {
            if Some(l.generation) == self.active {
                l.migrated_connections += n;
            }
        }
    }

    /// Generation `gen_id` exited; `how` describes the status.
    pub fn on_exit(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId, how: &str) {
        let Some(g) = self.gens.remove(&gen_id) else {
            return;
        };
        let was_candidate = self.upgrade.as_ref().is_some_and(|u| u.candidate == gen_id);
        if was_candidate {
            tracing::warn!(
                generation = gen_id,
                pid = g.pid,
                status = how,
                "candidate exited"
            );
            self.fail(
                host,
                now,
                format!("candidate exited before it was ready ({how})"),
            );
        } else if self.active == Some(gen_id) {
            self.active = None;
            if self.stopping {
                tracing::info!(generation = gen_id, pid = g.pid, status = how, "exited");
            } else {
                self.crashes += 1;
                // A generation that stayed up a while proves the build works: forget
                // earlier crashes. One that dies soon after READY is a crash loop.
                if g.promoted_at.is_some_and(|t| now - t >= STABLE_AFTER) {
                    self.consecutive_crashes = 0;
                }
                self.consecutive_crashes += 1;
                tracing::error!(
                    generation = gen_id,
                    pid = g.pid,
                    status = how,
                    crashes = self.crashes,
                    "active generation died"
                );
                let lost_state = self.s.stateful && g.has(Feature::State);
                match self.upgrade.as_mut() {
                    Some(u) => {
                        if lost_state {
                            let why = format!(
                                "STATE LOST: generation {gen_id} died ({how}) before handing over its state"
                            );
                            tracing::error!(generation = gen_id, "{why}");
                            u.state_lost = Some(why);
                            if u.stage == Stage::Snapshotting {
                                // No snapshot is coming: the candidate starts empty.
                                let c = u.candidate;
                                u.stage = Stage::Restored;
                                u.stage_deadline = None;
                                u.quiesced = None;
                                host.send(
                                    c,
                                    SupervisorMsg::Fresh {
                                        reason: u.state_lost.clone().unwrap_or_default(),
                                    },
                                );
                            }
                        }
                    }
                    None => self.schedule_replacement(now),
                }
                host.systemd(SdEvent::Ready, &self.status_line());
            }
        } else {
            tracing::info!(
                generation = gen_id,
                pid = g.pid,
                status = how,
                "retired generation exited"
            );
        }
        self.maybe_exit(host);
    }

    fn schedule_replacement(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        let exp = self.consecutive_crashes.saturating_sub(1).min(16);
        let delay = if self.consecutive_crashes <= 1 {
            Duration::ZERO
        } else {
            (self.s.backoff_min * 2u32.saturating_pow(exp)).min(self.s.backoff_max)
        };
        tracing::info!(delay_ms = ms(delay), "replacing the active generation");
        self.restart_at = Some(later(now, delay));
    }

    /// Drain every generation and exit once all are gone.
    pub fn request_stop(&mut self, host: &mut impl Host, now: Instant) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.restart_at = None;
        host.systemd(SdEvent::Stopping, "stopping");
        if let Some(u) = self.upgrade.as_ref() {
            if u.candidate != 0 {
                self.fail(host, now, "baton is stopping".into());
            }
        }
        if let Some(w) = self.queued.take() {
            let mut report = self.report_for_refusal("baton is stopping");
            host.finished(&mut report, w);
        }
        let ids: Vec<GenId> = self.gens.keys().copied().collect();
        for id in ids {
            self.retire(host, now, id, false);
        }
        self.active = None;
        self.maybe_exit(host);
    }

    fn maybe_exit(&mut self, host: &mut impl Host) {
        if self.stopping && self.gens.is_empty() && !self.exited {
            self.exited = true;
            host.exit(0, "stopped");
        }
    }

    /// Handles every deadline at or before `now`.
    pub fn tick(&mut self, host: &mut impl Host, now: Instant) {
        let due: Vec<(GenId, Gen)> = self
            .gens
            .iter()
            .filter(|(_, g)| {
                g.kill_at.is_some_and(|t| t <= now && !g.killed)
                    || g.ready_at.is_some_and(|t| t <= now)
                    || g.ready_by.is_some_and(|t| t <= now)
            })
            .map(|(k, g)| (*k, g.clone()))
            .collect();
        for (id, g) in due {
            if g.kill_at.is_some_and(|t| t <= now) && !g.killed {
                tracing::warn!(
                    generation = id,
                    pid = g.pid,
                    "drain deadline passed; SIGKILL"
                );
                if let Some(g) = self.gens.get_mut(&id) {
                    g.killed = true;
                }
                host.kill(id, g.pid, Kill::Now);
            }
            if g.ready_at.is_some_and(|t| t <= now) {
                if let Some(g) = self.gens.get_mut(&id) {
                    g.ready_at = None;
                }
                self.on_ready(host, now, id);
            }
            if g.ready_by.is_some_and(|t| t <= now) {
                if let Some(g) = self.gens.get_mut(&id) {
                    g.ready_by = None;
                }
                if self.upgrade.as_ref().is_some_and(|u| u.candidate == id) {
                    let t = self.s.ready_timeout;
                    self.fail(
                        host,
                        now,
                        format!(
                            "candidate was not ready within {}",
                            humantime::format_duration(t)
                        ),
                    );
                }
            }
        }
        if let Some(u) = self.upgrade.as_ref() {
            if u.stage_deadline.is_some_and(|t| t <= now) {
                let why = match u.stage {
                    Stage::Snapshotting => format!(
                        "old generation did not deliver its snapshot within {}",
                        humantime::format_duration(self.s.snapshot_timeout)
                    ),
                    _ => format!(
                        "candidate did not restore the snapshot within {}",
                        humantime::format_duration(self.s.restore_timeout)
                    ),
                };
                self.fail(host, now, why);
            }
        }
        if self.restart_at.is_some_and(|t| t <= now) {
            self.restart_at = None;
            self.begin(host, now, Why::Replace, Vec::new());
        }
    }

    fn promote(&mut self, host: &mut impl Host, now: Instant) {
        let Some(u) = self.upgrade.take() else {
            return;
        };
        let id = u.candidate;
        let old = self.active.replace(id);
        if let Some(g) = self.gens.get_mut(&id) {
            g.phase = Phase::Active;
            g.ready_by = None;
            g.ready_at = None;
            g.promoted_at = Some(now);
        }
        // Anything that stopped accepting for this upgrade drains now.
        let migrate = self.gens.get(&id).is_some_and(|g| g.has(Feature::Adopt));
        let retire: Vec<GenId> = old.into_iter().chain(u.quiesced).collect();
        for o in retire {
            if o != id
                && self
                    .gens
                    .get(&o)
                    .is_some_and(|g| g.phase != Phase::Draining)
            {
                self.retire(host, now, o, migrate);
            }
        }
        let report = u.report(UpgradeResult::Promoted, u.state_lost.clone(), now);
        tracing::info!(
            generation = id,
            pid = u.pid.unwrap_or(0),
            duration_ms = report.duration_ms,
            "promoted"
        );
        self.conclude(host, now, u.why, report, u.waiters);
    }

    /// The candidate failed: roll back.
    fn fail(&mut self, host: &mut impl Host, now: Instant, reason: String) {
        let Some(u) = self.upgrade.take() else {
            return;
        };
        let id = u.candidate;
        tracing::warn!(generation = id, reason, "rolling back");
        if self.gens.contains_key(&id) {
            // A stateful candidate has served nobody yet: kill it. A stateless one may
            // have accepted connections already: let it drain them.
            if self.s.stateful && u.stage != Stage::Starting {
                if let Some(g) = self.gens.get_mut(&id) {
                    g.killed = true;
                    g.phase = Phase::Draining;
                    g.ready_by = None;
                    g.ready_at = None;
                    let pid = g.pid;
                    host.kill(id, pid, Kill::Now);
                }
            } else {
                self.retire(host, now, id, false);
            }
        }
        if let Some(old) = u.quiesced {
            if let Some(g) = self.gens.get_mut(&old) {
                g.phase = Phase::Active;
                host.send(
                    old,
                    SupervisorMsg::Resume {
                        reason: reason.clone(),
                    },
                );
            }
        }
        let report = u.report(UpgradeResult::RolledBack, Some(reason), now);
        if u.why != Why::Upgrade {
            self.consecutive_crashes += 1;
        }
        self.conclude(host, now, u.why, report, u.waiters);
    }

    fn conclude(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        why: Why,
        mut report: UpgradeReport,
        waiters: Vec<WaiterId>,
    ) {
        let promoted = report.result == UpgradeResult::Promoted;
        match why {
            Why::Initial if !promoted => {
                let reason = report.reason.clone().unwrap_or_default();
                host.finished(&mut report, waiters);
                self.last = Some(report);
                self.stopping = true;
                self.exited = true;
                host.exit(1, &format!("the first generation failed: {reason}"));
                return;
            }
            Why::Initial | Why::Replace => {
                host.finished(&mut report, waiters);
                if why == Why::Replace && !promoted {
                    self.last = Some(report);
                }
            }
            Why::Upgrade => {
                host.finished(&mut report, waiters);
                self.last = Some(report);
            }
        }
        host.systemd(SdEvent::Ready, &self.status_line());
        if self.stopping {
            return;
        }
        if self.active.is_none() {
            self.schedule_replacement(now);
        } else if let Some(w) = self.queued.take() {
            self.begin(host, now, Why::Upgrade, w);
        }
    }

    /// Tells a generation to drain (or commit, if it was quiesced) and arms its SIGKILL.
    fn retire(&mut self, host: &mut impl Host, now: Instant, id: GenId, migrate: bool) {
        let deadline_ms = ms(self.s.drain_timeout);
        let Some(g) = self.gens.get_mut(&id) else {
            return;
        };
        let quiesced = g.phase == Phase::Quiesced;
        g.phase = Phase::Draining;
        g.ready_by = None;
        g.ready_at = None;
        if g.kill_at.is_none() {
            g.kill_at = Some(later(now, self.s.drain_timeout));
        }
        let pid = g.pid;
        tracing::info!(generation = id, pid, "draining");
        if quiesced {
            host.send(
                id,
                SupervisorMsg::Commit {
                    deadline_ms,
                    migrate,
                },
            );
        } else if g.features.is_some() {
            host.send(
                id,
                SupervisorMsg::Drain {
                    deadline_ms,
                    migrate,
                },
            );
        } else {
            host.kill(id, pid, Kill::Stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(later(now, Duration::MAX) > now);
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        Spawn(GenId),
        Kill(GenId, Kill),
        Send(GenId, SupervisorMsg),
        Pass(GenId, GenId),
        Sd(SdEvent),
        Finished(UpgradeResult, Option<String>, Vec<WaiterId>),
        Exit(i32),
    }

    #[derive(Default)]
    struct Fake {
        calls: Vec<Call>,
        fail_spawn: bool,
    }

    impl Host for Fake {
        fn spawn(&mut self, gen_id: GenId) -> Result<u32, String> {
            self.calls.push(Call::Spawn(gen_id));
            if self.fail_spawn {
                Err("No such file or directory".into())
            } else {
                Ok(1000 + gen_id as u32)
            }
        }
        fn kill(&mut self, gen_id: GenId, _pid: u32, how: Kill) {
            self.calls.push(Call::Kill(gen_id, how));
        }
        fn send(&mut self, gen_id: GenId, msg: SupervisorMsg) {
            self.calls.push(Call::Send(gen_id, msg));
        }
        fn pass_snapshot(&mut self, from: GenId, to: GenId) -> Result<(), String> {
            self.calls.push(Call::Pass(from, to));
            Ok(())
        }
        fn systemd(&mut self, event: SdEvent, _status: &str) {
            self.calls.push(Call::Sd(event));
        }
        fn finished(&mut self, r: &mut UpgradeReport, waiters: Vec<WaiterId>) {
            self.calls
                .push(Call::Finished(r.result, r.reason.clone(), waiters));
        }
        fn exit(&mut self, code: i32, _reason: &str) {
            self.calls.push(Call::Exit(code));
        }
    }

    impl Fake {
        fn take(&mut self) -> Vec<Call> {
            std::mem::take(&mut self.calls)
        }
    }

    fn settings() -> Settings {
        Settings {
            ready: ReadyMode::Notify,
            ready_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            stateful: false,
            snapshot_timeout: Duration::from_secs(3),
            restore_timeout: Duration::from_secs(4),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }

    /// A machine with generation 1 active.
    fn running(s: Settings) -> (Machine, Fake, Instant) {
        let mut m = Machine::new(s);
        let mut h = Fake::default();
        let t = Instant::now();
        m.start(&mut h, t);
        m.on_ready(&mut h, t, 1);
        assert_eq!(m.active(), Some(1));
        h.take();
        (m, h, t)
    }

    fn finished(calls: &[Call]) -> Vec<&Call> {
        calls
            .iter()
            .filter(|c| matches!(c, Call::Finished(..)))
            .collect()
    }

    #[test]
    fn promotes_on_ready_then_drains_old_with_its_own_deadline() {
        let (mut m, mut h, t) = running(settings());
        m.request_upgrade(&mut h, t, Some(7));
        assert_eq!(h.take(), vec![Call::Sd(SdEvent::Reloading), Call::Spawn(2)]);
        m.on_ready(&mut h, t + Duration::from_millis(50), 2);
        let calls = h.take();
        assert!(calls.contains(&Call::Kill(1, Kill::Stop)), "{calls:?}");
        assert!(calls.contains(&Call::Finished(UpgradeResult::Promoted, None, vec![7])));
        assert_eq!(m.active(), Some(2));
        assert_eq!(m.generation(1).unwrap().phase, Phase::Draining);
        // Killed exactly at its deadline, not before.
        let kill_at = t + Duration::from_millis(50) + Duration::from_secs(10);
        assert_eq!(m.next_deadline(), Some(kill_at));
        m.tick(&mut h, kill_at - Duration::from_millis(1));
        assert!(h.take().is_empty());
        m.tick(&mut h, kill_at);
        assert_eq!(h.take(), vec![Call::Kill(1, Kill::Now)]);
        m.on_exit(&mut h, kill_at, 1, "signal 9");
        assert_eq!(m.gens().count(), 1);
        assert_eq!(m.crashes(), 0);
    }

    #[test]
    fn sdk_children_get_a_drain_message() {
        let (mut m, mut h, t) = running(settings());
        m.on_hello(1, vec![]);
        m.request_upgrade(&mut h, t, None);
        m.on_ready(&mut h, t, 2);
        let calls = h.take();
        assert!(calls.contains(&Call::Send(
            1,
            SupervisorMsg::Drain {
                deadline_ms: 10_000,
                migrate: false
            }
        )));
        assert!(!calls.contains(&Call::Kill(1, Kill::Stop)));
    }

    #[test]
    fn ready_timeout_rolls_back_and_old_carries_on() {
        let (mut m, mut h, t) = running(settings());
        m.request_upgrade(&mut h, t, Some(1));
        h.take();
        assert_eq!(m.next_deadline(), Some(t + Duration::from_secs(5)));
        m.tick(&mut h, t + Duration::from_secs(5));
        let calls = h.take();
        assert!(calls.contains(&Call::Kill(2, Kill::Stop)), "{calls:?}");
        let f = finished(&calls);
        assert!(
            matches!(f[0], Call::Finished(UpgradeResult::RolledBack, Some(r), w) if r.contains("not ready within 5s") && w == &vec![1])
        );
        assert_eq!(m.active(), Some(1));
        assert_eq!(m.generation(1).unwrap().phase, Phase::Active);
        assert!(
            !calls
                .iter()
                .any(|c| matches!(c, Call::Kill(1, _) | Call::Send(1, _)))
        );
    }

    #[test]
    fn crash_before_ready_rolls_back() {
        let (mut m, mut h, t) = running(settings());
        m.request_upgrade(&mut h, t, None);
        h.take();
        m.on_exit(&mut h, t, 2, "exit status 3");
        let calls = h.take();
        assert!(
            matches!(finished(&calls)[0], Call::Finished(UpgradeResult::RolledBack, Some(r), _) if r.contains("exit status 3"))
        );
        assert_eq!(m.active(), Some(1));
        assert!(m.last_upgrade().is_some());
        assert_eq!(m.crashes(), 0);
    }

    #[test]
    fn spawn_failure_rolls_back() {
        let (mut m, mut h, t) = running(settings());
        h.fail_spawn = true;
        m.request_upgrade(&mut h, t, Some(3));
        let calls = h.take();
        assert!(
            matches!(finished(&calls)[0], Call::Finished(UpgradeResult::RolledBack, Some(r), _) if r.contains("spawn failed"))
        );
        assert!(!m.upgrading());
        assert_eq!(m.active(), Some(1));
    }

    #[test]
    fn hup_during_upgrade_is_queued_and_coalesced() {
        let (mut m, mut h, t) = running(settings());
        m.request_upgrade(&mut h, t, Some(1));
        m.request_upgrade(&mut h, t, Some(2));
        m.request_upgrade(&mut h, t, None);
        m.request_upgrade(&mut h, t, Some(3));
        let spawns = h
            .take()
            .iter()
            .filter(|c| matches!(c, Call::Spawn(_)))
            .count();
        assert_eq!(spawns, 1, "never two upgrades at once");
        assert!(m.queued());
        m.on_ready(&mut h, t, 2);
        let calls = h.take();
        // Waiter 1 gets upgrade 2; the three queued requests became one upgrade (3).
        assert!(calls.contains(&Call::Finished(UpgradeResult::Promoted, None, vec![1])));
        assert!(calls.contains(&Call::Spawn(3)));
        assert!(!m.queued());
        m.on_ready(&mut h, t, 3);
        let calls = h.take();
        assert!(calls.contains(&Call::Finished(UpgradeResult::Promoted, None, vec![2, 3])));
        assert_eq!(m.active(), Some(3));
        // Generations 1 and 2 drain at the same time, each with its own deadline.
        assert_eq!(m.generation(1).unwrap().phase, Phase::Draining);
        assert_eq!(m.generation(2).unwrap().phase, Phase::Draining);
        assert!(!calls.iter().any(|c| matches!(c, Call::Spawn(_))));
    }

    #[test]
    fn queued_request_runs_after_a_rollback_too() {
        let (mut m, mut h, t) = running(settings());
        m.request_upgrade(&mut h, t, Some(1));
        m.request_upgrade(&mut h, t, Some(2));
        h.take();
        m.on_exit(&mut h, t, 2, "exit status 1");
        let calls = h.take();
        assert!(calls.contains(&Call::Spawn(3)), "{calls:?}");
    }

    #[test]
    fn active_crash_is_replaced_with_backoff() {
        let (mut m, mut h, t) = running(settings());
        m.on_exit(&mut h, t, 1, "signal 11");
        assert_eq!(m.crashes(), 1);
        assert_eq!(m.active(), None);
        // First crash: replaced at once.
        assert_eq!(m.next_deadline(), Some(t));
        m.tick(&mut h, t);
        assert!(h.take().contains(&Call::Spawn(2)));
        // Replacement crashes before ready: backoff grows.
        m.on_exit(&mut h, t, 2, "exit status 1");
        h.take();
        let d1 = m.next_deadline().unwrap() - t;
        m.tick(&mut h, t + d1);
        m.on_exit(&mut h, t + d1, 3, "exit status 1");
        let d2 = m.next_deadline().unwrap() - (t + d1);
        assert!(d1 >= Duration::from_millis(100), "{d1:?}");
        assert!(d2 > d1, "{d1:?} then {d2:?}");
        // An upgrade requested while waiting to replace is queued, not lost.
        m.request_upgrade(&mut h, t + d1, Some(9));
        assert!(m.queued());
    }

    #[test]
    fn crash_soon_after_ready_still_backs_off() {
        let (mut m, mut h, t) = running(settings());
        let mut now = t;
        let mut delays = Vec::new();
        for gen_id in 1..=4 {
            m.on_exit(&mut h, now, gen_id, "exit status 7");
            let at = m.next_deadline().unwrap();
            delays.push(at - now);
            now = at;
            m.tick(&mut h, now);
            m.on_ready(&mut h, now, gen_id + 1);
            assert_eq!(m.active(), Some(gen_id + 1));
        }
        assert_eq!(delays[0], Duration::ZERO);
        assert!(delays.windows(2).skip(1).all(|w| w[1] > w[0]), "{delays:?}");
        // Up for a while: the next crash is replaced at once again.
        now += STABLE_AFTER;
        m.on_exit(&mut h, now, 5, "exit status 7");
        assert_eq!(m.next_deadline(), Some(now));
    }

    #[test]
    fn first_generation_failure_exits() {
        let mut m = Machine::new(settings());
        let mut h = Fake::default();
        let t = Instant::now();
        m.start(&mut h, t);
        m.on_exit(&mut h, t, 1, "exit status 1");
        assert!(h.take().contains(&Call::Exit(1)));
    }

    #[test]
    fn delay_readiness() {
        let mut s = settings();
        s.ready = ReadyMode::Delay(Duration::from_secs(1));
        let mut m = Machine::new(s);
        let mut h = Fake::default();
        let t = Instant::now();
        m.start(&mut h, t);
        assert_eq!(m.next_deadline(), Some(t + Duration::from_secs(1)));
        m.tick(&mut h, t + Duration::from_secs(1));
        assert_eq!(m.active(), Some(1));
    }

    #[test]
    fn stop_drains_everything_and_exits_when_all_are_gone() {
        let (mut m, mut h, t) = running(settings());
        m.request_upgrade(&mut h, t, Some(4));
        h.take();
        m.request_stop(&mut h, t);
        let calls = h.take();
        assert!(calls.contains(&Call::Sd(SdEvent::Stopping)));
        assert!(calls.contains(&Call::Kill(1, Kill::Stop)));
        assert!(calls.contains(&Call::Kill(2, Kill::Stop)));
        assert!(
            matches!(finished(&calls)[0], Call::Finished(UpgradeResult::RolledBack, _, w) if w == &vec![4])
        );
        m.request_upgrade(&mut h, t, None);
        assert!(!h.take().iter().any(|c| matches!(c, Call::Spawn(_))));
        m.on_exit(&mut h, t, 1, "exit status 0");
        assert!(!h.take().contains(&Call::Exit(0)));
        m.on_exit(&mut h, t, 2, "exit status 0");
        assert_eq!(h.take(), vec![Call::Exit(0)]);
    }

    fn stateful() -> (Machine, Fake, Instant) {
        let mut s = settings();
        s.stateful = true;
        let mut m = Machine::new(s);
        let mut h = Fake::default();
        let t = Instant::now();
        m.start(&mut h, t);
        m.on_hello(1, vec![Feature::State]);
        m.on_prepared(&mut h, t, 1);
        assert!(h.take().contains(&Call::Send(
            1,
            SupervisorMsg::Fresh {
                reason: "first generation".into()
            }
        )));
        m.on_ready(&mut h, t, 1);
        assert_eq!(m.active(), Some(1));
        h.take();
        (m, h, t)
    }

    #[test]
    fn stateful_commit() {
        let (mut m, mut h, t) = stateful();
        m.request_upgrade(&mut h, t, Some(1));
        m.on_hello(2, vec![Feature::State]);
        m.on_prepared(&mut h, t, 2);
        assert!(h.take().contains(&Call::Send(1, SupervisorMsg::Quiesce)));
        assert_eq!(m.generation(1).unwrap().phase, Phase::Quiesced);
        let t1 = t + Duration::from_millis(20);
        m.on_snapshot(&mut h, t1, 1, 1234);
        assert!(h.take().contains(&Call::Pass(1, 2)));
        // READY may overtake `restored` (datagram vs stream): promote only after both.
        m.on_ready(&mut h, t1, 2);
        assert_eq!(m.active(), Some(1));
        m.on_restored(&mut h, t + Duration::from_millis(30), 2);
        let calls = h.take();
        assert_eq!(m.active(), Some(2));
        assert!(calls.contains(&Call::Send(
            1,
            SupervisorMsg::Commit {
                deadline_ms: 10_000,
                migrate: false
            }
        )));
        let r = m.last_upgrade().unwrap();
        assert_eq!(r.snapshot_bytes, Some(1234));
        assert!(r.accept_gap_ms.unwrap() >= 30.0);
    }

    #[test]
    fn stateful_aborts_resume_the_old_generation() {
        type Abort = fn(&mut Machine, &mut Fake, Instant);
        let cases: Vec<(&str, Abort)> = vec![
            ("rejected", |m, h, t| {
                m.on_rejected(h, t, 2, "schema 2 is newer")
            }),
            ("exited", |m, h, t| m.on_exit(h, t, 2, "signal 6")),
            ("restore", |m, h, t| m.tick(h, t + Duration::from_secs(4))),
            ("snapshot", |m, h, t| {
                m.on_snapshot_failed(h, t, 1, "disk full")
            }),
        ];
        for (name, abort) in cases {
            let (mut m, mut h, t) = stateful();
            m.request_upgrade(&mut h, t, Some(5));
            m.on_hello(2, vec![Feature::State]);
            m.on_prepared(&mut h, t, 2);
            if name != "snapshot" {
                m.on_snapshot(&mut h, t, 1, 10);
            }
            h.take();
            abort(&mut m, &mut h, t);
            let calls = h.take();
            assert!(
                calls
                    .iter()
                    .any(|c| matches!(c, Call::Send(1, SupervisorMsg::Resume { .. }))),
                "{name}: {calls:?}"
            );
            assert!(calls.iter().any(|c| matches!(c, Call::Finished(UpgradeResult::RolledBack, _, w) if w == &vec![5])), "{name}");
            if name != "exited" {
                assert!(
                    calls.contains(&Call::Kill(2, Kill::Now)),
                    "{name}: {calls:?}"
                );
            }
            assert_eq!(m.active(), Some(1), "{name}");
            assert_eq!(m.generation(1).unwrap().phase, Phase::Active, "{name}");
        }
    }

    #[test]
    fn snapshot_timeout_aborts() {
        let (mut m, mut h, t) = stateful();
        m.request_upgrade(&mut h, t, None);
        m.on_hello(2, vec![Feature::State]);
        m.on_prepared(&mut h, t, 2);
        h.take();
        m.tick(&mut h, t + Duration::from_secs(3));
        let calls = h.take();
        assert!(calls.iter().any(|c| matches!(c, Call::Finished(UpgradeResult::RolledBack, Some(r), _) if r.contains("snapshot within 3s"))));
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::Send(1, SupervisorMsg::Resume { .. })))
        );
    }

    #[test]
    fn stateful_refuses_a_candidate_without_state_support() {
        let (mut m, mut h, t) = stateful();
        m.request_upgrade(&mut h, t, None);
        m.on_ready(&mut h, t, 2);
        assert_eq!(m.active(), Some(1));
        assert_eq!(m.last_upgrade().unwrap().result, UpgradeResult::RolledBack);
    }

    #[test]
    fn old_generation_dying_during_snapshot_is_reported() {
        let (mut m, mut h, t) = stateful();
        m.request_upgrade(&mut h, t, None);
        m.on_hello(2, vec![Feature::State]);
        m.on_prepared(&mut h, t, 2);
        h.take();
        m.on_exit(&mut h, t, 1, "signal 9");
        assert!(h.take().iter().any(|c| matches!(c, Call::Send(2, SupervisorMsg::Fresh { reason }) if reason.contains("STATE LOST"))));
        m.on_ready(&mut h, t, 2);
        let r = m.last_upgrade().unwrap();
        assert_eq!(r.result, UpgradeResult::Promoted);
        assert!(r.reason.as_deref().unwrap().contains("STATE LOST"));
    }
}
