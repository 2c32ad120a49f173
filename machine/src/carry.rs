//! What a reexec carries of the machine: a plain record, part of the versioned
//! hand-over (`reexec/state.rs`), decoupled from [`Machine`]'s fields. The machine
//! may rename or regroup its fields freely; only the conversions here change, and
//! the hand-over's shape test fails if this record changes without a decision.
//!
//! A reexec happens only when the machine is idle, so no upgrade, replacement or
//! stop is ever carried. Format 1 wrote the whole machine, so the record keeps the
//! fields that format had (always empty for those) for an older baton to read
//! what this one writes, after a downgrade.

use std::collections::BTreeMap;
use std::time::Instant;

use baton_protocol::{Feature, Phase, UpgradeReport};
use serde::{Deserialize, Serialize};

use super::probation::OnProbation;
use super::{Gen, GenId, Image, Machine, Settings, WaiterId};

/// How a carried time is written: as the host's monotonic clock, which both images
/// of baton share, so that deadlines carry over exactly (an `Instant` has no
/// serialised form).
pub trait MonoClock {
    /// `t` as monotonic microseconds.
    fn micros(&self, t: Instant) -> i64;
    /// The `Instant` of monotonic microseconds `micros`.
    fn instant(&self, micros: i64) -> Instant;
}

/// Why a machine cannot be carried, or a record not resumed.
#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    /// An upgrade, a replacement or a stop is under way.
    #[error("the supervisor is not idle")]
    NotIdle,
    /// The record carries work under way, which no baton writes.
    #[error("it carries work under way (a reexec happens only when idle)")]
    WorkUnderWay,
}

/// The machine across a reexec.
#[derive(Debug, Serialize, Deserialize)]
pub struct Carried {
    /// The settings it runs with.
    pub s: Settings,
    /// Every running generation.
    pub gens: BTreeMap<GenId, GenCarried>,
    /// The next generation's number.
    pub next_gen: GenId,
    /// The active generation.
    pub active: Option<GenId>,
    /// Waiters of an upgrade asked for but not started (a reexec was due).
    pub queued: Option<Vec<WaiterId>>,
    /// Unexpected exits of the active generation.
    pub crashes: u64,
    /// Those in a row (the restart back-off).
    pub consecutive_crashes: u32,
    /// The last finished upgrade.
    pub last: Option<UpgradeReport>,
    /// The last generation has exited (baton is stopping).
    pub exited: bool,
    /// The confirmed image.
    pub permanent: Option<Image>,
    /// The image on probation.
    pub probation: Option<ProbationCarried>,
    /// The last image known to serve, without a permanent one.
    #[serde(default)]
    pub fallback: Option<Image>,
    /// A stateful generation died with its state (the next candidate reports it).
    pub lost_state: Option<String>,
    /// What the first generation runs.
    pub boot_image: Option<Image>,
    /// Never set (idle): kept for format 1 readers.
    #[serde(default)]
    pub upgrade: Option<serde_json::Value>,
    /// Never set (idle): kept for format 1 readers.
    #[serde(default)]
    pub restart_at: Option<serde_json::Value>,
    /// What a replacement would run (none is due when idle).
    #[serde(default)]
    pub restart_image: Option<Image>,
    /// Never set (idle): kept for format 1 readers.
    #[serde(default)]
    pub stopping: bool,
}

/// A generation across a reexec.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenCarried {
    /// Process id.
    pub pid: u32,
    /// Phase.
    pub phase: Phase,
    /// Features its SDK announced.
    pub features: Option<Vec<Feature>>,
    /// Schema versions it restores.
    pub restores: Option<Vec<u32>>,
    /// What it runs.
    pub image: Image,
    /// When it is SIGKILLed.
    pub kill_at: Option<i64>,
    /// SIGKILL was sent.
    pub killed: bool,
    /// Becomes ready at this time (`--ready delay=`).
    pub ready_at: Option<i64>,
    /// Must be ready by this time.
    pub ready_by: Option<i64>,
    /// When it became active.
    pub promoted_at: Option<i64>,
}

