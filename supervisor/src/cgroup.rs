//! One cgroup (v2) per generation, so that retiring a generation kills everything it
//! started, including a grandchild that left the process group with `setsid()`.
//!
//! Used when baton may create cgroups below its own: as a systemd service with
//! `Delegate=yes`, or as root. Otherwise generations are contained by process group
//! only, and status says so.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::sys;

/// Where generation cgroups are created: baton's own cgroup.
#[derive(Debug, Clone)]
pub struct Cgroups {
    base: PathBuf,
}

/// The cgroup v2 directory of this process, from `/proc/self/cgroup` and the
/// cgroup2 mount point in `/proc/self/mountinfo`.
fn own_cgroup_dir() -> Option<PathBuf> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        // ... mount_point ... - fstype source options
        let (left, right) = l.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })?;
    Some(mount.join(rel.trim_start_matches('/')))
}

impl Cgroups {
    /// Finds baton's own cgroup and checks that a sub-cgroup can be created there.
    /// `None` (with the reason) when generations cannot be put in cgroups.
    pub fn detect() -> Result<Self, String> {
        let base = own_cgroup_dir().ok_or("no cgroup v2 hierarchy")?;
        let probe = base.join(format!("baton-{}-probe", std::process::id()));
        std::fs::create_dir(&probe)
            .map_err(|e| format!("cannot create a cgroup in {}: {e}", base.display()))?;
        let _ = std::fs::remove_dir(&probe);
        sweep_stale(&base);
        Ok(Cgroups { base })
    }

    /// Creates generation `gen`'s cgroup.
    ///
    /// # Errors
    /// The directory cannot be created or its `cgroup.procs` opened.
    pub fn create(&self, gen: u64) -> io::Result<GenCgroup> {
        let dir = self
            .base
            .join(format!("baton-{}-gen-{gen}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // std opens close-on-exec: the fd reaches the child's pre-exec hook only.
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?
            .into();
        Ok(GenCgroup { dir, procs })
    }
}

/// Removes the empty cgroups left by batons that died without cleaning up (SIGKILL):
/// `baton-<pid>-…` whose pid no longer exists. One still in use is not empty, and
/// `rmdir` refuses it.
fn sweep_stale(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("baton-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// A generation's cgroup.
#[derive(Debug)]
pub struct GenCgroup {
    dir: PathBuf,
    /// Open before fork: the child writes `0` here to join, before it execs.
    procs: OwnedFd,
}

impl GenCgroup {
    /// The `cgroup.procs` fd the child joins through.
    pub fn procs_fd(&self) -> &OwnedFd {
        &self.procs
    }

    /// Pids in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the cgroup (`cgroup.kill`, Linux 5.14+; else one by
    /// one, repeated while new ones appear).
    pub fn kill(&self) {
        if std::fs::write(self.dir.join("cgroup.kill"), b"1").is_ok() {
            return;
        }
        for _ in 0..16 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for p in pids {
                let _ = sys::kill(p, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Removes the cgroup if it is empty; `false` while processes remain.
    pub fn remove(&self) -> bool {
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }
}
