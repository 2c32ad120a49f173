//! Every raw process/resource system call of the bench, in one place.
//!
//! The only `unsafe` is in [`pass_as_fd3`]: the `pre_exec` hook and the raw fds it
//! borrows between fork and exec, each with its `SAFETY:` note.
#![allow(unsafe_code)]

use std::io;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Sends `sig` to `pid`. ESRCH (already gone) is `Ok(false)`.
pub fn signal(pid: u32, sig: Signal) -> io::Result<bool> {
    let pid = i32::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::ESRCH) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
/// The migration scenario holds thousands of connections, and the processes the bench
/// spawns (baton, and through it the app) inherit the raised limit. As root it first
/// raises the hard limit to `want` (within `fs.nr_open`), which 100,000 connections need:
/// the bench, and the app, each hold one fd per connection.
pub fn raise_nofile_limit(want: u64) -> io::Result<u64> {
    let (soft, mut hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if hard < want && nix::unistd::geteuid().is_root() {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(hard);
        let to = want.min(nr_open);
        if setrlimit(Resource::RLIMIT_NOFILE, to, to).is_ok() {
            tracing::info!(from = hard, to, "raised the hard RLIMIT_NOFILE");
            hard = to;
            return Ok(hard);
        }
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
        return Ok(hard);
    }
    Ok(soft)
}

/// CPU time (user + system) used by this process and every descendant it has reaped.
/// baton reaps its generations and the bench reaps baton, so after a scenario this covers
/// the whole process tree the scenario ran.
pub fn own_cpu() -> io::Result<std::time::Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    use nix::sys::time::TimeValLike;
    let mut total_us: i64 = 0;
    for who in [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN] {
        let u = getrusage(who).map_err(io::Error::from)?;
        total_us += u.user_time().num_microseconds() + u.system_time().num_microseconds();
    }
    Ok(std::time::Duration::from_micros(
        u64::try_from(total_us).unwrap_or(0),
    ))
}

/// Makes `listener` fd 3 in the child `cmd` spawns, the systemd socket-activation layout
/// (`LISTEN_FDS=1`). The caller keeps `listener` open until the child is spawned.
pub fn pass_as_fd3(cmd: &mut tokio::process::Command, listener: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};

    use nix::fcntl::{FcntlArg, FdFlag, fcntl};

    const TARGET: i32 = 3;
    let raw = listener.as_raw_fd();
    let hook = move || -> io::Result<()> {
        if raw == TARGET {
            // Already in place: only the close-on-exec flag must go.
            // SAFETY: fd 3 is open in the child (it is the listener, inherited through fork).
            let fd = unsafe { BorrowedFd::borrow_raw(TARGET) };
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
        } else {
            // SAFETY: `raw` is open in the child (inherited through fork; the parent keeps
            // it open until spawn returns). dup2 onto 3 replaces the child's copy of
            // whatever the parent holds at 3: a close-on-exec fd its runtime opened at
            // start-up (std's per-spawn error pipe is created later and numbered higher).
            // The new fd 3 is not close-on-exec. The returned OwnedFd is turned back into
            // a raw fd so that nothing closes fd 3 before exec.
            let fd = unsafe {
                nix::unistd::dup2_raw(BorrowedFd::borrow_raw(raw), TARGET)
                    .map_err(io::Error::from)?
            };
            let _ = fd.into_raw_fd();
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and only calls async-signal-safe
    // functions (fcntl, dup2); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Calls `listen(2)` again on a listening socket to set its backlog to
/// `net.core.somaxconn`, as baton and systemd do (std binds with a backlog of 128).
pub fn listen_somaxconn(listener: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{Backlog, listen};
    let max: i32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let backlog = Backlog::new(max).map_err(io::Error::from)?;
    listen(&listener, backlog).map_err(io::Error::from)
}
