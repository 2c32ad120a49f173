//! `baton run` settings: TOML config merged under the flags, then validated.
//! `file.rs` reads the TOML file, `values.rs` parses one value (a duration, a signal, a
//! number, a nice value) with the flag or key it came from in the error.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::args::RunArgs;
use crate::daemon::io::listeners::ListenSpec;
use crate::release::health::HealthCheck;
use crate::upgrade::{PrecopySettings, Probation, ReadyMode};

/// Probation on the plain path (no `--releases`): long enough to catch a build that
/// crashes a few seconds after READY.
pub const PLAIN_PROBATION: Duration = Duration::from_secs(10);
/// A setting that is wrong; the message names the flag or key and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

mod file;
mod values;

use file::{File, read_file};
pub use values::DEFAULT_NICE;
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
        // Names for messages: the flag, and the key when it came from the file.
        let pick = |flag: Option<String>, key: Option<String>, fname: &str, kname: &str| match flag
        {
            Some(v) => Some((v, format!("--{fname}"))),
            None => key.map(|v| (v, format!("config key '{kname}'"))),
        };
        let dur = |flag: Option<String>, key: Option<String>, name: &str, default: Duration| {
            let kname = name.replace('-', "_");
            match pick(flag, key, name, &kname) {
                Some((v, what)) => duration(&what, &v),
                None => Ok(default),
            }
        };
        let listen_raw = if a.listen.is_empty() {
            f.listen.clone().unwrap_or_default()
        } else {
            a.listen.clone()
        };
        let listen = listen_raw
            .iter()
            .map(|s| ListenSpec::parse(s).map_err(|e| ConfigError(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let unix_mode = match (&a.unix_mode, &f.unix_mode) {
            (Some(s), _) => toml_int("--unix-mode", &toml::Value::String(s.clone()), 8)?,
            (None, Some(toml::Value::Integer(i))) if f.unix_mode_octal => *i,
            (None, Some(toml::Value::Integer(i))) => {
                return Err(ConfigError(format!(
                    "config key 'unix_mode' = {i} is decimal: write an octal mode as 0o{i} or \"{i}\""
                )));
            }
            (None, Some(v)) => toml_int("config key 'unix_mode'", v, 8)?,
            (None, None) => 0o660,
        };
        if !(0..=0o7777).contains(&unix_mode) {
            return Err(ConfigError(format!(
                "invalid unix mode {unix_mode:o}: must be 0 to 7777 (octal)"
            )));
        }
        let backlog = match (&a.backlog, &f.backlog) {
            (Some(s), _) => toml_int("--backlog", &toml::Value::String(s.clone()), 10)?,
            (None, Some(v)) => toml_int("config key 'backlog'", v, 10)?,
            (None, None) => i64::from(crate::sys::somaxconn()),
        };
        if !(1..=i64::from(i32::MAX)).contains(&backlog) {
            return Err(ConfigError(format!(
                "invalid backlog {backlog}: must be from 1 to {}",
                i32::MAX
            )));
        }
        let ready = match pick(a.ready.clone(), f.ready.clone(), "ready", "ready") {
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
        let stop_signal = match pick(
            a.stop_signal.clone(),
            f.stop_signal.clone(),
            "stop-signal",
            "stop_signal",
        ) {
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
        let store_dir = a.releases.clone().or(f.releases.clone());
        if command.is_empty() {
            // A store recorded PROGRAM at its first `release add`: that one.
            if let Some(dir) = &store_dir {
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
        let nice = match (&a.nice, &f.nice) {
            (Some(s), _) => nice_value("--nice", &toml::Value::String(s.clone()))?,
            (None, Some(v)) => nice_value("config key 'nice'", v)?,
            (None, None) => Some(DEFAULT_NICE),
        };
        let control_group = match pick(
            a.control_group.clone(),
            f.control_group.clone(),
            "control-group",
            "control_group",
        ) {
            Some((v, what)) => Some(
                crate::sys::group_id(&v)
                    .map_err(|e| ConfigError(format!("invalid {what}: {e}")))?,
            ),
            None => None,
        };
        let program = command.remove(0);
        let store = a.releases.clone().or(f.releases.clone());
        if store.is_some() {
            let p = program.to_string_lossy();
            crate::release::store::check_program(&p).map_err(|e| ConfigError(e.0))?;
        } else {
            crate::daemon::process::spawn::resolve_program(&program).map_err(ConfigError)?;
        }
        let probation = match pick(
            a.probation.clone(),
            f.probation.clone(),
            "probation",
            "probation",
        ) {
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
        let health = match pick(a.health.clone(), f.health.clone(), "health", "health") {
            Some((v, _)) => Some(HealthCheck::parse(&v).map_err(ConfigError)?),
            None => None,
        };
        let int = |flag: &Option<String>, key: &Option<toml::Value>, name: &str, min: i64| {
            let v = match (flag, key) {
                (Some(s), _) => Some(toml_int(
                    &format!("--{name}"),
                    &toml::Value::String(s.clone()),
                    10,
                )?),
                (None, Some(v)) => Some(toml_int(
                    &format!("config key '{}'", name.replace('-', "_")),
                    v,
                    10,
                )?),
                (None, None) => None,
            };
            match v {
                Some(n) if n < min || n > i64::from(u32::MAX) => Err(ConfigError(format!(
                    "invalid --{name} {n}: must be from {min} to {}",
                    u32::MAX
                ))),
                other => Ok(other),
            }
        };
        let health_failures =
            int(&a.health_failures, &f.health_failures, "health-failures", 1)?.unwrap_or(3) as u32;
        let keep = int(&a.keep, &f.keep, "keep", 0)?.map(|n| n as usize);
        let precopy = PrecopySettings {
            enabled: match a.precopy.as_deref().or(f.precopy.as_deref()) {
                None | Some("auto") => true,
                Some("off") => false,
                Some(other) => {
                    return Err(ConfigError(format!(
                        "invalid --precopy {other:?}: expected auto or off"
                    )));
                }
            },
            rounds: int(&a.precopy_rounds, &f.precopy_rounds, "precopy-rounds", 0)?.unwrap_or(8)
                as u32,
            timeout: dur(
                a.precopy_timeout.clone(),
                f.precopy_timeout.clone(),
                "precopy-timeout",
                Duration::from_secs(60),
            )?,
        };
        let release = ReleaseConfig {
            store,
            probation,
            health,
            health_interval: dur(
                a.health_interval.clone(),
                f.health_interval.clone(),
                "health-interval",
                Duration::from_secs(2),
            )?
            .max(Duration::from_millis(10)),
            health_failures,
            preflight: a.preflight.clone().or(f.preflight.clone()),
            preflight_timeout: dur(
                a.preflight_timeout.clone(),
                f.preflight_timeout.clone(),
                "preflight-timeout",
                Duration::from_secs(30),
            )?,
            keep,
        };
        let metrics = match pick(a.metrics.clone(), f.metrics.clone(), "metrics", "metrics") {
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
        let state_dir = a.state_dir.clone().or(f.state_dir.clone()).or_else(|| {
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
            ready_timeout: dur(
                a.ready_timeout.clone(),
                f.ready_timeout.clone(),
                "ready-timeout",
                Duration::from_secs(30),
            )?,
            drain_timeout: dur(
                a.drain_timeout.clone(),
                f.drain_timeout.clone(),
                "drain-timeout",
                Duration::from_secs(30),
            )?,
            stop_signal,
            state: a.state || f.state.unwrap_or(false),
            snapshot_timeout: dur(
                a.snapshot_timeout.clone(),
                f.snapshot_timeout.clone(),
                "snapshot-timeout",
                Duration::from_secs(30),
            )?,
            restore_timeout: dur(
                a.restore_timeout.clone(),
                f.restore_timeout.clone(),
                "restore-timeout",
                Duration::from_secs(60),
            )?,
            precopy,
            // The notify socket beside it is passed to children, which need an absolute
            // path (sd_notify's rule).
            control: absolute(
                a.control
                    .control
                    .clone()
                    .or(f.control.clone())
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
