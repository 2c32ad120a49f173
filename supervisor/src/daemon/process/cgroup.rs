//! One cgroup (v2) per generation, so that retiring a generation kills everything it
//! started, including a grandchild that left the process group with `setsid()`.
//!
//! Used when baton may create cgroups below its own: as a systemd service with
//! `Delegate=yes`, or as root. Otherwise generations are contained by process group
//! only, and status says so.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::sys;

/// How generations are contained: the cgroups of the running ones, those of exited
/// ones still being emptied, and how many stray processes were killed.
#[derive(Debug)]
pub struct Containment {
    /// baton's own cgroup, below which generation cgroups go, or why there is none.
    base: Result<PathBuf, String>,
    live: HashMap<u64, GenCgroup>,
    dead: Vec<GenCgroup>,
    strays_killed: u64,
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

/// baton's own cgroup, if a sub-cgroup can be created there; else why not.
fn usable_base() -> Result<PathBuf, String> {
    let base = own_cgroup_dir().ok_or("no cgroup v2 hierarchy")?;
    let probe = base.join(format!("baton-{}-probe", std::process::id()));
    std::fs::create_dir(&probe)
        .map_err(|e| format!("cannot create a cgroup in {}: {e}", base.display()))?;
    let _ = std::fs::remove_dir(&probe);
    Ok(base)
}

impl Containment {
    /// Finds out whether generations can get cgroups of their own, and says so in
    /// the log.
    pub fn detect() -> Self {
        let base = if !enabled() {
            Err("cgroups turned off by BATON_NO_CGROUPS=1".to_owned())
        } else {
            usable_base()
        };
        match &base {
            Ok(_) => tracing::info!("each generation runs in its own cgroup"),
            Err(why) => tracing::info!(why, "generations are contained by process group only"),
        }
        Containment {
            base,
            live: HashMap::new(),
            dead: Vec::new(),
            strays_killed: 0,
        }
    }

    /// The cgroups of running generations (id, directory) and of exited ones still
    /// being emptied, for a reexec.
    pub fn handover(&self) -> (Vec<(u64, PathBuf)>, Vec<PathBuf>) {
        let live = self
            .live
            .iter()
            .map(|(id, cg)| (*id, cg.dir.clone()))
            .collect();
        let dead = self.dead.iter().map(|cg| cg.dir.clone()).collect();
        (live, dead)
    }

    /// Takes over the cgroups a reexec handed over (see [`Containment::handover`]).
    pub fn adopt(&mut self, live: &[(u64, PathBuf)], dead: &[PathBuf], strays_killed: u64) {
        self.strays_killed = strays_killed;
        for (id, dir) in live {
            match GenCgroup::open(dir.clone()) {
                Ok(cg) => {
                    self.live.insert(*id, cg);
                }
                Err(e) => {
                    tracing::warn!(generation = id, error = %e, "cannot reopen the generation's cgroup; containing it by process group only")
                }
            }
        }
        for dir in dead {
            if let Ok(cg) = GenCgroup::open(dir.clone()) {
                self.dead.push(cg);
            }
        }
    }

    /// Creates generation `gen_id`'s cgroup, for its spawn to join; `None` when
    /// generations are not contained by cgroup, or this one could not be created.
    pub fn prepare(&mut self, gen_id: u64) -> Option<&GenCgroup> {
        let base = self.base.as_ref().ok()?;
        match GenCgroup::create(base, gen_id) {
            Ok(cg) => Some(self.live.entry(gen_id).or_insert(cg)),
            Err(e) => {
                tracing::warn!(generation = gen_id, error = %e, "cannot create the generation's cgroup; containing it by process group only");
                None
            }
        }
    }

    /// Generation `gen_id` never started: drops its (empty) cgroup.
    pub fn spawn_failed(&mut self, gen_id: u64) {
        if let Some(cg) = self.live.remove(&gen_id) {
            cg.remove();
        }
    }

    /// SIGKILLs everything in generation `gen_id`'s cgroup.
    pub fn kill(&self, gen_id: u64) {
        if let Some(cg) = self.live.get(&gen_id) {
            cg.kill();
        }
    }

