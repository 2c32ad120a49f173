//! Dry-run snapshots (`baton snapshot`, `baton rehearse`): the active generation
//! quiesces and snapshots as for an upgrade, then resumes; nothing is committed.
//!
//! At most one runs at a time (later requests join it). An upgrade that reaches its
//! own quiesce meanwhile waits for it to end, so the two never interleave on one
//! process: a snapshot meant for a dry run is never passed to a candidate.

use std::time::Instant;

use baton_protocol::{Feature, Phase, SupervisorMsg};

use super::{GenId, Host, Machine, later};
use crate::Channel;

/// A dry-run snapshot under way.
pub(super) struct DryRun {
    /// The generation asked for it.
    pub gen_id: GenId,
    /// It must answer by then.
    pub deadline: Instant,
    /// A candidate that became prepared meanwhile; its upgrade goes on afterwards.
    pub prepared: Option<GenId>,
}

impl Machine {
    /// Takes a dry-run snapshot of the active generation, in schema `schema` (`None`:
    /// its own). The outcome goes to [`Host::dry_run_done`].
    ///
    /// # Errors
    /// Why none can be taken now (no active stateful generation, an upgrade under
    /// way, stopping).
    pub fn request_dry_run(
        &mut self,
        host: &mut impl Channel,
        now: Instant,
        schema: Option<u32>,
    ) -> Result<GenId, String> {
        if let Some(d) = &self.dry_run {
            return Ok(d.gen_id);
        }
        if self.stopping {
            return Err("baton is stopping".into());
        }
        if !self.s.stateful {
            return Err("baton runs without --state; there is no state to snapshot".into());
        }
        if self.upgrade.is_some() {
            return Err("an upgrade is under way; try again when it has ended".into());
        }
        let Some(active) = self.active else {
            return Err("no generation is active".into());
        };
        let g = self
            .gens
            .get_mut(&active)
            .ok_or("no generation is active")?;
        if !g.has(Feature::State) {
            return Err(format!(
                "generation {active} does not take part in state hand-over (no `state` in its hello)"
            ));
        }
        g.phase = Phase::Quiesced;
        self.dry_run = Some(DryRun {
            gen_id: active,
            deadline: later(now, self.s.snapshot_timeout),
            prepared: None,
        });
        tracing::info!(generation = active, ?schema, "dry-run snapshot: quiescing");
        host.send(
            active,
            SupervisorMsg::Quiesce {
                accept: schema.map(|v| vec![v]),
                dry_run: true,
            },
        );
        Ok(active)
    }

    /// A stateful candidate became prepared during a dry run: its quiesce waits.
    /// `true` if it was held back.
    pub(super) fn hold_for_dry_run(&mut self, gen_id: GenId) -> bool {
        match self.dry_run.as_mut() {
            Some(d) => {
                tracing::info!(
                    generation = gen_id,
                    "candidate prepared during a dry-run snapshot; its quiesce waits"
                );
                d.prepared = Some(gen_id);
                true
            }
            None => false,
        }
    }

    /// `from` answered a dry run with a snapshot of `size` bytes (the host holds it):
    /// `true` if it was one.
    pub(super) fn dry_run_snapshot(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        size: u64,
    ) -> bool {
        self.end_dry_run(host, now, from, Ok(size))
    }

    /// `from` could not snapshot for a dry run: `true` if it was one.
    pub(super) fn dry_run_failed(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        why: &str,
    ) -> bool {
        self.end_dry_run(
            host,
            now,
            from,
            Err(format!("generation {from} could not snapshot: {why}")),
        )
    }

    /// The dry run's generation exited.
    pub(super) fn dry_run_exited(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId) {
        if self.dry_run.as_ref().is_some_and(|d| d.gen_id == gen_id) {
            let d = self.dry_run.take();
            host.dry_run_done(
                gen_id,
                Err(format!("generation {gen_id} exited before its snapshot")),
            );
            self.after_dry_run(host, now, d);
        }
    }

    /// The dry run's deadline, if one runs.
    pub(super) fn dry_run_deadline(&self) -> Option<Instant> {
        self.dry_run.as_ref().map(|d| d.deadline)
    }

    /// Gives up a dry run that is overdue.
    pub(super) fn dry_run_tick(&mut self, host: &mut impl Host, now: Instant) {
        let Some(d) = self.dry_run.as_ref().filter(|d| d.deadline <= now) else {
            return;
        };
        let (gen_id, t) = (d.gen_id, self.s.snapshot_timeout);
        self.end_dry_run(
            host,
            now,
            gen_id,
            Err(format!(
                "generation {gen_id} did not deliver its snapshot within {}",
                humantime::format_duration(t)
            )),
        );
    }

    fn end_dry_run(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        outcome: Result<u64, String>,
    ) -> bool {
        if self.dry_run.as_ref().is_none_or(|d| d.gen_id != from) {
            return false;
        }
        let d = self.dry_run.take();
        if let Some(g) = self.gens.get_mut(&from) {
            if g.phase == Phase::Quiesced {
                g.phase = Phase::Active;
            }
        }
        let reason = match &outcome {
            Ok(_) => "dry-run snapshot taken".to_string(),
            Err(e) => format!("dry-run snapshot failed: {e}"),
        };
        host.send(from, SupervisorMsg::Resume { reason });
        host.dry_run_done(from, outcome);
        self.after_dry_run(host, now, d);
        true
    }

    /// Lets what waited for the dry run go on: a prepared candidate's quiesce, then a
    /// queued upgrade.
    fn after_dry_run(&mut self, host: &mut impl Host, now: Instant, d: Option<DryRun>) {
        if let Some(c) = d.and_then(|d| d.prepared) {
            self.on_prepared(host, now, c);
        }
        if self.idle() && !self.held {
            self.start_queued(host, now);
        }
    }
}
