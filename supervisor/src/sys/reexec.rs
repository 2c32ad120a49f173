//! The raw calls of a reexec: the sealed state file, fd inheritance, pidfds, the
//! signal mask, and the exec itself.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{FcntlArg, FdFlag, SealFlag, fcntl};
use nix::libc;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

/// A sealed, close-on-exec memfd holding `data`: nobody can change it once made.
pub fn sealed_memfd(name: &str, data: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let file = std::fs::File::from(fd);
    file.write_all_at(data, 0)?;
    let fd = OwnedFd::from(file);
    fcntl(
        fd.as_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SEAL
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE,
        ),
    )?;
    Ok(fd)
}

/// Takes the inherited fd `fd` if it is a sealed memfd (what [`sealed_memfd`]
/// makes), and reads it whole.
///
/// # Errors
/// It is not open, not a memfd, or not sealed against writes.
pub fn take_sealed_memfd(fd: RawFd) -> io::Result<(OwnedFd, Vec<u8>)> {
    let owned = super::take_inherited_fd(fd)
        .ok_or_else(|| io::Error::other(format!("fd {fd} is not open")))?;
    let seals = fcntl(owned.as_fd(), FcntlArg::F_GET_SEALS)
        .map_err(|e| io::Error::other(format!("fd {fd} is not a memfd: {e}")))?;
    let seals = SealFlag::from_bits_truncate(seals);
    if !seals.contains(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK) {
        return Err(io::Error::other(format!("memfd {fd} is not sealed")));
    }
    let file = std::fs::File::from(owned);
    let len = file.metadata()?.len();
    let mut data = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut data, 0)?;
    Ok((file.into(), data))
}

/// Takes ownership of an fd named in a reexec's state, once. It stays
/// inheritable until the take-over is complete (see `reexec::exec_back`).
///
/// # Errors
/// The fd is not open.
pub fn take_handed_fd(fd: RawFd) -> io::Result<OwnedFd> {
    super::take_inherited_fd(fd)
        .ok_or_else(|| io::Error::other(format!("handed-over fd {fd} is not open")))
}

/// Checks, without taking it, that the handed-over `fd` is open.
pub fn handed_fd_open(fd: RawFd) -> bool {
    fd >= 0 && {
        // SAFETY: a single fcntl probe on a number nothing in this image owns yet
        // (start-up, single thread); on a closed fd it just fails.
        let b = unsafe { BorrowedFd::borrow_raw(fd) };
        fcntl(b, FcntlArg::F_GETFD).is_ok()
    }
}

/// Clears (`true`) or sets `FD_CLOEXEC`: only the fds a reexec hands over are
/// inheritable, and only for the moment of the exec.
pub fn set_inheritable(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = if on {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// A pidfd for `pid` (Linux 5.3+). For a child, the pid cannot have been reused (it
/// is a zombie at worst: only baton reaps its children); other callers check.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this fd, close-on-exec, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reaps the child behind `pidfd` if it has exited: "exit status N" or
/// "signal N (SIGX)"; `None` while it runs.
pub fn try_reap_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<Option<String>> {
    // SAFETY: siginfo_t is plain data; all-zeroes is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(P_PIDFD) writes into `info`, which lives for the call.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` for a child (or left si_pid 0 with WNOHANG).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => format!("exit status {status}"),
        _ => match Signal::try_from(status) {
            Ok(sig) => format!("signal {status} ({sig})"),
            Err(_) => format!("signal {status}"),
        },
    }))
}

/// The signals a reexec must not lose: blocked across the exec (the mask is
/// inherited, pending signals stay pending) until the new image handles them.
pub const HELD_SIGNALS: [Signal; 4] = [
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR2,
];

/// Blocks (`true`) or unblocks [`HELD_SIGNALS`] on this thread.
pub fn hold_signals(block: bool) -> io::Result<()> {
    let mut set = SigSet::empty();
    for s in HELD_SIGNALS {
        set.add(s);
    }
    let how = if block {
        SigmaskHow::SIG_BLOCK
    } else {
        SigmaskHow::SIG_UNBLOCK
    };
    pthread_sigmask(how, Some(&set), None)?;
    Ok(())
}

