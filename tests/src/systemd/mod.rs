//! The systemd test fixture: a real systemd 252 as PID 1 of private namespaces (the
//! `shared/systemd-sandbox/sandbox` script), the shipped unit files loaded with a drop-in
//! that swaps only the binaries, the port and the log destination, and HTTP helpers to
//! drive hello-http through it. Used by `tests/systemd.rs`.

#![allow(missing_docs)]

mod chaos;
mod fixture;
mod load;
mod sandbox;
mod units;

pub use crate::http::{Response as HttpResponse, connect, http_get, read_response, send_get};
pub use chaos::*;
pub use fixture::*;
pub use load::*;
pub use sandbox::*;
pub use units::*;

use crate::harness;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The systemd tests share the machine's two cores with a whole init system, baton, the
/// app and a load generator each; running them one at a time keeps their timing honest.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Bound for anything that should take well under a second.
pub const SHORT: Duration = Duration::from_secs(10);
/// Bound for a start, a reload or a stop (the shipped timeouts are 30 s and more).
pub const LONG: Duration = Duration::from_secs(60);
/// How long hello-http waits before READY in the activation test.
pub const READY_DELAY: Duration = Duration::from_millis(1500);

pub const HELLO_SERVICE: &str = "hello-http.service";
pub const HELLO_SOCKET: &str = "hello-http.socket";
pub const TEMPLATE: &str = "baton@.service";
pub const TEMPLATE_INSTANCE: &str = "baton@hello.service";

// Values in the shipped unit files that the drop-ins replace.
pub const SHIPPED_BATON: &str = "/usr/local/bin/baton";
pub const SHIPPED_APP: &str = "/usr/local/bin/hello-http";
pub const SHIPPED_ADDR: &str = "127.0.0.1:8080";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn systemd_dir() -> PathBuf {
    repo_root().join("systemd")
}

pub struct Tools {
    pub sandbox: PathBuf,
    pub baton: PathBuf,
    pub hello: PathBuf,
}

/// What the tests need, or `None` (after saying why on stderr) when this machine cannot
/// run them. Missing *binaries* are not a reason to skip: that is a broken test setup.
pub fn tools(test: &str) -> Option<Tools> {
    let skip = |why: &str| {
        eprintln!("SKIP systemd::{test}: {why}");
        None
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root (the sandbox boots systemd in new namespaces)");
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return skip("/lib/systemd/systemd is missing (apt-get install systemd)");
    }
    if harness::which("unshare").is_none() || harness::which("nsenter").is_none() {
        return skip("unshare/nsenter missing (apt-get install util-linux)");
    }
    let sandbox = repo_root().join("../shared/systemd-sandbox/sandbox");
    if !sandbox.is_file() {
        return skip(&format!("{} is missing", sandbox.display()));
    }
    // Missing binaries are a broken setup, not a reason to skip.
    let baton = harness::baton_bin().unwrap_or_else(|e| panic!("{e}"));
    let hello = harness::hello_http_bin().unwrap_or_else(|e| panic!("{e}"));
    Some(Tools {
        sandbox,
        baton,
        hello,
    })
}
