//! Every `unsafe` block and raw fd / socket call of the crate.
//!
//! The rest of the crate only handles `OwnedFd` / `BorrowedFd` and calls the
//! small, checked functions here.

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::SealFlag;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::libc::c_void;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{
    getpeername, getsockname, getsockopt, sendmsg, sockopt, AddressFamily, ControlMessage,
    MsgFlags, SockType, SockaddrLike, SockaddrStorage,
};
use nix::sys::stat::{fstat, SFlag};
use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// At most this many fds are accepted per `recvmsg`. The supervisor sends at
/// most one per message, and Linux never merges the fds of two `sendmsg`s
/// into one read, so this is generous.
const MAX_FDS_PER_READ: usize = 16;

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Takes ownership of an fd number handed down by the parent process (a
/// listener at 3.., or the control socket).
///
/// Checks that the fd is open and marks it close-on-exec, so that it does not
/// leak into programs the application runs (`sd_listen_fds` does the same).
///
/// The caller must call this at most once per fd number and only for fds the
/// environment contract says belong to this process.
pub(crate) fn own_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative fd"));
    }
    // SAFETY: F_GETFD only queries the fd table entry; it neither reads nor
    // writes memory and is harmless on a closed fd (it fails with EBADF).
    let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open (checked just above), and the environment
    // contract (LISTEN_FDS with our own LISTEN_PID, BATON_CONTROL_FD) gives
    // it to this process; the caller takes each fd number once (the contract
    // variables are removed after they are read), so nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd())?;
    Ok(owned)
}

/// Sets `FD_CLOEXEC` (a per-fd flag: it never affects other processes
/// sharing the open file description).
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFD).map_err(errno)?;
    let mut flags = FdFlag::from_bits_truncate(flags);
    if !flags.contains(FdFlag::FD_CLOEXEC) {
        flags.insert(FdFlag::FD_CLOEXEC);
        fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(errno)?;
    }
    Ok(())
}

/// Makes sure `O_NONBLOCK` is set. Returns `true` when it had to set it.
///
/// `O_NONBLOCK` lives in the open file description, which every holder of an
/// inherited listener shares, so it must never be *cleared*, and it is only
/// set when missing (under baton it is always set already; under plain
/// systemd socket activation it may not be, and tokio needs it).
pub(crate) fn ensure_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(errno)?;
    let mut flags = OFlag::from_bits_truncate(flags);
    if flags.contains(OFlag::O_NONBLOCK) {
        return Ok(false);
    }
    flags.insert(OFlag::O_NONBLOCK);
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(errno)?;
    Ok(true)
}

/// What an fd is, as far as the SDK cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    /// Address family from `getsockname`.
    pub(crate) family: Option<AddressFamily>,
    /// `SO_TYPE`.
    pub(crate) ty: SockType,
    /// `SO_ACCEPTCONN`: `listen()` was called on it.
    pub(crate) listening: bool,
}

/// Describes a socket fd; fails with `ENOTSOCK` for anything else.
pub(crate) fn socket_info(fd: BorrowedFd<'_>) -> io::Result<SocketInfo> {
    let st = fstat(fd).map_err(errno)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(errno(Errno::ENOTSOCK));
    }
    let ty = getsockopt(&fd, sockopt::SockType).map_err(errno)?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).map_err(errno)?;
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(errno)?;
    Ok(SocketInfo {
        family: addr.family(),
        ty,
        listening,
    })
}

/// Whether a stream socket has a peer (`getpeername` succeeds): `false` for
/// one that was never connected, or (TCP) whose connection was reset or
/// fully closed.
pub(crate) fn has_peer(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match getpeername::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(_) => Ok(true),
        Err(Errno::ENOTCONN) => Ok(false),
        Err(e) => Err(errno(e)),
    }
}

/// What one `recvmsg` brought: bytes, fds and the sender's credentials.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the buffer (0: end of stream, for a stream socket).
    pub bytes: usize,
    /// Every fd that arrived, owned: dropping them closes them.
    pub fds: Vec<OwnedFd>,
    /// The sender's pid, when `SO_PASSCRED` is on and the kernel attached it.
    pub pid: Option<i32>,
    /// The sender attached more fds than `max_fds`: the kernel installed
    /// those that fit (they are in `fds`) and discarded the rest.
    pub fds_truncated: bool,
}

