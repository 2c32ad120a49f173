//! A generation exits: a crash of the active one (replaced, or reverted), a candidate
//! or an old generation ending, and baton's own stop.

use std::time::{Duration, Instant};

use baton_protocol::{EventKind, Feature};

use super::{GenId, Host, Machine, SdEvent, later, ms};
use crate::Outside;

/// A generation active this long resets the crash back-off.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(10);

impl Machine {
    /// Generation `gen_id` exited; `how` describes the status.
    pub(super) fn on_exit(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId, how: &str) {
        let Some(g) = self.gens.remove(&gen_id) else {
            return;
        };
        self.dry_run_exited(host, now, gen_id);
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
                    self.state_died_idle(gen_id, how);
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
                if self.precopy_source_died(host, now, gen_id, &g.image, how) {
                    self.maybe_exit(host);
                    return;
                }
                if self.upgrade.is_none() {
                    self.restart_image = Some(g.image.clone());
                    self.schedule_replacement(now);
                } else if lost_state {
                    self.state_died_upgrading(host, gen_id, how);
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

    pub(super) fn schedule_replacement(&mut self, now: Instant) {
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

    pub(super) fn maybe_exit(&mut self, host: &mut impl Outside) {
        if self.stopping && self.gens.is_empty() && !self.exited {
            self.exited = true;
            host.exit(0, "stopped");
        }
    }
}
