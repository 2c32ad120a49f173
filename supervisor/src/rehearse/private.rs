//! The private baton a rehearsal runs: its own control socket and directory, the app
//! behind a symlink that the rehearsal points at A or B before each upgrade.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_protocol::{ControlReply, ControlRequest, Phase, Status, UpgradeReport};
use nix::sys::signal::Signal;

use super::cleanup::Cleanup;
use crate::cli::{conn, snapshot};
use crate::sys;

/// A dry-run snapshot as it came.
pub struct Snap {
    /// What baton said about it.
    pub taken: snapshot::Taken,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Parsed, when it is JSON (what the SDKs write).
    pub json: Option<serde_json::Value>,
}

/// What the private baton runs and how.
pub struct Plan {
    /// `NAME=ADDR` listeners.
    pub listen: Vec<String>,
    /// `--state`.
    pub state: bool,
    /// More `baton run` options.
    pub baton_args: Vec<String>,
    /// The app's arguments.
    pub app_args: Vec<OsString>,
}

/// A running private baton; stopped (and its directory removed) on drop.
pub struct PrivateBaton {
    child: Option<Child>,
    control: PathBuf,
    link: PathBuf,
    log: PathBuf,
    cleanup: Cleanup,
}

impl PrivateBaton {
    /// Starts baton in `dir` running `exe`, and waits (up to `timeout`) until its first
    /// generation is active.
    ///
    /// # Errors
    /// baton cannot start, or its first generation fails (the log's tail says why).
    pub fn start(
        dir: &Path,
        exe: &Path,
        plan: &Plan,
        timeout: Duration,
        cleanup: Cleanup,
    ) -> anyhow::Result<PrivateBaton> {
        let control = dir.join("baton.sock");
        let link = dir.join("app");
        let log = dir.join("baton.log");
        point(&link, exe)?;
        let me = std::env::current_exe().context("cannot find baton's own executable")?;
        let mut cmd = Command::new(me);
        cmd.arg("run").arg("--control").arg(&control);
        for l in &plan.listen {
            cmd.arg("--listen").arg(l);
        }
        if plan.state {
            cmd.arg("--state");
        }
        cmd.args(&plan.baton_args)
            .arg("--")
            .arg(&link)
            .args(&plan.app_args);
        // Nothing of an outer supervisor: this baton is private.
        for var in [
            "INVOCATION_ID",
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "BATON_CONTROL",
            "BATON_CONTROL_FD",
        ] {
            cmd.env_remove(var);
        }
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .current_dir(dir);
        sys::die_with_parent(&mut cmd, Signal::SIGTERM);
        let child = cmd.spawn().context("cannot start the private baton")?;
        cleanup.add_baton(child.id());
        let mut b = PrivateBaton {
            child: Some(child),
            control,
            link,
            log,
            cleanup,
        };
        b.wait_active(timeout)?;
        Ok(b)
    }

    /// Its control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// Its status.
    ///
    /// # Errors
    /// It does not answer.
    pub fn status(&self) -> anyhow::Result<Status> {
        conn::status(Some(self.control.clone()), Duration::from_secs(10))
    }

    fn wait_active(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    self.child = None;
                    bail!(
                        "the private baton exited ({st}) before A was ready:\n{}",
                        self.log_tail(15)
                    );
                }
            }
            if self.control.exists() {
                if let Ok(s) = self.status() {
                    let active = s
                        .generations
                        .iter()
                        .any(|g| g.generation == s.generation && g.phase == Phase::Active);
                    if s.generation > 0 && active && !s.upgrading {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > until {
                bail!(
                    "A was not ready within {}:\n{}",
                    humantime::format_duration(timeout),
                    self.log_tail(15)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Points the app at `exe` and upgrades to it, waiting for the outcome.
    ///
    /// # Errors
    /// baton does not answer in `timeout`.
    pub fn upgrade_to(&self, exe: &Path, timeout: Duration) -> anyhow::Result<UpgradeReport> {
        point(&self.link, exe)?;
        match conn::ask(
            Some(self.control.clone()),
            ControlRequest::Upgrade { wait: true },
            Some(timeout),
        )? {
            ControlReply::Upgrade(r) => Ok(r),
            other => bail!("unexpected reply to upgrade: {other:?}"),
        }
    }

    /// Points the app at `exe` without upgrading.
    ///
    /// # Errors
    /// The link cannot be replaced.
    pub fn point_at(&self, exe: &Path) -> anyhow::Result<()> {
        point(&self.link, exe)
    }

    /// A dry-run snapshot, in schema `schema` (else the app's own).
    ///
    /// # Errors
    /// None can be taken.
    pub fn snapshot(&self, schema: Option<u32>, timeout: Duration) -> anyhow::Result<Snap> {
        let mut bytes = Vec::new();
        let taken = snapshot::take(&self.control, schema, timeout, &mut bytes)?;
        let json = serde_json::from_slice(&bytes).ok();
        Ok(Snap { taken, bytes, json })
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops it (SIGTERM: it drains every generation and removes its sockets), then
    /// SIGKILL if it takes longer than `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = sys::kill(c.id(), Signal::SIGTERM);
        if super::load::wait_for(&mut c, grace).is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cleanup.forget_baton(c.id());
    }
}

impl Drop for PrivateBaton {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

/// Points the symlink `link` at `exe`, atomically.
fn point(link: &Path, exe: &Path) -> anyhow::Result<()> {
    let tmp = link.with_extension("next");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(exe, &tmp).with_context(|| format!("symlink {}", tmp.display()))?;
    std::fs::rename(&tmp, link).with_context(|| format!("rename onto {}", link.display()))
}
