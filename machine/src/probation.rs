//! Probation: an image promoted but not confirmed yet, made permanent when its
//! probation passes, and reverted to the permanent image when it fails (OTP's
//! `make_permanent`, and the fallback of a node that never confirmed a release).

use std::time::{Duration, Instant};

use baton_protocol::{ReleaseResultKind, UpgradeReport};

use super::{GenId, Host, Image, Machine, Revert, WaiterId, Waiters, Why, later};
use crate::{Answers, Outside};

/// How long a newly promoted image stays on probation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Probation {
    /// Permanent at promotion.
    Off,
    /// Permanent once it has been active this long.
    For(Duration),
    /// Permanent only when asked (`baton release permanent`).
    Manual,
}

/// A release lifecycle change, for the host to persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseEvent<'a> {
    /// Promoted; on probation.
    Current(&'a Image),
    /// Confirmed.
    Permanent(&'a Image),
    /// Failed its readiness gate or its probation.
    Failed {
        /// The image.
        image: &'a Image,
        /// Why.
        reason: &'a str,
    },
    /// The revert away from `image` was refused; it keeps running, unconfirmed.
    RevertRefused {
        /// The image still running.
        image: &'a Image,
        /// Why the revert did not happen.
        reason: &'a str,
    },
}

/// How a probation (or the install that would have started one) ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbationOutcome {
    /// The image concerned.
    pub image: Option<Image>,
    /// How it ended.
    pub kind: ReleaseResultKind,
    /// Why, when it did not become permanent.
    pub reason: Option<String>,
    /// The upgrade that ended it (a revert, or a rollback before promotion).
    pub report: Option<UpgradeReport>,
}

/// The image on probation.
#[derive(Debug)]
pub(super) struct OnProbation {
    pub(super) image: Image,
    /// `None`: until made permanent by hand.
    pub(super) until: Option<Instant>,
    pub(super) waiters: Vec<WaiterId>,
    pub(super) failures: u32,
    /// It failed (crashed, failed its health check) with no earlier version to
    /// revert to: it keeps running, and its probation can no longer pass.
    pub(super) failed: Option<String>,
}

impl Machine {
    /// The confirmed image.
    pub fn permanent_image(&self) -> Option<&Image> {
        self.permanent.as_ref()
    }

    /// The image on probation, when its probation ends (`None`: manual), and its
    /// consecutive failed health checks.
    pub fn on_probation(&self) -> Option<(&Image, Option<Instant>, u32)> {
        self.probation
            .as_ref()
            .map(|p| (&p.image, p.until, p.failures))
    }

    /// The active generation, if it runs the image on probation (health checks
    /// are for it).
    pub fn probation_generation(&self) -> Option<GenId> {
        let p = self.probation.as_ref()?;
        let a = self.active?;
        (self.upgrade.is_none() && self.gens.get(&a).is_some_and(|g| g.image == p.image))
            .then_some(a)
    }

    /// Every image a generation runs or may run next; the host keeps these open.
    pub fn images_in_use(&self) -> Vec<Image> {
        let mut v: Vec<Image> = self.gens.values().map(|g| g.image.clone()).collect();
        v.extend(self.permanent.clone());
        v.extend(self.fallback.clone());
        v.extend(self.probation.as_ref().map(|p| p.image.clone()));
        v.extend(self.restart_image.clone());
        v.extend(self.upgrade.as_ref().and_then(|u| u.image.clone()));
        v.sort();
        v.dedup();
        v
    }

    /// install_release: upgrade to `image`.
    ///
    /// # Errors
    /// baton is stopping, or another upgrade is under way.
    pub fn request_install(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        image: Image,
        waiters: Waiters,
    ) -> Result<(), String> {
        self.install_as(host, now, image, waiters, Why::Upgrade)
    }

    /// `release rollback` with nothing on probation: back to `image`, a release
    /// that was permanent before; it is permanent again at its promotion, with no
    /// probation.
    ///
    /// # Errors
    /// As [`Machine::request_install`].
    pub fn request_rollback(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        image: Image,
        waiters: Waiters,
    ) -> Result<(), String> {
        self.install_as(host, now, image, waiters, Why::Rollback)
    }

