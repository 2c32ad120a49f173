//! `baton run` settings: TOML config merged under the flags, then validated.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;

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

/// The config file's shape. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Vec<String>>,
    unix_mode: Option<toml::Value>,
    /// `unix_mode` is written `0o…` in the text.
    #[serde(skip)]
    unix_mode_octal: bool,
    backlog: Option<toml::Value>,
    ready: Option<String>,
    ready_timeout: Option<String>,
    drain_timeout: Option<String>,
    stop_signal: Option<String>,
    state: Option<bool>,
    snapshot_timeout: Option<String>,
    restore_timeout: Option<String>,
    precopy: Option<String>,
    precopy_rounds: Option<toml::Value>,
    precopy_timeout: Option<String>,
    control: Option<PathBuf>,
    control_group: Option<String>,
    nice: Option<toml::Value>,
    releases: Option<PathBuf>,
    probation: Option<String>,
    health: Option<String>,
    health_interval: Option<String>,
    health_failures: Option<toml::Value>,
    preflight: Option<String>,
    preflight_timeout: Option<String>,
    keep: Option<toml::Value>,
    metrics: Option<String>,
    state_dir: Option<PathBuf>,
    command: Option<Vec<String>>,
}

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
    #[serde(with = "signal_number")]
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

/// A signal as its number.
mod signal_number {
    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Signal, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_i32(*s as i32)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let n = i32::deserialize(d)?;
        Signal::try_from(n).map_err(serde::de::Error::custom)
    }
}

/// The longest duration any setting takes: a year. Longer ones are typos, and
/// `Instant` arithmetic on them could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn duration(what: &str, v: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v).map_err(|e| {
        ConfigError(format!(
            "invalid {what} '{v}': {e} (expected e.g. 500ms, 30s, 2m)"
        ))
    })?;
    if d > MAX_DURATION {
        return Err(ConfigError(format!(
            "invalid {what} '{v}': longer than the maximum of 365 days"
        )));
    }
    Ok(d)
}

fn signal(what: &str, v: &str) -> Result<Signal, ConfigError> {
    let up = v.trim().to_ascii_uppercase();
    let parsed = if let Ok(n) = up.parse::<i32>() {
        Signal::try_from(n).ok()
    } else {
        let name = if up.starts_with("SIG") {
            up
        } else {
            format!("SIG{up}")
        };
        Signal::from_str(&name).ok()
    };
    match parsed {
        Some(Signal::SIGKILL | Signal::SIGSTOP) | None => Err(ConfigError(format!(
            "invalid {what} '{v}': expected a catchable signal name or number, e.g. TERM, QUIT, INT"
        ))),
        Some(s) => Ok(s),
    }
}

fn toml_int(what: &str, v: &toml::Value, radix: u32) -> Result<i64, ConfigError> {
    match v {
        toml::Value::Integer(i) => Ok(*i),
        toml::Value::String(s) => i64::from_str_radix(s.trim_start_matches("0o"), radix)
            .map_err(|_| ConfigError(format!("invalid {what} '{s}': not a number"))),
        other => Err(ConfigError(format!("invalid {what} {other}: not a number"))),
    }
}

/// baton's nice value unless told otherwise: ahead of an app at the default 0.
pub const DEFAULT_NICE: i32 = -10;

/// A nice value, -20..=19, or `off` (`None`).
fn nice_value(what: &str, v: &toml::Value) -> Result<Option<i32>, ConfigError> {
    if v.as_str() == Some("off") {
        return Ok(None);
    }
    let n = toml_int(what, v, 10).map_err(|_| {
        let shown = v
            .as_str()
            .map_or_else(|| v.to_string(), |s| format!("'{s}'"));
        ConfigError(format!(
            "invalid {what} {shown}: expected a nice value from -20 to 19, or off"
        ))
    })?;
    match i32::try_from(n) {
        Ok(n) if (-20..=19).contains(&n) => Ok(Some(n)),
        _ => Err(ConfigError(format!(
            "invalid {what} {n}: a nice value is from -20 to 19 (or off)"
        ))),
    }
}

/// A config file larger than this is refused (it would be a mistake, not a config).
const CONFIG_LIMIT: u64 = 1 << 20;

/// Whether `key = 0o…` is written as an octal literal in the config's text (TOML
/// forgets the radix once parsed).
fn octal_literal(text: &str, key: &str) -> bool {
    text.lines().any(|l| {
        l.trim_start()
            .strip_prefix(key)
            .map(str::trim_start)
            .and_then(|r| r.strip_prefix('='))
            .is_some_and(|v| v.trim_start().starts_with("0o"))
    })
}

