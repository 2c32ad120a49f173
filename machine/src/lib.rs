//! The upgrade state machine, pure: no processes, no sockets, no clock.
//!
//! The driver feeds it events (a request, READY, an exit, a control message, the
//! time) and it acts through the [`Host`] trait. Time is always passed in, and
//! [`Machine::next_deadline`] tells the driver when to call [`Machine::tick`], so
//! every timeout is unit-testable without sleeping or forking.
//!
//! A crate of its own so that Cargo keeps it pure: it depends on the protocol's
//! message types (without their I/O), serde, humantime and tracing, and on no
//! runtime, no syscall crate.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use baton_protocol::{EventKind, Feature, Phase, UpgradeReport, UpgradeResult};

mod carry;
mod dryrun;
mod exit;
mod handover;
mod host;
mod input;
mod outcome;
mod precopy;
mod probation;
mod record;
mod stateful;

pub use carry::{Carried, CarryError, GenCarried, MonoClock, ProbationCarried};
pub use handover::Handover;
pub use host::{
    Answers, Channel, Host, Kill, Outside, PrecopySettings, Processes, ReadyMode, SdEvent, Settings,
};
pub use input::Input;
pub use record::{Gen, Waiters};
use record::{Revert, Stage, Transfer, Upgrade, Why};

pub use probation::{Probation, ProbationOutcome, ReleaseEvent};

/// A generation number (1, 2, 3, ...).
pub type GenId = u64;
/// What a generation runs, as the host names it: a release's version, or a label
/// for the executable opened from PROGRAM. The machine only compares them.
pub type Image = String;
/// Identifies a client waiting for an upgrade's outcome (`baton upgrade --wait`).
pub type WaiterId = u64;

/// The supervisor's generations and its upgrade in progress. A reexec carries what
/// an idle machine holds as a [`Carried`] record, not these fields.
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
    /// What the replacement of a dead active generation runs.
    restart_image: Option<Image>,
    last: Option<UpgradeReport>,
    exited: bool,
    /// The confirmed image: what a revert returns to.
    permanent: Option<Image>,
    /// The promoted image not yet confirmed.
    probation: Option<probation::OnProbation>,
    /// Without a permanent image: the last one known to serve, which a failing
    /// image on probation reverts to (see `note_fallback`).
    fallback: Option<Image>,
    /// Set when a stateful active generation died with its state; the next
    /// candidate reports it.
    lost_state: Option<String>,
    /// What the first generation runs.
    boot_image: Option<Image>,
    /// A queued upgrade waits even once the machine is idle (a reexec is due).
    held: bool,
    /// A dry-run snapshot under way (a reexec waits for idle, so never carried).
    dry_run: Option<dryrun::DryRun>,
}

