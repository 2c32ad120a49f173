//! The child's side of the environment contract (see `PROTOCOL.md`):
//! `LISTEN_FDS` / `LISTEN_FDNAMES` / `LISTEN_PID`, `NOTIFY_SOCKET`,
//! `BATON_GENERATION` and `BATON_CONTROL_FD`.

use std::os::fd::{OwnedFd, RawFd};

use crate::error::{Error, Result};
use crate::sys;
use baton_protocol::{
    ENV_CONTROL_FD, ENV_GENERATION, ENV_LISTEN_FDNAMES, ENV_LISTEN_FDS, ENV_LISTEN_PID,
    ENV_NOTIFY_SOCKET, LISTEN_FDS_START,
};

/// More inherited listeners than this is certainly a broken environment.
const MAX_LISTEN_FDS: usize = 4096;

/// The variables [`Env::take`] removes from the process environment, so that
/// programs the application starts do not believe they were socket-activated
/// or supervised. `BATON_GENERATION` stays: it is informational only.
const TAKEN_VARS: [&str; 5] = [
    ENV_LISTEN_FDS,
    ENV_LISTEN_FDNAMES,
    ENV_LISTEN_PID,
    ENV_NOTIFY_SOCKET,
    ENV_CONTROL_FD,
];

/// The contract variables, parsed but with no fd touched yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvSpec {
    /// Names of the inherited listeners; listener `i` is fd `3 + i`.
    pub(crate) listeners: Vec<String>,
    /// `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
    pub(crate) notify_socket: Option<String>,
    /// `BATON_GENERATION`, if set.
    pub(crate) generation: Option<u64>,
    /// `BATON_CONTROL_FD`, if set.
    pub(crate) control_fd: Option<RawFd>,
}

fn invalid(var: &'static str, reason: impl Into<String>) -> Error {
    Error::Env {
        var,
        reason: reason.into(),
    }
}

/// Parses the contract variables. `get` reads one variable (`None` when
/// unset); `own_pid` is this process's pid.
///
/// Like `sd_listen_fds(3)`, listeners are ignored unless `LISTEN_PID` is set
/// and equals `own_pid`: a program the app starts inherits the environment
/// but must not grab the app's sockets.
pub(crate) fn parse(get: impl Fn(&str) -> Option<String>, own_pid: u32) -> Result<EnvSpec> {
    let listeners = parse_listeners(&get, own_pid)?;

    let notify_socket = match get(ENV_NOTIFY_SOCKET) {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) if s.starts_with('/') || (s.starts_with('@') && s.len() > 1) => Some(s),
        Some(s) => {
            return Err(invalid(
                ENV_NOTIFY_SOCKET,
                format!("{s:?} is neither an absolute path nor @abstract"),
            ));
        }
    };

    let generation = match get(ENV_GENERATION) {
        None => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|e| invalid(ENV_GENERATION, format!("{s:?}: {e}")))?,
        ),
    };

    let control_fd = match get(ENV_CONTROL_FD) {
        None => None,
        Some(s) => {
            let fd = s
                .parse::<RawFd>()
                .map_err(|e| invalid(ENV_CONTROL_FD, format!("{s:?}: {e}")))?;
            if fd < 3 {
                return Err(invalid(
                    ENV_CONTROL_FD,
                    format!("{fd} is stdin/stdout/stderr or negative"),
                ));
            }
            let first = LISTEN_FDS_START;
            // Bounded by MAX_LISTEN_FDS, so the cast is lossless.
            let end = first + listeners.len() as RawFd;
            if (first..end).contains(&fd) {
                return Err(invalid(
                    ENV_CONTROL_FD,
                    format!("{fd} is one of the listener fds {first}..{end}"),
                ));
            }
            Some(fd)
        }
    };

    Ok(EnvSpec {
        listeners,
        notify_socket,
        generation,
        control_fd,
    })
}

