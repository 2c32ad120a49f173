//! Spawning a generation straight into its cgroup: `clone3(CLONE_INTO_CGROUP |
//! CLONE_PIDFD)` (Linux 5.7+). Joining a cgroup after the fork (a write to
//! `cgroup.procs`) waits for an RCU grace period, about 5 ms here, and the spawn waited
//! with it; created inside the cgroup, the child costs nothing extra. Kernels or
//! hierarchies that refuse it fall back to the fork-then-join path of std's spawn.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;

use super::ExecPlan;

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What [`spawn_into_cgroup`] did.
pub enum Clone3 {
    /// The child runs in the cgroup (and execs, or reports why not on `exec_error`).
    Spawned {
        /// Its pid.
        pid: u32,
        /// A pidfd for it, to wait on and reap.
        pidfd: OwnedFd,
        /// Read end of the child's close-on-exec error pipe (non-blocking): end of file
        /// after a successful exec, else the errno; see [`exec_outcome`].
        exec_error: OwnedFd,
    },
    /// This kernel or cgroup refuses clone3 into it: use the fallback.
    Unsupported(io::Error),
}

/// Forks a child inside the cgroup `cgroup_dir` that runs `plan` with stdin from
/// `stdin`, in a process group of its own. Returns at once, without waiting for the
/// exec: under load the child may wait for a CPU before it can exec, and baton's loop
/// must not wait with it. A failed exec makes the child exit 127 with its errno on the
/// error pipe.
///
/// # Errors
/// The error pipe cannot be made.
pub fn spawn_into_cgroup(
    plan: &mut ExecPlan,
    cgroup_dir: BorrowedFd<'_>,
    stdin: BorrowedFd<'_>,
) -> io::Result<Clone3> {
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: CLONE_PIDFD | CLONE_INTO_CGROUP,
        pidfd: (&mut pidfd as *mut libc::c_int) as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup_dir.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // An empty mask, built before the fork: the child unblocks every signal with it.
    // SAFETY: sigset_t is plain data, and sigemptyset initialises it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a valid sigset_t to write.
    unsafe { libc::sigemptyset(&mut empty) };
    let (stdin, err_fd) = (stdin.as_raw_fd(), err_w.as_raw_fd());
    // Created inside the cgroup: nothing to join.
    let join = plan.replace_cgroup_join(None);
    // SAFETY: clone3 without CLONE_VM forks like fork(2): the child gets a copy of this
    // address space and continues here, where it makes only async-signal-safe calls
    // (plan.exec_in_child's, sigprocmask, signal, setpgid, dup2, write, _exit) on memory
    // allocated before the call. `args` is a valid clone_args of the size passed.
    // SCHED_BATCH for the clone: the new child does not take baton's CPU at once.
    let r = super::fork_as_batch(|| unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    });
    if r < 0 {
        let e = io::Error::last_os_error();
        plan.replace_cgroup_join(join);
        return Ok(Clone3::Unsupported(e));
    }
    if r == 0 {
        // The child.
        let e = child_exec(plan, &empty, stdin);
        let errno: i32 = e.raw_os_error().unwrap_or(libc::EINVAL);
        // SAFETY: write and _exit are async-signal-safe; the buffer lives on this stack.
        unsafe {
            libc::write(err_fd, (&errno as *const i32).cast(), 4);
            libc::_exit(127);
        }
    }
    drop(err_w);
    // SAFETY: clone3 returned a new pidfd in `pidfd`, owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Clone3::Spawned {
        pid: r as u32,
        pidfd,
        exec_error: err_r,
    })
}

/// What a cloned child's error pipe says so far.
pub enum ExecOutcome {
    /// Nothing yet: the child has not exec'd or failed.
    Pending,
    /// End of file: the exec closed the pipe, the program runs.
    Execed,
    /// The exec failed with this error (the child exits 127).
    Failed(io::Error),
}

/// The error pipe, registered with tokio to wait until it is readable.
///
/// # Errors
/// Registering failed.
pub fn async_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // Registration is the same for any fd read with readiness: see `async_pidfd`.
    super::async_pidfd(fd)
}

/// Reads the error pipe of a cloned child without blocking.
pub fn exec_outcome(pipe: BorrowedFd<'_>) -> ExecOutcome {
    let mut buf = [0u8; 4];
    match nix::unistd::read(pipe, &mut buf) {
        Ok(0) => ExecOutcome::Execed,
        Ok(4) => ExecOutcome::Failed(io::Error::from_raw_os_error(i32::from_ne_bytes(buf))),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => ExecOutcome::Pending,
        // A short or failed read: the errno is unknown, the exit says the rest.
        _ => ExecOutcome::Execed,
    }
}

/// In the child: what std's spawn does before its pre-exec hook, then the plan.
fn child_exec(plan: &mut ExecPlan, empty: &libc::sigset_t, stdin: libc::c_int) -> io::Error {
    // SAFETY: sigprocmask, signal, setpgid and dup2 are async-signal-safe and take
    // plain values; `empty` was initialised before the fork.
    unsafe {
        libc::sigprocmask(libc::SIG_SETMASK, empty, std::ptr::null_mut());
        // Rust ignores SIGPIPE; an ignored signal stays ignored across exec.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::setpgid(0, 0) < 0 || libc::dup2(stdin, 0) < 0 {
            return io::Error::last_os_error();
        }
    }
    match plan.exec_in_child() {
        Err(e) => e,
        Ok(()) => io::Error::from_raw_os_error(libc::EINVAL),
    }
}
