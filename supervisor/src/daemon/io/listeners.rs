//! Named listening sockets: parse `NAME=ADDR`, inherit from systemd, bind the rest.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use baton_protocol::{ENV_LISTEN_FDNAMES, ENV_LISTEN_FDS, ENV_LISTEN_PID, LISTEN_FDS_START};

use crate::sys::{self, SocketKind};

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ListenAddr {
    /// TCP on this address.
    Tcp(SocketAddr),
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A UDP socket bound to this address (shared by every generation: each reads
    /// the one kernel receive buffer).
    Udp(SocketAddr),
}

impl ListenAddr {
    /// Whether it is a datagram socket (no `listen()`, no connections).
    pub fn is_datagram(&self) -> bool {
        matches!(self, ListenAddr::Udp(_))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

/// One `--listen NAME=ADDR`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListenSpec {
    /// The name the child looks the socket up by (`LISTEN_FDNAMES`).
    pub name: String,
    /// Where to bind it.
    pub addr: ListenAddr,
}

/// Errors about listeners; each names the listener and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// `--listen` was not `NAME=ADDR`.
    #[error("invalid --listen '{spec}': {why}")]
    Parse {
        /// The text as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// Two listeners share a name.
    #[error("listener name '{0}' is given twice")]
    Duplicate(String),
    /// Binding failed (address in use, permission, ...).
    #[error("cannot listen on {addr} for '{name}': {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: ListenAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Unix socket path exists and is not a socket: never removed.
    #[error("cannot listen on unix:{} for '{name}': the path exists and is not a socket (refusing to remove it)", path.display())]
    NotASocket {
        /// Listener name.
        name: String,
        /// The path.
        path: PathBuf,
    },
    /// Another process is listening on the Unix socket path.
    #[error("cannot listen on unix:{} for '{name}': another process is listening there", path.display())]
    UnixInUse {
        /// Listener name.
        name: String,
        /// The path.
        path: PathBuf,
    },
    /// An inherited fd failed validation.
    #[error("inherited fd {fd} ('{name}') is unusable: {why}")]
    BadInherited {
        /// fd number.
        fd: i32,
        /// Its `LISTEN_FDNAMES` name.
        name: String,
        /// Why.
        why: String,
    },
    /// `LISTEN_FDS` and friends are malformed.
    #[error("bad socket activation environment: {0}")]
    BadEnv(String),
}

impl ListenSpec {
    /// Parses `NAME=ADDR`, ADDR being `HOST:PORT`, `[V6]:PORT`, `unix:PATH` or
    /// `udp:HOST:PORT` (`udp:[V6]:PORT`).
    ///
    /// # Errors
    /// [`ListenError::Parse`] naming the spec and the problem.
    pub fn parse(s: &str) -> Result<Self, ListenError> {
        let err = |why: &str| ListenError::Parse {
            spec: s.to_string(),
            why: why.to_string(),
        };
        let (name, addr) = s
            .split_once('=')
            .ok_or_else(|| err("expected NAME=ADDR, e.g. http=127.0.0.1:8080"))?;
        validate_name(name).map_err(|why| err(&why))?;
        let addr = if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("unix: needs a path"));
            }
            ListenAddr::Unix(PathBuf::from(path))
        } else if let Some(addr) = addr.strip_prefix("udp:") {
            ListenAddr::Udp(addr.parse().map_err(|_| {
                err("udp: needs HOST:PORT with an IP address (e.g. udp:127.0.0.1:5353, udp:[::1]:5353)")
            })?)
        } else {
            ListenAddr::Tcp(addr.parse().map_err(|_| {
                err("ADDR must be HOST:PORT with an IP address (e.g. 127.0.0.1:8080, [::1]:8080), unix:PATH or udp:HOST:PORT")
            })?)
        };
        Ok(ListenSpec {
            name: name.to_string(),
            addr,
        })
    }
}

/// A name is what `LISTEN_FDNAMES` can carry: no `:` and printable ASCII.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("NAME must be 1 to 255 characters".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b':' && b != b'=')
    {
        return Err("NAME may hold printable ASCII except ':' and '='".into());
    }
    Ok(())
}

