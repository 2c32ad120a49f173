//! `baton run` settings: TOML config merged under the flags, then validated.
//! `settings.rs` defines each setting once; from those definitions `flags.rs` builds
//! the command line and `file.rs` reads the TOML file; `sources.rs` picks a setting's
//! flag, key or default, and `values.rs` parses one value (a duration, a signal, a
//! number, a nice value) with the flag or key it came from in the error.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::daemon::io::listeners::ListenSpec;
use crate::release::health::HealthCheck;
use baton_machine::{PrecopySettings, Probation, ReadyMode};

/// Probation on the plain path (no `--releases`): long enough to catch a build that
/// crashes a few seconds after READY.
pub const PLAIN_PROBATION: Duration = Duration::from_secs(10);
/// A setting that is wrong; the message names the flag or key and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

mod file;
pub mod flags;
pub mod settings;
mod sources;
mod values;

use file::{File, read_file};
pub use flags::RunArgs;
use settings::{self as S, Setting};
use sources::Sources;
use values::{duration, nice_value, signal, toml_int};

/// Release lifecycle settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReleaseConfig {
    /// The store (`--releases`), if any.
    pub store: Option<PathBuf>,
    /// Probation after promotion.
    pub probation: Probation,
    /// Health check during probation.
    pub health: Option<HealthCheck>,
    /// Between health checks.
    pub health_interval: Duration,
    /// Failed checks in a row that revert.
    pub health_failures: u32,
    /// Vets a release before install.
    pub preflight: Option<String>,
    /// Its timeout.
    pub preflight_timeout: Duration,
    /// Old releases kept.
    pub keep: Option<usize>,
}

/// Validated settings for `baton run` (carried over whole by a reexec: a new
/// executable runs with the settings baton started with).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunConfig {
    /// Listeners to bind or inherit.
    pub listen: Vec<ListenSpec>,
    /// Unix socket file mode.
    pub unix_mode: u32,
    /// listen(2) backlog.
    pub backlog: i32,
    /// Readiness mode.
    pub ready: ReadyMode,
    /// Ready timeout.
    pub ready_timeout: Duration,
    /// Drain timeout.
    pub drain_timeout: Duration,
    /// Stop signal for children without the SDK.
    #[serde(with = "values::signal_number")]
    pub stop_signal: Signal,
    /// Stateful upgrades.
    pub state: bool,
    /// Snapshot timeout.
    pub snapshot_timeout: Duration,
    /// Restore timeout.
    pub restore_timeout: Duration,
    /// Pre-copy.
    #[serde(default)]
    pub precopy: PrecopySettings,
    /// Control socket path.
    pub control: PathBuf,
    /// Group (gid) whose members may use the control socket too.
    pub control_group: Option<u32>,
    /// PROGRAM.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Releases.
    pub release: ReleaseConfig,
    /// The fd limit baton started with, for its children (set by `main`).
    pub child_nofile: Option<(u64, u64)>,
    /// baton's own nice value (`None`: left as started).
    #[serde(default)]
    pub nice: Option<i32>,
    /// The nice value baton started with, for its children, when it changed its own
    /// (set by `main`).
    #[serde(default)]
    pub child_nice: Option<i32>,
    /// Where `/metrics` is served.
    #[serde(default)]
    pub metrics: Option<ListenSpec>,
    /// Where the history is kept.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