/// The machine's top-level state. Each one's data lives in the machine: an
/// upgrade's in its record, a replacement's in its deadline and image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Course {
    /// No generation is active and nothing is under way (before the first start,
    /// or after a failed one with nothing to replace it).
    Down,
    /// A generation serves and nothing is under way; a reexec may happen.
    Idle,
    /// A new generation is on its way in: the first start, an upgrade, a
    /// replacement, a revert or a rollback.
    Upgrading,
    /// The active generation died; its replacement starts at a deadline (back-off).
    RestartDue,
    /// A dry-run snapshot of the active generation is under way.
    DryRun,
    /// Every generation drains; baton exits once all are gone.
    Stopping,
}

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
            restart_image: None,
            last: None,
            exited: false,
            permanent: None,
            probation: None,
            fallback: None,
            lost_state: None,
            boot_image: None,
            held: false,
            dry_run: None,
        }
    }

    /// The top-level state: exactly one holds at a time.
    pub fn course(&self) -> Course {
        if self.stopping {
            Course::Stopping
        } else if self.upgrade.is_some() {
            Course::Upgrading
        } else if self.restart_at.is_some() {
            Course::RestartDue
        } else if self.dry_run.is_some() {
            Course::DryRun
        } else if self.active.is_some() {
            Course::Idle
        } else {
            Course::Down
        }
    }

    /// Nothing is under way and a generation is active ([`Course::Idle`]). A reexec
    /// happens only then.
    pub fn idle(&self) -> bool {
        self.course() == Course::Idle
    }

    /// Holds (`true`) a queued upgrade back even when idle, or lets it go: it
    /// starts now if the machine is idle.
    pub fn hold(&mut self, host: &mut impl Host, now: Instant, on: bool) {
        self.held = on;
        if !on && self.idle() {
            self.start_queued(host, now);
        }
    }

    fn start_queued(&mut self, host: &mut impl Host, now: Instant) {
        if let Some(w) = self.queued.take() {
            let waiters = Waiters {
                promoted: w,
                permanent: Vec::new(),
            };
            self.begin(host, now, Why::Upgrade, None, waiters);
        }
    }

    /// The first generation runs `image`; `permanent` says whether it is confirmed
    /// (else it goes on probation when it is ready).
    pub fn boot_with(&mut self, image: Image, permanent: bool) {
        if permanent {
            self.permanent = Some(image.clone());
        }
        self.boot_image = Some(image);
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
    pub fn status_line(&self, now: Instant) -> String {
        let mut s = match self
            .active
            .and_then(|a| self.gens.get(&a).map(|g| (a, g.pid)))
        {
            Some((a, pid)) => format!("generation {a} pid {pid}"),
            None => "no active generation".to_string(),
        };
        if let Some(u) = &self.upgrade {
            match u.why {
                Why::Upgrade => s.push_str(&format!("; upgrading to generation {}", u.candidate)),
                Why::Revert => s.push_str(&format!(
                    "; reverting to {}",
                    u.image.as_deref().unwrap_or("?")
                )),
                Why::Rollback => s.push_str(&format!(
                    "; rolling back to {}",
                    u.image.as_deref().unwrap_or("?")
                )),
                _ => {}
            }
        }
        if let Some(p) = self.probation_line(now) {
            s = format!("{p}; {s}");
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
        let probation = self.probation.as_ref().and_then(|p| p.until);
        gens.chain([up, self.restart_at, probation, self.dry_run_deadline()])
            .flatten()
            .min()
    }

    /// Starts the first generation.
    pub fn start(&mut self, host: &mut impl Host, now: Instant) {
        let image = self.boot_image.clone();
        self.begin(host, now, Why::Initial, image, Waiters::default());
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
        let busy = matches!(
            self.course(),
            Course::Upgrading | Course::RestartDue | Course::DryRun
        );
        if busy || self.held {
            self.queued.get_or_insert_with(Vec::new).extend(waiter);
            tracing::info!("upgrade requested during another; queued");
            return;
        }
        self.begin(host, now, Why::Upgrade, None, Waiters::promoted(waiter));
    }

    fn report_for_refusal(&self, reason: &str) -> UpgradeReport {
        UpgradeReport {
            reason: Some(reason.to_string()),
            ..UpgradeReport::new(UpgradeResult::RolledBack, self.next_gen, None)
        }
    }

    fn begin(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        why: Why,
        image: Option<Image>,
        waiters: Waiters,
    ) {
        self.begin_with(host, now, why, image, waiters, None);
    }

    fn begin_with(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        why: Why,
        image: Option<Image>,
        waiters: Waiters,
        revert: Option<Revert>,
    ) {
        let id = self.next_gen;
        self.next_gen += 1;
        self.restart_at = None;
        self.restart_image = None;
        self.upgrade = Some(Upgrade {
            why,
            candidate: id,
            pid: None,
            started: now,
            waiters,
            image: image.clone(),
            revert,
            stage: Stage::Starting,
            stage_deadline: None,
            state: Transfer {
                state_lost: self.lost_state.take(),
                ..Transfer::default()
            },
        });
        if matches!(why, Why::Upgrade | Why::Revert | Why::Rollback) {
            host.systemd(SdEvent::Reloading, &self.status_line(now));
        }
        match host.spawn(id, image.as_ref()) {
            Ok((pid, image)) => {
                tracing::info!(generation = id, pid, "spawned");
                host.event(
                    id,
                    pid,
                    EventKind::Spawned {
                        why: why.reason(),
                        image: image.clone(),
                    },
                );
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
                        restores: None,
                        image: image.clone(),
                        kill_at: None,
                        killed: false,
                        ready_at,
                        ready_by,
                        promoted_at: None,
                    },
                );
                if let Some(u) = self.upgrade.as_mut() {
                    u.pid = Some(pid);
                    u.image = Some(image);
                }
            }
            Err(e) => self.fail(host, now, format!("spawn failed: {e}")),
        }
    }

    /// The child's SDK said hello.
    fn on_hello(&mut self, gen_id: GenId, features: Vec<Feature>, restores: Option<Vec<u32>>) {
        if let Some(g) = self.gens.get_mut(&gen_id) {
            g.features = Some(features);
            g.restores = restores;
        }
    }

    /// `READY=1` from generation `gen_id` (or its delay elapsed).
    fn on_ready(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        if u.candidate != gen_id {
            return;
        }
        if let Some(g) = self.gens.get_mut(&gen_id) {
            g.ready_at = None;
            host.event(gen_id, g.pid, EventKind::Ready);
        }
        match u.stage {
            Stage::Restored => self.promote(host, now),
            Stage::Precopy | Stage::Snapshotting | Stage::Restoring => u.state.ready_early = true,
            Stage::Starting => {
                let needs_state = self.s.stateful
                    && self
                        .active
                        .and_then(|a| self.gens.get(&a))
                        .is_some_and(|g| g.has(Feature::State));
                if needs_state {
                    // An SDK that announced state hand-over but never called restore
                    // forgot to; one that did not announce it cannot.
                    let why = if self
                        .gens
                        .get(&gen_id)
                        .is_some_and(|g| g.has(Feature::State))
                    {
                        "candidate became ready without restoring the state: it announced state hand-over but never called restore before ready"
                    } else {
                        "candidate became ready without restoring the state (it does not support state hand-over)"
                    };
                    self.fail(host, now, why.into());
                } else {
                    self.promote(host, now);
                }
            }
        }
    }

    /// Connections handed over to `target` (see [`Handover`]), counted in the
    /// report of the upgrade that started it.
    pub fn note_handover(&mut self, target: GenId, h: Handover) {
        if let Some(l) = self.last.as_mut() {
            if l.generation == target {
                h.apply(l);
            }
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
        self.stage_tick(host, now);
        if self.restart_at.is_some_and(|t| t <= now) {
            self.restart_at = None;
            let image = self.restart_image.take().or_else(|| self.permanent.clone());
            self.begin(host, now, Why::Replace, image, Waiters::default());
        }
        self.probation_tick(host, now);
        self.dry_run_tick(host, now);
    }
}

#[cfg(test)]
mod tests;
