//! Running `baton rehearse` and reading its JSON report.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{CliOutput, HarnessError, Result, baton_bin, run_to_exit};

/// Bound on one rehearsal.
pub const REHEARSE_TIMEOUT: Duration = Duration::from_secs(300);

/// A finished rehearsal.
#[derive(Debug)]
pub struct Rehearsal {
    /// How the command ended.
    pub out: CliOutput,
    /// Its `--json` report.
    pub report: Value,
}

impl Rehearsal {
    /// The first step whose name starts with `name`.
    ///
    /// # Panics
    /// There is none (the test is wrong about the report).
    pub fn step(&self, name: &str) -> &Value {
        self.steps()
            .iter()
            .find(|s| s["name"].as_str().is_some_and(|n| n.starts_with(name)))
            .unwrap_or_else(|| panic!("no step {name:?} in {}", self.report))
    }

    /// Every step.
    pub fn steps(&self) -> &[Value] {
        self.report["steps"].as_array().map_or(&[], Vec::as_slice)
    }

    /// The outcome of step `name`: "pass", "fail" or "skip".
    pub fn outcome(&self, name: &str) -> &str {
        self.step(name)["outcome"].as_str().unwrap_or("")
    }

    /// The detail of step `name`.
    pub fn detail(&self, name: &str) -> &str {
        self.step(name)["detail"].as_str().unwrap_or("")
    }
}

/// Runs `baton rehearse --json <args>` (with `--settle 250ms` unless given) with its
/// temporary files under `tmp` (so a test can check that none are left), to completion.
///
/// # Errors
/// It cannot run, runs past [`REHEARSE_TIMEOUT`], or prints no JSON report.
pub async fn rehearse<I, S>(tmp: &Path, args: I) -> Result<Rehearsal>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    // The load still runs before, between and after the upgrades; a second each is
    // more than the suite's time allows for a dozen rehearsals.
    if !args.iter().any(|a| a == "--settle") {
        args.extend(["--settle".into(), "250ms".into()]);
    }
    let mut cmd = tokio::process::Command::new(baton_bin()?);
    cmd.arg("rehearse")
        .arg("--json")
        .args(&args)
        .env("TMPDIR", tmp)
        .env_remove("BATON_LOG");
    let out = run_to_exit(cmd, "baton rehearse", REHEARSE_TIMEOUT).await?;
    let report = serde_json::from_str(out.stdout.trim()).map_err(|e| {
        HarnessError::Setup(format!(
            "baton rehearse printed no JSON report ({e}): {out:?}"
        ))
    })?;
    Ok(Rehearsal { out, report })
}

/// The names left in `tmp` by rehearsals (their directories are `baton-rehearse-*`).
pub fn leftovers(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("baton-rehearse-"))
                .collect()
        })
        .unwrap_or_default()
}
