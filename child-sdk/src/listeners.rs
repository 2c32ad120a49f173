//! Inherited listeners by name, with a fallback bind when not inherited.

use std::fmt;
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{AddressFamily, SockType};

use crate::error::{Error, Result};
use crate::sys;

/// The inherited listeners, each taken at most once.
#[derive(Debug)]
pub(crate) struct Listeners {
    entries: Vec<(String, Option<OwnedFd>)>,
}

/// What kind of socket an inherited listener is (see
/// [`Baton::inherited_kind`](crate::Baton::inherited_kind)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenerKind {
    /// A TCP stream socket (IPv4 or IPv6): take it with
    /// [`Baton::tcp_incoming`](crate::Baton::tcp_incoming) or
    /// [`Baton::tcp_listener`](crate::Baton::tcp_listener).
    Tcp,
    /// A Unix stream socket: take it with
    /// [`Baton::unix_incoming`](crate::Baton::unix_incoming) or
    /// [`Baton::unix_listener`](crate::Baton::unix_listener).
    Unix,
    /// Anything else (a datagram socket, a FIFO, ...): only
    /// [`Baton::take_listener_fd`](crate::Baton::take_listener_fd) takes it.
    Other,
}

/// The socket a caller wants.
#[derive(Debug, Clone, Copy)]
enum Want {
    Tcp,
    Unix,
}

impl Listeners {
    pub(crate) fn new(inherited: Vec<(String, OwnedFd)>) -> Self {
        Listeners {
            entries: inherited.into_iter().map(|(n, fd)| (n, Some(fd))).collect(),
        }
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// The kind of the listener [`take`](Self::take) would return for
    /// `name`; `None` when there is none left of that name.
    pub(crate) fn kind(&self, name: &str) -> Option<ListenerKind> {
        let fd = self
            .entries
            .iter()
            .filter(|(n, _)| n == name)
            .find_map(|(_, fd)| fd.as_ref())?;
        // Not a socket at all (or unreadable): `Other`; taking it reports why.
        let Ok(info) = sys::socket_info(fd.as_fd()) else {
            return Some(ListenerKind::Other);
        };
        Some(match (info.ty, info.family) {
            (SockType::Stream, Some(AddressFamily::Inet | AddressFamily::Inet6)) => {
                ListenerKind::Tcp
            }
            (SockType::Stream, Some(AddressFamily::Unix)) => ListenerKind::Unix,
            _ => ListenerKind::Other,
        })
    }

    /// Takes the first untaken inherited listener called `name`.
    ///
    /// `Ok(None)` when none is called so; [`Error::ListenerTaken`] when all
    /// of that name were taken already.
    pub(crate) fn take(&mut self, name: &str) -> Result<Option<OwnedFd>> {
        let mut seen = false;
        for (n, fd) in &mut self.entries {
            if n == name {
                seen = true;
                if let Some(fd) = fd.take() {
                    return Ok(Some(fd));
                }
            }
        }
        if seen {
            Err(Error::ListenerTaken(name.to_owned()))
        } else {
            Ok(None)
        }
    }

    /// A TCP listener: the inherited one called `name`, else `fallback`
    /// freshly bound. The result is non-blocking, ready for tokio.
    pub(crate) fn tcp<A>(&mut self, name: &str, fallback: A) -> Result<std::net::TcpListener>
    where
        A: ToSocketAddrs + fmt::Display,
    {
        if let Some(fd) = self.take(name)? {
            let fd = check_inherited(name, fd, Want::Tcp)?;
            tracing::debug!(name, "using inherited TCP listener");
            return Ok(std::net::TcpListener::from(fd));
        }
        self.warn_fallback(name, &fallback);
        let bind_err = |source: io::Error| Error::Bind {
            name: name.to_owned(),
            addr: fallback.to_string(),
            source,
        };
        // std sets SO_REUSEADDR on Unix, so a restart does not trip over
        // TIME_WAIT.
        let l = std::net::TcpListener::bind(&fallback).map_err(bind_err)?;
        l.set_nonblocking(true).map_err(bind_err)?;
        Ok(l)
    }

    /// A Unix stream listener: the inherited one called `name`, else a new
    /// socket at `fallback` (a stale socket file left by a dead process is
    /// replaced; a live one is an error).
    pub(crate) fn unix(
        &mut self,
        name: &str,
        fallback: &Path,
    ) -> Result<std::os::unix::net::UnixListener> {
        if let Some(fd) = self.take(name)? {
            let fd = check_inherited(name, fd, Want::Unix)?;
            tracing::debug!(name, "using inherited Unix listener");
            return Ok(std::os::unix::net::UnixListener::from(fd));
        }
        self.warn_fallback(name, &fallback.display());
        let bind_err = |source: io::Error| Error::Bind {
            name: name.to_owned(),
            addr: fallback.display().to_string(),
            source,
        };
        remove_stale_socket(fallback).map_err(bind_err)?;
        let l = std::os::unix::net::UnixListener::bind(fallback).map_err(bind_err)?;
        l.set_nonblocking(true).map_err(bind_err)?;
        Ok(l)
    }

    fn warn_fallback(&self, name: &str, fallback: &dyn fmt::Display) {
        if self.entries.is_empty() {
            tracing::debug!(name, %fallback, "no inherited listeners: binding the fallback");
        } else {
            tracing::warn!(
                name,
                %fallback,
                inherited = ?self.names().collect::<Vec<_>>(),
                "no inherited listener of this name: binding the fallback"
            );
        }
    }
}

/// Checks an inherited fd is a listening stream socket of the right family,
/// and non-blocking.
fn check_inherited(name: &str, fd: OwnedFd, want: Want) -> Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let fail = |reason: String| Error::InheritedFd {
        fd: fd.as_raw_fd(),
        what: format!("listener {name:?}"),
        reason,
    };
    let info = sys::socket_info(fd.as_fd()).map_err(|e| fail(e.to_string()))?;
    let family_ok = match want {
        Want::Tcp => matches!(
            info.family,
            Some(AddressFamily::Inet | AddressFamily::Inet6)
        ),
        Want::Unix => info.family == Some(AddressFamily::Unix),
    };
    if !family_ok || info.ty != SockType::Stream || !info.listening {
        return Err(fail(format!(
            "expected a listening {want:?} stream socket, found {:?} {:?}{}",
            info.family,
            info.ty,
            if info.listening {
                ""
            } else {
                " (not listening)"
            }
        )));
    }
    let changed = sys::ensure_nonblocking(fd.as_fd()).map_err(|e| fail(e.to_string()))?;
    if changed {
        // Never happens under baton (it sets O_NONBLOCK at bind time); plain
        // systemd socket activation hands blocking sockets, and tokio needs
        // non-blocking ones. Setting (never clearing) it is safe for other
        // holders that poll.
        tracing::info!(name, "inherited listener was blocking: set O_NONBLOCK");
    }
    Ok(fd)
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("baton-listeners-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn inherited_listener_is_taken_by_name_once() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut ls = Listeners::new(vec![("http".to_owned(), OwnedFd::from(tcp))]);
        let l = ls.tcp("http", "127.0.0.1:1").unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        assert!(matches!(
            ls.tcp("http", "127.0.0.1:0"),
            Err(Error::ListenerTaken(n)) if n == "http"
        ));
    }

