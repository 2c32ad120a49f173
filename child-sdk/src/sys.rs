//! Every `unsafe` block and raw fd / socket call of the crate.
//!
//! The rest of the crate only handles `OwnedFd` / `BorrowedFd` and calls the
//! small, checked functions here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::SealFlag;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::libc::c_void;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getpeername, getsockname, getsockopt,
    sockopt,
};
use nix::sys::stat::{SFlag, fstat};
use std::num::NonZeroUsize;
use std::ptr::NonNull;

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

/// Removes `var` from the environment.
///
/// # Safety
///
/// No other thread may read or write the environment meanwhile.
pub(crate) unsafe fn remove_env(var: &str) {
    // SAFETY: passed on to the caller (see above).
    unsafe { std::env::remove_var(var) };
}

/// The number of threads in this process (`/proc/self/status`), if it can be read.
pub(crate) fn thread_count() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Makes `cmd`'s child inherit `fd` as fd number `target` (without
/// close-on-exec). `fd` stays open in this process until `cmd` is dropped.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn pass_fd_as(cmd: &mut std::process::Command, fd: OwnedFd, target: RawFd) {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl); `fd` lives in the closure, so
    // its number is valid until the Command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            if raw == target {
                // dup2 onto itself keeps FD_CLOEXEC: clear it instead.
                if nix::libc::fcntl(raw, nix::libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if nix::libc::dup2(raw, target) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
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