fn parse_listeners(get: &impl Fn(&str) -> Option<String>, own_pid: u32) -> Result<Vec<String>> {
    let Some(count) = get(ENV_LISTEN_FDS) else {
        return Ok(Vec::new());
    };
    match get(ENV_LISTEN_PID) {
        // sd_listen_fds: no LISTEN_PID means "not for us".
        None => return Ok(Vec::new()),
        Some(pid) => {
            let pid = pid
                .parse::<u32>()
                .map_err(|e| invalid(ENV_LISTEN_PID, format!("{pid:?}: {e}")))?;
            if pid != own_pid {
                return Ok(Vec::new());
            }
        }
    }
    let count = count
        .parse::<usize>()
        .map_err(|e| invalid(ENV_LISTEN_FDS, format!("{count:?}: {e}")))?;
    if count > MAX_LISTEN_FDS {
        return Err(invalid(
            ENV_LISTEN_FDS,
            format!("{count} is more than {MAX_LISTEN_FDS}"),
        ));
    }
    match get(ENV_LISTEN_FDNAMES) {
        // systemd's name for listeners nobody named.
        None => Ok(vec!["unknown".to_owned(); count]),
        Some(names) => {
            let names: Vec<String> = if count == 0 && names.is_empty() {
                Vec::new()
            } else {
                names.split(':').map(str::to_owned).collect()
            };
            if names.len() != count {
                return Err(invalid(
                    ENV_LISTEN_FDNAMES,
                    format!(
                        "{} names for {count} fds ({ENV_LISTEN_FDS}={count})",
                        names.len()
                    ),
                ));
            }
            Ok(names)
        }
    }
}

/// What this process inherited from its supervisor (or from systemd socket
/// activation), with the fds owned and close-on-exec.
///
/// Get one with [`Env::take`] (or [`Env::standalone`]) and hand it to
/// [`Builder::start`](crate::Builder::start).
#[derive(Debug)]
pub struct Env {
    pub(crate) generation: Option<u64>,
    pub(crate) listeners: Vec<(String, OwnedFd)>,
    pub(crate) notify_socket: Option<String>,
    pub(crate) control: Option<OwnedFd>,
}

impl Env {
    /// [`Env::take`] for a process that is still single-threaded, checked: safe to call
    /// from `main` before any runtime or thread is started. [`crate::run`] calls it.
    ///
    /// # Errors
    ///
    /// [`Error::Env`] when another thread exists already (call it before building a
    /// runtime, e.g. not inside `#[tokio::main]`), or as [`Env::take`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     let env = baton_child::Env::take_checked()?;
    ///     let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    ///     rt.block_on(async {
    ///         let baton = baton_child::Baton::builder().start(env)?;
    ///         baton.ready()?;
    ///         Ok(())
    ///     })
    /// }
    /// ```
    #[allow(unsafe_code)]
    pub fn take_checked() -> Result<Env> {
        match sys::thread_count() {
            Some(1) => {}
            n => {
                return Err(invalid(
                    "LISTEN_FDS",
                    format!(
                        "taken with {} threads running: take the environment before any thread or runtime starts (not inside #[tokio::main])",
                        n.map_or("several".to_owned(), |n| n.to_string())
                    ),
                ));
            }
        }
        // SAFETY: this process has one thread (checked above), so nothing else can read
        // or write the environment while it is taken.
        unsafe { Env::take() }
    }

