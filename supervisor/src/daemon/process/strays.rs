//! Without cgroups, a process that left its generation's process group (`setsid()`)
//! survives retirement. baton cannot kill it safely, but it can find it: a stray holds
//! one of baton's listening sockets and is neither baton nor in a live generation's tree.

use std::collections::BTreeSet;
use std::os::fd::AsFd;

use crate::daemon::io::listeners::Listener;

/// The socket inodes of `listeners`.
pub fn inodes(listeners: &[Listener]) -> BTreeSet<u64> {
    listeners
        .iter()
        .filter_map(|l| crate::sys::fd_inode(l.fd().as_fd()))
        .collect()
}

/// Processes other than baton that hold one of `inodes` and for which `ours` is false
/// (a live generation or one of its descendants). Reads `/proc/<pid>/fd`, which needs
/// the same uid or root: a stray is baton's own descendant, so that is enough.
pub fn holders(inodes: &BTreeSet<u64>, ours: impl Fn(u32) -> bool) -> Vec<u32> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || ours(pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|t| socket_inode(&t.to_string_lossy()))
                .is_some_and(|i| inodes.contains(&i))
        });
        if holds {
            out.push(pid);
        }
    }
    out
}

/// `socket:[1234]` → 1234.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Whether `pid` still exists.
pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_holding_the_socket_and_skips_ours() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = crate::sys::fd_inode(l.as_fd()).unwrap();
        let set = BTreeSet::from([inode]);
        // Only this process holds it, and baton never counts itself.
        assert!(holders(&set, |_| false).is_empty());
        assert_eq!(socket_inode("socket:[42]"), Some(42));
        assert_eq!(socket_inode("pipe:[42]"), None);
        assert!(alive(std::process::id()));
    }
}
