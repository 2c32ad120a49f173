//! Continuous load on its own runtime while a test drives systemctl.

use crate::load::{LoadGen, LoadHandle, LoadOpts, LoadReport};
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

pub struct Load {
    pub rt: tokio::runtime::Runtime,
    pub handle: Option<LoadHandle>,
}

impl Load {
    /// Keep-alive and connection-per-request clients, running on their own runtime while
    /// the test drives systemctl from this thread.
    pub fn start(fx: &Fixture, addr: SocketAddr) -> Load {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let opts = LoadOpts {
            keepalive: 4,
            fresh: 4,
            request_timeout: Duration::from_secs(10),
            ..LoadOpts::default()
        };
        let handle = {
            let _enter = rt.enter();
            LoadGen::start(addr, opts)
        };
        let load = Load {
            rt,
            handle: Some(handle),
        };
        load.progress(fx, 50);
        load
    }

    pub fn handle(&self) -> &LoadHandle {
        self.handle.as_ref().expect("load is running")
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

    pub fn stop(mut self) -> LoadReport {
        let handle = self.handle.take().expect("load is running");
        self.rt.block_on(handle.stop())
    }
}
