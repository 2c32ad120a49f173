//! The two-phase stateful upgrade: prepared, quiesce, snapshot, restore (or a
//! rejection), as the machine sees it.

use std::time::Instant;

use baton_protocol::{Feature, Phase, SupervisorMsg};

use super::{GenId, Host, Machine, Stage, Why, later, ms_f};
use crate::Channel;

fn state_lost(gen_id: GenId, how: &str) -> String {
    let why = format!("STATE LOST: generation {gen_id} died ({how}) before handing over its state");
    tracing::error!(generation = gen_id, "{why}");
    why
}

impl Machine {
    /// The active generation `gen_id`, which held state, died with no upgrade under
    /// way: the candidate that replaces it reports the loss.
    pub(super) fn state_died_idle(&mut self, gen_id: GenId, how: &str) {
        self.lost_state = Some(state_lost(gen_id, how));
    }

    /// The active generation `gen_id`, which held state, died during an upgrade.
    /// The upgrade reports the loss; if it waited for the snapshot, none is coming,
    /// and the candidate starts empty.
    pub(super) fn state_died_upgrading(
        &mut self,
        host: &mut impl Channel,
        gen_id: GenId,
        how: &str,
    ) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        let why = state_lost(gen_id, how);
        u.state.state_lost = Some(why.clone());
        if u.stage == Stage::Snapshotting {
            let c = u.candidate;
            u.stage = Stage::Restored;
            u.stage_deadline = None;
            u.state.quiesced = None;
            host.send(c, SupervisorMsg::Fresh { reason: why });
        }
    }

    /// Stateful candidate: initialised, waiting for state.
    pub(super) fn on_prepared(&mut self, host: &mut impl Channel, now: Instant, gen_id: GenId) {
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
        if let (true, Some(_)) = (self.s.stateful, old) {
            if self.hold_for_dry_run(gen_id) {
                return;
            }
        }
        if let (true, Some(old)) = (self.s.stateful, old) {
            if self.try_precopy(host, now, old, gen_id) {
                return;
            }
        }
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        match (self.s.stateful, old) {
            (true, Some(old)) => {
                self.quiesce_old(now, old);
                tracing::info!(generation = old, "quiescing for snapshot");
                let accept = self.gens.get(&gen_id).and_then(|g| g.restores.clone());
                host.send(
                    old,
                    SupervisorMsg::Quiesce {
                        accept,
                        dry_run: false,
                    },
                );
            }
            (stateful, _) => {
                let reason = if !stateful {
                    "baton runs without --state"
                } else if u.why == Why::Initial {
                    "first generation"
                } else if let Some(lost) = &u.state.state_lost {
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

    /// The old generation stops accepting now: the snapshot (or last round) is due and the
    /// accept gap starts.
    pub(super) fn quiesce_old(&mut self, now: Instant, old: GenId) {
        if let Some(u) = self.upgrade.as_mut() {
            u.stage = Stage::Snapshotting;
            u.stage_deadline = Some(later(now, self.s.snapshot_timeout));
            u.state.quiesced = Some(old);
            u.state.quiesced_at = Some(now);
        }
        if let Some(g) = self.gens.get_mut(&old) {
            g.phase = Phase::Quiesced;
        }
    }

    /// Stateful old generation delivered its snapshot (the driver holds the fd).
    pub(super) fn on_snapshot(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        size: u64,
    ) {
        if self.dry_run_snapshot(host, now, from, size) {
            return;
        }
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        if u.stage != Stage::Snapshotting || u.state.quiesced != Some(from) {
            return;
        }
        u.state.snapshot_ms = u.state.quiesced_at.map(|t| ms_f(now - t));
        u.state.snapshot_bytes = Some(size);
        let to = u.candidate;
        let kind = baton_protocol::EventKind::Snapshot {
            bytes: size,
            ms: u.state.snapshot_ms.unwrap_or(0.0),
        };
        let pid = self.gens.get(&from).map_or(0, |g| g.pid);
        host.event(from, pid, kind);
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        match host.pass_snapshot(from, to) {
            Ok(()) => {
                u.stage = Stage::Restoring;
                u.stage_deadline = Some(later(now, self.s.restore_timeout));
                u.state.restore_sent_at = Some(now);
            }
            Err(e) => self.fail(host, now, format!("cannot pass the snapshot: {e}")),
        }
    }

    /// Stateful old generation could not write a snapshot.
    pub(super) fn on_snapshot_failed(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        why: &str,
    ) {
        if self.dry_run_failed(host, now, from, why) {
            return;
        }
        if self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.state.quiesced == Some(from))
        {
            self.fail(
                host,
                now,
                format!("old generation failed to snapshot: {why}"),
            );
        }
    }

    /// Stateful candidate restored the snapshot.
    pub(super) fn on_restored(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        if u.candidate != gen_id || u.stage != Stage::Restoring {
            return;
        }
        u.state.restore_ms = u.state.restore_sent_at.map(|t| ms_f(now - t));
        u.stage = Stage::Restored;
        u.stage_deadline = None;
        let ms = u.state.restore_ms.unwrap_or(0.0);
        let pid = self.gens.get(&gen_id).map_or(0, |g| g.pid);
        host.event(gen_id, pid, baton_protocol::EventKind::Restored { ms });
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        // The ready timeout restarts: restoring a large state is not a hang.
        if let Some(g) = self.gens.get_mut(&gen_id) {
            if g.ready_by.is_some() {
                g.ready_by = Some(later(now, self.s.ready_timeout));
            }
        }
        if u.state.ready_early {
            self.promote(host, now);
        }
    }

    /// Stateful candidate rejected the snapshot.
    pub(super) fn on_rejected(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        gen_id: GenId,
        why: &str,
    ) {
        if self.upgrade.as_ref().is_some_and(|u| u.candidate == gen_id) {
            self.fail(host, now, format!("candidate rejected the snapshot: {why}"));
        }
    }

    /// A stateful stage (pre-copy, snapshot, restore) past its deadline fails the
    /// upgrade, naming the stage and its timeout.
    pub(super) fn stage_tick(&mut self, host: &mut impl Host, now: Instant) {
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
    }
}