    fn install_as(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        image: Image,
        waiters: Waiters,
        why: Why,
    ) -> Result<(), String> {
        if self.stopping {
            return Err("baton is stopping".into());
        }
        if self.upgrade.is_some() || self.restart_at.is_some() {
            return Err("an upgrade is in progress; try again when it has finished".into());
        }
        self.begin(host, now, why, Some(image), waiters);
        Ok(())
    }

    /// make_permanent by hand.
    ///
    /// # Errors
    /// `image` is neither permanent nor on probation.
    pub fn make_permanent(
        &mut self,
        host: &mut (impl Answers + Outside),
        now: Instant,
        image: &Image,
    ) -> Result<(), String> {
        if self.permanent.as_ref() == Some(image) && self.probation.is_none() {
            return Ok(());
        }
        match &self.probation {
            Some(p) if &p.image == image && self.probation_generation().is_some() => {
                self.confirm(host, Some(now));
                Ok(())
            }
            Some(p) if &p.image == image => Err(format!(
                "{image} is not running yet; try again when the upgrade has finished"
            )),
            Some(p) => Err(format!("{image} is not on probation ({} is)", p.image)),
            None => Err(format!("{image} is not on probation")),
        }
    }

    /// `release rollback` while an image is on probation: revert now.
    ///
    /// # Errors
    /// Nothing is on probation, there is no permanent image, or an upgrade runs.
    pub fn rollback(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        waiter: Option<WaiterId>,
    ) -> Result<(), String> {
        if self.upgrade.is_some() {
            return Err("an upgrade is in progress; try again when it has finished".into());
        }
        let Some(image) = self.probation.as_ref().map(|p| p.image.clone()) else {
            return Err("nothing is on probation".into());
        };
        if self.revert_target(&image).is_none() {
            return Err(format!(
                "{image} is on probation but there is no earlier version to go back to"
            ));
        }
        if let Some(p) = self.probation.as_mut() {
            p.waiters.extend(waiter);
        }
        self.revert_away(
            host,
            now,
            &image,
            "rollback requested".into(),
            Why::Rollback,
        );
        Ok(())
    }

    /// A health check of generation `gen_id` passed or failed.
    pub(super) fn on_health(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        gen_id: GenId,
        ok: bool,
        detail: &str,
    ) {
        if self.probation_generation() != Some(gen_id) {
            return;
        }
        let limit = self.s.health_failures.max(1);
        let Some(p) = self.probation.as_mut() else {
            return;
        };
        if ok {
            p.failures = 0;
            return;
        }
        p.failures += 1;
        tracing::warn!(
            generation = gen_id,
            failures = p.failures,
            limit,
            detail,
            "health check failed"
        );
        if p.failures >= limit {
            let image = p.image.clone();
            let why = format!("health check failed {limit} time(s) in a row: {detail}");
            self.revert_on_probation(host, now, &image, why);
        }
    }

    /// Generation `gen_id` reported `ERRNO=` (non-zero) through sd_notify: during
    /// probation that is a failure, as it is for systemd.
    pub(super) fn on_errno(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        gen_id: GenId,
        errno: &str,
    ) {
        if self.probation_generation() != Some(gen_id) {
            return;
        }
        if let Some(image) = self.probation.as_ref().map(|p| p.image.clone()) {
            let why = format!("generation {gen_id} reported ERRNO={errno} during probation");
            self.revert_on_probation(host, now, &image, why);
        }
    }

    /// The last version known to serve, other than `image`: the permanent one,
    /// else the one that was active when `image` was installed.
    pub(super) fn revert_target(&self, image: &Image) -> Option<Image> {
        self.permanent
            .clone()
            .or_else(|| self.fallback.clone())
            .filter(|t| t != image)
    }

    /// Records, at the promotion of `image` by `why`, the version it reverts to
    /// when there is no permanent one: the version that was active (`old`), or,
    /// if that one was itself still on probation, the one it would revert to.
    pub(super) fn note_fallback(&mut self, why: Why, old: Option<GenId>, image: &Image) {
        match why {
            Why::Upgrade | Why::Rollback => {
                let prev = old.and_then(|o| self.gens.get(&o)).map(|g| g.image.clone());
                let prev_unconfirmed = self
                    .probation
                    .as_ref()
                    .is_some_and(|p| Some(&p.image) == prev.as_ref() && p.failed.is_none());
                let carried = if prev_unconfirmed {
                    self.fallback.clone()
                } else {
                    None
                };
                let target = carried.or(prev).filter(|f| f != image);
                if target.is_some() {
                    self.fallback = target;
                }
            }
            // Back on the version known to serve: nothing older is needed.
            Why::Revert => self.fallback = None,
            Why::Initial | Why::Replace => {}
        }
    }