fn read_file(path: &Path) -> Result<File, ConfigError> {
    let text = crate::access::read_small_file(path, CONFIG_LIMIT)
        .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
    let mut file: File = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            })
            .unwrap_or(0);
        ConfigError(format!(
            "config {} line {line}: {}",
            path.display(),
            e.message().replace('\n', " ")
        ))
    })?;
    file.unix_mode_octal = octal_literal(&text, "unix_mode");
    Ok(file)
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
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn nice_defaults_to_minus_ten_and_takes_off_or_a_value() {
        assert_eq!(parse(&["--", "true"]).unwrap().nice, Some(DEFAULT_NICE));
        assert_eq!(parse(&["--nice", "off", "--", "true"]).unwrap().nice, None);
        assert_eq!(
            parse(&["--nice", "-20", "--", "true"]).unwrap().nice,
            Some(-20)
        );
        assert_eq!(
            parse(&["--nice", "19", "--", "true"]).unwrap().nice,
            Some(19)
        );
        for bad in ["-21", "20", "x", "2147483648"] {
            let e = parse(&["--nice", bad, "--", "true"])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--nice") && e.contains("-20 to 19"), "{e}");
        }
        let dir = std::env::temp_dir().join(format!("baton-nice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (value, want) in [("\"off\"", None), ("3", Some(3))] {
            let p = dir.join("b.toml");
            std::fs::write(&p, format!("nice = {value}\ncommand = [\"true\"]\n")).unwrap();
            let c = parse(&["--config", p.to_str().unwrap()]).unwrap();
            assert_eq!(c.nice, want, "{value}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn huge_durations_are_refused_for_every_flag() {
        for flag in [
            "--ready-timeout",
            "--drain-timeout",
            "--snapshot-timeout",
            "--restore-timeout",
        ] {
            let e = parse(&[flag, "300000000000y", "--", "true"])
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag) && e.contains("365 days"), "{e}");
        }
        let e = parse(&["--ready", "delay=300000000000y", "--", "true"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--ready"), "{e}");
        assert!(parse(&["--drain-timeout", "365days", "--", "true"]).is_ok());
    }

    fn parse(args: &[&str]) -> Result<RunConfig, ConfigError> {
        let mut v = vec!["baton", "run"];
        v.extend_from_slice(args);
        match crate::cli::args::Cli::try_parse_from(v).unwrap().command {
            crate::cli::args::Command::Run(a) => RunConfig::from_args(*a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_and_flags() {
        let c = parse(&["--listen", "http=127.0.0.1:0", "--", "true"]).unwrap();
        assert_eq!(c.ready_timeout, Duration::from_secs(30));
        assert_eq!(c.stop_signal, Signal::SIGTERM);
        assert_eq!(c.ready, ReadyMode::Notify);
        let c = parse(&["--ready", "delay=2s", "--stop-signal", "quit", "--", "true"]).unwrap();
        assert_eq!(c.ready, ReadyMode::Delay(Duration::from_secs(2)));
        assert_eq!(c.stop_signal, Signal::SIGQUIT);
    }

    #[test]
    fn errors_name_the_flag_or_key() {
        let e = parse(&["--ready-timeout", "soon", "--", "true"])
            .unwrap_err()
            .0;
        assert!(e.contains("--ready-timeout") && e.contains("soon"), "{e}");
        let e = parse(&["--stop-signal", "KILL", "--", "true"])
            .unwrap_err()
            .0;
        assert!(e.contains("--stop-signal"), "{e}");
        let e = parse(&["--", "/nonexistent/app"]).unwrap_err().0;
        assert!(e.contains("/nonexistent/app"), "{e}");
        let e = parse(&[]).unwrap_err().0;
        assert!(e.contains("PROGRAM"), "{e}");
    }

    #[test]
    fn release_settings() {
        let c = parse(&["--", "true"]).unwrap();
        assert_eq!(
            c.release.probation,
            Probation::For(Duration::from_secs(10)),
            "no store: a short probation"
        );
        let c = parse(&["--probation", "0", "--", "true"]).unwrap();
        assert_eq!(c.release.probation, Probation::Off);
        let c = parse(&["--releases", "/srv/r", "--", "bin/app"]).unwrap();
        assert_eq!(c.release.probation, Probation::For(Duration::from_secs(30)));
        assert_eq!(c.release.health_failures, 3);
        for (v, want) in [
            ("manual", Probation::Manual),
            ("0", Probation::Off),
            ("0s", Probation::Off),
            ("45s", Probation::For(Duration::from_secs(45))),
        ] {
            let c = parse(&["--probation", v, "--", "true"]).unwrap();
            assert_eq!(c.release.probation, want, "{v}");
        }
        for (args, want) in [
            (&["--probation", "soon"][..], "--probation"),
            (&["--health", "tcp://x:1"][..], "--health"),
            (&["--health-failures", "0"][..], "--health-failures"),
            (&["--keep=-1"][..], "--keep"),
            (
                &["--releases", "/srv/r", "--", "/abs/app"][..],
                "inside each release",
            ),
        ] {
            let mut all = args.to_vec();
            if !all.contains(&"--") {
                all.extend(["--", "true"]);
            }
            let e = parse(&all).unwrap_err().0;
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn config_file_under_flags() {
        let dir = std::env::temp_dir().join(format!("baton-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("b.toml");
        std::fs::write(
            &p,
            "listen = [\"http=127.0.0.1:0\"]\nready_timeout = \"5s\"\ndrain_timeout = \"7s\"\ncommand = [\"true\"]\n",
        )
        .unwrap();
        let c = parse(&["--config", p.to_str().unwrap(), "--drain-timeout", "1s"]).unwrap();
        assert_eq!(c.ready_timeout, Duration::from_secs(5));
        assert_eq!(c.drain_timeout, Duration::from_secs(1));
        assert_eq!(c.listen.len(), 1);
        std::fs::write(&p, "ready_timeout = \"x\"\ncommand = [\"true\"]\n").unwrap();
        let e = parse(&["--config", p.to_str().unwrap()]).unwrap_err().0;
        assert!(e.contains("config key 'ready_timeout'"), "{e}");
        std::fs::write(&p, "\nbogus = 1\n").unwrap();
        let e = parse(&["--config", p.to_str().unwrap()]).unwrap_err().0;
        assert!(e.contains("line 2") && e.contains("bogus"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::io::Write;

        const KEYS: [&str; 22] = [
            "listen",
            "unix_mode",
            "backlog",
            "ready",
            "ready_timeout",
            "drain_timeout",
            "stop_signal",
            "state",
            "snapshot_timeout",
            "restore_timeout",
            "control",
            "control_group",
            "nice",
            "releases",
            "probation",
            "health",
            "health_interval",
            "health_failures",
            "preflight",
            "preflight_timeout",
            "keep",
            "command",
        ];

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                "\"[ -~&&[^\"\\\\]]{0,20}\"",
                any::<i64>().prop_map(|n| n.to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                "\\[(\"[a-z0-9=:.]{0,12}\", ?){0,3}\\]",
                "(?s).{0,20}",
            ]
        }

        proptest! {
            /// Any duration text is accepted within the cap or refused with a message
            /// naming it; never a panic.
            #[test]
            fn durations_are_capped_or_refused(text in "(?s).{0,30}") {
                match duration("--drain-timeout", &text) {
                    Ok(d) => prop_assert!(d <= MAX_DURATION),
                    Err(e) => prop_assert!(e.to_string().contains("--drain-timeout"), "{}", e),
                }
            }

            /// Whole seconds up to the cap round-trip through humantime's format.
            #[test]
            fn formatted_durations_parse_back(secs in 0u64..=MAX_DURATION.as_secs()) {
                let d = Duration::from_secs(secs);
                let text = humantime::format_duration(d).to_string();
                prop_assert_eq!(duration("x", &text).unwrap(), d);
            }

            /// Any config file, well-formed or not, gives a config or one error line.
            #[test]
            fn any_config_file_gives_a_config_or_one_error_line(
                lines in prop::collection::vec((prop::sample::select(&KEYS[..]), value()), 0..8),
                junk in "(?s).{0,40}",
                with_junk in any::<bool>(),
            ) {
                let mut text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
                if with_junk {
                    text.push_str(&junk);
                }
                let dir = std::env::temp_dir().join(format!("baton-config-prop-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join("baton.toml");
                std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
                let path = path.to_str().unwrap().to_owned();
                if let Err(e) = parse(&["--config", &path, "--", "true"]) {
                    prop_assert!(!e.to_string().contains('\n'), "{}", e);
                }
            }
        }
    }
}
