//! Files into the store: copied (synced) or moved, and what an executable is.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::{StoreError, err};

pub(super) fn move_error(src: &Path, e: io::Error) -> StoreError {
    if e.raw_os_error() == Some(nix::libc::EXDEV) {
        err(format!(
            "cannot --move {}: it is on another filesystem than the store (add it without --move to copy)",
            src.display()
        ))
    } else {
        err(format!("cannot move {}: {e}", src.display()))
    }
}

/// A regular file with an execute bit.
///
/// # Errors
/// Why it is not one.
pub fn check_executable(p: &Path) -> Result<(), String> {
    match fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(m) if m.is_file() => Err("not executable".into()),
        Ok(_) => Err("not a regular file".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub(super) fn copy_file(src: &Path, dest: &Path) -> io::Result<()> {
    fs::copy(src, dest)?;
    File::open(dest)?.sync_all()
}

pub(super) fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    fs::create_dir(dest)?;
    fs::set_permissions(dest, fs::metadata(src)?.permissions())?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let m = fs::symlink_metadata(&from)?;
        if m.is_dir() {
            copy_tree(&from, &to)?;
        } else if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if m.is_file() {
            copy_file(&from, &to)?;
        } else {
            return Err(io::Error::other(format!(
                "{} is not a file, directory or symlink (dev {}, inode {})",
                from.display(),
                m.dev(),
                m.ino()
            )));
        }
    }
    File::open(dest)?.sync_all()
}