    /// Generation `gen_id`'s main process exited: kills whatever it left behind and
    /// removes its cgroup (later, if processes are still leaving it).
    pub fn reap(&mut self, gen_id: u64) {
        let Some(cg) = self.live.remove(&gen_id) else {
            return;
        };
        let strays = cg.pids();
        if !strays.is_empty() {
            tracing::warn!(
                generation = gen_id,
                pids = ?strays,
                "processes outlived their generation (setsid?); killing its cgroup"
            );
            self.strays_killed += strays.len() as u64;
            cg.kill();
        }
        if !cg.remove() {
            self.dead.push(cg);
        }
    }

    /// Retries removing the cgroups of exited generations.
    pub fn sweep(&mut self) {
        self.dead.retain(|cg| {
            if !cg.pids().is_empty() {
                cg.kill();
            }
            !cg.remove()
        });
    }

    /// baton is exiting: kills every generation's cgroup and waits a little (at most
    /// half a second) for them to empty, so that none is left behind.
    pub async fn shutdown(&mut self) {
        for (_, cg) in self.live.drain() {
            cg.kill();
            self.dead.push(cg);
        }
        for _ in 0..50 {
            self.sweep();
            if self.dead.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Whether generations run in cgroups (else strays can only be detected).
    pub fn contains(&self) -> bool {
        self.base.is_ok()
    }

    /// For status: `cgroup`, or `process group (<why>)`.
    pub fn describe(&self) -> String {
        match &self.base {
            Ok(_) => "cgroup".into(),
            Err(why) => format!("process group ({why})"),
        }
    }

    /// Processes killed because they outlived their generation.
    pub fn strays_killed(&self) -> u64 {
        self.strays_killed
    }
}

/// The generation cgroups batons left when they died without cleaning up (SIGKILL,
/// with their guardian): for each, everything in it is killed, it is removed, and a
/// warning says so. A cgroup belongs to a live baton, and is never touched, while its
/// pid (the `<pid>` of `baton-<pid>-…`) runs in the same cgroup as this baton; a pid
/// that has since been reused elsewhere does not count. Run once at start, before the
/// listeners are bound (the leftovers may hold our ports), and after a reexec.
pub fn reclaim_stale() {
    let Some(base) = own_cgroup_dir().filter(|_| enabled()) else {
        return;
    };
    for (pid, dir) in generation_dirs(&base) {
        if baton_alive(pid) {
            continue;
        }
        let killed = empty_and_remove(&dir);
        if killed > 0 {
            tracing::warn!(
                dead_baton = pid,
                killed,
                "killed what a dead baton's generations left, and removed their cgroups"
            );
        }
    }
}

/// Every `baton-<pid>-…` cgroup below `base`, with its pid.
fn generation_dirs(base: &Path) -> Vec<(u32, PathBuf)> {
    std::fs::read_dir(base)
        .map(|it| {
            it.flatten()
                .filter_map(|e| Some((owner_pid(&e.file_name())?, e.path())))
                .collect()
        })
        .unwrap_or_default()
}

/// The pids in cgroup `dir` now.
fn procs_in(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs every process in cgroup `dir` (`cgroup.kill`, Linux 5.14+; else one by
/// one, repeated while new ones appear).
fn kill_cgroup(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), b"1").is_ok() {
        return;
    }
    for _ in 0..16 {
        let pids = procs_in(dir);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = sys::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Whether baton needs a guardian: generations get cgroups, and no service manager
/// kills them when baton dies (systemd does, for a service: `KillMode=control-group`).
pub fn guardian_needed() -> bool {
    enabled() && std::env::var_os("INVOCATION_ID").is_none() && own_cgroup_dir().is_some()
}

/// Whether cgroups are not turned off by `BATON_NO_CGROUPS=1`.
fn enabled() -> bool {
    std::env::var_os("BATON_NO_CGROUPS").is_none_or(|v| v != "1")
}

/// Whether `pid` runs: exists and is not a zombie (which an init that does not reap
/// may keep for ever).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

/// Whether `pid` was exec'd by baton as a generation's main process: its environment
/// says `LISTEN_PID=<pid>`. One whose environment cannot be read counts as main (it is
/// only waited for, up to the drain timeout).
fn is_main(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => {
            let want = format!("LISTEN_PID={pid}");
            env.split(|b| *b == 0).any(|v| v == want.as_bytes())
        }
        Err(_) => true,
    }
}

/// baton `pid` died: its generations' main processes got their stop signal
/// (`PR_SET_PDEATHSIG`) and drain as on a normal stop. Once they have exited, or after
/// `drain`, whatever is left in its generation cgroups (a wrapper's children, which the
/// signal does not reach) is killed and the cgroups removed. The guardian runs this.
/// Returns how many processes were killed.
pub fn reclaim_of(pid: u32, drain: std::time::Duration) -> usize {
    let Some(base) = own_cgroup_dir().filter(|_| enabled()) else {
        return 0;
    };
    let dirs: Vec<PathBuf> = generation_dirs(&base)
        .into_iter()
        .filter(|(owner, _)| *owner == pid)
        .map(|(_, dir)| dir)
        .collect();
    // A generation's main process is the one baton exec'd with `LISTEN_PID` set to its
    // own pid (kept in `/proc/<pid>/environ` across `unsetenv` and a wrapper's exec); a
    // wrapper's children inherit their parent's. Parentage cannot tell: once baton and a
    // wrapper shell are gone, all of them have init as their parent.
    let inside: Vec<u32> = dirs.iter().flat_map(|d| procs_in(d)).collect();
    let mains: Vec<u32> = inside.iter().copied().filter(|&p| is_main(p)).collect();
    let deadline = std::time::Instant::now() + drain;
    while mains.iter().any(|&p| running(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    dirs.iter().map(|d| empty_and_remove(d)).sum()
}

/// `baton-<pid>-…` → pid.
fn owner_pid(name: &std::ffi::OsStr) -> Option<u32> {
    name.to_str()?
        .strip_prefix("baton-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Whether `pid` runs in this baton's cgroup, where a baton that made generation
/// cgroups beside ours would run.
fn baton_alive(pid: u32) -> bool {
    let rel = |who: &str| {
        let cg = std::fs::read_to_string(format!("/proc/{who}/cgroup")).ok()?;
        cg.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned)
    };
    // A zombie has exited: its cgroups are orphans even before its parent reaps it.
    running(pid) && rel(&pid.to_string()).is_some_and(|theirs| rel("self") == Some(theirs))
}

/// Kills everything in cgroup `dir` and below, waits (at most 2 s) for it to empty, and
/// removes it. Returns how many processes were in it.
fn empty_and_remove(dir: &Path) -> usize {
    let found = procs_in(dir).len();
    if found > 0 {
        kill_cgroup(dir);
    }
    for _ in 0..200 {
        if remove_tree(dir) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    found
}

/// Removes the cgroup `dir` and the cgroups below it, deepest first; `false` while a
/// process remains in one.
fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// A generation's cgroup.
#[derive(Debug)]
pub struct GenCgroup {
    dir: PathBuf,
    /// Open before fork: the child writes `0` here to join, before it execs.
    procs: OwnedFd,
    /// The directory, for `clone3(CLONE_INTO_CGROUP)`.
    dir_fd: OwnedFd,
}

impl GenCgroup {
    /// Creates generation `gen_id`'s cgroup below `base`.
    fn create(base: &std::path::Path, gen_id: u64) -> io::Result<Self> {
        let dir = base.join(format!("baton-{}-gen-{gen_id}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Self::open(dir)
    }

    /// Opens the existing cgroup `dir`.
    fn open(dir: PathBuf) -> io::Result<Self> {
        // std opens close-on-exec: the fd reaches the child's pre-exec hook only.
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?
            .into();
        let dir_fd = std::fs::File::open(&dir)?.into();
        Ok(GenCgroup { dir, procs, dir_fd })
    }

    /// The cgroup's directory, to create a child in it.
    pub fn dir_fd(&self) -> &OwnedFd {
        &self.dir_fd
    }

    /// The `cgroup.procs` fd the child joins through.
    pub fn procs_fd(&self) -> &OwnedFd {
        &self.procs
    }

    /// Pids in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        procs_in(&self.dir)
    }

    /// SIGKILLs every process in the cgroup.
    pub fn kill(&self) {
        kill_cgroup(&self.dir);
    }

    /// Removes the cgroup if it is empty; `false` while processes remain.
    pub fn remove(&self) -> bool {
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }
}
