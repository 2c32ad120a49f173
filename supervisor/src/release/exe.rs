//! The executable a generation runs, opened once and exec'd from that open file:
//! what was checked (its sha256, its kind) is what runs, whatever happens to the
//! path afterwards (`mv new app`, a deleted release).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// An opened executable.
#[derive(Debug)]
pub struct Exe {
    file: File,
    /// Where it was opened.
    pub path: PathBuf,
    /// A `#!` script (exec'd through baton's `/proc` fd, not `execveat`).
    pub script: bool,
    /// The release it belongs to, with its directory.
    pub release: Option<(String, PathBuf)>,
    identity: (u64, u64, i64, i64, u64),
    /// A release's recorded sha256, and the file's identity (ctime included, which
    /// no user can set back) when its content last matched it.
    checked: Option<Checked>,
}

/// What a release's executable must be at every exec.
#[derive(Debug)]
struct Checked {
    sha256: String,
    /// The store's owner.
    owner: Option<u32>,
    /// The file's identity when it last matched.
    last: std::sync::Mutex<Option<Stamp>>,
}

/// What changes whenever a file's content or metadata changes.
type Stamp = (u64, u64, i64, i64, u64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec(), m.size())
}

/// Reads a file from its start through `pread`, leaving its offset alone.
struct At<'a>(&'a File, u64);

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read_at(buf, self.1)?;
        self.1 += n as u64;
        Ok(n)
    }
}

impl Exe {
    /// Opens `path` (close-on-exec) and checks that it is an executable file.
    ///
    /// # Errors
    /// A message naming the path.
    pub fn open(path: &Path) -> Result<Exe, String> {
        let file = File::open(path).map_err(|e| format!("program '{}': {e}", path.display()))?;
        let m = file
            .metadata()
            .map_err(|e| format!("program '{}': {e}", path.display()))?;
        if !m.is_file() {
            return Err(format!(
                "program '{}' is not a regular file",
                path.display()
            ));
        }
        if m.permissions().mode() & 0o111 == 0 {
            return Err(format!("program '{}' is not executable", path.display()));
        }
        let mut head = [0u8; 2];
        let n = file.read_at(&mut head, 0).unwrap_or(0);
        Ok(Exe {
            file,
            path: path.to_path_buf(),
            script: n == 2 && &head == b"#!",
            release: None,
            identity: (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()),
            checked: None,
        })
    }

    /// An executable a reexec handed over, opened by the image before.
    ///
    /// # Errors
    /// The fd is not a regular file.
    pub fn from_handover(
        fd: std::os::fd::OwnedFd,
        path: PathBuf,
        script: bool,
        release: Option<(String, PathBuf)>,
        sha256: Option<String>,
    ) -> Result<Exe, String> {
        let file = File::from(fd);
        let m = file.metadata().map_err(|e| e.to_string())?;
        if !m.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        let owner = store_owner(release.as_ref());
        let exe = Exe {
            file,
            path,
            script,
            release,
            identity: (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()),
            // Checked at its next exec, not here: a reexec must not fail over it.
            checked: sha256.map(|sha256| Checked {
                owner,
                sha256,
                last: std::sync::Mutex::new(None),
            }),
        };
        Ok(exe)
    }

    /// Opens a release's executable and checks it is the one the store recorded.
    ///
    /// # Errors
    /// It cannot be opened, or its sha256 is not `sha256`.
    pub fn open_release(
        path: &Path,
        sha256: &str,
        version: &str,
        dir: &Path,
    ) -> Result<Exe, String> {
        let mut exe = Exe::open(path)?;
        let got = exe
            .sha256()
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if got != sha256 {
            return Err(format!(
                "release {version}: {} does not match the store (sha256 {got}, expected {sha256}): it was changed after it was added; refusing to run it",
                path.display()
            ));
        }
        exe.release = Some((version.to_string(), dir.to_path_buf()));
        let owner = store_owner(exe.release.as_ref());
        let m = exe
            .file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        if let Some(o) = owner {
            crate::release::store::owner::check_tree(dir, o)
                .map_err(|e| format!("release {version}: {e}"))?;
        }
        exe.checked = Some(Checked {
            sha256: sha256.to_string(),
            owner,
            last: std::sync::Mutex::new(Some(stamp(&m))),
        });
        Ok(exe)
    }

