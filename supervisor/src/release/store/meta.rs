//! `releases.json`: what the store knows about each release, and the lifecycle
//! transitions on it.

use baton_protocol::{Release, ReleaseResult, ReleaseStatus};
use serde::{Deserialize, Serialize};

use super::{MAX_RESULTS, StoreError, err, unix_now};

/// The generations of a running baton, so that `release remove` without one
/// knows what is in use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InUse {
    /// The baton that runs them.
    pub pid: u32,
    /// Versions its generations run.
    pub versions: Vec<String>,
}

/// `releases.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// File format version.
    pub format: u32,
    /// PROGRAM: the executable's path inside every release.
    #[serde(default)]
    pub program: Option<String>,
    /// Releases, in the order they were added.
    #[serde(default)]
    pub releases: Vec<Release>,
    /// The release that was permanent before the permanent one (`release rollback`).
    #[serde(default)]
    pub previous_permanent: Option<String>,
    /// What a running baton uses.
    #[serde(default)]
    pub in_use: Option<InUse>,
}

impl Meta {
    /// The release named `version`.
    pub fn get(&self, version: &str) -> Option<&Release> {
        self.releases.iter().find(|r| r.version == version)
    }

    pub(super) fn get_mut(&mut self, version: &str) -> Result<&mut Release, StoreError> {
        self.releases
            .iter_mut()
            .find(|r| r.version == version)
            .ok_or_else(|| err(format!("no release '{version}' in the store")))
    }

    /// The permanent release, if one.
    pub fn permanent(&self) -> Option<&Release> {
        self.with_status(ReleaseStatus::Permanent)
    }

    /// The current release (on probation), if one.
    pub fn current(&self) -> Option<&Release> {
        self.with_status(ReleaseStatus::Current)
    }

    fn with_status(&self, s: ReleaseStatus) -> Option<&Release> {
        self.releases.iter().find(|r| r.status == s)
    }

    /// Versions a live baton's generations run (empty if that baton is gone).
    pub fn live_in_use(&self) -> Vec<String> {
        match &self.in_use {
            Some(u) if crate::sys::pid_alive(u.pid) => u.versions.clone(),
            _ => Vec::new(),
        }
    }

    /// Appends a result to `version`'s history.
    pub fn record(&mut self, version: &str, action: &str, ok: bool, detail: &str) {
        if let Ok(r) = self.get_mut(version) {
            r.results.push(ReleaseResult {
                at: unix_now(),
                action: action.to_string(),
                ok,
                detail: crate::text::one_line(detail),
            });
            let extra = r.results.len().saturating_sub(MAX_RESULTS);
            r.results.drain(..extra);
        }
    }

    /// `version` was promoted: it is current, and a previous current one is old.
    pub fn set_current(&mut self, version: &str) -> Result<(), StoreError> {
        self.get_mut(version)?;
        for r in &mut self.releases {
            if r.status == ReleaseStatus::Current && r.version != version {
                r.status = ReleaseStatus::Old;
            }
        }
        let r = self.get_mut(version)?;
        if r.status != ReleaseStatus::Permanent {
            r.status = ReleaseStatus::Current;
        }
        Ok(())
    }

    /// make_permanent: `version` is permanent, the previous permanent one is old.
    pub fn set_permanent(&mut self, version: &str) -> Result<(), StoreError> {
        self.get_mut(version)?;
        let mut previous = None;
        for r in &mut self.releases {
            if r.version != version
                && matches!(r.status, ReleaseStatus::Permanent | ReleaseStatus::Current)
            {
                if r.status == ReleaseStatus::Permanent {
                    previous = Some(r.version.clone());
                }
                r.status = ReleaseStatus::Old;
            }
        }
        let r = self.get_mut(version)?;
        if r.status != ReleaseStatus::Permanent {
            r.status = ReleaseStatus::Permanent;
            if previous.is_some() {
                self.previous_permanent = previous;
            }
        }
        Ok(())
    }

    /// `version` failed (preflight, readiness or probation).
    pub fn set_failed(&mut self, version: &str) -> Result<(), StoreError> {
        let r = self.get_mut(version)?;
        if r.status != ReleaseStatus::Permanent {
            r.status = ReleaseStatus::Failed;
        }
        Ok(())
    }

    /// The release a starting baton runs, and why: the permanent one; without one,
    /// the newest release that has not failed.
    ///
    /// # Errors
    /// The store has no release to boot.
    pub fn boot_choice(&self) -> Result<(String, String), StoreError> {
        if let Some(p) = self.permanent() {
            let why = match self.current() {
                Some(c) => format!(
                    "permanent release {}; {} was on probation when baton stopped and is not booted until installed again",
                    p.version, c.version
                ),
                None => format!("permanent release {}", p.version),
            };
            return Ok((p.version.clone(), why));
        }
        let newest = self
            .releases
            .iter()
            .rev()
            .find(|r| r.status != ReleaseStatus::Failed)
            .ok_or_else(|| err("no release to boot"))?;
        Ok((
            newest.version.clone(),
            format!(
                "no permanent release yet: newest release {}, permanent after its probation",
                newest.version
            ),
        ))
    }
}
