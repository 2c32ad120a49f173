//! Every `baton run` setting, defined once. Each definition drives the flag (clap),
//! its TOML key, where the merge looks for it, the default the merge falls back to
//! (parsed by the same code as a user's value, so the documented default is the real
//! one) and the README's table (`baton generate settings`).

/// How a setting's value is written, on the command line and in the TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A string.
    Text,
    /// A path (need not be UTF-8 on the command line).
    Path,
    /// A number, or a word the setting takes (a TOML integer or string).
    Number,
    /// An octal file mode (a TOML `0o…` integer or a string).
    Mode,
    /// Present or not (a TOML boolean).
    Switch,
    /// Repeatable (a TOML array of strings).
    List,
}

/// What a setting is when nobody sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// Nothing: the feature is off.
    None,
    /// This value, parsed as if it had been given.
    Value(&'static str),
    /// Worked out at start; the text says how.
    Described(&'static str),
}

/// One setting.
#[derive(Debug)]
pub struct Setting {
    /// The flag without `--`; the TOML key is the same with `_` for `-`.
    pub name: &'static str,
    /// The value's name in help (empty for a switch).
    pub value: &'static str,
    /// How its value is written.
    pub kind: Kind,
    /// Its default.
    pub default: DefaultValue,
    /// What it does, one sentence (help, README, man page).
    pub help: &'static str,
    /// An environment variable the flag falls back to.
    pub env: Option<&'static str>,
}

impl Setting {
    /// The TOML key.
    pub fn key(&self) -> String {
        self.name.replace('-', "_")
    }

    /// How messages name it when it came from the command line.
    pub fn flag(&self) -> String {
        format!("--{}", self.name)
    }

    /// The default as help shows it.
    pub fn default_text(&self) -> Option<&'static str> {
        match self.default {
            DefaultValue::None => None,
            DefaultValue::Value(v) | DefaultValue::Described(v) => Some(v),
        }
    }

    /// The clap argument.
    pub fn arg(&self) -> clap::Arg {
        use clap::ArgAction;
        let help = match self.default_text() {
            Some(d) => format!("{} [default: {d}]", self.help),
            None => self.help.to_owned(),
        };
        let mut a = clap::Arg::new(self.name).long(self.name).help(help);
        a = match self.kind {
            Kind::Switch => a.action(ArgAction::SetTrue),
            Kind::List => a.action(ArgAction::Append),
            Kind::Path => a.value_parser(clap::value_parser!(std::path::PathBuf)),
            // Numbers may be negative (`--nice -5`).
            Kind::Number => a.allow_negative_numbers(true),
            Kind::Text | Kind::Mode => a,
        };
        if !self.value.is_empty() {
            a = a.value_name(self.value);
        }
        if let Some(env) = self.env {
            a = a.env(env);
        }
        a
    }
}

macro_rules! settings {
    ($($id:ident { $name:literal, $value:literal, $kind:ident, $default:expr, $help:literal $(, env = $env:literal)? })*) => {
        $(
            #[doc = $help]
            pub const $id: Setting = Setting {
                name: $name,
                value: $value,
                kind: Kind::$kind,
                default: $default,
                help: $help,
                env: settings!(@env $($env)?),
            };
        )*
        /// Every setting, in the order help and the README list them.
        pub const ALL: &[&Setting] = &[$(&$id),*];
    };
    (@env) => { None };
    (@env $env:literal) => { Some($env) };
}

use self::DefaultValue::{Described, None as Unset, Value};