impl RunConfig {
    /// Merges `--config` (if any) under the flags and validates everything.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad flag or key.
    pub fn from_args(a: RunArgs) -> Result<Self, ConfigError> {
        let f = match &a.config {
            Some(p) => read_file(p)?,
            None => File::default(),
        };
        let src = Sources {
            flags: &a,
            file: &f,
        };
        let listen = src
            .list(&S::LISTEN)
            .iter()
            .map(|s| ListenSpec::parse(s).map_err(|e| ConfigError(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let unix_mode = match src.value(&S::UNIX_MODE) {
            Some((v, what)) => toml_int(&what, &v, 8)?,
            None => 0o660,
        };
        if !(0..=0o7777).contains(&unix_mode) {
            return Err(ConfigError(format!(
                "invalid unix mode {unix_mode:o}: must be 0 to 7777 (octal)"
            )));
        }
        let backlog = match src.value(&S::BACKLOG) {
            Some((v, what)) => toml_int(&what, &v, 10)?,
            None => i64::from(crate::sys::somaxconn()),
        };
        if !(1..=i64::from(i32::MAX)).contains(&backlog) {
            return Err(ConfigError(format!(
                "invalid backlog {backlog}: must be from 1 to {}",
                i32::MAX
            )));
        }
        let ready = match src.text(&S::READY) {
            None => ReadyMode::Notify,
            Some((v, what)) => {
                if v == "notify" {
                    ReadyMode::Notify
                } else if let Some(d) = v.strip_prefix("delay=") {
                    ReadyMode::Delay(duration(&what, d)?)
                } else {
                    return Err(ConfigError(format!(
                        "invalid {what} '{v}': expected 'notify' or 'delay=DUR'"
                    )));
                }
            }
        };
        let stop_signal = match src.text(&S::STOP_SIGNAL) {
            Some((v, what)) => signal(&what, &v)?,
            None => Signal::SIGTERM,
        };
        let mut command: Vec<OsString> = a.command.clone();
        if command.is_empty() {
            command = f
                .command
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(OsString::from)
                .collect();
        }
        let store = src.path(&S::RELEASES);
        if command.is_empty() {
            // A store recorded PROGRAM at its first `release add`: that one.
            if let Some(dir) = &store {
                let store =
                    crate::release::store::Store::open(dir, false).map_err(|e| ConfigError(e.0))?;
                let meta = store.read().map_err(|e| ConfigError(e.0))?;
                command.extend(meta.program.map(OsString::from));
            }
        }
        if command.is_empty() {
            return Err(ConfigError(
                "no PROGRAM given: usage: baton run [OPTIONS] -- PROGRAM [ARGS...] (or --releases DIR, whose store records it)".into(),
            ));
        }
        let nice = match src.value(&S::NICE) {
            Some((v, what)) => nice_value(&what, &v)?,
            None => None,
        };
        let control_group = match src.text(&S::CONTROL_GROUP) {
            Some((v, what)) => Some(
                crate::sys::group_id(&v)
                    .map_err(|e| ConfigError(format!("invalid {what}: {e}")))?,
            ),
            None => None,
        };
        let program = command.remove(0);
        if store.is_some() {
            let p = program.to_string_lossy();
            crate::release::store::check_program(&p).map_err(|e| ConfigError(e.0))?;
        } else {
            crate::daemon::process::spawn::resolve_program(&program).map_err(ConfigError)?;
        }
        let probation = match src.text(&S::PROBATION) {
            None if store.is_some() => Probation::For(Duration::from_secs(30)),
            // Without a store a crash soon after an upgrade still reverts to the
            // previous executable (held open by fd); short, so that back-to-back
            // deploys supersede it without waiting.
            None => Probation::For(PLAIN_PROBATION),
            Some((v, _)) if v == "manual" => Probation::Manual,
            Some((v, _)) if v == "0" => Probation::Off,
            Some((v, what)) => match duration(&what, &v)? {
                d if d.is_zero() => Probation::Off,
                d => Probation::For(d),
            },
        };
        let health = match src.text(&S::HEALTH) {
            Some((v, _)) => Some(HealthCheck::parse(&v).map_err(ConfigError)?),
            None => None,
        };
        let int = |s: &Setting, min: i64| -> Result<Option<i64>, ConfigError> {
            let Some((v, what)) = src.value(s) else {
                return Ok(None);
            };
            match toml_int(&what, &v, 10)? {
                n if n < min || n > i64::from(u32::MAX) => Err(ConfigError(format!(
                    "invalid {what} {n}: must be from {min} to {}",
                    u32::MAX
                ))),
                n => Ok(Some(n)),
            }
        };
        let health_failures = int(&S::HEALTH_FAILURES, 1)?.unwrap_or(3) as u32;
        let keep = int(&S::KEEP, 0)?.map(|n| n as usize);
        let precopy = PrecopySettings {
            enabled: match src.text(&S::PRECOPY) {
                None => true,
                Some((v, _)) if v == "auto" => true,
                Some((v, _)) if v == "off" => false,
                Some((other, what)) => {
                    return Err(ConfigError(format!(
                        "invalid {what} {other:?}: expected auto or off"
                    )));
                }
            },
            rounds: int(&S::PRECOPY_ROUNDS, 0)?.unwrap_or(8) as u32,
            timeout: src.duration(&S::PRECOPY_TIMEOUT)?,
        };
        let release = ReleaseConfig {
            store,
            probation,
            health,
            health_interval: src
                .duration(&S::HEALTH_INTERVAL)?
                .max(Duration::from_millis(10)),
            health_failures,
            preflight: src.text(&S::PREFLIGHT).map(|(v, _)| v),
            preflight_timeout: src.duration(&S::PREFLIGHT_TIMEOUT)?,
            keep,
        };
        let metrics = match src.text(&S::METRICS) {
            Some((v, what)) => {
                let spec = ListenSpec::parse(&format!("metrics={v}")).map_err(|e| match e {
                    crate::daemon::io::listeners::ListenError::Parse { why, .. } => {
                        ConfigError(format!("invalid {what} '{v}': {why}"))
                    }
                    other => ConfigError(other.to_string()),
                })?;
                if spec.addr.is_datagram() {
                    return Err(ConfigError(format!(
                        "invalid {what} '{v}': metrics are served over HTTP (TCP or unix:PATH)"
                    )));
                }
                Some(spec)
            }
            None => None,
        };
        let state_dir = src.path(&S::STATE_DIR).or_else(|| {
            // systemd's StateDirectory= (the first, when several are set).
            std::env::var_os("STATE_DIRECTORY")
                .and_then(|v| std::env::split_paths(&v).next())
                .filter(|p| !p.as_os_str().is_empty())
        });
        Ok(RunConfig {
            metrics,
            state_dir,
            listen,
            unix_mode: unix_mode as u32,
            backlog: backlog as i32,
            ready,
            ready_timeout: src.duration(&S::READY_TIMEOUT)?,
            drain_timeout: src.duration(&S::DRAIN_TIMEOUT)?,
            stop_signal,
            state: src.switch(&S::STATE),
            snapshot_timeout: src.duration(&S::SNAPSHOT_TIMEOUT)?,
            restore_timeout: src.duration(&S::RESTORE_TIMEOUT)?,
            precopy,
            // The notify socket beside it is passed to children, which need an absolute
            // path (sd_notify's rule).
            control: absolute(
                src.path(&S::CONTROL)
                    .unwrap_or_else(crate::access::default_control_path),
            ),
            control_group,
            program,
            args: command,
            release,
            child_nofile: None,
            nice,
            child_nice: None,
        })
    }
}

/// `std::path::absolute`, keeping the path as given if the working directory is gone.
fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

#[cfg(test)]
mod tests;
