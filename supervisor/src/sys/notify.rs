//! The notify socket: `sd_notify` datagrams in (with fds refused), and out to
//! systemd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use nix::libc;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, bind, setsockopt, socket, sockopt,
};

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
