//! The `--config` TOML file: its shape, read with a size limit, errors with the line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// The config file's shape. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub(super) listen: Option<Vec<String>>,
    pub(super) unix_mode: Option<toml::Value>,
    /// `unix_mode` is written `0o…` in the text.
    #[serde(skip)]
    pub(super) unix_mode_octal: bool,
    pub(super) backlog: Option<toml::Value>,
    pub(super) ready: Option<String>,
    pub(super) ready_timeout: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) stop_signal: Option<String>,
    pub(super) state: Option<bool>,
    pub(super) snapshot_timeout: Option<String>,
    pub(super) restore_timeout: Option<String>,
    pub(super) precopy: Option<String>,
    pub(super) precopy_rounds: Option<toml::Value>,
    pub(super) precopy_timeout: Option<String>,
    pub(super) control: Option<PathBuf>,
    pub(super) control_group: Option<String>,
    pub(super) nice: Option<toml::Value>,
    pub(super) releases: Option<PathBuf>,
    pub(super) probation: Option<String>,
    pub(super) health: Option<String>,
    pub(super) health_interval: Option<String>,
    pub(super) health_failures: Option<toml::Value>,
    pub(super) preflight: Option<String>,
    pub(super) preflight_timeout: Option<String>,
    pub(super) keep: Option<toml::Value>,
    pub(super) metrics: Option<String>,
    pub(super) state_dir: Option<PathBuf>,
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

pub(super) fn read_file(path: &Path) -> Result<File, ConfigError> {
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
