//! Every raw process/resource system call of the bench, in one place.
//!
//! Nothing here is `unsafe`: nix wraps each call safely.

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, Signal};
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
/// spawns (baton, and through it the app) inherit the raised limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
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
    use nix::sys::resource::{getrusage, UsageWho};
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