    /// The sha256 a release's executable must have (`None` outside a store).
    pub fn expected_sha256(&self) -> Option<&str> {
        self.checked.as_ref().map(|c| c.sha256.as_str())
    }

    /// Before every exec (crash restarts included): a release's executable still has
    /// the content the store recorded. Re-hashed only when the file changed since it
    /// last matched, so an unchanged one costs an `fstat`.
    ///
    /// # Errors
    /// It was changed: rewritten in place through another name, say.
    pub fn verify(&self) -> Result<(), String> {
        let Some(Checked {
            sha256: want,
            owner,
            last,
        }) = &self.checked
        else {
            return Ok(());
        };
        let m = self
            .file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", self.path.display()))?;
        if let (Some(o), Some((version, dir))) = (owner, &self.release) {
            // The whole tree, at every exec: a file beside PROGRAM may run as well.
            crate::release::store::owner::check_tree(dir, *o)
                .map_err(|e| format!("release {version}: {e}"))?;
        }
        let now = stamp(&m);
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last == Some(now) {
            return Ok(());
        }
        let got = self
            .sha256()
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        if &got != want {
            return Err(format!(
                "{} no longer matches the store (sha256 {got}, expected {want}): it was changed while baton held it open; refusing to run it",
                self.path.display()
            ));
        }
        *last = Some(now);
        Ok(())
    }

    /// sha256 of the open file.
    ///
    /// # Errors
    /// Reading failed.
    pub fn sha256(&self) -> io::Result<String> {
        crate::release::store::sha256(At(&self.file, 0))
    }

    /// The open file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The open file's metadata.
    ///
    /// # Errors
    /// `fstat` failed.
    pub fn metadata(&self) -> std::io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

    /// Whether `other` is the same file, unchanged.
    pub fn same_file(&self, other: &Exe) -> bool {
        self.identity == other.identity
    }

    /// Checks that it can run on this machine: an ELF for this architecture, or a
    /// `#!` script whose interpreter exists.
    ///
    /// # Errors
    /// Why it cannot.
    pub fn check_runs_here(&self) -> Result<(), String> {
        let mut head = [0u8; 256];
        let n = self.file.read_at(&mut head, 0).map_err(|e| e.to_string())?;
        let head = &head[..n];
        if head.starts_with(b"#!") {
            let line = head[2..].split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let interp = line.split_whitespace().next().unwrap_or_default();
            return crate::release::store::check_executable(Path::new(interp))
                .map_err(|why| format!("its interpreter '{interp}': {why}"));
        }
        if n < 20 || &head[..4] != b"\x7fELF" {
            return Err("not an ELF executable or a #! script".into());
        }
        let class64 = head[4] == 2;
        let machine = u16::from_le_bytes([head[18], head[19]]);
        let (want_machine, name) = if cfg!(target_arch = "x86_64") {
            (62, "x86_64")
        } else if cfg!(target_arch = "aarch64") {
            (183, "aarch64")
        } else {
            return Ok(());
        };
        if machine != want_machine || !class64 {
            return Err(format!(
                "an ELF for another machine (e_machine {machine}, {}-bit), not {name}",
                if class64 { 64 } else { 32 }
            ));
        }
        Ok(())
    }
}

/// The owner of the store a release directory is in (its parent).
fn store_owner(release: Option<&(String, PathBuf)>) -> Option<u32> {
    let (_, dir) = release?;
    crate::release::store::owner::owner_of(dir.parent()?)
        .ok()
        .map(|(uid, _)| uid)
}
