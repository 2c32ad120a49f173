//! sd_notify in (the children's `NOTIFY_SOCKET`) and out (baton to systemd).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UnixDatagram;

use crate::sys;

/// The datagram socket children send `READY=1` and friends to.
pub struct NotifyIn {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifyIn {
    /// Binds at `path`, replacing a stale socket file (never anything else).
    ///
    /// # Errors
    /// The path is taken by something that is not a socket, or bind failed.
    pub fn bind(path: &Path) -> io::Result<Self> {
        match sys::path_is_socket(path)? {
            Some(true) => std::fs::remove_file(path)?,
            Some(false) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            None => {}
        }
        let fd = sys::bind_notify_socket(path)?;
        Ok(NotifyIn {
            sock: UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))?,
            path: path.to_path_buf(),
        })
    }

    /// The socket a reexec handed over, bound at `path`.
    ///
    /// # Errors
    /// It cannot be registered with the runtime.
    pub fn from_handover(fd: std::os::fd::OwnedFd, path: PathBuf) -> io::Result<Self> {
        let std = std::os::unix::net::UnixDatagram::from(fd);
        std.set_nonblocking(true)?;
        Ok(NotifyIn {
            sock: UnixDatagram::from_std(std)?,
            path,
        })
    }

    /// The socket (for a reexec).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for one datagram: the sender's pid and its `KEY=VALUE` lines.
    ///
    /// # Errors
    /// A socket error other than "would block".
    pub async fn recv(&self) -> io::Result<(u32, String)> {
        let mut buf = vec![0u8; 4096];
        loop {
            self.sock.readable().await?;
            match self.sock.try_io(Interest::READABLE, || {
                sys::recv_notify(self.sock.as_fd(), &mut buf)
            }) {
                Ok((pid, n)) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    return Ok((u32::try_from(pid).unwrap_or(0), text));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for NotifyIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Parses a notify payload into `(key, value)` pairs.
pub fn parse(payload: &str) -> impl Iterator<Item = (&str, &str)> {
    payload.lines().filter_map(|l| l.split_once('='))
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parens: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Walks up from `pid` until `is_ours` matches (the pid itself counts), at most 32 steps.
pub fn owning_pid(pid: u32, is_ours: impl Fn(u32) -> bool) -> Option<u32> {
    let mut p = pid;
    for _ in 0..32 {
        if is_ours(p) {
            return Some(p);
        }
        p = ppid(p)?;
        if p <= 1 {
            return None;
        }
    }
    None
}

/// baton's own messages to systemd (a no-op when not started by systemd).
pub struct SystemdOut {
    addr: Option<String>,
    watchdog: Option<Duration>,
}

impl SystemdOut {
    /// Reads `NOTIFY_SOCKET` and the watchdog settings, and removes them from the
    /// environment so children don't talk to systemd directly.
    pub fn from_env() -> Self {
        let addr = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|a| !a.is_empty());
        let for_us = std::env::var("WATCHDOG_PID")
            .map(|p| p.parse::<u32>().ok() == Some(std::process::id()))
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && for_us)
            .map(Duration::from_micros);
        SystemdOut { addr, watchdog }
    }

    /// Whether systemd is listening.
    pub fn enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// How often to send `WATCHDOG=1` (half the systemd interval), if asked to.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends `msg` (newline-separated `KEY=VALUE`s).
    pub fn send(&self, msg: &str) {
        self.send_fds(msg, &[]);
    }

    /// Sends `msg` with fds attached (for `FDSTORE=1`).
    pub fn send_fds(&self, msg: &str, fds: &[BorrowedFd<'_>]) {
        if let Some(addr) = &self.addr {
            match sys::send_notify(addr, msg.as_bytes(), fds) {
                Ok(()) => {}
                // systemd itself going away (shutdown) is not baton's problem.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::debug!(error = %e, "sd_notify failed");
                }
                Err(e) => tracing::warn!(error = %e, "sd_notify failed"),
            }
        }
    }

    /// `RELOADING=1` with the timestamp systemd 253+ requires (older ones ignore it).
    pub fn reloading(&self, status: &str) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={}",
            sys::monotonic_usec(),
            crate::text::one_line(status)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_payload() {
        let v: Vec<_> = parse("READY=1\nSTATUS=hello world\nbogus\n").collect();
        assert_eq!(v, vec![("READY", "1"), ("STATUS", "hello world")]);
    }

    #[test]
    fn finds_self_and_parent() {
        let me = std::process::id();
        assert_eq!(owning_pid(me, |p| p == me), Some(me));
        let parent = ppid(me).unwrap();
        assert_eq!(owning_pid(me, |p| p == parent), Some(parent));
        assert_eq!(owning_pid(me, |_| false), None);
    }

    #[tokio::test]
    async fn receives_with_sender_pid() {
        let dir = std::env::temp_dir().join(format!("baton-nt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.sock");
        let n = NotifyIn::bind(&path).unwrap();
        sys::send_notify(path.to_str().unwrap(), b"READY=1", &[]).unwrap();
        let (pid, text) = n.recv().await.unwrap();
        assert_eq!(pid, std::process::id());
        assert_eq!(text, "READY=1");
        drop(n);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any datagram parses without panicking, and every pair it yields is a real
            /// `KEY=VALUE` line of it.
            #[test]
            fn any_payload_parses_to_its_own_lines(payload in "(?s).{0,400}") {
                for (k, v) in parse(&payload) {
                    let line = format!("{k}={v}");
                    prop_assert!(payload.lines().any(|l| l == line), "{:?} not a line of {:?}", line, payload);
                }
            }

            /// Well-formed assignments come back as written.
            #[test]
            fn assignments_come_back(pairs in prop::collection::vec(("[A-Z_]{1,12}", "[ -~&&[^=]]{0,30}"), 0..8)) {
                let payload: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
                let got: Vec<(String, String)> = parse(&payload).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
                prop_assert_eq!(got, pairs);
            }
        }
    }
}
