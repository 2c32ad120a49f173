//! The store's ownership rule: every file in it belongs to the store's owner, with
//! no setuid, setgid or sticky bit and no group or world write. baton (often root)
//! execs what is there, so nothing in it may be changeable by anyone else.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The mode a file or directory gets in the store: the caller's bits, less
/// setuid/setgid/sticky and group or world write.
pub fn store_mode(mode: u32) -> u32 {
    mode & 0o755
}

/// Whether `mode` obeys the rule.
pub fn mode_ok(mode: u32) -> bool {
    mode & 0o7022 == 0
}

/// Makes everything under `root` (not following links) owned by `uid:gid` and
/// its modes [`store_mode`].
///
/// # Errors
/// A file cannot be changed (not root, and not already the owner's): the message
/// names it.
pub fn normalise(root: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let m = fs::symlink_metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if m.uid() != uid || m.gid() != gid {
        std::os::unix::fs::lchown(root, Some(uid), Some(gid)).map_err(|e| {
            format!(
                "{} belongs to uid {} and cannot be given to the store's owner (uid {uid}): {e}",
                root.display(),
                m.uid()
            )
        })?;
    }
    if !m.file_type().is_symlink() {
        let mode = m.permissions().mode() & 0o7777;
        if mode != store_mode(mode) {
            fs::set_permissions(root, fs::Permissions::from_mode(store_mode(mode)))
                .map_err(|e| format!("{}: {e}", root.display()))?;
        }
    }
    if m.is_dir() {
        for entry in fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", root.display()))?;
            normalise(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Checks an opened file against the rule.
///
/// # Errors
/// Who owns it or which bit is wrong.
pub fn check(meta: &fs::Metadata, owner: u32, what: &Path) -> Result<(), String> {
    if meta.uid() != owner {
        return Err(format!(
            "{} belongs to uid {}, not to the store's owner (uid {owner}); refusing to run it",
            what.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if !mode_ok(mode) {
        return Err(format!(
            "{} has mode {mode:o} (setuid, setgid, or writable by others); refusing to run it",
            what.display()
        ));
    }
    Ok(())
}

/// Checks every file and directory of a release tree against the rule (not following
/// links; a link's own owner counts, its mode does not). A wrapper's `env.sh` runs as
/// surely as PROGRAM does.
///
/// # Errors
/// The first entry that breaks the rule, named.
pub fn check_tree(root: &Path, owner: u32) -> Result<(), String> {
    let m = fs::symlink_metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if m.file_type().is_symlink() {
        if m.uid() != owner {
            return check(&m, owner, root);
        }
        return Ok(());
    }
    check(&m, owner, root)?;
    if m.is_dir() {
        for entry in fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", root.display()))?;
            check_tree(&entry.path(), owner)?;
        }
    }
    Ok(())
}

/// The rule for an executable outside a store that baton execs as itself (a reexec):
/// the file and every directory on its path belong to baton's user or root, and none
/// of them can be written by anyone else: no world write, no group write unless the
/// group is root's or baton's own (a umask of 002), and no setuid or setgid bit on the
/// file. A world-writable directory passes only if sticky, as `/tmp` is: there nobody
/// else can rename or remove the file.
///
/// # Errors
/// The file or directory that breaks the rule, named.
pub fn check_own_exec(
    path: &Path,
    meta: &fs::Metadata,
    euid: u32,
    egid: u32,
) -> Result<(), String> {
    let trusted = |uid: u32| uid == euid || uid == 0;
    let others_write = |m: &fs::Metadata| {
        let mode = m.permissions().mode();
        mode & 0o002 != 0 || (mode & 0o020 != 0 && m.gid() != 0 && m.gid() != egid)
    };
    let mode = meta.permissions().mode() & 0o7777;
    if !trusted(meta.uid()) {
        return Err(format!(
            "{} belongs to uid {}, not to baton's user (uid {euid}) or root; refusing to run it",
            path.display(),
            meta.uid()
        ));
    }
    if mode & 0o6000 != 0 || others_write(meta) {
        return Err(format!(
            "{} has mode {mode:o} (setuid, setgid, or writable by others); refusing to run it",
            path.display()
        ));
    }
    for dir in path.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let m = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let sticky = m.permissions().mode() & 0o1000 != 0;
        if !trusted(m.uid()) || (others_write(&m) && !sticky) {
            return Err(format!(
                "{} is in {} (uid {}, mode {:o}), which others can write; refusing to run it",
                path.display(),
                dir.display(),
                m.uid(),
                m.permissions().mode() & 0o7777
            ));
        }
    }
    Ok(())
}

/// The store's owner, from its directory.
///
/// # Errors
/// It cannot be read.
pub fn owner_of(dir: &Path) -> io::Result<(u32, u32)> {
    let m = fs::metadata(dir)?;
    Ok((m.uid(), m.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_normalised_mode_obeys_the_rule_and_keeps_what_it_may(mode in 0u32..=0o7777) {
            let m = store_mode(mode);
            prop_assert!(mode_ok(m));
            // The owner's bits are kept, and read/execute for the others.
            prop_assert_eq!(m & 0o700, mode & 0o700);
            prop_assert_eq!(m & 0o055, mode & 0o055);
            // A mode that obeys the rule is left alone.
            prop_assert_eq!(mode_ok(mode), store_mode(mode) == mode);
        }

        #[test]
        fn only_the_owner_with_a_good_mode_passes(owner in 0u32..4, mode in 0u32..=0o7777) {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("f");
            fs::write(&f, b"x").unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            let meta = fs::metadata(&f).unwrap();
            let ok = check(&meta, owner, &f).is_ok();
            let real_uid = meta.uid();
            prop_assert_eq!(ok, real_uid == owner && mode_ok(mode & 0o7777));
        }
    }
}
