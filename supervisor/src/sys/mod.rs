//! Every `unsafe` block and raw fd / libc call of the supervisor lives here, in one
//! file per topic: `socket.rs` (listeners and inherited fds), `notify.rs` (the notify
//! socket), `peer.rs` (control socket peers), `process.rs` (signals, limits, `/proc`),
//! `exec.rs` (between fork and exec), `clone.rs` (clone3 into a cgroup), `guard.rs`
//! (the guardian that outlives baton), `reexec.rs` (the calls only a reexec makes) and
//! `sched.rs` (nice and scheduling). No other module of the crate may use `unsafe`.
#![allow(unsafe_code)]

mod clone;
mod exec;
mod guard;
mod notify;
mod peer;
mod process;
mod reexec;
mod sched;
mod socket;
pub use clone::*;
pub use exec::*;
pub use guard::*;
pub use notify::*;
pub use peer::*;
pub use process::*;
pub use reexec::*;
pub use sched::*;
pub use socket::*;

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::fcntl::{FcntlArg, OFlag, fcntl};

    use super::*;

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