    /// Reads the contract variables, takes ownership of the inherited fds
    /// (marking them close-on-exec) and removes `LISTEN_FDS`,
    /// `LISTEN_FDNAMES`, `LISTEN_PID`, `NOTIFY_SOCKET` and `BATON_CONTROL_FD`
    /// from the environment, as `sd_listen_fds(1)` does, so that programs the
    /// application runs do not inherit them.
    ///
    /// A second call finds nothing and returns an empty environment.
    ///
    /// # Safety
    ///
    /// It changes the process environment, so no other thread may read or
    /// write the environment while it runs (glibc's `setenv`/`getenv` are
    /// not thread-safe; `std::env::remove_var` is `unsafe` in edition 2024
    /// for this reason). Call it early in `main`, before building a
    /// multi-threaded runtime or spawning threads.
    ///
    /// # Errors
    ///
    /// [`Error::Env`] if a variable is malformed, [`Error::InheritedFd`] if
    /// an fd the variables name is not open or not a socket (the control
    /// socket must be a Unix stream socket). The variables are removed even
    /// then.
    ///
    /// # Example
    ///
    /// ```no_run
    /// fn main() -> Result<(), Box<dyn std::error::Error>> {
    ///     // SAFETY: still single-threaded here.
    ///     let env = unsafe { baton_child::Env::take() }?;
    ///     let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    ///     rt.block_on(async {
    ///         let baton = baton_child::Baton::builder().start(env)?;
    ///         println!("generation {}", baton.generation());
    ///         Ok(())
    ///     })
    /// }
    /// ```
    // The one `unsafe` outside `sys`: the caller's promise (no other thread) is this
    // function's contract, so it is part of the API; the raw call is in `sys`.
    #[allow(unsafe_code)]
    pub unsafe fn take() -> Result<Env> {
        let mut values: Vec<(&'static str, String)> = Vec::new();
        let mut first_err = None;
        for var in TAKEN_VARS.into_iter().chain([ENV_GENERATION]) {
            match std::env::var_os(var).map(|v| v.into_string()) {
                None => {}
                Some(Ok(v)) => values.push((var, v)),
                Some(Err(raw)) => {
                    first_err.get_or_insert(invalid(var, format!("not UTF-8: {raw:?}")));
                }
            }
        }
        for var in TAKEN_VARS {
            // SAFETY: the caller promised no other thread touches the environment.
            unsafe { sys::remove_env(var) };
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let get = |var: &str| {
            values
                .iter()
                .find(|(n, _)| *n == var)
                .map(|(_, v)| v.clone())
        };
        let spec = parse(get, std::process::id())?;
        Env::from_spec(spec)
    }

    /// An environment with nothing inherited: generation 0, no listeners, no
    /// notify or control socket. [`Baton`](crate::Baton) then binds fallback
    /// addresses and its readiness and reporting calls do nothing.
    pub fn standalone() -> Env {
        Env {
            generation: None,
            listeners: Vec::new(),
            notify_socket: None,
            control: None,
        }
    }

    fn from_spec(spec: EnvSpec) -> Result<Env> {
        let mut listeners = Vec::with_capacity(spec.listeners.len());
        for (i, name) in spec.listeners.into_iter().enumerate() {
            // Bounded by MAX_LISTEN_FDS, so the cast is lossless.
            let fd = LISTEN_FDS_START + i as RawFd;
            let what = format!("listener {name:?}");
            let owned = sys::own_inherited_fd(fd).map_err(|e| Error::InheritedFd {
                fd,
                what: what.clone(),
                reason: e.to_string(),
            })?;
            sys::socket_info(std::os::fd::AsFd::as_fd(&owned)).map_err(|e| Error::InheritedFd {
                fd,
                what,
                reason: e.to_string(),
            })?;
            listeners.push((name, owned));
        }
        let control = match spec.control_fd {
            None => None,
            Some(fd) => Some(take_control_fd(fd)?),
        };
        Ok(Env {
            generation: spec.generation,
            listeners,
            notify_socket: spec.notify_socket,
            control,
        })
    }

    /// The generation number baton gave this process; 0 when not under baton.
    pub fn generation(&self) -> u64 {
        self.generation.unwrap_or(0)
    }

    /// Whether this process runs under baton (`BATON_GENERATION` was set).
    /// Plain systemd socket activation is not "supervised".
    pub fn is_supervised(&self) -> bool {
        self.generation.is_some()
    }

    /// Names of the inherited listeners, in fd order.
    pub fn listener_names(&self) -> impl Iterator<Item = &str> {
        self.listeners.iter().map(|(n, _)| n.as_str())
    }
}

fn take_control_fd(fd: RawFd) -> Result<OwnedFd> {
    let fail = |reason: String| Error::InheritedFd {
        fd,
        what: "control socket".to_owned(),
        reason,
    };
    let owned = sys::own_inherited_fd(fd).map_err(|e| fail(e.to_string()))?;
    let info =
        sys::socket_info(std::os::fd::AsFd::as_fd(&owned)).map_err(|e| fail(e.to_string()))?;
    if info.family != Some(nix::sys::socket::AddressFamily::Unix)
        || info.ty != nix::sys::socket::SockType::Stream
        || info.listening
    {
        return Err(fail(format!(
            "expected a connected Unix stream socket, found {info:?}"
        )));
    }
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_with(vars: &[(&str, &str)], pid: u32) -> Result<EnvSpec> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(|k| map.get(k).cloned(), pid)
    }

    #[test]
    fn empty_environment_is_standalone() {
        let spec = parse_with(&[], 42).unwrap();
        assert_eq!(
            spec,
            EnvSpec {
                listeners: vec![],
                notify_socket: None,
                generation: None,
                control_fd: None
            }
        );
    }

    #[test]
    fn full_baton_environment() {
        let spec = parse_with(
            &[
                ("LISTEN_FDS", "2"),
                ("LISTEN_FDNAMES", "http:admin"),
                ("LISTEN_PID", "42"),
                ("NOTIFY_SOCKET", "/run/baton/ctl.notify"),
                ("BATON_GENERATION", "7"),
                ("BATON_CONTROL_FD", "5"),
            ],
            42,
        )
        .unwrap();
        assert_eq!(spec.listeners, vec!["http", "admin"]);
        assert_eq!(spec.notify_socket.as_deref(), Some("/run/baton/ctl.notify"));
        assert_eq!(spec.generation, Some(7));
        assert_eq!(spec.control_fd, Some(5));
    }

    #[test]
    fn listeners_for_another_pid_are_ignored() {
        let spec = parse_with(
            &[
                ("LISTEN_FDS", "1"),
                ("LISTEN_FDNAMES", "http"),
                ("LISTEN_PID", "41"),
            ],
            42,
        )
        .unwrap();
        assert!(spec.listeners.is_empty());
    }

    #[test]
    fn listeners_without_pid_are_ignored_like_sd_listen_fds() {
        let spec = parse_with(&[("LISTEN_FDS", "1")], 42).unwrap();
        assert!(spec.listeners.is_empty());
    }

    #[test]
    fn missing_names_default_to_unknown() {
        let spec = parse_with(&[("LISTEN_FDS", "2"), ("LISTEN_PID", "42")], 42).unwrap();
        assert_eq!(spec.listeners, vec!["unknown", "unknown"]);
    }

    #[test]
    fn zero_listeners_with_empty_names() {
        let spec = parse_with(
            &[
                ("LISTEN_FDS", "0"),
                ("LISTEN_FDNAMES", ""),
                ("LISTEN_PID", "42"),
            ],
            42,
        )
        .unwrap();
        assert!(spec.listeners.is_empty());
    }

    #[test]
    fn malformed_values_are_errors_naming_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("LISTEN_FDS", "x"), ("LISTEN_PID", "42")], "LISTEN_FDS"),
            (&[("LISTEN_FDS", "1"), ("LISTEN_PID", "x")], "LISTEN_PID"),
            (
                &[
                    ("LISTEN_FDS", "2"),
                    ("LISTEN_PID", "42"),
                    ("LISTEN_FDNAMES", "a"),
                ],
                "LISTEN_FDNAMES",
            ),
            (
                &[("LISTEN_FDS", "99999"), ("LISTEN_PID", "42")],
                "LISTEN_FDS",
            ),
            (&[("BATON_GENERATION", "-1")], "BATON_GENERATION"),
            (&[("BATON_CONTROL_FD", "abc")], "BATON_CONTROL_FD"),
            (&[("BATON_CONTROL_FD", "1")], "BATON_CONTROL_FD"),
            (
                &[
                    ("LISTEN_FDS", "2"),
                    ("LISTEN_PID", "42"),
                    ("BATON_CONTROL_FD", "4"),
                ],
                "BATON_CONTROL_FD",
            ),
            (&[("NOTIFY_SOCKET", "relative/path")], "NOTIFY_SOCKET"),
            (&[("NOTIFY_SOCKET", "@")], "NOTIFY_SOCKET"),
        ];
        for (vars, bad) in cases {
            match parse_with(vars, 42) {
                Err(Error::Env { var, .. }) => assert_eq!(var, *bad, "{vars:?}"),
                other => panic!("{vars:?}: expected an error about {bad}, got {other:?}"),
            }
        }
    }

    #[test]
    fn abstract_and_empty_notify_socket() {
        let spec = parse_with(&[("NOTIFY_SOCKET", "@baton/x")], 1).unwrap();
        assert_eq!(spec.notify_socket.as_deref(), Some("@baton/x"));
        let spec = parse_with(&[("NOTIFY_SOCKET", "")], 1).unwrap();
        assert_eq!(spec.notify_socket, None);
    }

    #[test]
    fn control_fd_after_the_listeners_is_fine() {
        let spec = parse_with(
            &[
                ("LISTEN_FDS", "2"),
                ("LISTEN_PID", "42"),
                ("BATON_CONTROL_FD", "5"),
            ],
            42,
        )
        .unwrap();
        assert_eq!(spec.control_fd, Some(5));
    }
}
