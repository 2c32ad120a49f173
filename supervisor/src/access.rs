//! Who may reach baton's sockets: the directory checks that stop another user from
//! planting a socket where baton or its client looks, and the peer check.
//!
//! The rule, for the control socket's directory and every directory above it: owned
//! by this uid or root, and not writable by group or others unless sticky (as `/tmp`
//! is: only a file's owner may replace it there). A symlink on the way must be owned
//! by this uid or root too. The same checks run in `baton run` and in every client
//! command, so neither side talks to a socket another user could have put there.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::sys;

const STICKY: u32 = 0o1000;

/// A failed check: the path could be another user's, or could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Another user could control the path (one line, naming it).
    #[error("{0}")]
    Unsafe(String),
    /// The path could not be inspected.
    #[error("{}: {source}", path.display())]
    Io {
        /// What was inspected.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl CheckError {
    fn io(path: &Path, source: io::Error) -> Self {
        CheckError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<CheckError> for io::Error {
    fn from(e: CheckError) -> Self {
        let kind = match &e {
            CheckError::Unsafe(_) => io::ErrorKind::PermissionDenied,
            CheckError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e.to_string())
    }
}

fn trusted_owner(uid: u32, me: u32) -> bool {
    uid == me || uid == 0
}

/// Checks one directory's owner and mode.
fn check_dir_meta(dir: &Path, m: &std::fs::Metadata, me: u32) -> Result<(), CheckError> {
    if !trusted_owner(m.uid(), me) {
        return Err(CheckError::Unsafe(format!(
            "refusing {}: it is owned by uid {}, not by uid {me} or root (another user could replace what baton keeps there)",
            dir.display(),
            m.uid()
        )));
    }
    let mode = m.mode();
    if mode & 0o022 != 0 && mode & STICKY == 0 {
        return Err(CheckError::Unsafe(format!(
            "refusing {}: mode {:04o} lets other users replace what baton keeps there (chmod go-w, or add the sticky bit)",
            dir.display(),
            mode & 0o7777
        )));
    }
    Ok(())
}

/// Checks `dir` (which must exist) and every directory above it; returns `dir`'s
/// metadata.
///
/// # Errors
/// [`CheckError::Unsafe`] naming the first directory or symlink another user
/// controls, or an I/O error reading them.
pub fn check_dir(dir: &Path) -> Result<std::fs::Metadata, CheckError> {
    let me = sys::getuid();
    // Symlinks on the way, as written: each must belong to us or root.
    let mut walked = PathBuf::new();
    for c in dir.components() {
        walked.push(c);
        if matches!(c, Component::Normal(_)) {
            let m = std::fs::symlink_metadata(&walked).map_err(|e| CheckError::io(&walked, e))?;
            if m.file_type().is_symlink() && !trusted_owner(m.uid(), me) {
                return Err(CheckError::Unsafe(format!(
                    "refusing {}: it is a symlink owned by uid {}",
                    walked.display(),
                    m.uid()
                )));
            }
        }
    }
    let real = std::fs::canonicalize(dir).map_err(|e| CheckError::io(dir, e))?;
    let mut own = None;
    for d in real.ancestors() {
        let m = std::fs::metadata(d).map_err(|e| CheckError::io(d, e))?;
        check_dir_meta(d, &m, me)?;
        own.get_or_insert(m);
    }
    // `ancestors()` yields `real` itself first, so `own` is set.
    own.ok_or_else(|| CheckError::io(dir, io::ErrorKind::NotFound.into()))
}

/// The directory a socket path lives in (`.` for a bare file name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// For `baton run`: creates the socket's directory if missing (mode 0700, or 0750
/// with `group` as its group), then checks it and everything above it.
///
/// # Errors
/// The directory cannot be created, or [`check_dir`] refuses it.
pub fn prepare_dir(socket: &Path, group: Option<u32>) -> io::Result<()> {
    let dir = parent_of(socket);
    if !dir.exists() {
        if let Some(up) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(up)?;
        }
        let mode = if group.is_some() { 0o750 } else { 0o700 };
        // Created with its final mode: no window in which it is more open.
        match std::fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {
                if let Some(gid) = group {
                    sys::chown_group(dir, gid)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    check_dir(dir)?;
    Ok(())
}

/// Creates `dir` if missing (mode 0700; its parents as usual), then checks it and
/// everything above it ([`check_dir`]): for baton's state directory.
///
/// # Errors
/// It cannot be created, or [`check_dir`] refuses it.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        if let Some(up) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(up)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    check_dir(dir)?;
    Ok(())
}

/// For clients: checks the socket's directory, and that the socket itself belongs
/// to us, root, or the directory's owner.
///
/// # Errors
/// [`CheckError`] when another user could have put the socket there.
pub fn check_client(socket: &Path) -> Result<(), CheckError> {
    let dir_owner = check_dir(parent_of(socket))?.uid();
    let me = sys::getuid();
    match std::fs::symlink_metadata(socket) {
        Ok(m) if !trusted_owner(m.uid(), me) && m.uid() != dir_owner => {
            Err(CheckError::Unsafe(format!(
                "refusing {}: it is owned by uid {}, not by uid {me}, root or the directory's owner",
                socket.display(),
                m.uid()
            )))
        }
        // A missing socket is for `connect` to report.
        _ => Ok(()),
    }
}

/// Whether a peer with these credentials may use the control socket: this uid, root,
/// or (with `--control-group`) a member of that group.
pub fn peer_allowed(uid: u32, gids: &[u32], group: Option<u32>) -> bool {
    trusted_owner(uid, sys::getuid()) || group.is_some_and(|g| gids.contains(&g))
}

/// Reads a small regular file: never blocks on a FIFO or a device (opened
/// non-blocking, then checked), and never reads more than `limit` bytes.
///
/// # Errors
/// It cannot be opened or read, is not a regular file, or is larger than `limit`.
pub fn read_small_file(path: &Path, limit: u64) -> io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the {limit} a file here may have",
                meta.len()
            ),
        ));
    }
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "grew past its size limit",
        ));
    }
    Ok(text)
}