/// One `recvmsg` with room for `max_fds` fds (and credentials).
///
/// Every fd the kernel installed is wrapped in an `OwnedFd` before anything
/// can fail, including on `MSG_CTRUNC`, so no path leaks one. Received fds
/// are close-on-exec from the start (`MSG_CMSG_CLOEXEC`), so a concurrent
/// `fork`+`exec` cannot leak them either. Non-blocking (`MSG_DONTWAIT`):
/// `WouldBlock` is returned as is.
///
/// # Errors
///
/// The OS error of `recvmsg`.
pub fn recv_msg(fd: BorrowedFd<'_>, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let fd_bytes = max_fds * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe {
        nix::libc::CMSG_SPACE(fd_bytes as u32) as usize
            + nix::libc::CMSG_SPACE(std::mem::size_of::<nix::libc::ucred>() as u32) as usize
    };
    // u64 elements: the control buffer must be aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = nix::libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: nix::libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast::<c_void>();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at one iovec over `buf` and at `control`, both alive and
    // at least as long as the lengths given.
    let n = unsafe {
        nix::libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            nix::libc::MSG_CMSG_CLOEXEC | nix::libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Received {
        bytes: n as usize,
        fds: Vec::new(),
        pid: None,
        fds_truncated: msg.msg_flags & nix::libc::MSG_CTRUNC != 0,
    };
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed
    // headers (on truncation it shortens cmsg_len to what it wrote), and
    // CMSG_FIRSTHDR/CMSG_NXTHDR never step past msg_controllen.
    unsafe {
        let mut c = nix::libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = nix::libc::CMSG_DATA(c);
            let len =
                ((*c).cmsg_len as usize).saturating_sub(data.offset_from(c.cast::<u8>()) as usize);
            if (*c).cmsg_level == nix::libc::SOL_SOCKET {
                if (*c).cmsg_type == nix::libc::SCM_RIGHTS {
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        // SAFETY: the kernel just installed this fd for us; nothing else
                        // knows its number, so this is its only owner.
                        out.fds.push(OwnedFd::from_raw_fd(raw));
                    }
                } else if (*c).cmsg_type == nix::libc::SCM_CREDENTIALS
                    && len >= std::mem::size_of::<nix::libc::ucred>()
                {
                    let cred = std::ptr::read_unaligned(data.cast::<nix::libc::ucred>());
                    out.pid = Some(cred.pid);
                }
            }
            c = nix::libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(out)
}

/// Reads from a Unix stream socket into `buf`, appending the fds that came
/// along to `fds`. Returns the number of bytes read; 0 means end of stream.
/// The socket should be non-blocking (`WouldBlock` is returned as is).
///
/// A read that brought more fds than [`MAX_FDS_PER_READ`] is a protocol
/// violation: the fds that did arrive are closed and an error returned.
pub(crate) fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let r = recv_msg(fd, buf, MAX_FDS_PER_READ)?;
    if r.fds_truncated {
        // `r.fds` is dropped here: every fd that arrived is closed.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer sent more than {MAX_FDS_PER_READ} fds at once; they were closed"),
        ));
    }
    fds.extend(r.fds);
    Ok(r.bytes)
}

/// One `sendmsg` on a Unix stream socket with `fds` attached as
/// `SCM_RIGHTS`. Returns how many bytes were written (possibly fewer than
/// `buf.len()`; the fds always travel with the first byte written).
///
/// `MSG_NOSIGNAL`: a vanished supervisor is an `EPIPE` error, not a SIGPIPE.
pub(crate) fn send_with_fds(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(buf)];
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(errno)
}

/// Writes all of `buf` to a socket without a runtime, waiting (at most a
/// second at a time) for room if the socket is non-blocking and full. Used
/// for the first line on a fresh socket, where it never waits in practice.
pub(crate) fn write_all_blocking(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        match send_with_fds(fd, &buf[off..], &[]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = [PollFd::new(fd, PollFlags::POLLOUT)];
                match poll(&mut pfd, PollTimeout::from(1000u16)) {
                    Ok(0) => return Err(io::ErrorKind::TimedOut.into()),
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates an anonymous, sealable memory file (close-on-exec).
pub(crate) fn memfd(name: &str) -> io::Result<OwnedFd> {
    memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).map_err(errno)
}

/// The seals that make a file immutable: no write, no shrink, no grow.
pub(crate) fn immutable_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE
}

/// Seals a memfd against any change, including further sealing.
pub(crate) fn seal_immutable(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl(
        fd,
        FcntlArg::F_ADD_SEALS(immutable_seals() | SealFlag::F_SEAL_SEAL),
    )
    .map(drop)
    .map_err(errno)
}

/// The seals on a file (`EINVAL` for files that cannot be sealed).
pub(crate) fn seals(fd: BorrowedFd<'_>) -> io::Result<SealFlag> {
    fcntl(fd, FcntlArg::F_GET_SEALS)
        .map(SealFlag::from_bits_truncate)
        .map_err(errno)
}

/// Whether `fd` is a regular file (a memfd is one), and its size.
pub(crate) fn regular_file_size(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let st = fstat(fd).map_err(errno)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Ok(None);
    }
    Ok(Some(u64::try_from(st.st_size).unwrap_or(0)))
}