    #[test]
    fn inherited_listener_of_the_wrong_kind_is_rejected() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ls = Listeners::new(vec![("admin".to_owned(), OwnedFd::from(tcp))]);
        let dir = tmpdir("kind");
        assert!(matches!(
            ls.unix("admin", &dir.join("s")),
            Err(Error::InheritedFd { .. })
        ));

        // A connected stream is not a listener.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut ls = Listeners::new(vec![("admin".to_owned(), OwnedFd::from(a))]);
        assert!(matches!(
            ls.unix("admin", &dir.join("s")),
            Err(Error::InheritedFd { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kind_of_an_inherited_listener_by_name() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dir = tmpdir("kindof");
        let unix = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut ls = Listeners::new(vec![
            ("web".to_owned(), OwnedFd::from(tcp)),
            ("kv".to_owned(), OwnedFd::from(unix)),
            ("dns".to_owned(), OwnedFd::from(udp)),
            ("odd".to_owned(), OwnedFd::from(file)),
        ]);
        assert_eq!(ls.kind("web"), Some(ListenerKind::Tcp));
        assert_eq!(ls.kind("kv"), Some(ListenerKind::Unix));
        assert_eq!(ls.kind("dns"), Some(ListenerKind::Other));
        assert_eq!(ls.kind("odd"), Some(ListenerKind::Other));
        assert_eq!(ls.kind("nope"), None);
        // Once taken, there is nothing left to describe.
        ls.unix("kv", &dir.join("unused")).unwrap();
        assert_eq!(ls.kind("kv"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn blocking_inherited_listener_is_made_nonblocking() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ls = Listeners::new(vec![("http".to_owned(), OwnedFd::from(tcp))]);
        let l = ls.tcp("http", "127.0.0.1:0").unwrap();
        // A blocking accept would hang here; non-blocking says WouldBlock.
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn fallbacks_are_bound_when_not_inherited() {
        let mut ls = Listeners::new(Vec::new());
        let l = ls.tcp("http", "127.0.0.1:0").unwrap();
        assert!(l.local_addr().unwrap().port() != 0);

        let dir = tmpdir("fallback");
        let path = dir.join("admin.sock");
        // A stale socket file (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let u = ls.unix("admin", &path).unwrap();
        // A live one is not.
        assert!(matches!(
            Listeners::new(Vec::new()).unix("admin", &path),
            Err(Error::Bind { .. })
        ));
        drop(u);
        // Neither is a regular file.
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Listeners::new(Vec::new()).unix("admin", &file),
            Err(Error::Bind { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