/// A listening socket baton holds for the whole of its life.
#[derive(Debug)]
pub struct Listener {
    /// Its name.
    pub name: String,
    /// What it is bound to (the real port when `:0` was asked for).
    pub addr: ListenAddr,
    /// Came from systemd (socket unit or fd store) rather than bound by baton.
    pub inherited: bool,
    fd: OwnedFd,
    /// A Unix socket file baton created, with its (dev, inode): removed on drop if
    /// it is still that file, so a failed start or a stop leaves nothing behind.
    bound_file: Option<(PathBuf, (u64, u64))>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, id)) = &self.bound_file {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if (m.dev(), m.ino()) == *id {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

impl Listener {
    /// A listener a reexec handed over, with the socket file baton bound (if any).
    pub fn from_handover(
        name: String,
        addr: ListenAddr,
        inherited: bool,
        fd: OwnedFd,
        bound_file: Option<(PathBuf, (u64, u64))>,
    ) -> Self {
        Listener {
            name,
            addr,
            inherited,
            fd,
            bound_file,
        }
    }

    /// The socket file baton bound, with its (dev, inode).
    pub fn bound_file(&self) -> Option<&(PathBuf, (u64, u64))> {
        self.bound_file.as_ref()
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Options for binding.
#[derive(Debug, Clone, Copy)]
pub struct BindOptions {
    /// listen(2) backlog.
    pub backlog: i32,
    /// Mode of Unix socket files.
    pub unix_mode: Option<u32>,
}

/// Takes the sockets systemd passed (if `LISTEN_PID` is ours), matches them to
/// `specs` by name, and binds the rest. Inherited sockets with names not in `specs`
/// are kept too, under their own names.
///
/// # Errors
/// The first listener that cannot be inherited or bound; nothing is left bound.
pub fn open_all(specs: &[ListenSpec], opts: BindOptions) -> Result<Vec<Listener>, ListenError> {
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(ListenError::Duplicate(s.name.clone()));
        }
    }
    let mut out = inherit_from_env()?;
    for l in &out {
        if let Some(spec) = specs.iter().find(|s| s.name == l.name) {
            if !same_kind(&spec.addr, &l.addr) {
                return Err(ListenError::BadInherited {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&l.fd()),
                    name: l.name.clone(),
                    why: format!("it is {} but --listen asks for {}", l.addr, spec.addr),
                });
            }
        }
    }
    for spec in specs {
        if out.iter().any(|l| l.name == spec.name) {
            continue;
        }
        out.push(bind_one(spec, opts)?);
    }
    Ok(out)
}

/// Binds baton's own metrics socket (never passed to a child).
///
/// # Errors
/// As for a listener: in use, permission, a path that is not a socket.
pub fn bind_own(spec: &ListenSpec, opts: BindOptions) -> Result<Listener, ListenError> {
    bind_one(spec, opts)
}

fn same_kind(a: &ListenAddr, b: &ListenAddr) -> bool {
    match (a, b) {
        (ListenAddr::Tcp(x), ListenAddr::Tcp(y)) => x.is_ipv4() == y.is_ipv4(),
        (ListenAddr::Unix(_), ListenAddr::Unix(_)) => true,
        (ListenAddr::Udp(x), ListenAddr::Udp(y)) => x.is_ipv4() == y.is_ipv4(),
        _ => false,
    }
}

fn bind_one(spec: &ListenSpec, opts: BindOptions) -> Result<Listener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        name: spec.name.clone(),
        addr: spec.addr.clone(),
        source,
    };
    match &spec.addr {
        ListenAddr::Tcp(addr) | ListenAddr::Udp(addr) => {
            let udp = spec.addr.is_datagram();
            let fd = if udp {
                sys::bind_udp(*addr)
            } else {
                sys::bind_tcp(*addr, opts.backlog)
            }
            .map_err(bind_err)?;
            // The real port when `:0` was asked for.
            let real = match sys::inspect_listener(fd.as_fd()) {
                Ok(SocketKind::Tcp(a) | SocketKind::Udp(a)) => a,
                _ => *addr,
            };
            Ok(Listener {
                name: spec.name.clone(),
                addr: if udp {
                    ListenAddr::Udp(real)
                } else {
                    ListenAddr::Tcp(real)
                },
                inherited: false,
                fd,
                bound_file: None,
            })
        }
        ListenAddr::Unix(path) => {
            remove_stale_unix(&spec.name, path)?;
            let fd = sys::bind_unix(path, opts.backlog).map_err(bind_err)?;
            let id = {
                use std::os::unix::fs::MetadataExt;
                std::fs::symlink_metadata(path)
                    .map(|m| (m.dev(), m.ino()))
                    .map_err(bind_err)?
            };
            let listener = Listener {
                name: spec.name.clone(),
                addr: spec.addr.clone(),
                inherited: false,
                fd,
                bound_file: Some((path.clone(), id)),
            };
            if let Some(mode) = opts.unix_mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(bind_err)?;
            }
            Ok(listener)
        }
    }
}