/// A read-only view of a whole sealed file, mapped into memory (no copy).
#[derive(Debug)]
pub(crate) struct SealedMap {
    ptr: NonNull<c_void>,
    len: usize,
}

impl SealedMap {
    /// Maps `fd`, which must be a non-empty regular file sealed against
    /// writes and shrinking (checked here: these seals are what make the
    /// mapping sound).
    pub(crate) fn new(fd: BorrowedFd<'_>) -> io::Result<SealedMap> {
        let needed = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK;
        if !seals(fd)?.contains(needed) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "file is not sealed against writes and shrinking",
            ));
        }
        let size = regular_file_size(fd)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"))?;
        let len = usize::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        let nz = NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "file is empty"))?;
        // SAFETY: a fresh private read-only mapping at an address the kernel
        // picks, so no existing memory is affected. The file is sealed
        // against writes and shrinking (checked above, and seals can never
        // be removed), so its content cannot change behind the mapping
        // (F_SEAL_WRITE also fails while a writable shared mapping exists)
        // and no page can become SIGBUS through truncation. `len` is the
        // file's size, so every mapped page is backed.
        let ptr = unsafe { mmap(None, nz, ProtFlags::PROT_READ, MapFlags::MAP_PRIVATE, fd, 0) }
            .map_err(errno)?;
        Ok(SealedMap { ptr, len })
    }

    /// The file's bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live PROT_READ mapping of exactly `len` bytes
        // (unmapped only in Drop, which needs `&mut self`), whose content
        // cannot change (see `new`). u8 has no alignment or validity
        // requirements.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for SealedMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `new`, and no
        // slice borrowed from it outlives `self`.
        if let Err(e) = unsafe { munmap(self.ptr, self.len) } {
            tracing::warn!(error = %e, "munmap of a snapshot failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn socket_info_describes_listeners_and_streams() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let info = socket_info(l.as_fd()).unwrap();
        assert_eq!(info.family, Some(AddressFamily::Inet));
        assert_eq!(info.ty, SockType::Stream);
        assert!(info.listening);

        let (a, _b) = UnixStream::pair().unwrap();
        let info = socket_info(a.as_fd()).unwrap();
        assert_eq!(info.family, Some(AddressFamily::Unix));
        assert!(!info.listening);
    }

    #[test]
    fn has_peer_tells_connected_streams_from_others() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(has_peer(a.as_fd()).unwrap());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!has_peer(l.as_fd()).unwrap());
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(has_peer(c.as_fd()).unwrap());
        // A stream socket that was never connected.
        let lone = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        assert!(!has_peer(lone.as_fd()).unwrap());
    }

    #[test]
    fn socket_info_rejects_non_sockets() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let err = socket_info(f.as_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOTSOCK));
    }

    #[test]
    fn fds_travel_with_data_and_arrive_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let payload = std::fs::File::open("/dev/null").unwrap();
        let n = send_with_fds(a.as_fd(), b"x\n", &[payload.as_fd()]).unwrap();
        assert_eq!(n, 2);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"x\n");
        assert_eq!(fds.len(), 1);
        let flags = fcntl(fds[0].as_fd(), FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        // It is the same file: /dev/null is a character device.
        let st = fstat(fds[0].as_fd()).unwrap();
        assert_eq!(
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT,
            SFlag::S_IFCHR
        );
    }

    #[test]
    fn sealed_memfd_maps_and_unsealed_does_not() {
        use std::io::Write;
        let fd = memfd("t").unwrap();
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        f.write_all(b"hello").unwrap();
        assert!(SealedMap::new(fd.as_fd()).is_err());
        seal_immutable(fd.as_fd()).unwrap();
        assert!(f.write_all(b"more").is_err());
        assert_eq!(regular_file_size(fd.as_fd()).unwrap(), Some(5));
        let m = SealedMap::new(fd.as_fd()).unwrap();
        assert_eq!(m.as_slice(), b"hello");
        // Regular files that cannot be sealed are refused too.
        let dev = std::fs::File::open("/dev/null").unwrap();
        assert!(SealedMap::new(dev.as_fd()).is_err());
        assert_eq!(regular_file_size(dev.as_fd()).unwrap(), None);
    }
}
