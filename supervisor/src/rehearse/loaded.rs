//! The upgrades under load: the built-in HTTP clients or a `--load` command, A → B and
//! B → A, with the requests that failed in each upgrade's window.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_protocol::UpgradeResult;

use super::cleanup::Cleanup;
use super::private::PrivateBaton;
use super::report::Outcome;
use super::{Probe, Rehearsal, load, upgrade_figures};

impl Rehearsal<'_> {
    /// Step 4: load, A → B and B → A under it.
    pub(super) fn under_load(
        &mut self,
        baton: &PrivateBaton,
        probe: &Probe,
        env: &[(String, String)],
        cleanup: &Cleanup,
    ) {
        let settle: Duration = self.args.settle.into();
        enum Running {
            Http(load::HttpLoad),
            Cmd(load::CmdLoad),
        }
        let running = match (&self.args.load, probe.addr) {
            (Some(cmd), _) => match load::CmdLoad::start(cmd, env, &self.dir, cleanup.clone()) {
                Ok(l) => Running::Cmd(l),
                Err(e) => {
                    self.report
                        .step("load", Outcome::Fail, format!("{e:#}"), &[]);
                    return;
                }
            },
            (None, Some(addr)) => Running::Http(load::HttpLoad::start(
                addr,
                &self.args.http_path,
                self.args.clients,
            )),
            (None, None) => {
                self.report.step(
                    "load",
                    Outcome::Skip,
                    "no built-in load for this listener (not TCP): give --load CMD",
                    &[],
                );
                self.upgrade(baton, &self.b.clone(), "A → B");
                if !self.args.no_downgrade {
                    self.upgrade(baton, &self.a.clone(), "B → A");
                }
                return;
            }
        };
        let mut running = running;
        std::thread::sleep(settle);
        let steps: Vec<(PathBuf, &str)> = if self.args.no_downgrade {
            vec![(self.b.clone(), "A → B under load")]
        } else {
            vec![
                (self.b.clone(), "A → B under load"),
                (self.a.clone(), "B → A under load"),
            ]
        };
        let mut answered_from = match &running {
            Running::Http(h) => h.ok(),
            Running::Cmd(_) => 0,
        };
        for (exe, name) in steps {
            let t0 = Instant::now();
            let r = baton.upgrade_to(&exe, self.timeout());
            std::thread::sleep(settle);
            let promoted = matches!(&r, Ok(r) if r.result == UpgradeResult::Promoted);
            let outcome = match r {
                Ok(r) if r.result == UpgradeResult::Promoted => {
                    let (mut detail, mut figures) = upgrade_figures(&r);
                    let mut ok = true;
                    match &mut running {
                        Running::Http(h) => {
                            let (failed, first) = h.failures_between(t0, Instant::now());
                            let answered = h.ok() - answered_from;
                            answered_from = h.ok();
                            detail =
                                format!("{detail}; {answered} requests answered, {failed} failed");
                            if let Some(f) = first {
                                detail = format!("{detail} (first: {f})");
                            }
                            figures.push(("requests", answered.into()));
                            figures.push(("failed", failed.into()));
                            ok = failed == 0;
                        }
                        Running::Cmd(c) => {
                            if c.exited() {
                                detail = format!(
                                    "{detail}; but the load command had already ended: it must run through the upgrades"
                                );
                                ok = false;
                            }
                        }
                    }
                    (
                        if ok { Outcome::Pass } else { Outcome::Fail },
                        detail,
                        figures,
                    )
                }
                Ok(r) => (
                    Outcome::Fail,
                    format!("rolled back: {}", r.reason.unwrap_or_default()),
                    Vec::new(),
                ),
                Err(e) => (Outcome::Fail, format!("{e:#}"), Vec::new()),
            };
            self.report.step(name, outcome.0, outcome.1, &outcome.2);
            if !promoted {
                break;
            }
        }
        if self.args.no_downgrade {
            self.report
                .step("B → A under load", Outcome::Skip, "--no-downgrade", &[]);
        }
        match running {
            Running::Http(h) => {
                let (answered, failed, first) = h.stop();
                let outcome = if failed == 0 && answered > 0 {
                    Outcome::Pass
                } else {
                    Outcome::Fail
                };
                let mut detail = format!(
                    "built-in HTTP: {} keep-alive and {} fresh-connection clients; {answered} requests answered, {failed} failed",
                    self.args.clients, self.args.clients
                );
                if let Some(f) = first {
                    detail.push_str(&format!(" (first: {f})"));
                }
                if answered == 0 {
                    detail.push_str(
                        "; does the app speak HTTP? Give --load CMD for any other protocol",
                    );
                }
                self.report.step(
                    "load",
                    outcome,
                    detail,
                    &[("requests", answered.into()), ("failed", failed.into())],
                );
            }
            Running::Cmd(c) => {
                let end = c.finish(Duration::from_millis(100));
                use std::os::unix::process::ExitStatusExt;
                let term = Some(nix::sys::signal::Signal::SIGTERM as i32);
                let (outcome, what) = match end.status {
                    Some(s) if end.stopped && (s.success() || s.signal() == term) => (
                        Outcome::Pass,
                        "stopped after the last step (SIGTERM)".to_string(),
                    ),
                    Some(s) if s.success() => (Outcome::Pass, "exit 0".to_string()),
                    Some(s) => (Outcome::Fail, format!("{s}")),
                    None => (
                        Outcome::Fail,
                        "killed: it did not stop on SIGTERM".to_string(),
                    ),
                };
                let tail = end.tail.lines().last().unwrap_or("").to_string();
                self.report.step(
                    "load",
                    outcome,
                    if tail.is_empty() {
                        what.clone()
                    } else {
                        format!("{what}; last output: {tail}")
                    },
                    &[("result", what.into()), ("output", end.tail.into())],
                );
            }
        }
    }
}
