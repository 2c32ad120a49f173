//! Every `unsafe` block and raw socket call of the crate: one `recvmsg`
//! that owns every fd it receives, and one `sendmsg` with `SCM_RIGHTS`.
#![allow(unsafe_code)]

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc::c_void;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// At most this many fds are accepted per `recvmsg`. The supervisor sends at
/// most one per message, and Linux never merges the fds of two `sendmsg`s
/// into one read, so this is generous.
const MAX_FDS_PER_READ: usize = 16;

fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::stat::{SFlag, fstat};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

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
}
