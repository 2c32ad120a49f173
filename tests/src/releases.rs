//! Release stores for end-to-end tests: releases of hello-http as wrapper scripts
//! (as real deploys often are) or as the binary itself, added with the real
//! `baton release` CLI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_protocol::{Release, ReleaseReply, ReleaseStatus};

use crate::harness::{
    Baton, CliOutput, Result, TestDir, baton_cli, hello_http_bin, io_err, write_script,
};

/// Bound on one `baton release` call that does not wait for an outcome.
pub const RELEASE_CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on `baton release install --wait`: probation included.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A store directory and a place to build releases, removed on drop.
pub struct StoreDir {
    dir: TestDir,
}

impl StoreDir {
    /// An empty store (not created yet: the first add does).
    pub fn new(tag: &str) -> Result<Self> {
        Ok(Self {
            dir: TestDir::new(tag)?,
        })
    }

    /// The store (`--releases`).
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// The store as a `--releases` value.
    pub fn arg(&self) -> String {
        self.store().display().to_string()
    }

    /// `baton release --releases STORE permanent VERSION`, which must succeed.
    ///
    /// # Panics
    /// When it fails, with its output.
    pub async fn permanent(&self, version: &str) {
        let out = self.offline(&["permanent", version]).await;
        assert!(
            out.as_ref().is_ok_and(|o| o.status.success()),
            "release permanent {version}: {out:?}"
        );
    }

    /// A path for things outside the store.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Builds a release tree `<version>/bin/app`, a wrapper script that execs
    /// hello-http labelled `version` with `args`; with `healthy`, the tree also
    /// holds a `healthy` file (for `--health exec:test -e {dir}/healthy`).
    pub fn hello_tree(&self, version: &str, args: &str, healthy: bool) -> Result<PathBuf> {
        let hello = hello_http_bin()?;
        self.tree(
            version,
            &hello,
            &format!("--label {version} {args}"),
            healthy,
        )
    }

    /// Like [`hello_tree`](Self::hello_tree), for kv-server with `--schema schema`.
    pub fn kv_tree(&self, version: &str, schema: u32, healthy: bool) -> Result<PathBuf> {
        self.kv_tree_with(version, schema, "", healthy)
    }

    /// [`kv_tree`](Self::kv_tree) with more arguments for kv-server.
    pub fn kv_tree_with(
        &self,
        version: &str,
        schema: u32,
        args: &str,
        healthy: bool,
    ) -> Result<PathBuf> {
        let kv = crate::harness::kv_server_bin()?;
        self.tree(version, &kv, &format!("--schema {schema} {args}"), healthy)
    }

    fn tree(&self, version: &str, bin: &Path, args: &str, healthy: bool) -> Result<PathBuf> {
        let tree = self.dir.join(format!("src-{version}"));
        std::fs::create_dir_all(tree.join("bin")).map_err(io_err("mkdir"))?;
        write_script(
            &tree.join("bin/app"),
            &format!("#!/bin/sh\nexec {} {args} \"$@\"\n", bin.display()),
        )?;
        if healthy {
            std::fs::write(tree.join("healthy"), "").map_err(io_err("write healthy"))?;
        }
        Ok(tree)
    }

    /// `baton release --releases STORE add [--program bin/app] VERSION PATH`; must succeed.
    pub async fn add(&self, version: &str, path: &Path) -> Result<CliOutput> {
        let path = path.display().to_string();
        let out = self
            .offline(&["add", "--program", "bin/app", version, &path])
            .await?;
        ok(out, "release add")
    }

    /// Adds a hello-http tree as `version` and returns its source tree.
    pub async fn add_hello(&self, version: &str, args: &str, healthy: bool) -> Result<PathBuf> {
        let tree = self.hello_tree(version, args, healthy)?;
        self.add(version, &tree).await?;
        Ok(tree)
    }

    /// `baton release --releases STORE <args>`.
    pub async fn offline(&self, args: &[&str]) -> Result<CliOutput> {
        let store = self.arg();
        let mut all = vec!["release", "--releases", store.as_str()];
        all.extend_from_slice(args);
        baton_cli(all, RELEASE_CLI_TIMEOUT).await
    }

    /// `baton run --releases STORE -- bin/app` where it must exit at once (a bad store).
    pub async fn run_to_exit(&self) -> Result<CliOutput> {
        self.run_to_exit_with("bin/app").await
    }

    /// [`run_to_exit`](Self::run_to_exit) with another PROGRAM.
    pub async fn run_to_exit_with(&self, program: &str) -> Result<CliOutput> {
        let store = self.arg();
        let control = self.join("run-to-exit.sock").display().to_string();
        baton_cli(
            [
                "run",
                "--listen",
                "http=127.0.0.1:0",
                "--releases",
                store.as_str(),
                "--control",
                control.as_str(),
                "--",
                program,
            ],
            RELEASE_CLI_TIMEOUT,
        )
        .await
    }

    /// `release list --json` of the store itself.
    pub async fn list(&self) -> Result<Vec<Release>> {
        let out = ok(self.offline(&["list", "--json"]).await?, "release list")?;
        parse_list(&out)
    }
}

fn ok(out: CliOutput, what: &str) -> Result<CliOutput> {
    if out.status.success() {
        Ok(out)
    } else {
        Err(crate::harness::HarnessError::Cli {
            args: what.into(),
            status: out.status.to_string(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

fn parse_list(out: &CliOutput) -> Result<Vec<Release>> {
    serde_json::from_str(out.stdout.trim()).map_err(|e| crate::harness::HarnessError::Cli {
        args: "release list --json".into(),
        status: format!("unparsable output: {e}"),
        stdout: out.stdout.clone(),
        stderr: out.stderr.clone(),
    })
}

/// `baton release <args>` on a running baton.
pub async fn release(baton: &Baton, args: &[&str], timeout: Duration) -> Result<CliOutput> {
    let mut all = vec!["release"];
    all.extend_from_slice(args);
    baton.cli(&all, timeout).await
}

/// `release list --json` from a running baton.
pub async fn list(baton: &Baton) -> Result<Vec<Release>> {
    let out = ok(
        release(baton, &["list", "--json"], RELEASE_CLI_TIMEOUT).await?,
        "release list",
    )?;
    parse_list(&out)
}

/// The status of `version` in `list` (panics if absent: a test bug).
pub fn status_of(list: &[Release], version: &str) -> ReleaseStatus {
    list.iter()
        .find(|r| r.version == version)
        .unwrap_or_else(|| panic!("no release {version} in {list:?}"))
        .status
}

/// The release the active generation runs.
pub async fn active_release(baton: &Baton) -> Result<Option<String>> {
    let s = baton.status().await?;
    Ok(s.generations
        .iter()
        .find(|g| Some(g.pid) == s.pid)
        .and_then(|g| g.release.clone()))
}

/// The release reply a `--json` release command printed.
///
/// # Panics
/// When it printed none, with its output.
pub fn reply(out: &CliOutput) -> ReleaseReply {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not a release reply ({e}): {out:?}"))
}
