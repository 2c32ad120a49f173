//! One setting's value parsed, the flag or key it came from named in the error.

use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::ConfigError;

/// A signal as its number.
pub(super) mod signal_number {
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

pub(super) fn duration(what: &str, v: &str) -> Result<Duration, ConfigError> {
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

pub(super) fn signal(what: &str, v: &str) -> Result<Signal, ConfigError> {
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

pub(super) fn toml_int(what: &str, v: &toml::Value, radix: u32) -> Result<i64, ConfigError> {
    match v {
        toml::Value::Integer(i) => Ok(*i),
        toml::Value::String(s) => i64::from_str_radix(s.trim_start_matches("0o"), radix)
            .map_err(|_| ConfigError(format!("invalid {what} '{s}': not a number"))),
        other => Err(ConfigError(format!("invalid {what} {other}: not a number"))),
    }
}

/// A nice value, -20..=19, or `off` (`None`).
pub(super) fn nice_value(what: &str, v: &toml::Value) -> Result<Option<i32>, ConfigError> {
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
