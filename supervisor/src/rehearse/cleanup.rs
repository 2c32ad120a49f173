//! What a rehearsal must take down however it ends: the private baton, the load
//! command's process group and the temporary directory. SIGINT, SIGTERM and SIGHUP
//! are taken by one thread (they are blocked everywhere else), which cleans up and
//! exits 130.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::sys;

#[derive(Default)]
struct Held {
    batons: Vec<u32>,
    groups: Vec<u32>,
    dirs: Vec<PathBuf>,
}

/// Set when a terminating signal came: the handling thread owns the exit from then on.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// If the rehearsal was interrupted, never returns: the thread handling the signal is
/// taking everything down and exits 130 (whatever the steps saw meanwhile, such as the
/// private baton going away, is not a result).
pub fn unless_interrupted() {
    while INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::park();
    }
}

/// The registry; clones share it.
#[derive(Clone, Default)]
pub struct Cleanup(Arc<Mutex<Held>>);

impl Cleanup {
    /// Blocks the terminating signals in this thread (and so in every thread it starts
    /// later) and starts the one that handles them. Call before starting any thread.
    pub fn install() -> Cleanup {
        let c = Cleanup::default();
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        if set.thread_block().is_ok() {
            let held = c.clone();
            std::thread::spawn(move || {
                if let Ok(sig) = set.wait() {
                    INTERRUPTED.store(true, Ordering::SeqCst);
                    held.run();
                    eprintln!(
                        "baton rehearse: interrupted by {sig}; stopped the private baton and removed its files"
                    );
                    std::process::exit(130);
                }
            });
        }
        c
    }

    fn with<T>(&self, f: impl FnOnce(&mut Held) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A private baton to stop.
    pub fn add_baton(&self, pid: u32) {
        self.with(|h| h.batons.push(pid));
    }

    /// It was stopped.
    pub fn forget_baton(&self, pid: u32) {
        self.with(|h| h.batons.retain(|p| *p != pid));
    }

    /// A process group to kill.
    pub fn add_group(&self, pgid: u32) {
        self.with(|h| h.groups.push(pgid));
    }

    /// It is gone.
    pub fn forget_group(&self, pgid: u32) {
        self.with(|h| h.groups.retain(|p| *p != pgid));
    }

    /// A directory to remove.
    pub fn add_dir(&self, dir: PathBuf) {
        self.with(|h| h.dirs.push(dir));
    }

    /// Takes everything down: load groups first (SIGKILL), then each baton (SIGTERM,
    /// which drains its generations; SIGKILL after 15 s), then the directories.
    pub fn run(&self) {
        let held = self.with(std::mem::take);
        for g in held.groups {
            let _ = sys::signal_group(g, Signal::SIGKILL);
        }
        for pid in held.batons {
            let _ = sys::kill(pid, Signal::SIGTERM);
            if !reaped_within(pid, Duration::from_secs(15)) {
                let _ = sys::kill(pid, Signal::SIGKILL);
                reaped_within(pid, Duration::from_secs(5));
            }
        }
        for d in held.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Waits for child `pid` to exit, reaping it.
fn reaped_within(pid: u32, bound: Duration) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return true;
    };
    let until = Instant::now() + bound;
    loop {
        match waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
            _ => return true,
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
