//! The release store (`--releases DIR`): `DIR/<version>/` trees side by side, and
//! `DIR/releases.json` with each one's status, sha256 and results.
//!
//! Every change is read-modify-write under an exclusive `flock` on `DIR/.lock`,
//! and the file is replaced atomically (temp file, fsync, rename, fsync of the
//! directory), so a crash leaves the old or the new metadata, never a mix, and two
//! writers (a running baton and `baton release add`) never lose each other's work.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use baton_protocol::{Release, ReleaseStatus};
use sha2::{Digest, Sha256};

mod files;
mod meta;

pub use files::check_executable;
use files::{copy_file, copy_tree, move_error};
pub mod owner;

pub use meta::{InUse, Meta};

/// The metadata file inside the store.
pub const META_FILE: &str = "releases.json";
const LOCK_FILE: &str = ".lock";
/// Results kept per release.
const MAX_RESULTS: usize = 10;
/// How long a writer waits for the lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// A store error: one line naming the file, version or path at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

fn err(msg: impl Into<String>) -> StoreError {
    StoreError(msg.into())
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `releases.json` larger than this is refused, not read.
const META_LIMIT: u64 = 16 << 20;

/// Checks a version name: it becomes a directory name, so no `/`, no leading dot.
///
/// # Errors
/// The name is empty, too long, starts with a dot or has other characters than
/// letters, digits and `._+~-`.
pub fn check_version(v: &str) -> Result<(), StoreError> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && !v.starts_with('.')
        && !v.starts_with('-')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(format!(
            "invalid version '{v}': use 1 to 64 letters, digits and ._+~- (not starting with . or -)"
        )))
    }
}

/// Checks PROGRAM for a store: a relative path inside a release.
///
/// # Errors
/// PROGRAM is absolute, empty or climbs out with `..`.
pub fn check_program(p: &str) -> Result<(), StoreError> {
    let path = Path::new(p);
    let inside = !p.is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if inside {
        Ok(())
    } else {
        Err(err(format!(
            "with --releases, PROGRAM '{p}' must be a path inside each release, like bin/app"
        )))
    }
}

