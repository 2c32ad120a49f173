//! Inherited listeners by name, with a fallback bind when not inherited.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{AddressFamily, SockType};

use crate::error::{Error, Result};
use crate::sys;

/// The inherited listeners, each taken at most once.
#[derive(Debug)]
pub(crate) struct Listeners {
    entries: Vec<(String, Option<OwnedFd>)>,
    /// Under baton: a name it did not pass is an error, not a fallback bind.
    supervised: bool,
}

/// A listening socket, ready for tokio (non-blocking).
#[derive(Debug)]
pub(crate) enum Listening {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listeners {
    pub(crate) fn new(inherited: Vec<(String, OwnedFd)>) -> Self {
        Listeners {
            entries: inherited.into_iter().map(|(n, fd)| (n, Some(fd))).collect(),
            supervised: false,
        }
    }

    /// Under baton, the fallback is only for running outside it: asking for a name baton
    /// did not pass is an error naming those it did. (A supervisor that passes no
    /// listener at all, as a test's fake one may, leaves the fallback on.)
    pub(crate) fn supervised(mut self, yes: bool) -> Self {
        self.supervised = yes;
        self
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
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

    /// The stream listener called `name`: the inherited one, whatever its
    /// kind (TCP or Unix), or else `fallback` freshly bound: `unix:PATH`
    /// for a Unix socket (a stale socket file is replaced), anything else
    /// as `HOST:PORT` (with `SO_REUSEADDR`).
    pub(crate) fn listen(&mut self, name: &str, fallback: &str) -> Result<Listening> {
        if let Some(fd) = self.take(name)? {
            let l = check_inherited(name, fd)?;
            match l {
                Listening::Tcp(_) => tracing::debug!(name, "using inherited TCP listener"),
                Listening::Unix(_) => tracing::debug!(name, "using inherited Unix listener"),
            }
            return Ok(l);
        }
        self.fallback_allowed(name, fallback)?;
        let bind_err = |source: io::Error| Error::Bind {
            name: name.to_owned(),
            addr: fallback.to_owned(),
            source,
        };
        if let Some(path) = fallback.strip_prefix("unix:") {
            let path = Path::new(path);
            remove_stale_socket(path).map_err(bind_err)?;
            let l = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
            l.set_nonblocking(true).map_err(bind_err)?;
            return Ok(Listening::Unix(l));
        }
        // std sets SO_REUSEADDR on Unix, so a restart does not trip over
        // TIME_WAIT.
        let l = std::net::TcpListener::bind(fallback).map_err(bind_err)?;
        l.set_nonblocking(true).map_err(bind_err)?;
        Ok(Listening::Tcp(l))
    }

    /// The UDP socket called `name`: the inherited one, or else `fallback`
    /// (`HOST:PORT`) freshly bound. Non-blocking either way.
    pub(crate) fn udp(&mut self, name: &str, fallback: &str) -> Result<std::net::UdpSocket> {
        if let Some(fd) = self.take(name)? {
            return check_inherited_udp(name, fd);
        }
        self.fallback_allowed(name, fallback)?;
        let bind_err = |source: io::Error| Error::Bind {
            name: name.to_owned(),
            addr: fallback.to_owned(),
            source,
        };
        let s = std::net::UdpSocket::bind(fallback).map_err(bind_err)?;
        s.set_nonblocking(true).map_err(bind_err)?;
        Ok(s)
    }

    fn fallback_allowed(&self, name: &str, fallback: &str) -> Result<()> {
        if self.supervised && !self.entries.is_empty() {
            let passed: Vec<String> = self.names().map(|n| format!("{n:?}")).collect();
            return Err(Error::UnknownListener {
                name: name.to_owned(),
                passed: passed.join(", "),
            });
        }
        if self.entries.is_empty() {
            tracing::debug!(
                name,
                fallback,
                "no inherited listeners: binding the fallback"
            );
        } else {
            tracing::warn!(
                name,
                fallback,
                inherited = ?self.names().collect::<Vec<_>>(),
                "no inherited listener of this name: binding the fallback"
            );
        }
        Ok(())
    }
}

/// Checks an inherited fd is a listening TCP or Unix stream socket, and
/// makes it non-blocking.
fn check_inherited(name: &str, fd: OwnedFd) -> Result<Listening> {
    use std::os::fd::AsRawFd;
    let fail = |reason: String| Error::InheritedFd {
        fd: fd.as_raw_fd(),
        what: format!("listener {name:?}"),
        reason,
    };
    let info = sys::socket_info(fd.as_fd()).map_err(|e| fail(e.to_string()))?;
    let unix = match info.family {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => false,
        Some(AddressFamily::Unix) => true,
        _ => return Err(fail(format!("not a TCP or Unix socket: {info:?}"))),
    };
    if info.ty != SockType::Stream || !info.listening {
        return Err(fail(format!(
            "expected a listening stream socket, found {:?} {:?}{}",
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
    Ok(if unix {
        Listening::Unix(fd.into())
    } else {
        Listening::Tcp(fd.into())
    })
}

/// Checks an inherited fd is a UDP socket, and makes it non-blocking.
fn check_inherited_udp(name: &str, fd: OwnedFd) -> Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let fail = |reason: String| Error::InheritedFd {
        fd: fd.as_raw_fd(),
        what: format!("UDP socket {name:?}"),
        reason,
    };
    let info = sys::socket_info(fd.as_fd()).map_err(|e| fail(e.to_string()))?;
    let inet = matches!(
        info.family,
        Some(AddressFamily::Inet | AddressFamily::Inet6)
    );
    if !inet || info.ty != SockType::Datagram {
        return Err(fail(format!(
            "expected a UDP socket, found {:?} {:?}",
            info.family, info.ty
        )));
    }
    // As for stream listeners: set, never clear, O_NONBLOCK on the shared socket.
    sys::ensure_nonblocking(fd.as_fd()).map_err(|e| fail(e.to_string()))?;
    Ok(fd.into())
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

    fn as_tcp(l: Result<Listening>) -> std::net::TcpListener {
        match l {
            Ok(Listening::Tcp(l)) => l,
            other => panic!("expected TCP, got {other:?}"),
        }
    }

    #[test]
    fn udp_sockets_are_taken_by_type() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = u.local_addr().unwrap();
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ls = Listeners::new(vec![
            ("dns".to_owned(), OwnedFd::from(u)),
            ("http".to_owned(), OwnedFd::from(t)),
        ]);
        assert_eq!(
            ls.udp("dns", "127.0.0.1:0").unwrap().local_addr().unwrap(),
            addr
        );
        // A stream listener is not a UDP socket, nor the other way round.
        let e = ls.udp("http", "127.0.0.1:0").unwrap_err().to_string();
        assert!(e.contains("expected a UDP socket"), "{e}");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ls = Listeners::new(vec![("dns".to_owned(), OwnedFd::from(u))]);
        let e = ls.listen("dns", "127.0.0.1:0").unwrap_err().to_string();
        assert!(e.contains("Datagram"), "{e}");
        // Not inherited: the fallback is bound.
        let mut ls = Listeners::new(vec![]);
        assert!(ls.udp("dns", "127.0.0.1:0").is_ok());
    }

    #[test]
    fn inherited_listener_is_taken_by_name_once_whatever_the_fallback() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut ls = Listeners::new(vec![("http".to_owned(), OwnedFd::from(l))]);
        // The inherited kind wins over the fallback's.
        let l = as_tcp(ls.listen("http", "unix:/nonexistent/x.sock"));
        assert_eq!(l.local_addr().unwrap(), addr);
        assert!(matches!(
            ls.listen("http", "127.0.0.1:0"),
            Err(Error::ListenerTaken(n)) if n == "http"
        ));
    }

    #[test]
    fn inherited_non_listeners_are_rejected() {
        let dir = tmpdir("kind");
        // A connected stream is not a listener; neither is UDP or a file.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut ls = Listeners::new(vec![
            ("a".to_owned(), OwnedFd::from(a)),
            ("b".to_owned(), OwnedFd::from(udp)),
            ("c".to_owned(), OwnedFd::from(file)),
        ]);
        for name in ["a", "b", "c"] {
            assert!(
                matches!(
                    ls.listen(name, "127.0.0.1:0"),
                    Err(Error::InheritedFd { .. })
                ),
                "{name}"
            );
        }
        let unix = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        let mut ls = Listeners::new(vec![("kv".to_owned(), OwnedFd::from(unix))]);
        assert!(matches!(
            ls.listen("kv", "127.0.0.1:0"),
            Ok(Listening::Unix(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn under_baton_a_name_it_did_not_pass_is_an_error_naming_those_it_did() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ls = Listeners::new(vec![("web".to_owned(), OwnedFd::from(l))]).supervised(true);
        match ls.listen("http", "127.0.0.1:0") {
            Err(e @ Error::UnknownListener { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("\"http\"") && text.contains("\"web\""),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ls = Listeners::new(vec![("echo".to_owned(), OwnedFd::from(u))]).supervised(true);
        assert!(matches!(
            ls.udp("udp", "127.0.0.1:0"),
            Err(Error::UnknownListener { .. })
        ));
        // Outside baton the fallback is bound, as before.
        let mut ls = Listeners::new(Vec::new());
        assert!(matches!(
            ls.listen("http", "127.0.0.1:0"),
            Ok(Listening::Tcp(_))
        ));
    }

    #[test]
    fn blocking_inherited_listener_is_made_nonblocking() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ls = Listeners::new(vec![("http".to_owned(), OwnedFd::from(l))]);
        let l = as_tcp(ls.listen("http", "127.0.0.1:0"));
        // A blocking accept would hang here; non-blocking says WouldBlock.
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn fallbacks_are_bound_when_not_inherited() {
        let mut ls = Listeners::new(Vec::new());
        let l = as_tcp(ls.listen("http", "127.0.0.1:0"));
        assert!(l.local_addr().unwrap().port() != 0);
        assert!(matches!(
            ls.listen("x", "not an address"),
            Err(Error::Bind { .. })
        ));

        let dir = tmpdir("fallback");
        let path = dir.join("admin.sock");
        let fallback = format!("unix:{}", path.display());
        // A stale socket file (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let u = ls.listen("admin", &fallback).unwrap();
        assert!(matches!(u, Listening::Unix(_)));
        // A live one is not.
        assert!(matches!(
            Listeners::new(Vec::new()).listen("admin", &fallback),
            Err(Error::Bind { .. })
        ));
        drop(u);
        // Neither is a regular file.
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Listeners::new(Vec::new()).listen("admin", &format!("unix:{}", file.display())),
            Err(Error::Bind { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