    /// Reverts away from `image` if it is on probation and an earlier version is
    /// known to serve; returns whether a revert started. Without one (the very
    /// first version) the image keeps running, marked failed: its probation can no
    /// longer pass, and a crash restarts it with back-off.
    pub(super) fn revert_on_probation(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        image: &Image,
        reason: String,
    ) -> bool {
        self.revert_away(host, now, image, reason, Why::Revert)
    }

    fn revert_away(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        image: &Image,
        reason: String,
        why: Why,
    ) -> bool {
        if self.probation.as_ref().is_none_or(|p| &p.image != image) {
            return false;
        }
        let Some(target) = self.revert_target(image) else {
            let Some(p) = self.probation.as_mut() else {
                return false;
            };
            let why = format!("{reason}; no earlier version to revert to");
            tracing::error!(image = %p.image, reason = why, "probation failed");
            if p.failed.is_none() {
                host.release(super::ReleaseEvent::RevertRefused {
                    image: &p.image,
                    reason: &why,
                });
            }
            p.failed = Some(why.clone());
            p.until = None;
            let outcome = ProbationOutcome {
                image: Some(p.image.clone()),
                kind: ReleaseResultKind::RevertRefused,
                reason: Some(why),
                report: None,
            };
            let waiters = std::mem::take(&mut p.waiters);
            host.probation_over(&outcome, waiters);
            return false;
        };
        let Some(p) = self.probation.take() else {
            return false;
        };
        tracing::warn!(image = %p.image, to = %target, reason, "probation failed: reverting");
        let revert = Revert {
            failed: p.image,
            reason,
            waiters: p.waiters,
        };
        self.begin_with(
            host,
            now,
            why,
            Some(target),
            Waiters::default(),
            Some(revert),
        );
        true
    }

