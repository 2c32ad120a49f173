//! The merge: a setting comes from its flag, else its TOML key, else its default,
//! and an error names whichever it came from.

use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;
use super::file::File;
use super::flags::{Raw, RunArgs};
use super::settings::{DefaultValue, Setting};
use super::values::duration;

/// A setting's value and how messages name where it came from.
pub(super) struct Given {
    pub(super) raw: Raw,
    pub(super) what: String,
}

/// The flags over the file.
pub(super) struct Sources<'a> {
    pub(super) flags: &'a RunArgs,
    pub(super) file: &'a File,
}

impl Sources<'_> {
    /// The flag, else the key, else a default value (as if given as the flag).
    pub(super) fn get(&self, s: &Setting) -> Option<Given> {
        if let Some(r) = self.flags.get(s) {
            return Some(Given {
                raw: r.clone(),
                what: s.flag(),
            });
        }
        if let Some(r) = self.file.given.get(s.name) {
            return Some(Given {
                raw: r.clone(),
                what: format!("config key '{}'", s.key()),
            });
        }
        match s.default {
            DefaultValue::Value(v) => Some(Given {
                raw: Raw::Text(v.to_owned()),
                what: s.flag(),
            }),
            DefaultValue::None | DefaultValue::Described(_) => None,
        }
    }

    /// A text setting, with the name of where it came from.
    pub(super) fn text(&self, s: &Setting) -> Option<(String, String)> {
        self.get(s).map(|g| (text_of(g.raw), g.what))
    }

    /// A number setting (a TOML value), with the name of where it came from.
    pub(super) fn value(&self, s: &Setting) -> Option<(toml::Value, String)> {
        self.get(s).map(|g| {
            let v = match g.raw {
                Raw::Value(v) => v,
                Raw::Text(t) => toml::Value::String(t),
                Raw::Path(p) => toml::Value::String(p.to_string_lossy().into_owned()),
                Raw::Switch(b) => toml::Value::Boolean(b),
                Raw::List(l) => toml::Value::Array(l.into_iter().map(Into::into).collect()),
            };
            (v, g.what)
        })
    }

    /// A duration setting (every duration setting has a default).
    pub(super) fn duration(&self, s: &Setting) -> Result<Duration, ConfigError> {
        match self.text(s) {
            Some((v, what)) => duration(&what, &v),
            None => Err(ConfigError(format!("{} has no default", s.flag()))),
        }
    }

    /// A path setting.
    pub(super) fn path(&self, s: &Setting) -> Option<PathBuf> {
        self.get(s).map(|g| match g.raw {
            Raw::Path(p) => p,
            other => PathBuf::from(text_of(other)),
        })
    }

    /// A switch: on if either source turns it on.
    pub(super) fn switch(&self, s: &Setting) -> bool {
        matches!(self.get(s).map(|g| g.raw), Some(Raw::Switch(true)))
    }

    /// A list: the flags' replace the file's.
    pub(super) fn list(&self, s: &Setting) -> Vec<String> {
        match self.get(s).map(|g| g.raw) {
            Some(Raw::List(l)) => l,
            _ => Vec::new(),
        }
    }
}

/// A raw value as text (a path lossily: only a path setting keeps non-UTF-8 bytes).
fn text_of(raw: Raw) -> String {
    match raw {
        Raw::Text(t) => t,
        Raw::Path(p) => p.to_string_lossy().into_owned(),
        Raw::Value(v) => v.as_str().map_or_else(|| v.to_string(), str::to_owned),
        Raw::Switch(b) => b.to_string(),
        Raw::List(l) => l.join(","),
    }
}
