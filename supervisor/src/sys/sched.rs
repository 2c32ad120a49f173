//! CPU scheduling: baton's own nice value, and the one its children get back.
//!
//! baton uses little CPU, but what it does (a spawn, a relay, a control reply) sits on
//! the upgrade's critical path, and the app it supervises may saturate every core. A
//! lower nice value lets baton run when it wakes; children are put back to the nice
//! value baton started with, before they exec.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;

/// Nothing to restore in children.
const UNSET: i32 = i32::MIN;
/// The nice value children get back (baton started with it), or [`UNSET`].
static CHILD_NICE: AtomicI32 = AtomicI32::new(UNSET);

/// This process's nice value.
///
/// # Errors
/// `getpriority` failed.
pub fn own_nice() -> io::Result<i32> {
    // -1 is a valid nice value: only errno tells a failure.
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes plain integers.
    let n = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if n == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// What [`set_own_nice`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum NiceChange {
    /// Changed from this value (which children get back).
    From(i32),
    /// Already there.
    Unchanged,
}

/// Sets baton's nice value to `want` (−20..=19). Call it while baton has one thread:
/// on Linux the value is per thread, and threads started later inherit it.
///
/// # Errors
/// The current value cannot be read, or raising the priority is not permitted (it
/// needs `CAP_SYS_NICE` or `RLIMIT_NICE`); the error names the value baton keeps.
pub fn set_own_nice(want: i32) -> Result<NiceChange, String> {
    let now = own_nice().map_err(|e| format!("cannot read the nice value: {e}"))?;
    if now == want {
        return Ok(NiceChange::Unchanged);
    }
    // SAFETY: setpriority takes plain integers.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, want) } < 0 {
        let e = io::Error::last_os_error();
        return Err(format!("cannot set nice {want} (keeping {now}): {e}"));
    }
    Ok(NiceChange::From(now))
}

/// Records the nice value children get back (`None`: they keep baton's).
pub fn set_child_nice(nice: Option<i32>) {
    CHILD_NICE.store(nice.unwrap_or(UNSET), Ordering::Relaxed);
}

/// The nice value children get back, if baton changed its own.
pub fn child_nice() -> Option<i32> {
    match CHILD_NICE.load(Ordering::Relaxed) {
        UNSET => None,
        n => Some(n),
    }
}

/// In a forked child: back to the nice value baton started with, where permitted (a
/// `--nice` above the start value cannot be undone without `CAP_SYS_NICE`; the child
/// then keeps baton's, which only lowers its priority). Async-signal-safe: an atomic
/// load and one syscall.
pub fn restore_nice_in_child() {
    if let Some(n) = child_nice() {
        // SAFETY: setpriority takes plain integers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) };
    }
}

/// Makes `cmd`'s child start at the nice value baton started with.
pub fn children_nice(cmd: &mut tokio::process::Command) {
    if child_nice().is_some() {
        // SAFETY: the hook runs between fork and exec and only makes the
        // async-signal-safe calls of `restore_nice_in_child`.
        unsafe {
            cmd.pre_exec(|| {
                restore_nice_in_child();
                Ok(())
            });
        }
    }
}

/// Runs `clone` (a fork) with this thread in `SCHED_BATCH`, which the child inherits:
/// a new `SCHED_BATCH` task never preempts the running one on wake-up, so baton is not
/// put off its CPU by its own child before the spawn returns. Both return through here
/// to `SCHED_OTHER` (the child first thing, async-signal-safe: two syscalls). Threads
/// in another policy (an operator's choice) are left alone.
pub fn fork_as_batch<T>(clone: impl FnOnce() -> T) -> T {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_getscheduler and sched_setscheduler take plain values and a
    // pointer to `param`, which lives on this stack. The nice value is kept.
    let batch = unsafe {
        libc::sched_getscheduler(0) == libc::SCHED_OTHER
            && libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) == 0
    };
    let r = clone();
    if batch {
        // SAFETY: as above.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_as_batch_returns_to_the_policy_it_had() {
        // SAFETY: sched_getscheduler(0) takes a plain value and reads this thread's policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let before = policy();
        let inside = fork_as_batch(policy);
        if before == libc::SCHED_OTHER {
            assert_eq!(inside, libc::SCHED_BATCH);
        }
        assert_eq!(policy(), before);
    }
}
