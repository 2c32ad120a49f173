//! The `--config` TOML file: read with a size limit, each key checked against the
//! setting definitions, errors with the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::ConfigError;
use super::flags::Raw;
use super::settings::{self, COMMAND_KEY, Kind};

/// The config file's settings, by name, and its `command`.
#[derive(Debug, Default)]
pub(super) struct File {
    pub(super) given: BTreeMap<&'static str, Raw>,
    pub(super) command: Option<Vec<String>>,
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

/// The line `key` is set on (1-based), or 0.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

fn strings(v: &toml::Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().map(str::to_owned))
        .collect()
}

/// A key's value as the setting's kind takes it.
fn raw(kind: Kind, key: &str, v: toml::Value, octal: bool) -> Result<Raw, String> {
    let want = match kind {
        Kind::Text | Kind::Path => "a string",
        Kind::Number => "a number or a string",
        Kind::Mode => "an octal mode (0o660 or \"660\")",
        Kind::Switch => "true or false",
        Kind::List => "an array of strings",
    };
    let bad = || format!("invalid type for '{key}': expected {want}");
    Ok(match (kind, v) {
        (Kind::Text, toml::Value::String(s)) => Raw::Text(s),
        (Kind::Path, toml::Value::String(s)) => Raw::Path(PathBuf::from(s)),
        (Kind::Number, v @ (toml::Value::Integer(_) | toml::Value::String(_))) => Raw::Value(v),
        (Kind::Mode, toml::Value::Integer(i)) if octal => {
            Raw::Value(toml::Value::String(format!("{i:o}")))
        }
        (Kind::Mode, toml::Value::Integer(i)) => {
            return Err(format!(
                "'{key}' = {i} is decimal: write an octal mode as 0o{i} or \"{i}\""
            ));
        }
        (Kind::Mode, v @ toml::Value::String(_)) => Raw::Value(v),
        (Kind::Switch, toml::Value::Boolean(b)) => Raw::Switch(b),
        (Kind::List, v) => Raw::List(strings(&v).ok_or_else(bad)?),
        _ => return Err(bad()),
    })
}

pub(super) fn read_file(path: &Path) -> Result<File, ConfigError> {
    let text = crate::access::read_small_file(path, CONFIG_LIMIT)
        .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
    let at = |line: usize, why: String| {
        ConfigError(format!("config {} line {line}: {why}", path.display()))
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |s| {
            text.as_bytes()[..s.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1
        });
        at(line, e.message().replace('\n', " "))
    })?;
    let mut file = File::default();
    for (key, v) in table {
        let line = line_of(&text, &key);
        if key == COMMAND_KEY {
            let c = strings(&v).ok_or_else(|| {
                at(
                    line,
                    format!("invalid type for '{key}': expected an array of strings"),
                )
            })?;
            file.command = Some(c);
            continue;
        }
        let Some(s) = settings::by_key(&key) else {
            let keys: Vec<String> = settings::ALL.iter().map(|s| s.key()).collect();
            return Err(at(
                line,
                format!(
                    "unknown key '{key}' (the keys are {}, {COMMAND_KEY})",
                    keys.join(", ")
                ),
            ));
        };
        let octal = octal_literal(&text, &key);
        file.given.insert(
            s.name,
            raw(s.kind, &key, v, octal).map_err(|why| at(line, why))?,
        );
    }
    Ok(file)
}