    /// A generation running `image` was promoted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn after_promotion(
        &mut self,
        host: &mut (impl Answers + Outside),
        now: Instant,
        why: Why,
        image: &Image,
        waiters: Vec<WaiterId>,
        revert: Option<Revert>,
        report: &UpgradeReport,
    ) {
        if let Some(r) = revert {
            host.release(super::ReleaseEvent::Failed {
                image: &r.failed,
                reason: &r.reason,
            });
            let outcome = ProbationOutcome {
                image: Some(r.failed.clone()),
                kind: ReleaseResultKind::Reverted,
                reason: Some(format!("{}; reverted to {image}", r.reason)),
                report: Some(report.clone()),
            };
            host.probation_over(&outcome, r.waiters);
        }
        if let Some(p) = self.probation.as_mut() {
            if &p.image == image {
                p.waiters.extend(waiters);
                return;
            }
            let superseded = format!("superseded by {image} before it was made permanent");
            self.abandon_probation(host, &superseded);
        }
        if why == Why::Rollback && self.permanent.as_ref() != Some(image) {
            // Back to a release that was permanent before: it is again, at once.
            tracing::info!(image = %image, "rolled back: permanent again");
            self.permanent = Some(image.clone());
            self.fallback = None;
            host.release(super::ReleaseEvent::Permanent(image));
        }
        if self.permanent.as_ref() == Some(image) {
            let outcome = ProbationOutcome {
                image: Some(image.clone()),
                kind: ReleaseResultKind::Permanent,
                reason: None,
                report: Some(report.clone()),
            };
            host.probation_over(&outcome, waiters);
            return;
        }
        host.release(super::ReleaseEvent::Current(image));
        let until = match self.s.probation {
            Probation::Off => Some(now),
            Probation::For(d) => Some(later(now, d)),
            Probation::Manual => None,
        };
        tracing::info!(image = %image, "on probation");
        self.probation = Some(OnProbation {
            image: image.clone(),
            until,
            waiters,
            failures: 0,
            failed: None,
        });
        if self.s.probation == Probation::Off {
            self.confirm(host, None);
        }
    }

    /// An upgrade to `image` failed before promotion (or a revert failed).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn after_rollback(
        &mut self,
        host: &mut (impl Answers + Outside),
        _now: Instant,
        image: Option<&Image>,
        reason: &str,
        waiters: Vec<WaiterId>,
        revert: Option<Revert>,
        report: &UpgradeReport,
    ) {
        if let Some(r) = revert {
            let still_running = self
                .active
                .and_then(|a| self.gens.get(&a))
                .is_some_and(|g| g.image == r.failed);
            let outcome = if still_running {
                let why = format!(
                    "{}, but the revert failed: {reason}; {} keeps running, not permanent",
                    r.reason, r.failed
                );
                host.release(super::ReleaseEvent::RevertRefused {
                    image: &r.failed,
                    reason: &why,
                });
                ProbationOutcome {
                    image: Some(r.failed.clone()),
                    kind: ReleaseResultKind::RevertRefused,
                    reason: Some(why),
                    report: Some(report.clone()),
                }
            } else {
                host.release(super::ReleaseEvent::Failed {
                    image: &r.failed,
                    reason: &r.reason,
                });
                ProbationOutcome {
                    image: Some(r.failed.clone()),
                    kind: ReleaseResultKind::Reverted,
                    reason: Some(format!(
                        "{}; the first start of the permanent release failed too ({reason}), retrying",
                        r.reason
                    )),
                    report: Some(report.clone()),
                }
            };
            host.probation_over(&outcome, r.waiters);
            return;
        }
        if let Some(img) = image {
            let running = self
                .gens
                .values()
                .any(|g| &g.image == img && g.phase == baton_protocol::Phase::Active);
            if self.permanent.as_ref() != Some(img) && !running {
                host.release(super::ReleaseEvent::Failed { image: img, reason });
            }
        }
        let outcome = ProbationOutcome {
            image: image.cloned(),
            kind: ReleaseResultKind::RolledBack,
            reason: Some(reason.to_string()),
            report: Some(report.clone()),
        };
        host.probation_over(&outcome, waiters);
    }

    /// Probation passed (or was cut short by hand): the image is permanent. With `now`,
    /// systemd's `STATUS=` is updated (it said "on probation").
    fn confirm(&mut self, host: &mut (impl Answers + Outside), now: Option<Instant>) {
        let Some(p) = self.probation.take() else {
            return;
        };
        tracing::info!(image = %p.image, "permanent");
        self.permanent = Some(p.image.clone());
        self.fallback = None;
        host.release(super::ReleaseEvent::Permanent(&p.image));
        let outcome = ProbationOutcome {
            image: Some(p.image),
            kind: ReleaseResultKind::Permanent,
            reason: None,
            report: None,
        };
        host.probation_over(&outcome, p.waiters);
        if let Some(now) = now {
            host.systemd(super::SdEvent::Status, &self.status_line(now));
        }
    }

    /// Ends a probation without a verdict.
    pub(super) fn abandon_probation(&mut self, host: &mut impl Answers, reason: &str) {
        if let Some(p) = self.probation.take() {
            let outcome = ProbationOutcome {
                image: Some(p.image),
                kind: ReleaseResultKind::Interrupted,
                reason: Some(reason.to_string()),
                report: None,
            };
            host.probation_over(&outcome, p.waiters);
        }
    }

    pub(super) fn probation_tick(&mut self, host: &mut (impl Answers + Outside), now: Instant) {
        let due = self
            .probation
            .as_ref()
            .and_then(|p| p.until)
            .is_some_and(|t| t <= now);
        let failed = self.probation.as_ref().is_some_and(|p| p.failed.is_some());
        if due && !failed && self.probation_generation().is_some() {
            self.confirm(host, Some(now));
        }
    }

    /// e.g. `v2 on probation (12 s left)`.
    pub(super) fn probation_line(&self, now: Instant) -> Option<String> {
        let p = self.probation.as_ref()?;
        if let Some(why) = &p.failed {
            return Some(format!("{} FAILED on probation ({why})", p.image));
        }
        Some(match p.until {
            Some(t) => format!(
                "{} on probation ({} s left)",
                p.image,
                t.saturating_duration_since(now).as_secs_f64().ceil() as u64
            ),
            None => format!("{} on probation (until made permanent)", p.image),
        })
    }
}
