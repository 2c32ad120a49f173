//! Every `unsafe` block and raw fd / libc call of the supervisor lives here and in the
//! files below it, one per topic: `clone.rs` (clone3 into a cgroup), `guard.rs` (the
//! guardian that outlives baton), `reexec.rs` (the calls only a reexec makes) and
//! `sched.rs` (nice and scheduling).

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::libc;
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike,
    SockaddrStorage, UnixAddr, bind, getsockopt, listen, setsockopt, socket, sockopt,
};
use nix::sys::stat::{SFlag, fstat};

mod clone;
mod guard;
mod reexec;
mod sched;
pub use clone::*;
pub use guard::*;
pub use reexec::*;
pub use sched::*;

/// What an inherited or bound listening socket turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketKind {
    /// A TCP listener bound to this address.
    Tcp(SocketAddr),
    /// A Unix stream listener, bound to this path (None if abstract/unnamed).
    Unix(Option<std::path::PathBuf>),
    /// A bound UDP socket.
    Udp(SocketAddr),
}

/// Creates a UDP socket bound to `addr`, with `O_NONBLOCK` and `O_CLOEXEC`.
pub fn bind_udp(addr: SocketAddr) -> io::Result<OwnedFd> {
    bind_inet(addr, SockType::Datagram, false)
}

/// Creates a TCP listener with `SO_REUSEADDR`, `O_NONBLOCK` and `O_CLOEXEC`.
pub fn bind_tcp(addr: SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let fd = bind_inet(addr, SockType::Stream, true)?;
    listen(&fd, backlog_of(backlog)?)?;
    Ok(fd)
}

/// An inet socket of type `ty` bound to `addr`, non-blocking and close-on-exec.
fn bind_inet(addr: SocketAddr, ty: SockType, reuse_addr: bool) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if reuse_addr {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => {
            // A `[::]` socket is IPv6 only; IPv4 gets its own `--listen`.
            setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
            bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?
        }
    }
    Ok(fd)
}

/// Creates a Unix stream listener at `path` with `O_NONBLOCK` and `O_CLOEXEC`.
pub fn bind_unix(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&fd, backlog_of(backlog)?)?;
    Ok(fd)
}

fn backlog_of(n: i32) -> io::Result<Backlog> {
    Backlog::new(n).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Reads `net.core.somaxconn`, the kernel's cap on a listen backlog.
pub fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Removes `var` from the environment. Only for start-up, before the runtime's
/// threads exist (see `main`): changing the environment races with any other thread
/// that reads it.
pub fn remove_env_at_startup(var: &str) {
    // SAFETY: called while baton is still single-threaded (listeners are set up before
    // the tokio runtime is built).
    unsafe { std::env::remove_var(var) };
}

/// Takes ownership of an inherited fd after checking that it is open.
///
/// Returns `None` if `fd` is not open.
pub fn take_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    fcntl(borrow_raw_checked(fd)?, FcntlArg::F_GETFD).ok()?;
    // SAFETY: the fd is open (F_GETFD succeeded), it came from our parent through
    // LISTEN_FDS, and nothing else in this process owns it: it is taken exactly once,
    // at startup, before any other fd is opened.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn borrow_raw_checked(fd: RawFd) -> Option<BorrowedFd<'static>> {
    if fd < 0 {
        return None;
    }
    // SAFETY: only used for a single fcntl probe right away, while the fd number is
    // not closed by anyone (startup, single thread); fcntl on a closed fd just fails.
    Some(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Checks that `fd` is a listening stream socket and says what it is bound to.
///
/// # Errors
/// A human-readable reason when it is not a socket, not `SOCK_STREAM`, not
/// listening, or of an unsupported family.
pub fn inspect_listener(fd: BorrowedFd<'_>) -> Result<SocketKind, String> {
    let st = fstat(fd).map_err(|e| format!("fstat failed: {e}"))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err("not a socket".into());
    }
    let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| format!("SO_TYPE: {e}"))?;
    if ty == SockType::Datagram {
        // systemd's ListenDatagram=: only UDP (a Unix datagram socket has no peer to
        // answer that every generation could share).
        let addr: SockaddrStorage =
            socket::getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
        return match sockaddr_kind(&addr) {
            Some(SocketKind::Tcp(a)) => Ok(SocketKind::Udp(a)),
            _ => Err(format!(
                "a datagram socket of family {:?}, expected UDP",
                addr.family()
            )),
        };
    }
    if ty != SockType::Stream {
        return Err(format!(
            "a {ty:?} socket, expected a stream socket or a UDP socket"
        ));
    }
    let listening =
        getsockopt(&fd, sockopt::AcceptConn).map_err(|e| format!("SO_ACCEPTCONN: {e}"))?;
    if !listening {
        return Err("a stream socket that is not listening".into());
    }
    let addr: SockaddrStorage =
        socket::getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
    sockaddr_kind(&addr).ok_or_else(|| format!("unsupported address family {:?}", addr.family()))
}

fn sockaddr_kind(addr: &SockaddrStorage) -> Option<SocketKind> {
    if let Some(a) = addr.as_sockaddr_in() {
        return Some(SocketKind::Tcp(SocketAddr::V4((*a).into())));
    }
    if let Some(a) = addr.as_sockaddr_in6() {
        return Some(SocketKind::Tcp(SocketAddr::V6((*a).into())));
    }
    addr.as_unix_addr()
        .map(|u| SocketKind::Unix(u.path().map(Path::to_path_buf)))
}

