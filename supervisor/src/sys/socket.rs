//! Sockets: binding listeners, taking inherited ones (checked before they are
//! wrapped), inspecting them, and the flags and counters baton reads off them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::libc;
use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike,
    SockaddrStorage, UnixAddr, bind, getsockopt, listen, setsockopt, socket, sockopt,
};
use nix::sys::stat::{SFlag, fstat};

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