settings! {
    LISTEN { "listen", "NAME=ADDR", List, Unset,
        "a listener; ADDR is `HOST:PORT`, `[V6]:PORT`, `unix:PATH` or `udp:HOST:PORT`; sockets systemd passes (`LISTEN_FDS`) are matched by NAME and not bound again; repeatable" }
    UNIX_MODE { "unix-mode", "MODE", Mode, Value("0660"),
        "mode of the Unix socket files baton binds, in octal" }
    BACKLOG { "backlog", "N", Number, Described("net.core.somaxconn"),
        "listen(2) backlog" }
    READY { "ready", "notify|delay=DUR", Text, Value("notify"),
        "how readiness is known: `notify` (READY=1 on `NOTIFY_SOCKET`) or `delay=DUR` (alive for DUR)" }
    READY_TIMEOUT { "ready-timeout", "DUR", Text, Value("30s"),
        "a candidate not ready by then is rolled back" }
    DRAIN_TIMEOUT { "drain-timeout", "DUR", Text, Value("30s"),
        "a draining generation is SIGKILLed after this" }
    STOP_SIGNAL { "stop-signal", "SIG", Text, Value("TERM"),
        "what a child without the SDK gets when it must drain (also sent if baton dies)" }
    STATE { "state", "", Switch, Unset,
        "two-phase stateful upgrades: the old generation's snapshot is restored by the new one" }
    SNAPSHOT_TIMEOUT { "snapshot-timeout", "DUR", Text, Value("30s"),
        "stateful: the old generation must deliver its snapshot by then" }
    RESTORE_TIMEOUT { "restore-timeout", "DUR", Text, Value("60s"),
        "stateful: the candidate must restore it by then" }
    PRECOPY { "precopy", "auto|off", Text, Value("auto"),
        "stateful: pre-copy (the state streams while the old generation serves) when both generations support it; `off` sends everything while paused" }
    PRECOPY_ROUNDS { "precopy-rounds", "N", Number, Value("8"),
        "pre-copy: at most N delta rounds after the full copy" }
    PRECOPY_TIMEOUT { "precopy-timeout", "DUR", Text, Value("60s"),
        "pre-copy: no new round after DUR; the rest is copied while paused" }
    CONTROL { "control", "PATH", Path,
        Described("$BATON_CONTROL, else $XDG_RUNTIME_DIR/baton.sock, else /run/baton/baton.sock for root, else /tmp/baton-UID/baton.sock"),
        "the control socket", env = "BATON_CONTROL" }
    CONTROL_GROUP { "control-group", "GROUP", Text, Unset,
        "members of GROUP (name or gid) may use the control socket too (mode 0660)" }
    NICE { "nice", "N|off", Number, Value("-10"),
        "baton's own nice value (-20..19), so that it keeps its place on CPUs the app saturates; every child (generation, health and preflight command) gets back the value baton started with; `off` leaves baton's alone; without `CAP_SYS_NICE` baton keeps its start value and logs it once" }
    RELEASES { "releases", "DIR", Path, Unset,
        "run PROGRAM (a path inside each release, e.g. `bin/app`) from the release store DIR" }
    PROBATION { "probation", "DUR|manual", Text, Described("30s with --releases, else 10s"),
        "a promoted version is reverted if it fails within DUR (`0`: permanent at once)" }
    HEALTH { "health", "CHECK", Text, Unset,
        "health check during probation: `exec:CMD` (exit 0) or `http://HOST:PORT/PATH` (2xx)" }
    HEALTH_INTERVAL { "health-interval", "DUR", Text, Value("2s"),
        "time between health checks" }
    HEALTH_FAILURES { "health-failures", "N", Number, Value("3"),
        "failed health checks in a row that revert" }
    PREFLIGHT { "preflight", "CMD", Text, Unset,
        "vets a release before it is installed (`{exe}`, `{version}`, `{dir}` are replaced)" }
    PREFLIGHT_TIMEOUT { "preflight-timeout", "DUR", Text, Value("30s"),
        "bound on the preflight" }
    KEEP { "keep", "N", Number, Described("all"),
        "old releases kept in the store; older ones are deleted" }
    METRICS { "metrics", "ADDR", Text, Unset,
        "serve Prometheus metrics at `HOST:PORT` or `unix:PATH` (`GET /metrics`), baton's own socket" }
    STATE_DIR { "state-dir", "DIR", Path, Described("$STATE_DIRECTORY, else memory only"),
        "keep the upgrade history (`history.jsonl`) there, across restarts" }
}

/// The TOML key for PROGRAM and its arguments (after `--` on the command line).
pub const COMMAND_KEY: &str = "command";

/// The setting whose TOML key is `key`.
pub fn by_key(key: &str) -> Option<&'static Setting> {
    ALL.iter().copied().find(|s| s.key() == key)
}

/// The README's table of settings, in Markdown.
pub fn markdown() -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out = String::from("| option | default | meaning |\n|---|---|---|\n");
    for s in ALL {
        let flag = if s.value.is_empty() {
            s.flag()
        } else {
            format!("{} {}", s.flag(), s.value)
        };
        let default = match s.default {
            DefaultValue::None if s.kind == Kind::Switch => "off".to_owned(),
            DefaultValue::None => "—".to_owned(),
            DefaultValue::Value(v) => format!("`{v}`"),
            DefaultValue::Described(v) => cell(v),
        };
        out.push_str(&format!(
            "| `{}` | {default} | {} |\n",
            cell(&flag),
            cell(s.help)
        ));
    }
    out
}
