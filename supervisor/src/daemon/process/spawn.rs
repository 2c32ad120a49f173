//! Starting one generation: resolve PROGRAM, lay out fds and env, exec.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use baton_protocol::{
    ENV_CONTROL_FD, ENV_GENERATION, ENV_LISTEN_FDNAMES, ENV_LISTEN_FDS, ENV_LISTEN_PID,
    ENV_NOTIFY_SOCKET, LISTEN_FDS_START,
};
use nix::sys::signal::Signal;

use crate::daemon::io::listeners::Listener;
use crate::release::exe::Exe;
use crate::sys;

/// The release a generation runs (with `--releases`).
pub const ENV_RELEASE: &str = "BATON_RELEASE";
/// That release's directory.
pub const ENV_RELEASE_DIR: &str = "BATON_RELEASE_DIR";

/// Variables baton sets itself, or that belong to baton and not to its children.
const OWN_VARS: &[&str] = &[
    ENV_RELEASE,
    ENV_RELEASE_DIR,
    ENV_LISTEN_FDS,
    ENV_LISTEN_FDNAMES,
    ENV_LISTEN_PID,
    ENV_NOTIFY_SOCKET,
    ENV_GENERATION,
    ENV_CONTROL_FD,
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// What every spawn shares.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// PROGRAM as given (argv\[0\]).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Sent to children on baton's death (PR_SET_PDEATHSIG).
    pub death_signal: Signal,
    /// The fd limit baton started with (soft, hard), restored in children when baton
    /// raised its own.
    pub child_nofile: Option<(u64, u64)>,
    /// The children's `NOTIFY_SOCKET`.
    pub notify_path: PathBuf,
    /// baton's environment at startup, minus its own variables.
    pub base_env: Vec<Vec<u8>>,
}

/// A started child.
pub struct Spawned {
    /// How to wait for it.
    pub exit: crate::daemon::process::generation::ExitWatch,
    /// Its pid.
    pub pid: u32,
    /// baton's end of the child's control socket.
    pub control: OwnedFd,
}

/// baton's environment without the variables it manages for its children.
pub fn base_env() -> Vec<Vec<u8>> {
    std::env::vars_os()
        .filter(|(k, _)| !OWN_VARS.iter().any(|v| OsStr::new(v) == k.as_os_str()))
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e
        })
        .collect()
}

/// Finds PROGRAM: a path if it has a `/`, else the first executable match in `PATH`.
///
/// # Errors
/// A message naming PROGRAM when it does not exist or is not executable.
pub fn resolve_program(program: &OsStr) -> Result<PathBuf, String> {
    let name = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        return check_executable(name).map(|()| name.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if check_executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!("program '{}' not found in PATH", name.display()))
}

fn check_executable(p: &Path) -> Result<(), String> {
    crate::release::store::check_executable(p)
        .map_err(|why| format!("program '{}': {why}", p.display()))
}

/// Spawns generation `gen_id` running `exe`, with the listeners at fds 3.. and its
/// control socket after them.
///
/// # Errors
/// The exec failed (reported through std's error pipe).
pub fn spawn(
    cfg: &SpawnConfig,
    listeners: &[Listener],
    gen_id: u64,
    cgroup: Option<&crate::daemon::process::cgroup::GenCgroup>,
    exe: &Exe,
) -> io::Result<Spawned> {
    let path = &exe.path;
    let (ours, theirs) = sys::stream_socketpair()?;
    let n = listeners.len();
    let control_fd = LISTEN_FDS_START + n as i32;
    let mut env = cfg.base_env.clone();
    let mut set = |k: &str, v: &[u8]| {
        let mut e = k.as_bytes().to_vec();
        e.push(b'=');
        e.extend_from_slice(v);
        env.push(e);
    };
    if n > 0 {
        set(ENV_LISTEN_FDS, n.to_string().as_bytes());
        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
        set(ENV_LISTEN_FDNAMES, names.join(":").as_bytes());
    }
    set(ENV_NOTIFY_SOCKET, cfg.notify_path.as_os_str().as_bytes());
    set(ENV_GENERATION, gen_id.to_string().as_bytes());
    set(ENV_CONTROL_FD, control_fd.to_string().as_bytes());
    if let Some((version, dir)) = &exe.release {
        set(ENV_RELEASE, version.as_bytes());
        set(ENV_RELEASE_DIR, dir.as_os_str().as_bytes());
    }
    let mut fds: Vec<_> = listeners.iter().map(|l| l.fd()).collect();
    fds.push(theirs.as_fd());
    let mut argv: Vec<&OsStr> = vec![cfg.program.as_os_str()];
    argv.extend(cfg.args.iter().map(OsString::as_os_str));
    let mut plan = sys::ExecPlan::new(
        exe.fd(),
        exe.script,
        &argv,
        &env,
        n > 0,
        &fds,
        cfg.death_signal,
        cgroup.map(|c| c.procs_fd().as_fd()),
        cfg.child_nofile,
    )?;
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if let Some(cg) = cgroup {
        let stdin = std::fs::File::open("/dev/null")?;
        match sys::spawn_into_cgroup(&mut plan, cg.dir_fd().as_fd(), stdin.as_fd())
            .map_err(with_path)?
        {
            sys::Clone3::Spawned {
                pid,
                pidfd,
                exec_error,
            } => {
                drop(theirs);
                return Ok(Spawned {
                    exit: crate::daemon::process::generation::ExitWatch::Cloned {
                        pidfd,
                        exec_error,
                    },
                    pid,
                    control: ours,
                });
            }
            sys::Clone3::Unsupported(e) => {
                tracing::debug!(error = %e, "clone3 into the cgroup refused: fork, then join");
            }
        }
    }
    let mut cmd = tokio::process::Command::new(path);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        // Own process group: a terminal's Ctrl-C reaches baton, which drains the
        // children, instead of killing them all at once.
        .process_group(0)
        .kill_on_drop(false);
    sys::install_exec(&mut cmd, plan);
    let child = cmd.spawn().map_err(with_path)?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    Ok(Spawned {
        exit: crate::daemon::process::generation::ExitWatch::Child(child),
        pid,
        control: ours,
    })
}
