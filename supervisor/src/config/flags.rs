//! `baton run`'s command line, built from the setting definitions: each flag's
//! raw value, kept by setting until the merge reads it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgMatches, FromArgMatches};

use super::settings::{self, Kind, Setting};

/// A setting's value as written, before it is parsed.
#[derive(Debug, Clone)]
pub enum Raw {
    /// Text (a flag's value, or a TOML string).
    Text(String),
    /// A path.
    Path(PathBuf),
    /// A TOML number, or a number's text from a flag.
    Value(toml::Value),
    /// A switch.
    Switch(bool),
    /// A repeated flag, or a TOML array.
    List(Vec<String>),
}

/// `baton run`'s arguments as given. Every setting can also come from `--config`;
/// flags win.
#[derive(Debug, Default)]
pub struct RunArgs {
    /// The settings given as flags, by name.
    pub given: BTreeMap<&'static str, Raw>,
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// PROGRAM and its arguments.
    pub command: Vec<OsString>,
}

impl RunArgs {
    /// The flag's raw value, if given.
    pub fn get(&self, s: &Setting) -> Option<&Raw> {
        self.given.get(s.name)
    }
}

const CONFIG: &str = "config";
const COMMAND: &str = "command";

fn raw(m: &ArgMatches, s: &Setting) -> Option<Raw> {
    match s.kind {
        Kind::Switch => m.get_flag(s.name).then_some(Raw::Switch(true)),
        Kind::List => m
            .get_many::<String>(s.name)
            .map(|v| Raw::List(v.cloned().collect())),
        Kind::Path => m.get_one::<PathBuf>(s.name).cloned().map(Raw::Path),
        Kind::Number | Kind::Mode => m
            .get_one::<String>(s.name)
            .map(|v| Raw::Value(toml::Value::String(v.clone()))),
        Kind::Text => m.get_one::<String>(s.name).cloned().map(Raw::Text),
    }
}

impl FromArgMatches for RunArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let given = settings::ALL
            .iter()
            .filter_map(|s| raw(m, s).map(|r| (s.name, r)))
            .collect();
        Ok(RunArgs {
            given,
            config: m.get_one::<PathBuf>(CONFIG).cloned(),
            command: m
                .get_many::<OsString>(COMMAND)
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for RunArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.args(settings::ALL.iter().map(|s| s.arg()))
            .arg(
                clap::Arg::new(CONFIG)
                    .long(CONFIG)
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("TOML file with the same settings: each key is the flag's name with `_` for `-` (`ready_timeout = \"5s\"`), and `command = [...]` for PROGRAM"),
            )
            .arg(
                clap::Arg::new(COMMAND)
                    .last(true)
                    .num_args(0..)
                    .value_name("PROGRAM [ARGS]")
                    .value_parser(clap::value_parser!(OsString))
                    .help("the program to run and its arguments (after `--`); resolved again at every upgrade"),
            )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// Where the control socket is, for the client commands: the same definition as
/// `baton run --control`.
#[derive(Debug, Default, Clone)]
pub struct ControlArg {
    /// The path, if given (flag or `$BATON_CONTROL`).
    pub control: Option<PathBuf>,
}

impl FromArgMatches for ControlArg {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(ControlArg {
            control: m.get_one::<PathBuf>(settings::CONTROL.name).cloned(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for ControlArg {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(settings::CONTROL.arg())
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}
