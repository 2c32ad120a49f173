//! `baton rehearse --from A --to B`: an app's upgrade path, tried on real binaries by a
//! private baton, for the app author's CI.
//!
//! The order, and why:
//! 1. A starts, and `--setup` fills it.
//! 2. `--faults`: A → B with B killed at each phase; A must serve on, state intact.
//! 3. The state round trip, with no load, because it compares states exactly: A's
//!    snapshot; A → B; B's state written in A's schema (its down-migration), which must
//!    equal A's; B → A; A's state, which must equal A's first one. Every snapshot is a
//!    dry run (quiesce, snapshot, resume), so nothing else changes.
//! 4. Load (built-in HTTP, or `--load CMD`), then A → B and B → A under it: every
//!    failed request is counted.

mod cleanup;
mod diff;
mod faults;
mod load;
mod loaded;
mod private;
mod probe;
mod report;
mod roundtrip;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_protocol::{Status, UpgradeReport, UpgradeResult};

use crate::cli::args::RehearseArgs;
use cleanup::Cleanup;
use private::{Plan, PrivateBaton};
use probe::Probe;
use report::{Outcome, Report, took};

/// Runs the rehearsal and prints its report; exit 0 only when every step passed.
///
/// # Errors
/// A or B is not an executable, or the temporary directory cannot be made. Failures of
/// the rehearsal itself are steps of the report, not errors.
pub fn run(args: RehearseArgs) -> anyhow::Result<ExitCode> {
    let cleanup = Cleanup::install();
    let a = resolve(&args.from, args.program.as_deref(), "from")?;
    let b = resolve(&args.to, args.program.as_deref(), "to")?;
    let tmp = tempfile::Builder::new()
        .prefix("baton-rehearse-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let dir = tmp.path().to_path_buf();
    cleanup.add_dir(dir.clone());
    let mut report = Report {
        from: a.display().to_string(),
        to: b.display().to_string(),
        ..Report::default()
    };
    let mut r = Rehearsal {
        args: &args,
        a,
        b,
        dir: dir.clone(),
        report: &mut report,
    };
    let tail = r.all(&cleanup);
    cleanup::unless_interrupted();
    report.passed = !report.failed();
    if args.keep {
        report.kept = Some(tmp.keep().display().to_string());
    }
    drop(cleanup);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    if report.failed() {
        if let Some(t) = tail.filter(|t| !t.is_empty()) {
            eprintln!("---- the private baton's log, last lines ----\n{t}");
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// A or B as an executable: the file itself, or `--program` inside a directory.
fn resolve(p: &Path, program: Option<&Path>, which: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).with_context(|| format!("--{which} {}", p.display()))?;
    let exe = if meta.is_dir() {
        match program {
            Some(rel) => p.join(rel),
            None => bail!(
                "--{which} {} is a directory: say which executable in it runs with --program (e.g. bin/app)",
                p.display()
            ),
        }
    } else {
        p.to_path_buf()
    };
    let meta = std::fs::metadata(&exe).with_context(|| format!("--{which} {}", exe.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--{which} {}: not an executable file", exe.display());
    }
    Ok(std::path::absolute(&exe)?)
}

struct Rehearsal<'a> {
    args: &'a RehearseArgs,
    a: PathBuf,
    b: PathBuf,
    dir: PathBuf,
    report: &'a mut Report,
}

impl Rehearsal<'_> {
    fn timeout(&self) -> Duration {
        self.args.timeout.into()
    }

    /// Every step; returns the private baton's log tail, for a failure.
    fn all(&mut self, cleanup: &Cleanup) -> Option<String> {
        let plan = Plan {
            listen: if self.args.listen.is_empty() {
                vec!["http=127.0.0.1:0".into()]
            } else {
                self.args.listen.clone()
            },
            state: self.args.state,
            baton_args: self.args.baton_arg.clone(),
            app_args: self.args.args.clone(),
        };
        let t = Instant::now();
        let baton =
            match PrivateBaton::start(&self.dir, &self.a, &plan, self.timeout(), cleanup.clone()) {
                Ok(b) => b,
                Err(e) => {
                    self.report
                        .step("A starts", Outcome::Fail, format!("{e:#}"), &[]);
                    return None;
                }
            };
        let tail = |b: &PrivateBaton| Some(b.log_tail(30));
        let status = match baton.status() {
            Ok(s) => s,
            Err(e) => {
                self.report
                    .step("A starts", Outcome::Fail, format!("{e:#}"), &[]);
                return tail(&baton);
            }
        };
        let env = environment(&status, baton.control(), &self.dir);
        let listeners: Vec<String> = status
            .listeners
            .iter()
            .map(|l| format!("{}={}", l.name, l.addr))
            .collect();
        self.report.step(
            "A starts",
            Outcome::Pass,
            format!(
                "ready in {}; generation {} (pid {}); {}",
                took(t.elapsed()),
                status.generation,
                status.pid.unwrap_or(0),
                listeners.join(" ")
            ),
            &[("ready_ms", (t.elapsed().as_millis() as u64).into())],
        );
        let first: Option<SocketAddr> = status.listeners.first().and_then(|l| l.addr.parse().ok());
        let http = first
            .filter(|_| self.args.load.is_none())
            .map(|_| self.args.http_path.clone());
        let probe = Probe { addr: first, http };

        if let Some(cmd) = &self.args.setup {
            let t = Instant::now();
            match run_cmd(
                cmd,
                &env,
                &self.dir.join("setup.log"),
                self.timeout(),
                cleanup,
            ) {
                Ok(()) => self.report.step(
                    "setup",
                    Outcome::Pass,
                    format!("exit 0 in {}", took(t.elapsed())),
                    &[("ms", (t.elapsed().as_millis() as u64).into())],
                ),
                Err(why) => {
                    self.report.step("setup", Outcome::Fail, why, &[]);
                    return tail(&baton);
                }
            };
        }

        // Does the app keep state? A dry run says.
        let mut stateful = self.args.state;
        let mut a_snap = None;
        if stateful {
            match baton.snapshot(None, self.timeout()) {
                Ok(s) => a_snap = Some(s),
                Err(e) => {
                    let why = format!("{e:#}");
                    if why.contains("does not take part") {
                        self.report.step(
                            "state",
                            Outcome::Skip,
                            "no state: the app does not take part in state hand-over",
                            &[],
                        );
                        stateful = false;
                    } else {
                        self.report.step("snapshot A", Outcome::Fail, why, &[]);
                        return tail(&baton);
                    }
                }
            }
        } else {
            self.report.step(
                "state",
                Outcome::Skip,
                "no state (rehearse without --state)",
                &[],
            );
        }

        if self.args.faults {
            let mut trials = vec![faults::Fault::Spawned];
            if stateful {
                trials.push(faults::Fault::Restoring);
            }
            let ctx = faults::Ctx {
                baton: &baton,
                a: &self.a,
                b: &self.b,
                stateful,
                probe: &probe,
                timeout: self.timeout(),
                dir: &self.dir,
            };
            for f in trials {
                faults::trial(&ctx, f, self.report);
            }
        }

        let mut a_active = true;
        if let Some(a_snap) = a_snap {
            a_active = self.round_trip(&baton, a_snap);
        }
        if !a_active {
            for name in ["A → B under load", "B → A under load"] {
                self.report
                    .step(name, Outcome::Skip, "A is not running (see above)", &[]);
            }
            return tail(&baton);
        }
        self.under_load(&baton, &probe, &env, cleanup);
        if self.report.failed() {
            tail(&baton)
        } else {
            None
        }
    }

    /// An upgrade to `exe` as a step; whether it was promoted.
    fn upgrade(&mut self, baton: &PrivateBaton, exe: &Path, name: &str) -> bool {
        match baton.upgrade_to(exe, self.timeout()) {
            Ok(r) if r.result == UpgradeResult::Promoted => {
                let (detail, figures) = upgrade_figures(&r);
                self.report.step(name, Outcome::Pass, detail, &figures);
                true
            }
            Ok(r) => {
                let still = baton.status().ok().and_then(|s| s.pid);
                self.report.step(
                    name,
                    Outcome::Fail,
                    format!(
                        "rolled back: {}; the running generation (pid {}) serves on",
                        r.reason.unwrap_or_default(),
                        still.unwrap_or(0)
                    ),
                    &[],
                );
                false
            }
            Err(e) => {
                self.report.step(name, Outcome::Fail, format!("{e:#}"), &[]);
                false
            }
        }
    }
}

/// The text and figures of a promoted upgrade.
fn upgrade_figures(r: &UpgradeReport) -> (String, Vec<(&'static str, serde_json::Value)>) {
    let mut detail = format!(
        "promoted generation {} in {} ms",
        r.generation, r.duration_ms
    );
    let mut figures = vec![
        ("generation", r.generation.into()),
        ("duration_ms", r.duration_ms.into()),
    ];
    if let Some(gap) = r.accept_gap_ms {
        detail.push_str(&format!("; accept gap {gap:.1} ms"));
        figures.push(("accept_gap_ms", gap.into()));
    }
    if let Some(bytes) = r.snapshot_bytes {
        detail.push_str(&format!("; state {}", crate::text::size(bytes)));
        figures.push(("snapshot_bytes", bytes.into()));
    }
    if r.migrated_connections > 0 {
        detail.push_str(&format!(
            "; {} connections migrated",
            r.migrated_connections
        ));
        figures.push(("migrated_connections", r.migrated_connections.into()));
    }
    if r.lost_connections > 0 {
        detail.push_str(&format!("; {} connections LOST", r.lost_connections));
        figures.push(("lost_connections", r.lost_connections.into()));
    }
    (detail, figures)
}

/// What `--setup` and `--load` get: the listeners' addresses and the control socket.
fn environment(status: &Status, control: &Path, dir: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        ("BATON_CONTROL".to_string(), control.display().to_string()),
        ("REHEARSE_DIR".to_string(), dir.display().to_string()),
    ];
    for l in &status.listeners {
        let name: String = l
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        env.push((format!("REHEARSE_{name}"), l.addr.clone()));
        if let Ok(a) = l.addr.parse::<SocketAddr>() {
            env.push((format!("REHEARSE_{name}_HOST"), a.ip().to_string()));
            env.push((format!("REHEARSE_{name}_PORT"), a.port().to_string()));
        }
    }
    env
}

/// Runs `sh -c cmd` to completion (bounded); its output goes to `log`.
fn run_cmd(
    cmd: &str,
    env: &[(String, String)],
    log: &Path,
    bound: Duration,
    cleanup: &Cleanup,
) -> Result<(), String> {
    let mut child =
        load::shell(cmd, env, log, cleanup).map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let status = load::wait_for(&mut child, bound);
    // Whatever it left in its group goes too.
    let _ = crate::sys::signal_group(child.id(), nix::sys::signal::Signal::SIGKILL);
    cleanup.forget_group(child.id());
    let Some(status) = status else {
        let _ = child.wait();
        return Err(format!(
            "{cmd:?} did not finish within {}",
            humantime::format_duration(bound)
        ));
    };
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text.lines().last().unwrap_or("").to_string();
    Err(format!("{cmd:?}: {status}; last output: {last}"))
}