/// The inode of the file `fd` refers to (a socket's is what `/proc/<pid>/fd` shows).
pub fn fd_inode(fd: BorrowedFd<'_>) -> Option<u64> {
    fstat(fd).ok().map(|st| st.st_ino)
}

/// Whether a listening socket still listens (a child may have `shutdown()` it).
pub fn is_listening(fd: BorrowedFd<'_>) -> bool {
    getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
}

/// Puts a listener that stopped listening back into the listening state.
pub fn relisten(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    listen(&fd, backlog_of(backlog)?)?;
    Ok(())
}

/// Sets `O_NONBLOCK` on a listener, once, before any child shares it.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Ok(())
}

/// Sets `FD_CLOEXEC`, so the fd never leaks into a child by accident.
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// A connected pair of `SOCK_STREAM` Unix sockets, both close-on-exec.
pub fn stream_socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

/// Whether `path` exists and is a socket (without following symlinks).
///
/// Returns `Ok(None)` when nothing exists at `path`.
pub fn path_is_socket(path: &Path) -> io::Result<Option<bool>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            Ok(Some(m.file_type().is_socket()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Binds a datagram socket for sd_notify at `path`, with `SO_PASSCRED` on, so each
/// message carries its sender's pid.
pub fn bind_notify_socket(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    setsockopt(&fd, sockopt::PassCred, &true)?;
    refuse_fds(fd.as_fd())?;
    // Children may run as another user; only root and the owner could connect to
    // a 0600 socket, so open it up: senders are checked by pid, not by mode.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    Ok(fd)
}

/// Receives one sd_notify datagram: the sender's pid (from `SCM_CREDENTIALS`, 0 if
/// absent) and the payload length. Fds never belong on this socket: any that came
/// along (a kernel without `SO_PASSRIGHTS`) are closed, truncated or not.
pub fn recv_notify(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(i32, usize)> {
    let r = baton_protocol::wire::recv_msg(fd, buf, 0)?;
    // `r.fds` drops here, closing every fd that arrived.
    Ok((r.pid.unwrap_or(0), r.bytes))
}

/// `SO_PASSRIGHTS` (Linux 6.16+, asm-generic value; not in the libc crate yet).
const SO_PASSRIGHTS: libc::c_int = 83;

/// Makes the kernel refuse `SCM_RIGHTS` sent to this socket (`sendmsg` fails with
/// `EPERM`), so no sender can make baton install an fd. Older kernels lack the
/// option: `Ok(false)`, and received fds are closed instead.
pub fn refuse_fds(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads one c_int from the pointer, which points at `off`.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        e => Err(e),
    }
}

/// Sends one sd_notify datagram to `addr` (a path, or `@name` for abstract), with
/// optional fds (for `FDSTORE=1`).
pub fn send_notify(addr: &str, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let sa = if let Some(name) = addr.strip_prefix('@') {
        UnixAddr::new_abstract(name.as_bytes())?
    } else {
        UnixAddr::new(addr)?
    };
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [io::IoSlice::new(payload)];
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    sendmsg(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), Some(&sa))?;
    Ok(())
}

/// Bytes waiting in a socket's receive queue (`FIONREAD`).
pub fn pending_bytes(fd: BorrowedFd<'_>) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        0
    } else {
        usize::try_from(n).unwrap_or(0)
    }
}

/// Shuts down the reading side of a stream socket: what is queued stays
/// readable, then reads see EOF, whoever else still holds the other end.
pub fn shut_rd(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read)?;
    Ok(())
}

/// Sets the group of `path` (owner unchanged).
pub fn chown_group(path: &Path, gid: u32) -> io::Result<()> {
    nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))?;
    Ok(())
}

/// Looks up a group by name or number.
///
/// # Errors
/// A message naming the group when it does not exist.
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("no such group '{name}'")),
        Err(e) => Err(format!("cannot look up group '{name}': {e}")),
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+), not in the libc crate.
const SO_PEERGROUPS: libc::c_int = 59;

/// A connected peer's uid and groups (primary and supplementary). Unknown: uid
/// `u32::MAX` and no groups, which no check accepts.
pub fn peer_ids(stream: &tokio::net::UnixStream) -> (u32, Vec<u32>) {
    let Ok(cred) = stream.peer_cred() else {
        return (u32::MAX, Vec::new());
    };
    let mut gids = vec![cred.gid()];
    let mut buf = [0 as libc::gid_t; 256];
    let mut len = std::mem::size_of_val(&buf) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf` and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERGROUPS,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == 0 {
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        gids.extend(buf.iter().take(n).copied());
    }
    (cred.uid(), gids)
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
    fn replace_cgroup_join(&mut self, procs: Option<RawFd>) -> Option<RawFd> {
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
        restore_nice_in_child();
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

    #[test]
    fn inspects_bound_tcp_listener() {
        let fd = bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        match inspect_listener(fd.as_fd()).unwrap() {
            SocketKind::Tcp(a) => assert!(a.port() != 0),
            other => panic!("unexpected {other:?}"),
        }
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_NONBLOCK));
    }

    #[test]
    fn rejects_non_sockets() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(inspect_listener(f.as_fd()).unwrap_err(), "not a socket");
    }
}