/// Replaces this process's image with the open file `exe` (a `#!` script through
/// `/proc/self/fd`, which needs `exe` inheritable). Returns only on failure.
pub fn exec_self(
    exe: BorrowedFd<'_>,
    script: bool,
    argv: &[CString],
    env: &[CString],
) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    if script {
        let Ok(path) = CString::new(format!("/proc/self/fd/{}", exe.as_raw_fd())) else {
            return io::Error::other("bad path");
        };
        if let Err(e) = set_inheritable(exe, true) {
            return e;
        }
        // SAFETY: path, argv and envp are NUL-terminated strings that outlive the
        // call, and both pointer arrays end with a null pointer.
        unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        let e = io::Error::last_os_error();
        let _ = set_inheritable(exe, false);
        return e;
    }
    // SAFETY: execveat(fd, "", argv, envp, AT_EMPTY_PATH) runs the open file; the
    // pointers are as above, and "" is a static NUL-terminated string.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            exe.as_raw_fd(),
            c"".as_ptr(),
            argv_ptrs.as_ptr(),
            env_ptrs.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
}

/// [`set_inheritable`] by number, for the fds a hand-over names.
pub fn set_inheritable_raw(fd: RawFd, on: bool) -> io::Result<()> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the caller holds every fd it names open for the duration of this call
    // (they belong to the driver, which is blocked in the reexec); an fd that is not
    // open just makes fcntl fail with EBADF.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    set_inheritable(fd, on)
}

/// Registers a pidfd with the runtime, readable once the process exits.
pub fn async_pidfd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open for as long as it lives and always reports the
    // same fd number, which is what `register_with_interest` requires.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into())
}

/// What a crash during a take-over execs: the previous executable, with an
/// environment per fatal signal saying which. Built before it can be needed, so the
/// signal handler only reads it (no allocation, no locks).
struct CrashExec {
    exe: RawFd,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envs: Vec<(libc::c_int, Vec<CString>, Vec<*const libc::c_char>)>,
}

static CRASH: std::sync::atomic::AtomicPtr<CrashExec> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// The signals that mean this image crashed.
pub const CRASH_SIGNALS: [Signal; 5] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
];

extern "C" fn on_crash(sig: libc::c_int) {
    let p = CRASH.load(std::sync::atomic::Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: `p` came from `Box::leak` in `arm_crash_exec` and is never freed.
        let c = unsafe { &*p };
        if let Some((_, _, envp)) = c.envs.iter().find(|(s, _, _)| *s == sig) {
            // SAFETY: execveat is async-signal-safe; the pointers are NUL-terminated
            // arrays of NUL-terminated strings that live forever.
            unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    c.exe,
                    c"".as_ptr(),
                    c.argv_ptrs.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            };
        }
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) }
}

/// Until [`disarm_crash_exec`]: a crash (a fatal signal, or a panic) execs `prev`
/// with `argv` and `env(signal name)` instead of killing the process, so that a new
/// image that dies while taking over hands everything back.
///
/// # Errors
/// A handler could not be installed.
pub fn arm_crash_exec(
    prev: BorrowedFd<'_>,
    argv: Vec<CString>,
    env: impl Fn(&str) -> Vec<CString>,
) -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, sigaction};
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envs = CRASH_SIGNALS
        .iter()
        .map(|s| {
            let e = env(s.as_str());
            let mut ptrs: Vec<*const libc::c_char> = e.iter().map(|x| x.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            (*s as libc::c_int, e, ptrs)
        })
        .collect();
    let c = Box::leak(Box::new(CrashExec {
        exe: prev.as_raw_fd(),
        _argv: argv,
        argv_ptrs,
        envs,
    }));
    CRASH.store(c, std::sync::atomic::Ordering::Release);
    let action = SigAction::new(
        SigHandler::Handler(on_crash),
        SaFlags::SA_RESETHAND,
        SigSet::empty(),
    );
    for s in CRASH_SIGNALS {
        // SAFETY: `on_crash` only makes async-signal-safe calls on memory prepared above.
        unsafe { sigaction(s, &action) }?;
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        if !CRASH.load(std::sync::atomic::Ordering::Acquire).is_null() {
            on_crash(libc::SIGABRT);
        }
    }));
    Ok(())
}

/// The take-over is done: crashes are crashes again.
pub fn disarm_crash_exec() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, sigaction};
    CRASH.store(std::ptr::null_mut(), std::sync::atomic::Ordering::Release);
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for s in CRASH_SIGNALS {
        // SAFETY: restoring the default action is always sound.
        let _ = unsafe { sigaction(s, &default) };
    }
}
