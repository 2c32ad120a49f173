//! Debian packages for the packaging tests: building baton's (`scripts/package`) and
//! the hello-http examples (`examples/packaging/build`), installing them for real,
//! and purging them again whatever happens.
//!
//! The tests install into the machine's own dpkg database (CI runs as root on a
//! throwaway machine): a chroot would need a whole Debian inside it, and
//! `dpkg --instdir` does not run maintainer scripts the way an upgrade does, which
//! is what they are about. They refuse to touch a machine where baton or
//! hello-http is installed already.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness;
use crate::systemd::repo_root;

/// Why this machine cannot run the packaging tests, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (it installs packages)".into());
    }
    for tool in ["dpkg", "dpkg-deb", "dpkg-query"] {
        if harness::which(tool).is_none() {
            return Some(format!("{tool} is missing (not a Debian system?)"));
        }
    }
    let deb = Command::new("cargo").args(["deb", "--version"]).output();
    if !deb.is_ok_and(|o| o.status.success()) {
        return Some("cargo-deb is missing (scripts/install-test-deps installs it)".into());
    }
    for pkg in ["baton", "hello-http"] {
        if installed(pkg).is_some() {
            return Some(format!(
                "package {pkg} is installed on this machine; the test would replace it"
            ));
        }
    }
    None
}

/// The installed version of `pkg`.
pub fn installed(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status} ${Version}", pkg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = text.strip_prefix("install ok installed ")?;
    Some(rest.trim().to_owned())
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The last line of a command's stdout, as a path.
fn last_path(out: &Output) -> PathBuf {
    let text = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(text.lines().last().unwrap_or_default().trim())
}

/// `scripts/package --deb-version VERSION`, into `out`.
pub fn baton_deb(version: &str, out: &Path) -> PathBuf {
    let o = run(Command::new(repo_root().join("scripts/package"))
        .args(["--deb-version", version, "--output"])
        .arg(out));
    let deb = last_path(&o);
    assert!(deb.is_file(), "scripts/package made no {}", deb.display());
    deb
}

/// `examples/packaging/build OUT`: hello-http 1, 2 and 3 (broken).
pub fn hello_debs(out: &Path) -> Vec<PathBuf> {
    let hello = harness::hello_http_bin().unwrap_or_else(|e| panic!("{e}"));
    let o = run(Command::new(repo_root().join("examples/packaging/build"))
        .arg(out)
        .env("HELLO_HTTP_BIN", hello));
    let debs: Vec<PathBuf> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(debs.len(), 3, "{debs:?}");
    debs
}

/// Packages this test installed, purged on drop (in reverse order).
#[derive(Default)]
pub struct Installed(Vec<String>);

impl Installed {
    /// `dpkg -i DEB` on the host, which must succeed; remembers `pkg` for the purge.
    pub fn install(&mut self, pkg: &str, deb: &Path) {
        if !self.0.iter().any(|p| p == pkg) {
            self.0.push(pkg.to_owned());
        }
        run(Command::new("dpkg").arg("-i").arg(deb));
    }

    /// Remembers `pkg` (installed some other way) for the purge.
    pub fn track(&mut self, pkg: &str) {
        if !self.0.iter().any(|p| p == pkg) {
            self.0.push(pkg.to_owned());
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        for pkg in self.0.iter().rev() {
            let out = Command::new("dpkg").args(["--purge", pkg]).output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("dpkg --purge {pkg}: {out:?}");
            }
        }
    }
}