/// Removes a leftover socket file, but only a socket nobody listens on.
fn remove_stale_unix(name: &str, path: &Path) -> Result<(), ListenError> {
    match sys::path_is_socket(path) {
        Ok(None) => Ok(()),
        Ok(Some(false)) => Err(ListenError::NotASocket {
            name: name.into(),
            path: path.into(),
        }),
        Ok(Some(true)) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::UnixInUse {
                    name: name.into(),
                    path: path.into(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ListenError::Bind {
                name: name.into(),
                addr: ListenAddr::Unix(path.into()),
                source,
            })
        }
        Err(source) => Err(ListenError::Bind {
            name: name.into(),
            addr: ListenAddr::Unix(path.into()),
            source,
        }),
    }
}

/// Takes systemd's `LISTEN_FDS` if they are meant for this process. Duplicate names
/// (a socket unit and the fd store both passing `http`) keep the first.
fn inherit_from_env() -> Result<Vec<Listener>, ListenError> {
    let Ok(count) = std::env::var(ENV_LISTEN_FDS) else {
        return Ok(Vec::new());
    };
    let for_us = std::env::var(ENV_LISTEN_PID)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    if !for_us {
        return Ok(Vec::new());
    }
    let count: i32 = count
        .parse()
        .map_err(|_| ListenError::BadEnv(format!("{ENV_LISTEN_FDS}={count} is not a number")))?;
    let names: Vec<String> = std::env::var(ENV_LISTEN_FDNAMES)
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out: Vec<Listener> = Vec::new();
    for i in 0..count {
        let fd_num = LISTEN_FDS_START + i;
        let name = names
            .get(i as usize)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| "unknown".to_string());
        let fd = sys::take_inherited_fd(fd_num).ok_or_else(|| ListenError::BadInherited {
            fd: fd_num,
            name: name.clone(),
            why: "not open".into(),
        })?;
        sys::set_cloexec(fd.as_fd()).map_err(|e| ListenError::BadInherited {
            fd: fd_num,
            name: name.clone(),
            why: e.to_string(),
        })?;
        let kind = sys::inspect_listener(fd.as_fd()).map_err(|why| ListenError::BadInherited {
            fd: fd_num,
            name: name.clone(),
            why,
        })?;
        if out.iter().any(|l| l.name == name) {
            tracing::debug!(
                fd = fd_num,
                name,
                "duplicate inherited listener name; closing"
            );
            continue;
        }
        sys::set_nonblocking(fd.as_fd()).map_err(|e| ListenError::BadInherited {
            fd: fd_num,
            name: name.clone(),
            why: e.to_string(),
        })?;
        let addr = match kind {
            SocketKind::Tcp(a) => ListenAddr::Tcp(a),
            SocketKind::Unix(p) => ListenAddr::Unix(p.unwrap_or_else(|| PathBuf::from("@"))),
            SocketKind::Udp(a) => ListenAddr::Udp(a),
        };
        tracing::info!(fd = fd_num, name, %addr, "inherited listener");
        out.push(Listener {
            name,
            addr,
            inherited: true,
            fd,
            bound_file: None,
        });
    }
    // So that nothing we exec later mistakes these for its own.
    for var in [ENV_LISTEN_FDS, ENV_LISTEN_FDNAMES, ENV_LISTEN_PID] {
        sys::remove_env_at_startup(var);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = ListenSpec::parse("http=127.0.0.1:8080").unwrap();
        assert_eq!(s.name, "http");
        assert_eq!(s.addr, ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()));
        let s = ListenSpec::parse("v6=[::1]:0").unwrap();
        assert_eq!(s.addr, ListenAddr::Tcp("[::1]:0".parse().unwrap()));
        let s = ListenSpec::parse("admin=unix:/run/x.sock").unwrap();
        assert_eq!(s.addr, ListenAddr::Unix("/run/x.sock".into()));
        let s = ListenSpec::parse("dns=udp:127.0.0.1:5353").unwrap();
        assert_eq!(s.addr, ListenAddr::Udp("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(s.addr.to_string(), "udp:127.0.0.1:5353");
        let s = ListenSpec::parse("dns=udp:[::1]:0").unwrap();
        assert_eq!(s.addr, ListenAddr::Udp("[::1]:0".parse().unwrap()));
    }

    #[test]
    fn binds_udp_and_reports_the_real_port() {
        let spec = ListenSpec::parse("dns=udp:127.0.0.1:0").unwrap();
        let opts = BindOptions {
            backlog: 16,
            unix_mode: None,
        };
        let l = bind_one(&spec, opts).unwrap();
        let ListenAddr::Udp(a) = l.addr else {
            panic!("{:?}", l.addr)
        };
        assert_ne!(a.port(), 0);
        // Taken: a second bind of the same port names the listener.
        let again = ListenSpec::parse(&format!("dns2=udp:{a}")).unwrap();
        let e = bind_one(&again, opts).unwrap_err().to_string();
        assert!(e.contains("dns2") && e.contains(&a.to_string()), "{e}");
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "http",
            "=127.0.0.1:1",
            "http=nohost",
            "http=localhost:80",
            "a:b=127.0.0.1:1",
            "http=unix:",
            "http=127.0.0.1:99999",
            "dns=udp:",
            "dns=udp:localhost:53",
            "dns=udp:unix:/x",
        ] {
            let e = ListenSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn refuses_to_remove_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("baton-lt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("file");
        std::fs::write(&p, b"keep me").unwrap();
        let spec = ListenSpec {
            name: "u".into(),
            addr: ListenAddr::Unix(p.clone()),
        };
        let opts = BindOptions {
            backlog: 16,
            unix_mode: None,
        };
        let e = bind_one(&spec, opts).unwrap_err();
        assert!(matches!(e, ListenError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        // A stale socket file (nobody listening) is replaced.
        let s = dir.join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&s).unwrap());
        let spec = ListenSpec {
            name: "u".into(),
            addr: ListenAddr::Unix(s.clone()),
        };
        let l = bind_one(&spec, opts).unwrap();
        assert!(sys::is_listening(l.fd()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::net::SocketAddr;

        proptest! {
            /// No `--listen` value panics the parser; an error names the spec.
            #[test]
            fn any_spec_parses_or_names_itself(spec in "(?s).{0,80}") {
                if let Err(e) = ListenSpec::parse(&spec) {
                    prop_assert!(e.to_string().contains(&spec) || spec.contains('\n'), "{}", e);
                }
            }

            /// `NAME=HOST:PORT` and `NAME=unix:PATH` come back as given.
            #[test]
            fn valid_specs_round_trip(
                name in "[a-z][a-z0-9_-]{0,15}",
                // (ip, port) only: flow info and scope ids are not part of the syntax.
                addr in (any::<std::net::IpAddr>(), any::<u16>()).prop_map(SocketAddr::from),
                path in "/[a-zA-Z0-9_./-]{1,40}",
            ) {
                let s = ListenSpec::parse(&format!("{name}={addr}")).unwrap();
                prop_assert_eq!(&s.name, &name);
                prop_assert_eq!(s.addr, ListenAddr::Tcp(addr));
                let u = ListenSpec::parse(&format!("{name}=unix:{path}")).unwrap();
                prop_assert_eq!(u.addr, ListenAddr::Unix(PathBuf::from(&path)));
            }
        }
    }
}