/// The image on probation across a reexec.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProbationCarried {
    /// The image.
    pub image: Image,
    /// When probation ends (`None`: by hand).
    pub until: Option<i64>,
    /// Clients waiting for it to become permanent.
    pub waiters: Vec<WaiterId>,
    /// Failed health checks in a row.
    pub failures: u32,
    /// Why it failed with nothing to revert to.
    #[serde(default)]
    pub failed: Option<String>,
}

impl GenCarried {
    fn new(g: &Gen, c: &impl MonoClock) -> Self {
        let t = |t: Option<Instant>| t.map(|t| c.micros(t));
        GenCarried {
            pid: g.pid,
            phase: g.phase,
            features: g.features.clone(),
            restores: g.restores.clone(),
            image: g.image.clone(),
            kill_at: t(g.kill_at),
            killed: g.killed,
            ready_at: t(g.ready_at),
            ready_by: t(g.ready_by),
            promoted_at: t(g.promoted_at),
        }
    }

    fn into_gen(self, c: &impl MonoClock) -> Gen {
        let g = self;
        let t = |t: Option<i64>| t.map(|t| c.instant(t));
        Gen {
            pid: g.pid,
            phase: g.phase,
            features: g.features,
            restores: g.restores,
            image: g.image,
            kill_at: t(g.kill_at),
            killed: g.killed,
            ready_at: t(g.ready_at),
            ready_by: t(g.ready_by),
            promoted_at: t(g.promoted_at),
        }
    }
}

impl Machine {
    /// What a reexec carries, its times written by `clock`.
    ///
    /// # Errors
    /// [`CarryError::NotIdle`]: an upgrade, a replacement or a stop is under way,
    /// which a reexec never carries.
    pub fn carry(&self, clock: &impl MonoClock) -> Result<Carried, CarryError> {
        if !self.idle() {
            return Err(CarryError::NotIdle);
        }
        Ok(Carried {
            s: self.s,
            gens: self
                .gens
                .iter()
                .map(|(k, g)| (*k, GenCarried::new(g, clock)))
                .collect(),
            next_gen: self.next_gen,
            active: self.active,
            queued: self.queued.clone(),
            crashes: self.crashes,
            consecutive_crashes: self.consecutive_crashes,
            last: self.last.clone(),
            exited: self.exited,
            permanent: self.permanent.clone(),
            probation: self.probation.as_ref().map(|p| ProbationCarried {
                image: p.image.clone(),
                until: p.until.map(|t| clock.micros(t)),
                waiters: p.waiters.clone(),
                failures: p.failures,
                failed: p.failed.clone(),
            }),
            fallback: self.fallback.clone(),
            lost_state: self.lost_state.clone(),
            boot_image: self.boot_image.clone(),
            upgrade: None,
            restart_at: None,
            restart_image: self.restart_image.clone(),
            stopping: false,
        })
    }

    /// The machine a reexec carried over, its times read by `clock`.
    ///
    /// # Errors
    /// [`CarryError::WorkUnderWay`]: the record carries an upgrade, a replacement or
    /// a stop, which no baton writes (it reexecs only when idle).
    pub fn resume(c: Carried, clock: &impl MonoClock) -> Result<Machine, CarryError> {
        if c.upgrade.is_some() || c.restart_at.is_some() || c.stopping {
            return Err(CarryError::WorkUnderWay);
        }
        let mut m = Machine::new(c.s);
        m.gens = c
            .gens
            .into_iter()
            .map(|(k, g)| (k, g.into_gen(clock)))
            .collect();
        m.next_gen = c.next_gen;
        m.active = c.active;
        m.queued = c.queued;
        m.crashes = c.crashes;
        m.consecutive_crashes = c.consecutive_crashes;
        m.last = c.last;
        m.exited = c.exited;
        m.permanent = c.permanent;
        m.probation = c.probation.map(|p| OnProbation {
            image: p.image,
            until: p.until.map(|t| clock.instant(t)),
            waiters: p.waiters,
            failures: p.failures,
            failed: p.failed,
        });
        m.fallback = c.fallback;
        m.lost_state = c.lost_state;
        m.boot_image = c.boot_image;
        m.restart_image = c.restart_image;
        Ok(m)
    }
}
