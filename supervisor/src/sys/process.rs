//! Processes: signals, limits, the environment at start-up, and what `/proc` says
//! about baton itself.

use std::io;

/// Removes `var` from the environment. Only for start-up, before the runtime's
/// threads exist (see `main`): changing the environment races with any other thread
/// that reads it.
pub fn remove_env_at_startup(var: &str) {
    // SAFETY: called while baton is still single-threaded (listeners are set up before
    // the tokio runtime is built).
    unsafe { std::env::remove_var(var) };
}

/// Restores the default SIGPIPE action (Rust ignores it), so that a client command
/// whose reader went away (`baton status | head -3`) ends quietly as `ls` would,
/// instead of panicking in `println!`.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler code; called at start-up of client commands,
    // before any thread is spawned.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

/// The real uid of this process.
pub fn getuid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub fn kill(pid: u32, sig: nix::sys::signal::Signal) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: baton holds a socket per waiting
/// control client and per relayed connection, and the usual soft limit of 1024 is far
/// below that. Returns the limits it started with, which children get back (an app may
/// use `select()`, which breaks above 1024), or `None` when nothing changed.
pub fn raise_nofile() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let want = hard.min(1 << 20);
    if soft >= want {
        return None;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
        Ok(()) => Some((soft, hard)),
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "cannot raise the fd limit");
            None
        }
    }
}

/// Whether process `pid` exists (signal 0).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    p > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

/// SIGKILLs the process group led by `pid` (every generation leads its own group).
pub fn kill_group(pid: u32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`).
fn status_kb(pid: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// This process's resident memory in KiB (`VmRSS`), 0 if unknown.
pub fn own_rss_kb() -> u64 {
    status_kb("self", "VmRSS:").unwrap_or(0)
}

/// A process's peak resident memory in bytes (`VmHWM`), if it can be read.
pub fn peak_rss(pid: u32) -> Option<u64> {
    status_kb(&pid.to_string(), "VmHWM:").map(|kb| kb * 1024)
}

/// This process's open fds, 0 if unknown.
pub fn own_open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1) as u64)
        .unwrap_or(0)
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd's `MONOTONIC_USEC=` wants it.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// Sends `sig` to the process group led by `pid`; a group that is gone is not an error.
pub fn signal_group(pid: u32, sig: nix::sys::signal::Signal) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes `cmd`'s child start with no signal blocked (the process spawning it may block
/// some for one thread to take them, and a child inherits the mask), and get `sig`
/// when the thread that spawned it dies (so a SIGKILLed `baton rehearse` takes its
/// private baton with it). Spawn from a thread that lives as long as the child should.
pub fn die_with_parent(cmd: &mut std::process::Command, sig: nix::sys::signal::Signal) {
    use nix::libc;
    use std::os::unix::process::CommandExt;
    let sig = sig as libc::c_ulong;
    // SAFETY: the hook runs between fork and exec and makes async-signal-safe calls
    // (sigemptyset, sigprocmask, prctl) on a set on its own stack and plain integers.
    unsafe {
        cmd.pre_exec(move || {
            let mut none = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) < 0
                || libc::prctl(libc::PR_SET_PDEATHSIG, sig) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
