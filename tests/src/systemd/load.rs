//! Continuous load on its own runtime while a test drives systemctl.

use crate::load::{LoadGen, LoadHandle, LoadOpts, LoadReport};
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

pub struct Load {
    pub rt: tokio::runtime::Runtime,
    /// One load generator per [`LoadOpts`] given to [`Load::start_with`].
    pub handles: Vec<LoadHandle>,
}

impl Load {
    /// Keep-alive and connection-per-request clients, running on their own runtime while
    /// the test drives systemctl from this thread.
    pub fn start(fx: &Fixture, addr: SocketAddr) -> Load {
        let opts = LoadOpts {
            keepalive: 4,
            fresh: 4,
            request_timeout: Duration::from_secs(10),
            ..LoadOpts::default()
        };
        Load::start_with(fx, addr, vec![opts])
    }

    /// One load generator per entry of `opts`, on one runtime; returns once the first
    /// one has made progress.
    pub fn start_with(fx: &Fixture, addr: SocketAddr, opts: Vec<LoadOpts>) -> Load {
        assert!(
            !opts.is_empty(),
            "Load::start_with needs at least one LoadOpts"
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let handles = {
            let _enter = rt.enter();
            opts.into_iter().map(|o| LoadGen::start(addr, o)).collect()
        };
        let load = Load { rt, handles };
        load.progress(fx, 50);
        load
    }

    /// The first load generator.
    pub fn handle(&self) -> &LoadHandle {
        &self.handles[0]
    }

    /// Waits until `n` more requests succeeded (the service is really serving), and
    /// fails fast if any request failed meanwhile.
    pub fn progress(&self, fx: &Fixture, n: u64) {
        let before = self.handle().snapshot().ok;
        let res = self.rt.block_on(
            self.handle()
                .wait_until(LONG, |s| s.failed > 0 || s.ok >= before + n),
        );
        match res {
            Ok(s) if s.failed == 0 => {}
            Ok(s) | Err(s) => fx.fail(&format!(
                "load: wanted {n} more ok requests after {before} with none failed, got {s:?}"
            )),
        }
    }

    /// Waits until `n` more requests succeeded on the first generator, failures or not
    /// (for tests that count failures themselves).
    pub fn progress_any(&self, fx: &Fixture, n: u64) {
        let before = self.handle().snapshot().ok;
        let res = self
            .rt
            .block_on(self.handle().wait_until(LONG, |s| s.ok >= before + n));
        if let Err(s) = res {
            fx.fail(&format!(
                "load: wanted {n} more ok requests after {before}, got {s:?}"
            ));
        }
    }

    /// Stops every generator; the first one's report.
    pub fn stop(self) -> LoadReport {
        self.stop_all().swap_remove(0)
    }

    /// Stops every generator; their reports, in the order they were started.
    pub fn stop_all(self) -> Vec<LoadReport> {
        let Load { rt, handles } = self;
        rt.block_on(async {
            let mut out = Vec::new();
            for h in handles {
                out.push(h.stop().await);
            }
            out
        })
    }
}