/// sha256 of everything readable from `r`, in lower-case hex.
///
/// # Errors
/// Reading failed.
pub fn sha256(mut r: impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Held while the store is being changed; released on drop.
struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// A release store directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store at `dir`, which must be a directory (`create`: made if missing).
    ///
    /// # Errors
    /// `dir` is missing (and not to be created) or not a directory.
    pub fn open(dir: &Path, create: bool) -> Result<Self, StoreError> {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(err(format!(
                    "release store {} is not a directory",
                    dir.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir_all(dir).map_err(|e| {
                    err(format!(
                        "cannot create release store {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            Err(e) => return Err(err(format!("release store {}: {e}", dir.display()))),
        }
        // As given, first: a symlink on the way that another user owns could be
        // pointed elsewhere later (canonicalising below would hide it).
        crate::access::check_dir(dir).map_err(|e| err(format!("release store: {e}")))?;
        // Absolute: children get it as BATON_RELEASE_DIR, and checks as {dir}.
        let dir = fs::canonicalize(dir)
            .map_err(|e| err(format!("release store {}: {e}", dir.display())))?;
        // baton (often root) writes temporary files and execs releases here: a directory
        // another user could write to would let them plant symlinks or swap files.
        crate::access::check_dir(&dir).map_err(|e| err(format!("release store: {e}")))?;
        Ok(Store { dir })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata file's path.
    pub fn meta_path(&self) -> PathBuf {
        self.dir.join(META_FILE)
    }

    /// A release's directory.
    pub fn release_dir(&self, version: &str) -> PathBuf {
        self.dir.join(version)
    }

    fn lock(&self) -> Result<Lock, StoreError> {
        let path = self.dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                err(format!(
                    "release store {} is not writable: {e}",
                    self.dir.display()
                ))
            })?;
        let started = Instant::now();
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(Lock(l)),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < LOCK_WAIT => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, e)) => {
                    return Err(err(format!(
                        "cannot lock {}: {} (another writer holds it?)",
                        path.display(),
                        e.desc()
                    )));
                }
            }
        }
    }

    /// Reads the metadata (an empty store if the file does not exist yet).
    ///
    /// # Errors
    /// The file cannot be read or is not valid metadata (the message names it).
    pub fn read(&self) -> Result<Meta, StoreError> {
        let path = self.meta_path();
        let text = match crate::access::read_small_file(&path, META_LIMIT) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Meta {
                    format: 1,
                    ..Meta::default()
                });
            }
            Err(e) => return Err(err(format!("cannot read {}: {e}", path.display()))),
        };
        let meta: Meta = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "corrupt release store metadata {}: {e} (restore it from a backup or fix it by hand)",
                path.display()
            ))
        })?;
        if meta.format != 1 {
            return Err(err(format!(
                "{}: unknown format {} (this baton reads format 1)",
                path.display(),
                meta.format
            )));
        }
        // Checked again on every read: a hand-edited `../../x` must never become a
        // path outside the store.
        let versions = meta
            .releases
            .iter()
            .map(|r| r.version.as_str())
            .chain(meta.previous_permanent.as_deref());
        for v in versions {
            check_version(v).map_err(|e| err(format!("{}: {}", path.display(), e.0)))?;
        }
        if let Some(p) = &meta.program {
            check_program(p).map_err(|e| err(format!("{}: {}", path.display(), e.0)))?;
        }
        Ok(meta)
    }

    fn write(&self, meta: &Meta) -> Result<(), StoreError> {
        let path = self.meta_path();
        let tmp = self.dir.join(format!(".{META_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(meta)
            .map_err(|e| err(format!("cannot encode {}: {e}", path.display())))?;
        let write = || -> io::Result<()> {
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            // A new file, never one (or a symlink) that is there already.
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| err(format!("cannot write {}: {e}", path.display())))
    }

    /// Read-modify-write under the lock.
    ///
    /// # Errors
    /// Locking, reading or writing failed, or `f` did.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Meta) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _lock = self.lock()?;
        let mut meta = self.read()?;
        let out = f(&mut meta)?;
        self.write(&meta)?;
        Ok(out)
    }

    /// Records PROGRAM for a new store, or checks it matches the recorded one.
    ///
    /// # Errors
    /// PROGRAM is not a path inside a release, or differs from the recorded one.
    pub fn adopt_program(&self, program: &str) -> Result<(), StoreError> {
        check_program(program)?;
        let meta = self.read()?;
        match meta.program.as_deref() {
            Some(p) if p == program => Ok(()),
            Some(p) => Err(err(format!(
                "release store {} holds releases whose PROGRAM is '{p}', not '{program}'",
                self.dir.display()
            ))),
            None => self.update(|m| {
                m.program = Some(program.to_string());
                Ok(())
            }),
        }
    }

    /// The executable of `version`.
    ///
    /// # Errors
    /// The store does not know PROGRAM yet.
    pub fn exe_path(&self, meta: &Meta, version: &str) -> Result<PathBuf, StoreError> {
        let program = meta.program.as_deref().ok_or_else(|| {
            err("the store does not know PROGRAM yet: give --program PATH (e.g. bin/app)")
        })?;
        Ok(self.release_dir(version).join(program))
    }

    /// unpack_release: copies (or moves) `src`, a file or a directory, into the
    /// store as `version`, status `unpacked`. A file lands at PROGRAM inside the
    /// release; a directory is the release.
    ///
    /// # Errors
    /// A bad version, a duplicate, a missing or bad `src`, a release without an
    /// executable PROGRAM, or a store that cannot be written.
    pub fn add(
        &self,
        version: &str,
        src: &Path,
        mv: bool,
        program: Option<&str>,
    ) -> Result<Release, StoreError> {
        check_version(version)?;
        let src_meta = fs::symlink_metadata(src)
            .map_err(|e| err(format!("cannot add {}: {e}", src.display())))?;
        if !src_meta.is_dir() && !src_meta.is_file() {
            return Err(err(format!(
                "cannot add {}: not a file or a directory",
                src.display()
            )));
        }
        if let Some(p) = program {
            self.adopt_program(p)?;
        }
        let meta = self.read()?;
        let program = meta.program.clone().ok_or_else(|| {
            err("the store does not know PROGRAM yet: give --program PATH (e.g. bin/app)")
        })?;
        let exists = |m: &Meta| {
            if m.get(version).is_some() || self.release_dir(version).exists() {
                Err(err(format!("release '{version}' is already in the store")))
            } else {
                Ok(())
            }
        };
        exists(&meta)?;
        // Unpack beside the store under a temporary name, then rename: a release
        // directory exists whole or not at all.
        let tmp = self
            .dir
            .join(format!(".unpack-{version}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let unpack = || -> Result<String, StoreError> {
            let io = |what: &str, e: io::Error| err(format!("{what}: {e}"));
            if src_meta.is_dir() {
                if mv {
                    fs::rename(src, &tmp).map_err(|e| move_error(src, e))?;
                } else {
                    copy_tree(src, &tmp)
                        .map_err(|e| io(&format!("cannot copy {}", src.display()), e))?;
                }
            } else {
                let dest = tmp.join(&program);
                // Ours alone: create_dir fails on anything already there.
                fs::create_dir(&tmp).map_err(|e| io("cannot unpack", e))?;
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(|e| io("cannot unpack", e))?;
                }
                if mv {
                    fs::rename(src, &dest).map_err(|e| move_error(src, e))?;
                } else {
                    copy_file(src, &dest)
                        .map_err(|e| io(&format!("cannot copy {}", src.display()), e))?;
                }
            }
            // The store's rule, whatever the source had: its owner's files, no
            // setuid, no group or world write.
            let (uid, gid) =
                owner::owner_of(&self.dir).map_err(|e| io(&self.dir.display().to_string(), e))?;
            owner::normalise(&tmp, uid, gid)
                .map_err(|why| err(format!("cannot add {}: {why}", src.display())))?;
            let exe = tmp.join(&program);
            check_executable(&exe).map_err(|why| {
                err(format!(
                    "{} holds no executable PROGRAM '{program}': {why}",
                    src.display()
                ))
            })?;
            let f = File::open(&exe).map_err(|e| io(&exe.display().to_string(), e))?;
            sha256(f).map_err(|e| io(&exe.display().to_string(), e))
        };
        let sha = match unpack() {
            Ok(s) => s,
            Err(e) => {
                if mv && src_meta.is_dir() && tmp.exists() {
                    let _ = fs::rename(&tmp, src);
                } else if mv && tmp.join(&program).exists() {
                    let _ = fs::rename(tmp.join(&program), src);
                }
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let release = Release {
            version: version.to_string(),
            status: ReleaseStatus::Unpacked,
            sha256: sha,
            added: unix_now(),
            results: Vec::new(),
        };
        let r = release.clone();
        let done = self.update(|m| {
            exists(m)?;
            fs::rename(&tmp, self.release_dir(version))
                .map_err(|e| err(format!("cannot unpack into the store: {e}")))?;
            m.releases.push(r);
            m.record(version, "add", true, &format!("from {}", src.display()));
            Ok(())
        });
        if let Err(e) = done {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(release)
    }

    /// Deletes `version`. Refuses the permanent and current releases and any in
    /// `in_use`.
    ///
    /// # Errors
    /// Unknown, protected or in use, or the store cannot be written.
    pub fn remove(&self, version: &str, in_use: &[String]) -> Result<(), StoreError> {
        self.update(|m| {
            let r = m.get_mut(version)?;
            match r.status {
                ReleaseStatus::Permanent | ReleaseStatus::Current => {
                    return Err(err(format!(
                        "release '{version}' is {}: it cannot be removed",
                        r.status.as_str()
                    )));
                }
                _ => {}
            }
            if in_use
                .iter()
                .chain(m.live_in_use().iter())
                .any(|v| v == version)
            {
                return Err(err(format!(
                    "release '{version}' is in use by a running generation"
                )));
            }
            m.releases.retain(|r| r.version != version);
            if m.previous_permanent.as_deref() == Some(version) {
                m.previous_permanent = None;
            }
            self.delete_dir(version)
        })
    }

    fn delete_dir(&self, version: &str) -> Result<(), StoreError> {
        // Rename first, so a half-deleted tree never looks like a release.
        let dir = self.release_dir(version);
        let trash = self
            .dir
            .join(format!(".remove-{version}-{}", std::process::id()));
        match fs::rename(&dir, &trash) {
            Ok(()) => fs::remove_dir_all(&trash)
                .map_err(|e| err(format!("cannot delete {}: {e}", trash.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(err(format!("cannot remove {}: {e}", dir.display()))),
        }
    }

    /// `--keep N`: deletes the oldest `old` releases beyond the newest `keep`,
    /// never one in `in_use`. Returns the versions removed.
    ///
    /// # Errors
    /// The store cannot be written.
    pub fn prune(&self, keep: usize, in_use: &[String]) -> Result<Vec<String>, StoreError> {
        self.update(|m| {
            let old: Vec<String> = m
                .releases
                .iter()
                .filter(|r| r.status == ReleaseStatus::Old && !in_use.contains(&r.version))
                .map(|r| r.version.clone())
                .collect();
            let gone: Vec<String> = old[..old.len().saturating_sub(keep)].to_vec();
            for v in &gone {
                self.delete_dir(v)?;
                m.releases.retain(|r| &r.version != v);
                if m.previous_permanent.as_ref() == Some(v) {
                    m.previous_permanent = None;
                }
            }
            Ok(gone)
        })
    }
}

#[cfg(test)]
mod tests;
