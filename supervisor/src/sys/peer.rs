//! Who is on the other end of the control socket, and the group it is shared with.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::libc;

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
