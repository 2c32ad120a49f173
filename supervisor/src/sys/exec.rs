//! Spawning a generation: the `ExecPlan` that runs between `fork` and `exec`, where
//! only async-signal-safe calls are allowed.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::libc;

/// Everything the forked child needs to exec, allocated before `fork`, so the child
/// runs only async-signal-safe code (no allocation, no locks).
pub struct ExecPlan {
    /// The executable, opened (and checked) by baton.
    exe: RawFd,
    /// Scripts: `/proc/<baton>/fd/<exe>`, so the interpreter can open the checked
    /// file through baton's fd without the child inheriting one.
    proc_path: Option<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits and the NUL terminator.
    listen_pid: Box<[u8]>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Source fds, in target order (fd 3, 4, ...).
    fds: Vec<RawFd>,
    /// Scratch space for the high duplicates; preallocated so the child needn't.
    scratch: Vec<RawFd>,
    parent: libc::pid_t,
    death_signal: libc::c_int,
    /// Highest fd number to close when `close_range` is missing.
    max_fd: RawFd,
    /// The generation's `cgroup.procs`, which the child joins before anything else.
    cgroup_procs: Option<RawFd>,
    /// The fd limit baton started with, restored in the child.
    nofile: Option<libc::rlimit>,
}

// SAFETY: the raw pointers point into heap buffers owned by this same struct
// (`_argv`, `_envp`, `listen_pid`), which never move when the struct does, and they
// are only dereferenced by `execve` in the forked child.
unsafe impl Send for ExecPlan {}
// SAFETY: as above; the parent never reads through the pointers.
unsafe impl Sync for ExecPlan {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

/// `CLOSE_RANGE_CLOEXEC` (Linux 5.11+): mark the range close-on-exec, don't close it.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

impl ExecPlan {
    /// Prepares an exec of the open file `exe` with `argv` and `env` (entries
    /// `KEY=VALUE`, without `LISTEN_PID`, which is filled in by the child), placing
    /// `fds[i]` at `3 + i`. A `script` (`#!`) is exec'd through
    /// `/proc/<baton>/fd/<exe>`: `execveat` of a close-on-exec fd cannot run a
    /// script, and an inheritable one would leak into the child.
    ///
    /// # Errors
    /// An argument or variable contains a NUL byte.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        exe: BorrowedFd<'_>,
        script: bool,
        argv: &[&std::ffi::OsStr],
        env: &[Vec<u8>],
        with_listen_pid: bool,
        fds: &[BorrowedFd<'_>],
        death_signal: nix::sys::signal::Signal,
        cgroup_procs: Option<BorrowedFd<'_>>,
        nofile: Option<(u64, u64)>,
    ) -> io::Result<Self> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument");
        let parent = nix::unistd::getpid().as_raw();
        let proc_path = if script {
            Some(CString::new(format!("/proc/{parent}/fd/{}", exe.as_raw_fd())).map_err(nul)?)
        } else {
            None
        };
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(nul))
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = env
            .iter()
            .map(|e| CString::new(e.clone()).map_err(nul))
            .collect::<io::Result<_>>()?;
        let mut listen_pid = vec![0u8; LISTEN_PID_PREFIX.len() + 24].into_boxed_slice();
        listen_pid[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|e| e.as_ptr()).collect();
        if with_listen_pid {
            envp_ptrs.push(listen_pid.as_ptr().cast());
        }
        envp_ptrs.push(std::ptr::null());
        let fds: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        Ok(ExecPlan {
            exe: exe.as_raw_fd(),
            proc_path,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            listen_pid,
            envp_ptrs,
            scratch: vec![-1; fds.len() + 1],
            fds,
            parent,
            death_signal: death_signal as libc::c_int,
            max_fd: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft.min(65536) as RawFd)
                .unwrap_or(4096),
            cgroup_procs: cgroup_procs.map(|f| f.as_raw_fd()),
            nofile: nofile.map(|(soft, hard)| libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            }),
        })
    }

    /// Replaces the `cgroup.procs` the child joins through (None: clone3 creates it
    /// in the cgroup), returning the previous one.
    pub(super) fn replace_cgroup_join(&mut self, procs: Option<RawFd>) -> Option<RawFd> {
        std::mem::replace(&mut self.cgroup_procs, procs)
    }

    /// Runs in the forked child (from `pre_exec`): lays out the fds, arms the
    /// parent-death signal, fills in `LISTEN_PID`, and execs. Returns only on failure.
    ///
    /// Only async-signal-safe calls are made: `fcntl`, `dup2`, `setpriority`, `prctl`,
    /// `getppid`, `getpid`, `execve`, plus writes into memory allocated before `fork`.
    pub fn exec_in_child(&mut self) -> io::Result<()> {
        if let Some(fd) = self.cgroup_procs {
            // First, before the fd layout can reuse this fd's number: join the
            // generation's cgroup ("0" = the writing process), so that everything it
            // ever starts is in it.
            // SAFETY: write is async-signal-safe; the buffer is a static byte string.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let n = self.fds.len() as RawFd;
        let first = nix::libc::STDERR_FILENO + 1;
        // Move every source above the target range first, so that laying out fd 3..
        // never overwrites a source that is still needed.
        for i in 0..self.fds.len() {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) is async-signal-safe; the source fd is open
            // (the parent holds it until spawn returns).
            let high = unsafe { libc::fcntl(self.fds[i], libc::F_DUPFD_CLOEXEC, first + n) };
            if high < 0 {
                return Err(io::Error::last_os_error());
            }
            self.scratch[i] = high;
        }
        // The executable too, out of the way of the layout (it stays close-on-exec:
        // execveat reads it before the exec closes it).
        let exe_slot = self.fds.len();
        // SAFETY: as above; baton holds the executable open until spawn returns.
        let exe = unsafe { libc::fcntl(self.exe, libc::F_DUPFD_CLOEXEC, first + n) };
        if exe < 0 {
            return Err(io::Error::last_os_error());
        }
        self.scratch[exe_slot] = exe;
        for i in 0..self.fds.len() {
            // SAFETY: dup2 is async-signal-safe; the new fd has FD_CLOEXEC cleared, which
            // is exactly what makes it survive the exec.
            if unsafe { libc::dup2(self.scratch[i], first + i as RawFd) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Anything baton inherited without CLOEXEC (a pipe from its own parent, say)
        // must not reach the child either: it gets exactly stdio, listeners and control.
        // Mark the rest close-on-exec rather than closing it: std's exec-error pipe is
        // among them, and it must stay open until execve, to report e.g. ENOEXEC.
        // SAFETY: close_range is a plain syscall on integers, async-signal-safe.
        if unsafe {
            libc::syscall(
                libc::SYS_close_range,
                (first + n) as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            )
        } < 0
        {
            // Kernels before 5.11: one by one, up to the fd limit.
            for fd in (first + n)..self.max_fd {
                // SAFETY: fcntl is async-signal-safe; EBADF for unused numbers is fine.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        super::restore_nice_in_child();
        if let Some(limit) = &self.nofile {
            // SAFETY: setrlimit is a plain syscall reading one struct owned by `self`;
            // lowering a soft limit is always allowed.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and takes plain integers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, self.death_signal as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: getppid is async-signal-safe. If baton died before prctl, the signal
        // would never come: give up instead of running unsupervised.
        if unsafe { libc::getppid() } != self.parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: getpid is async-signal-safe.
        let pid = unsafe { libc::getpid() };
        write_decimal(&mut self.listen_pid[LISTEN_PID_PREFIX.len()..], pid as u64);
        match &self.proc_path {
            // SAFETY: the path, argv and envp are NUL-terminated strings in buffers
            // owned by `self`, and both pointer arrays end with a null pointer.
            Some(path) => unsafe {
                libc::execve(
                    path.as_ptr(),
                    self.argv_ptrs.as_ptr(),
                    self.envp_ptrs.as_ptr(),
                )
            },
            // SAFETY: execveat(fd, "", argv, envp, AT_EMPTY_PATH) runs the open file;
            // the pointers are as above, and "" is a static NUL-terminated string.
            None => unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    exe,
                    c"".as_ptr(),
                    self.argv_ptrs.as_ptr(),
                    self.envp_ptrs.as_ptr(),
                    libc::AT_EMPTY_PATH,
                ) as libc::c_int
            },
        };
        Err(io::Error::last_os_error())
    }
}

/// Makes `cmd` run `plan` in the forked child instead of its own exec.
pub fn install_exec(cmd: &mut tokio::process::Command, mut plan: ExecPlan) {
    // SAFETY: the hook runs between fork and exec and does only async-signal-safe work
    // (see `ExecPlan::exec_in_child`); all its memory was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || plan.exec_in_child());
    }
}

/// Writes `v` in decimal followed by a NUL into `buf`, without allocating.
fn write_decimal(buf: &mut [u8], mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        buf[i] = digits[n - 1 - i];
    }
    buf[n] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits() {
        let mut b = [0xffu8; 24];
        write_decimal(&mut b, 4_194_304);
        assert_eq!(&b[..8], b"4194304\0");
        write_decimal(&mut b, 0);
        assert_eq!(&b[..2], b"0\0");
    }
}
