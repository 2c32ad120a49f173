//! The upgrade state machine, pure: no processes, no sockets, no clock.
//!
//! The driver feeds it events (a request, READY, an exit, a control message, the
//! time) and it acts through the [`Host`] trait. Time is always passed in, and
//! [`Machine::next_deadline`] tells the driver when to call [`Machine::tick`], so
//! every timeout is unit-testable without sleeping or forking.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use baton_protocol::{EventKind, Feature, Phase, SupervisorMsg, UpgradeReport, UpgradeResult};

mod handover;
mod host;
mod precopy;
mod probation;
mod record;
mod stateful;

pub use handover::Handover;
pub use host::{Host, Kill, PrecopySettings, ReadyMode, SdEvent, Settings};
pub use record::{Gen, Waiters};
use record::{Revert, Stage, Upgrade, Why};

pub use probation::{Probation, ProbationOutcome, ReleaseEvent};

/// A generation number (1, 2, 3, ...).
pub type GenId = u64;
/// What a generation runs, as the host names it: a release's version, or a label
/// for the executable opened from PROGRAM. The machine only compares them.
pub type Image = String;
/// Identifies a client waiting for an upgrade's outcome (`baton upgrade --wait`).
pub type WaiterId = u64;

/// The supervisor's generations and its upgrade in progress. Serializable, so
/// that a reexec carries it over whole.
#[derive(serde::Serialize, serde::Deserialize)]
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
    #[serde(with = "crate::clock::opt")]
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
    #[serde(default)]
    fallback: Option<Image>,
    /// Set when a stateful active generation died with its state; the next
    /// candidate reports it.
    lost_state: Option<String>,
    /// What the first generation runs.
    boot_image: Option<Image>,
    /// A queued upgrade waits even once the machine is idle (a reexec is due).
    #[serde(skip)]
    held: bool,
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
            restart_image: None,
            last: None,
            exited: false,
            permanent: None,
            probation: None,
            fallback: None,
            lost_state: None,
            boot_image: None,
            held: false,
        }
    }

    /// Nothing is under way: no upgrade, no replacement due, not stopping, and a
    /// generation is active. A reexec happens only then.
    pub fn idle(&self) -> bool {
        self.upgrade.is_none()
            && self.restart_at.is_none()
            && !self.stopping
            && self.active.is_some()
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
        gens.chain([up, self.restart_at, probation]).flatten().min()
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
        if self.upgrade.is_some() || self.restart_at.is_some() || self.held {
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
            quiesced: None,
            quiesced_at: None,
            snapshot_ms: None,
            snapshot_bytes: None,
            restore_sent_at: None,
            restore_ms: None,
            ready_early: false,
            state_lost: self.lost_state.take(),
            precopy: None,
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
    pub fn on_hello(&mut self, gen_id: GenId, features: Vec<Feature>, restores: Option<Vec<u32>>) {
        if let Some(g) = self.gens.get_mut(&gen_id) {
            g.features = Some(features);
            g.restores = restores;
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
            host.event(gen_id, g.pid, EventKind::Ready);
        }
        match u.stage {
            Stage::Restored => self.promote(host, now),
            Stage::Precopy | Stage::Snapshotting | Stage::Restoring => u.ready_early = true,
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

    /// Generation `gen_id` exited; `how` describes the status.
    pub fn on_exit(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId, how: &str) {
        let Some(g) = self.gens.remove(&gen_id) else {
            return;
        };
        let how_s = how.to_string();
        let crashed = self.active == Some(gen_id) && !self.stopping;
        host.event(
            gen_id,
            g.pid,
            if crashed {
                EventKind::Crashed { how: how_s }
            } else {
                EventKind::Exited { how: how_s }
            },
        );
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
                if lost_state && self.upgrade.is_none() {
                    let why = format!(
                        "STATE LOST: generation {gen_id} died ({how}) before handing over its state"
                    );
                    tracing::error!(generation = gen_id, "{why}");
                    self.lost_state = Some(why);
                }
                if self.upgrade.is_none()
                    && self.revert_on_probation(
                        host,
                        now,
                        &g.image,
                        format!("generation {gen_id} exited during probation ({how})"),
                    )
                {
                    self.maybe_exit(host);
                    return;
                }
                if self.precopy_from() == Some(gen_id) {
                    // The candidate holds part of a state that is gone: abort it, and
                    // replace the dead generation as after any crash.
                    self.restart_image = Some(g.image.clone());
                    let why = format!(
                        "STATE LOST: generation {gen_id} died ({how}) during pre-copy; the candidate is aborted"
                    );
                    tracing::error!(generation = gen_id, "{why}");
                    self.lost_state = Some(why.clone());
                    self.fail(host, now, why);
                    self.maybe_exit(host);
                    return;
                }
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
                    None => {
                        self.restart_image = Some(g.image.clone());
                        self.schedule_replacement(now);
                    }
                }
                host.systemd(SdEvent::Ready, &self.status_line(now));
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
        self.abandon_probation(host, "baton is stopping");
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
                    Stage::Precopy => format!(
                        "pre-copy did not finish within {}",
                        humantime::format_duration(self.s.precopy_deadline())
                    ),
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
            let image = self.restart_image.take().or_else(|| self.permanent.clone());
            self.begin(host, now, Why::Replace, image, Waiters::default());
        }
        self.probation_tick(host, now);
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
        let mut report = u.report(UpgradeResult::Promoted, u.state_lost.clone(), now);
        self.peak_rss(host, &u, &mut report);
        tracing::info!(
            generation = id,
            pid = u.pid.unwrap_or(0),
            duration_ms = report.duration_ms,
            "promoted"
        );
        let image = self.gens.get(&id).map(|g| g.image.clone());
        let Upgrade {
            why,
            waiters,
            revert,
            ..
        } = u;
        if let (Some(image), Why::Initial, None, None) =
            (&image, why, &self.boot_image, &self.permanent)
        {
            // Started as PROGRAM, not from a store: what the operator started is the
            // baseline a probation reverts to.
            self.permanent = Some(image.clone());
        }
        if let Some(image) = &image {
            self.note_fallback(why, old, image);
            self.after_promotion(host, now, why, image, waiters.permanent, revert, &report);
        }
        self.conclude(host, now, why, image, report, waiters.promoted);
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
        // A pre-copy sender serves still, but its round must stop.
        if let Some(old) = u.old_gen() {
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
        let mut report = u.report(UpgradeResult::RolledBack, Some(reason.clone()), now);
        self.peak_rss(host, &u, &mut report);
        if !matches!(u.why, Why::Upgrade | Why::Revert | Why::Rollback) {
            self.consecutive_crashes += 1;
        }
        let Upgrade {
            why,
            waiters,
            revert,
            image,
            ..
        } = u;
        self.after_rollback(
            host,
            now,
            image.as_ref(),
            &reason,
            waiters.permanent,
            revert,
            &report,
        );
        self.conclude(host, now, why, image, report, waiters.promoted);
    }

    fn conclude<H: Host>(
        &mut self,
        host: &mut H,
        now: Instant,
        why: Why,
        image: Option<Image>,
        mut report: UpgradeReport,
        waiters: Vec<WaiterId>,
    ) {
        let promoted = report.result == UpgradeResult::Promoted;
        let (gen_id, pid) = (report.generation, report.pid.unwrap_or(0));
        let finished = |host: &mut H, report: &mut UpgradeReport, waiters| {
            host.finished(report, waiters);
            let (why, report) = (why.reason(), report.clone());
            let image = image.clone().unwrap_or_default();
            host.event(
                gen_id,
                pid,
                if promoted {
                    EventKind::Promoted { why, image, report }
                } else {
                    EventKind::RolledBack { why, image, report }
                },
            );
        };
        match why {
            Why::Initial if !promoted => {
                let reason = report.reason.clone().unwrap_or_default();
                finished(host, &mut report, waiters);
                self.last = Some(report);
                self.stopping = true;
                self.exited = true;
                host.exit(1, &format!("the first generation failed: {reason}"));
                return;
            }
            Why::Initial | Why::Replace => {
                finished(host, &mut report, waiters);
                if why == Why::Replace && !promoted {
                    self.last = Some(report);
                }
            }
            Why::Upgrade | Why::Revert | Why::Rollback => {
                finished(host, &mut report, waiters);
                self.last = Some(report);
            }
        }
        host.systemd(SdEvent::Ready, &self.status_line(now));
        if self.stopping {
            return;
        }
        if self.active.is_none() {
            if self.restart_image.is_none() {
                self.restart_image = self.permanent.clone();
            }
            self.schedule_replacement(now);
        } else if !self.held {
            self.start_queued(host, now);
        }
    }

    /// A stateful upgrade's memory peaks, from the host.
    fn peak_rss(&self, host: &mut impl Host, u: &Upgrade, report: &mut UpgradeReport) {
        if let Some(old) = u.old_gen() {
            report.old_peak_rss_bytes = host.peak_rss(old);
            report.new_peak_rss_bytes = host.peak_rss(u.candidate);
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
        host.event(id, pid, EventKind::Draining { connections: None });
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
mod tests;
