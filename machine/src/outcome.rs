//! How an upgrade ends: the candidate promoted or the upgrade failed, the report
//! concluded, and the old generations retired.

use std::time::Instant;

use baton_protocol::{EventKind, Feature, Phase, SupervisorMsg, UpgradeReport, UpgradeResult};

use super::record::{Stage, Upgrade, Why};
use super::{GenId, Host, Image, Kill, Machine, SdEvent, WaiterId, later, ms};
use crate::{Channel, Outside, Processes};

impl Machine {
    pub(super) fn promote(&mut self, host: &mut impl Host, now: Instant) {
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
        let retire: Vec<GenId> = old.into_iter().chain(u.state.quiesced).collect();
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
        let mut report = u.report(UpgradeResult::Promoted, u.state.state_lost.clone(), now);
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
    pub(super) fn fail(&mut self, host: &mut impl Host, now: Instant, reason: String) {
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

    pub(super) fn conclude<H: Host>(
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
    pub(super) fn peak_rss(&self, host: &mut impl Host, u: &Upgrade, report: &mut UpgradeReport) {
        if let Some(old) = u.old_gen() {
            report.old_peak_rss_bytes = host.peak_rss(old);
            report.new_peak_rss_bytes = host.peak_rss(u.candidate);
        }
    }

    /// Tells a generation to drain (or commit, if it was quiesced) and arms its SIGKILL.
    pub(super) fn retire(
        &mut self,
        host: &mut (impl Processes + Channel + Outside),
        now: Instant,
        id: GenId,
        migrate: bool,
    ) {
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