/// The default control socket path: `$XDG_RUNTIME_DIR/baton.sock`, else
/// `/run/baton/baton.sock` for root, else `/tmp/baton-$UID/baton.sock`.
pub fn default_control_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("baton.sock"),
        _ if sys::getuid() == 0 => PathBuf::from("/run/baton/baton.sock"),
        _ => PathBuf::from(format!("/tmp/baton-{}/baton.sock", sys::getuid())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("baton-access-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    #[test]
    fn accepts_private_and_sticky_dirs() {
        let d = tmp("ok");
        check_dir(&d).unwrap();
        // The temp dir itself is sticky and world-writable, as /tmp is.
        check_dir(&std::env::temp_dir()).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_world_writable_dir_without_sticky_bit() {
        let d = tmp("open");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_dir(&d).unwrap_err();
        assert!(e.to_string().contains("mode 0777"), "{e}");
        let e = check_client(&d.join("baton.sock")).unwrap_err();
        assert!(e.to_string().contains("refusing"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn creates_missing_dir_private() {
        let d = tmp("mk");
        let sock = d.join("run").join("baton.sock");
        prepare_dir(&sock, None).unwrap();
        let mode = std::fs::metadata(d.join("run")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn peer_rules() {
        let me = sys::getuid();
        assert!(peer_allowed(me, &[], None));
        assert!(peer_allowed(0, &[], None));
        let other = if me == 4242 { 4243 } else { 4242 };
        assert!(!peer_allowed(other, &[7], None));
        assert!(!peer_allowed(other, &[7], Some(8)));
        assert!(peer_allowed(other, &[7, 8], Some(8)));
    }
}
