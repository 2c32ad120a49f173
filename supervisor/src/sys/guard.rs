//! The guardian's raw calls: it is forked from baton and outlives it by a moment, to
//! kill what baton's generations left when baton itself was SIGKILLed.

use std::ffi::CStr;
use std::io;
use std::os::fd::AsRawFd;

use nix::libc;

/// Forks a guardian: a child that waits for this process to exit, then runs
/// `on_death(pid)` and exits. It keeps only stderr, ignores
/// the signals a terminal or a process-group kill sends, and names itself `name` (so
/// `pgrep -x baton` does not find it). Returns the guardian's pid.
///
/// # Errors
/// Refuses (`WouldBlock`) unless this process has one thread: the child runs ordinary
/// code, which is safe after `fork` only when no other thread could hold a lock.
pub fn fork_guardian(name: &CStr, on_death: impl FnOnce(u32)) -> io::Result<u32> {
    if threads() != Some(1) {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "baton is already multi-threaded",
        ));
    }
    let me = std::process::id();
    // SAFETY: one thread (checked above), so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            guardian_setup(name);
            while !exited(me) {}
            on_death(me);
            // SAFETY: _exit ends the process at once, without running baton's atexit
            // handlers or flushing state that belongs to the parent.
            unsafe { libc::_exit(0) }
        }
        pid => Ok(pid as u32),
    }
}

/// The number of threads in this process, from `/proc/self/status`.
fn threads() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// The guardian keeps stderr only, leaves signals meant for baton alone, and is named.
fn guardian_setup(name: &CStr) {
    // SAFETY: close_range takes plain integers; the guardian owns no fd above 2 that
    // anything in it still uses (listeners and sockets belong to baton).
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in [0, 1] {
            // SAFETY: dup2 onto stdin/stdout, which the guardian owns.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    for sig in [
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGPIPE,
        libc::SIGQUIT,
    ] {
        // SAFETY: SIG_IGN for a standard signal; no handler code is involved.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes, which
    // the kernel truncates to fit.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Waits until process `pid` (the guardian's parent) has exited; `false` when
/// interrupted first.
fn exited(pid: u32) -> bool {
    let Ok(pidfd) = super::pidfd_open(pid) else {
        return true;
    };
    // The parent may have died before the pidfd was opened, and its pid been reused.
    // SAFETY: getppid has no arguments and cannot fail.
    if unsafe { libc::getppid() } as u32 != pid {
        return true;
    }
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives for the call.
    let r = unsafe { libc::poll(&mut p, 1, -1) };
    r > 0 || (r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted)
}
