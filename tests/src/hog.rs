//! Contention as a test dimension: busy processes, at least one per core, for as long
//! as the [`CpuHog`] lives. Timing and hand-over defects hide on an idle machine.

use std::process::{Child, Command, Stdio};

/// Busy-looping processes, killed and reaped on drop.
pub struct CpuHog {
    children: Vec<Child>,
}

impl CpuHog {
    /// `n` busy processes (`sh` spinning on `:`), at the test's own priority.
    ///
    /// # Errors
    /// `sh` could not be started.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut hog = CpuHog {
            children: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            hog.children.push(child);
        }
        Ok(hog)
    }

    /// One busy process per core, plus one, so that every core is contended.
    ///
    /// # Errors
    /// As [`CpuHog::start`].
    pub fn per_core() -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self::start(cores + 1)
    }

    /// The busy processes' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
