//! The machine's records: one generation, and the upgrade in progress.

use std::time::Instant;

use baton_protocol::{Feature, Phase, UpgradeReport, UpgradeResult};

use super::{GenId, Image, WaiterId, ms, ms_f};

/// One running child.
#[derive(Debug, Clone)]
pub struct Gen {
    /// Process id.
    pub pid: u32,
    /// Phase.
    pub phase: Phase,
    /// Features announced by its SDK (`None` until it says hello: no SDK).
    pub features: Option<Vec<Feature>>,
    /// Schema versions it restores, if it said.
    pub restores: Option<Vec<u32>>,
    /// What it runs.
    pub image: Image,
    /// When it is SIGKILLed (draining, or a rolled-back candidate).
    pub kill_at: Option<Instant>,
    /// SIGKILL was sent.
    pub killed: bool,
    /// Becomes ready at this time (`--ready delay=`).
    pub(super) ready_at: Option<Instant>,
    /// Must be ready by this time.
    pub(super) ready_by: Option<Instant>,
    /// When it became active.
    pub(super) promoted_at: Option<Instant>,
}

impl Gen {
    pub(super) fn has(&self, f: Feature) -> bool {
        self.features.as_ref().is_some_and(|v| v.contains(&f))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// The first generation at startup.
    Initial,
    /// Requested (HUP, `baton upgrade`, `systemctl reload`).
    Upgrade,
    /// The active generation died; this replaces it.
    Replace,
    /// A generation on probation failed; this goes back to the permanent image.
    Revert,
    /// Asked for by hand: back to a release that was permanent before.
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Waiting for READY (stateless) or `prepared` (stateful).
    Starting,
    /// Pre-copy: the old generation serves and sends rounds.
    Precopy,
    /// Old generation quiesced; waiting for its snapshot (or last round).
    Snapshotting,
    /// Candidate has the snapshot; waiting for `restored`.
    Restoring,
    /// Candidate restored (or told to start fresh); waiting for READY.
    Restored,
}

/// Who waits for an upgrade: until promotion (or rollback), or until the image
/// it installs is permanent (or reverted).
#[derive(Debug, Default)]
pub struct Waiters {
    /// Answered at promotion or rollback.
    pub promoted: Vec<WaiterId>,
    /// Answered when probation ends (or at rollback).
    pub permanent: Vec<WaiterId>,
}

impl Waiters {
    pub(super) fn promoted(w: Option<WaiterId>) -> Self {
        Waiters {
            promoted: w.into_iter().collect(),
            permanent: Vec::new(),
        }
    }
}

/// A revert in progress: the image that failed, why, and who waits.
#[derive(Debug)]
pub(super) struct Revert {
    pub(super) failed: Image,
    pub(super) reason: String,
    pub(super) waiters: Vec<WaiterId>,
}

#[derive(Debug)]
pub(super) struct Upgrade {
    pub(super) why: Why,
    pub(super) candidate: GenId,
    pub(super) pid: Option<u32>,
    pub(super) started: Instant,
    pub(super) waiters: Waiters,
    /// The image asked for (`None`: what a plain upgrade runs).
    pub(super) image: Option<Image>,
    pub(super) revert: Option<Revert>,
    pub(super) stage: Stage,
    pub(super) stage_deadline: Option<Instant>,
    /// What the state hand-over has done so far (empty for a stateless upgrade).
    pub(super) state: Transfer,
}

/// A stateful upgrade's hand-over: which generation was quiesced, the snapshot's
/// and the restore's figures, the pre-copy run. All empty until the stages that
/// fill them, and for a stateless upgrade.
#[derive(Debug, Default)]
pub(super) struct Transfer {
    /// The generation that was quiesced for this upgrade.
    pub(super) quiesced: Option<GenId>,
    pub(super) quiesced_at: Option<Instant>,
    pub(super) snapshot_ms: Option<f64>,
    pub(super) snapshot_bytes: Option<u64>,
    pub(super) restore_sent_at: Option<Instant>,
    pub(super) restore_ms: Option<f64>,
    /// READY arrived while still restoring (datagrams can overtake the stream).
    pub(super) ready_early: bool,
    /// Set when the old generation died with its state.
    pub(super) state_lost: Option<String>,
    /// The chunked hand-over, when both generations do it.
    pub(super) precopy: Option<super::precopy::Run>,
}

impl Why {
    /// As the event stream says it.
    pub(super) fn reason(self) -> baton_protocol::StartReason {
        use baton_protocol::StartReason as R;
        match self {
            Why::Initial => R::Initial,
            Why::Upgrade => R::Upgrade,
            Why::Replace => R::Replace,
            Why::Revert => R::Revert,
            Why::Rollback => R::Rollback,
        }
    }
}

impl Upgrade {
    /// The old generation sending a pre-copy, if one runs.
    pub(super) fn precopy_from(&self) -> Option<GenId> {
        self.state.precopy.as_ref().map(|p| p.from)
    }

    /// The old generation handing its state over: quiesced, or still serving a pre-copy.
    pub(super) fn old_gen(&self) -> Option<GenId> {
        self.state.quiesced.or(self.precopy_from())
    }

    /// The outcome of this upgrade, with the timings gathered so far.
    pub(super) fn report(
        &self,
        result: UpgradeResult,
        reason: Option<String>,
        now: Instant,
    ) -> UpgradeReport {
        let mut r = UpgradeReport {
            reason,
            duration_ms: ms(now - self.started),
            accept_gap_ms: self.state.quiesced_at.map(|t| ms_f(now - t)),
            snapshot_bytes: self.state.snapshot_bytes,
            snapshot_ms: self.state.snapshot_ms,
            restore_ms: self.state.restore_ms,
            ..UpgradeReport::new(result, self.candidate, self.pid)
        };
        if let Some(p) = &self.state.precopy {
            p.fill(&mut r);
        }
        r
    }
}
