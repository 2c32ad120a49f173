//! Runs the real `baton` binary for end-to-end tests.
//!
//! Everything here talks to baton the way an operator would: it spawns `baton run`, and
//! asks `baton status --json` / `baton upgrade --wait` / signals. Nothing is mocked.
//!
//! Every wait is bounded and waits for an observable event (a status change, a pid
//! disappearing, a process exiting), polling at a short interval; nothing sleeps for a
//! fixed time hoping that something happened meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_protocol::{ControlReply, Phase, ReexecReport, Status, UpgradeReport};
pub use nix::sys::signal::Signal;

use crate::sys;

/// How long `Baton::start` waits for the first generation to become active.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one `baton status|stop` CLI call.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one `baton upgrade --wait` call: well above any ready/drain timeout the tests use.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(120);
/// Polling interval of the bounded waits.
const POLL: Duration = Duration::from_millis(20);

/// Why a harness operation failed. `Debug` prints the same readable text as `Display`, so
/// that `.unwrap()` in a test shows the message (and baton's stderr) as is.
#[derive(thiserror::Error)]
pub enum HarnessError {
    /// The test environment is not set up (e.g. binaries not built).
    #[error("{0}")]
    Setup(String),
    /// An I/O operation of the harness failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// A bounded wait ran out.
    #[error("timed out after {timeout:?} waiting for {what}; last seen: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        timeout: Duration,
        /// The last observation (status JSON or error).
        last: String,
    },
    /// A `baton` CLI call failed.
    #[error("`baton {args}` failed ({status}): stdout: {stdout:?} stderr: {stderr:?}")]
    Cli {
        /// The arguments.
        args: String,
        /// How it exited.
        status: String,
        /// Its stdout.
        stdout: String,
        /// Its stderr.
        stderr: String,
    },
    /// `baton run` exited while it was expected to run.
    #[error("baton exited unexpectedly ({status}); its stderr:\n{log}")]
    Exited {
        /// How it exited.
        status: String,
        /// The tail of its log.
        log: String,
    },
}

impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Result of harness operations.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Maps an I/O error to a [`HarnessError::Io`] saying what was being done.
pub fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// Serialises the tests that start baton or put load on the machine: the tests of one
/// binary run in parallel threads, and two load tests on 2 cores would only measure each
/// other. Hold the guard for the whole test (declare it first, so it is dropped last).
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The cargo target directory of the running test (`target/<profile>`).
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(io_err("current_exe"))?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| HarnessError::Setup(format!("{} has no parent", exe.display())))?
        .to_path_buf();
    // Test executables live in target/<profile>/deps; binaries one level up.
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    Ok(dir)
}

/// The path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> Result<PathBuf> {
    let dir = target_dir()?;
    let path = dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    let profile = if dir.file_name() == Some(OsStr::new("release")) {
        " --release"
    } else {
        ""
    };
    Err(HarnessError::Setup(format!(
        "{} not found: the end-to-end tests run the workspace's real binaries; \
         build them first with `cargo build --workspace{profile}` (same profile as the tests)",
        path.display()
    )))
}

/// `target/<profile>/baton`.
pub fn baton_bin() -> Result<PathBuf> {
    bin("baton")
}

/// `target/<profile>/hello-http`.
pub fn hello_http_bin() -> Result<PathBuf> {
    bin("hello-http")
}

/// `target/<profile>/kv-server`.
pub fn kv_server_bin() -> Result<PathBuf> {
    bin("kv-server")
}

/// The `udp-echo` example binary.
pub fn udp_echo_bin() -> Result<PathBuf> {
    bin("udp-echo")
}

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Looks `prog` up in `PATH`.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The real python3 interpreter (not a version-manager shim, which would add a shell and
/// hundreds of milliseconds to every spawn).
pub async fn python3() -> Result<PathBuf> {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CLI_TIMEOUT, probe)
        .await
        .map_err(|_| HarnessError::Timeout {
            what: "python3 to print sys.executable".into(),
            timeout: CLI_TIMEOUT,
            last: "still running (killed)".into(),
        })?
        .map_err(io_err("running python3 (is it installed?)"))?;
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || exe.is_empty() {
        return Err(HarnessError::Setup(format!(
            "python3 -c 'print(sys.executable)' failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(PathBuf::from(exe))
}

/// A fresh directory under the system temp dir, removed on drop unless the test panicked
/// (then it is kept, and its path printed, for a post-mortem).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `$TMPDIR/baton-test-<tag>-<pid>-<n>-<nanos>`.
    pub fn new(tag: &str) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "baton-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).map_err(io_err(format!("mkdir {}", path.display())))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test dir kept for inspection: {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes an executable script.
pub fn write_script(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).map_err(io_err(format!("write {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Points the symlink `link` at `target`, atomically (a new link renamed over the old).
pub fn replace_symlink(link: &Path, target: &Path) -> Result<()> {
    let tmp = link.with_extension("new-link");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(io_err(format!("symlink {}", tmp.display())))?;
    fs::rename(&tmp, link).map_err(io_err(format!("rename onto {}", link.display())))
}

/// What a one-shot `baton ...` invocation did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `baton <args>` to completion, killing it if it runs longer than `timeout`.
pub async fn baton_cli<I, S>(args: I, timeout: Duration) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = tokio::process::Command::new(baton_bin()?);
    cmd.args(&args)
        // One-shot invocations are checked for their exact output (bad input must print
        // one line): a developer's BATON_LOG=debug must not change that.
        .env_remove("BATON_LOG");
    run_to_exit(cmd, &format!("baton {shown}"), timeout).await
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) to completion, killing
/// it if it runs longer than `timeout`; `what` names it in errors.
///
/// # Errors
/// It cannot be spawned or waited for, or it ran past `timeout`.
pub async fn run_to_exit(
    mut cmd: tokio::process::Command,
    what: &str,
    timeout: Duration,
) -> Result<CliOutput> {
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err(format!("spawn {what}")))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| HarnessError::Timeout {
            what: format!("`{what}` to exit"),
            timeout,
            last: "still running (killed)".into(),
        })?
        .map_err(io_err(format!("wait for {what}")))?;
    Ok(CliOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

/// How `baton upgrade --wait` ended.
#[derive(Debug, Clone)]
// One per upgrade in a test: the size does not matter, and a box would clutter every match.
#[allow(clippy::large_enum_variant)]
pub enum UpgradeOutcome {
    /// Exit 0. The report comes from the command's JSON output when it prints one, else
    /// from `status.last_upgrade` right after.
    Promoted(UpgradeReport),
    /// Exit 1: rolled back; `message` is its stderr.
    RolledBack {
        /// What `baton upgrade --wait` printed on stderr.
        message: String,
    },
}

/// A running `baton run`, killed (with all its descendants) on drop.
pub struct Baton {
    child: std::process::Child,
    exit: Option<ExitStatus>,
    control: PathBuf,
    log: PathBuf,
    // Last field: dropped after `Drop::drop` has killed everything using it.
    dir: TestDir,
}

impl Baton {
    /// Starts `baton run --control <tmp>/baton.sock <args> -- <program...>` in a new temp
    /// dir and waits until a generation is active.
    pub async fn start<A, P>(args: A, program: P) -> Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        P: IntoIterator,
        P::Item: AsRef<OsStr>,
    {
        Self::start_in(TestDir::new("run")?, args, program).await
    }

    /// Like [`Baton::start`], in a directory the test prepared (e.g. with a PROGRAM symlink).
    pub async fn start_in<A, P>(dir: TestDir, args: A, program: P) -> Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        P: IntoIterator,
        P::Item: AsRef<OsStr>,
    {
        let baton = Self::spawn_in(dir, args, program)?;
        baton.wait_active(START_TIMEOUT).await?;
        Ok(baton)
    }

    /// Spawns `baton run` without waiting for anything.
    pub fn spawn_in<A, P>(dir: TestDir, args: A, program: P) -> Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        P: IntoIterator,
        P::Item: AsRef<OsStr>,
    {
        Self::spawn_with(&baton_bin()?, &[], dir, args, program)
    }

    /// Spawns `exe run ...` (a baton executable of the test's own, say a copy it
    /// will replace) with extra environment variables, without waiting.
    pub fn spawn_with<A, P>(
        exe: &Path,
        env: &[(&str, &str)],
        dir: TestDir,
        args: A,
        program: P,
    ) -> Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        P: IntoIterator,
        P::Item: AsRef<OsStr>,
    {
        let log = dir.join("baton.log");
        let out = fs::File::create(&log).map_err(io_err(format!("create {}", log.display())))?;
        Self::spawn_inner(exe, env, dir, out, args, program)
    }

    /// Spawns `baton run ...` with stdout and stderr going to `out` (a pipe, a file on
    /// a full disk) instead of the log file, without waiting.
    pub fn spawn_with_stderr<A, P>(dir: TestDir, out: fs::File, args: A, program: P) -> Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        P: IntoIterator,
        P::Item: AsRef<OsStr>,
    {
        Self::spawn_inner(&baton_bin()?, &[], dir, out, args, program)
    }

    fn spawn_inner<A, P>(
        exe: &Path,
        env: &[(&str, &str)],
        dir: TestDir,
        out: fs::File,
        args: A,
        program: P,
    ) -> Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        P: IntoIterator,
        P::Item: AsRef<OsStr>,
    {
        let control = dir.join("baton.sock");
        let log = dir.join("baton.log");
        let stdout = out
            .try_clone()
            .map_err(io_err("dup the output for stdout"))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.envs(env.iter().copied());
        cmd.arg("run").arg("--control").arg(&control);
        cmd.args(args);
        cmd.arg("--");
        cmd.args(program);
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(out);
        let child = cmd.spawn().map_err(io_err("spawn baton run"))?;
        Ok(Self {
            child,
            exit: None,
            control,
            log,
            dir,
        })
    }

    /// The notify socket baton made beside its control socket (`<control>.notify`).
    pub fn notify_path(&self) -> PathBuf {
        let mut p = self.control.as_os_str().to_owned();
        p.push(".notify");
        PathBuf::from(p)
    }

    /// baton's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control socket path.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The test's temp dir.
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    /// baton's stderr (and that of its children, which inherit it) so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log.display()))
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn check_running(&self) -> Result<()> {
        if self.exit.is_some() || !pid_alive(self.pid()) {
            return Err(HarnessError::Exited {
                status: self
                    .exit
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "exited, not yet reaped".into()),
                log: self.log_tail(60),
            });
        }
        Ok(())
    }

    /// Runs `baton <args> --control <ours>` with a bound.
    pub async fn cli(&self, args: &[&str], timeout: Duration) -> Result<CliOutput> {
        let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
        all.push("--control".into());
        all.push(self.control.clone().into_os_string());
        baton_cli(all, timeout).await
    }

    /// `baton reexec --wait --json`: whether it exited 0, and the report it printed.
    pub async fn reexec_wait(&self) -> Result<(bool, ReexecReport)> {
        let out = self
            .cli(&["reexec", "--wait", "--json"], Duration::from_secs(60))
            .await?;
        let report = serde_json::from_str(out.stdout.trim()).map_err(|e| {
            HarnessError::Setup(format!(
                "reexec --wait printed no report ({e}): {out:?}; log tail:\n{}",
                self.log_tail(40)
            ))
        })?;
        Ok((out.status.success(), report))
    }

    /// `baton status --json`, parsed.
    pub async fn status(&self) -> Result<Status> {
        let out = self.cli(&["status", "--json"], CLI_TIMEOUT).await?;
        if !out.status.success() {
            return Err(HarnessError::Cli {
                args: "status --json".into(),
                status: out.status.to_string(),
                stdout: out.stdout,
                stderr: out.stderr,
            });
        }
        serde_json::from_str(out.stdout.trim()).map_err(|e| HarnessError::Cli {
            args: "status --json".into(),
            status: format!("unparsable output: {e}"),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// Polls status until `cond` holds (bounded); fails early if baton exits.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Status) -> bool,
    ) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let last = match self.status().await {
                Ok(s) if cond(&s) => return Ok(s),
                Ok(s) => serde_json::to_string(&s).unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: what.to_owned(),
                    timeout,
                    last: format!("{last}\nbaton log tail:\n{}", self.log_tail(40)),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until a generation is active.
    pub async fn wait_active(&self, timeout: Duration) -> Result<Status> {
        self.wait_for("an active generation", timeout, |s| {
            s.pid.is_some() && s.generations.iter().any(|g| g.phase == Phase::Active)
        })
        .await
    }

    /// Waits until no upgrade runs or is queued and exactly one generation is left (the
    /// active one): every older generation has drained and exited.
    pub async fn wait_settled(&self, timeout: Duration) -> Result<Status> {
        self.wait_for("no upgrade running and a single generation", timeout, |s| {
            !s.upgrading
                && s.queued_upgrades == 0
                && s.generations.len() == 1
                && s.generations[0].phase == Phase::Active
                && s.pid == Some(s.generations[0].pid)
        })
        .await
    }

    /// `baton upgrade --wait`.
    pub async fn upgrade_wait(&self) -> Result<UpgradeOutcome> {
        let out = self.cli(&["upgrade", "--wait"], UPGRADE_TIMEOUT).await?;
        match out.status.code() {
            Some(0) => {
                if let Some(report) = parse_upgrade_report(&out.stdout) {
                    return Ok(UpgradeOutcome::Promoted(report));
                }
                let status = self.status().await?;
                status
                    .last_upgrade
                    .map(UpgradeOutcome::Promoted)
                    .ok_or_else(|| HarnessError::Cli {
                        args: "upgrade --wait".into(),
                        status: "exit 0 but status.last_upgrade is null".into(),
                        stdout: out.stdout,
                        stderr: out.stderr,
                    })
            }
            Some(1) => Ok(UpgradeOutcome::RolledBack {
                message: out.stderr.trim().to_owned(),
            }),
            _ => Err(HarnessError::Cli {
                args: "upgrade --wait".into(),
                status: out.status.to_string(),
                stdout: out.stdout,
                stderr: out.stderr,
            }),
        }
    }

    /// `baton upgrade` (no wait): exit 0 expected.
    pub async fn upgrade(&self) -> Result<CliOutput> {
        self.cli_ok(&["upgrade"]).await
    }

    /// `baton stop`: exit 0 expected.
    pub async fn stop_cli(&self) -> Result<CliOutput> {
        self.cli_ok(&["stop"]).await
    }

    async fn cli_ok(&self, args: &[&str]) -> Result<CliOutput> {
        let out = self.cli(args, CLI_TIMEOUT).await?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(HarnessError::Cli {
                args: args.join(" "),
                status: out.status.to_string(),
                stdout: out.stdout,
                stderr: out.stderr,
            })
        }
    }

    /// Sends a signal to baton.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        sys::signal(self.pid(), sig).map_err(io_err(format!("kill -{sig} baton")))?;
        Ok(())
    }

    /// `kill -HUP <baton>`.
    pub fn hup(&self) -> Result<()> {
        self.signal(Signal::SIGHUP)
    }

    /// The address of the listener `name` as status shows it (`HOST:PORT` or `unix:PATH`).
    pub async fn listener_addr(&self, name: &str) -> Result<String> {
        let status = self.status().await?;
        status
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr.clone())
            .ok_or_else(|| {
                HarnessError::Setup(format!(
                    "no listener named {name:?} in status: {:?}",
                    status.listeners
                ))
            })
    }

    /// The address of the UDP listener `name` (status shows `udp:HOST:PORT`).
    pub async fn udp_addr(&self, name: &str) -> Result<SocketAddr> {
        let addr = self.listener_addr(name).await?;
        addr.strip_prefix("udp:")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                HarnessError::Setup(format!(
                    "listener {name} address {addr:?} is not udp:HOST:PORT"
                ))
            })
    }

    /// The TCP address of the listener `name`.
    pub async fn tcp_addr(&self, name: &str) -> Result<SocketAddr> {
        let addr = self.listener_addr(name).await?;
        addr.parse().map_err(|e| {
            HarnessError::Setup(format!(
                "listener {name} address {addr:?} is not HOST:PORT: {e}"
            ))
        })
    }

    /// Waits (bounded) for baton to exit and reaps it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_err("wait for baton"))? {
                self.exit = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: "baton to exit".into(),
                    timeout,
                    last: format!("still running; log tail:\n{}", self.log_tail(40)),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILLs baton and every descendant. Freezing baton first stops it from spawning a
    /// new generation between the moment its children are listed and the moment it dies.
    fn kill_tree(&mut self) {
        let pid = self.pid();
        let _ = sys::signal(pid, Signal::SIGSTOP);
        // While baton is stopped (alive, so no other baton's start-up sweep takes its
        // cgroups for a dead baton's), empty and remove its generations' cgroups.
        for dir in generation_cgroups(pid) {
            empty_and_remove_cgroup(&dir);
        }
        for d in descendants(pid) {
            let _ = sys::signal(d, Signal::SIGKILL);
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if self.exit.is_none() {
            self.kill_tree();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- baton log ({}), last 300 lines ----\n{}\n---- end of baton log ----",
                self.log.display(),
                self.log_tail(300)
            );
        }
    }
}

fn parse_upgrade_report(stdout: &str) -> Option<UpgradeReport> {
    let text = stdout.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(report) = serde_json::from_str::<UpgradeReport>(text) {
        return Some(report);
    }
    match serde_json::from_str::<ControlReply>(text) {
        Ok(ControlReply::Upgrade(report)) => Some(report),
        _ => None,
    }
}

/// Reads `/proc/<pid>/stat`: (state, ppid).
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses; the fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// How `pid` is scheduled, from `/proc/<pid>/stat`: (nice, policy), the policy as
/// `sched_setscheduler` numbers it (0 `SCHED_OTHER`, 3 `SCHED_BATCH`).
pub fn sched_of(pid: u32) -> Option<(i32, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields 19 (nice) and 41 (policy); the first after the last ')' is field 3.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some((fields.get(16)?.parse().ok()?, fields.get(38)?.parse().ok()?))
}

/// Sends `sig` to `pid`; `Ok(false)` when it is gone already.
///
/// # Errors
/// Any other failure of kill(2).
pub fn signal_pid(pid: u32, sig: Signal) -> Result<bool> {
    sys::signal(pid, sig).map_err(io_err(format!("kill -{sig} {pid}")))
}

/// Raises this process's soft fd limit to the hard one, for tests that hold
/// thousands of connections (baton and its children inherit it).
///
/// # Errors
/// The limit could not be raised.
pub fn raise_nofile() -> Result<u64> {
    crate::sys::raise_nofile().map_err(io_err("raising RLIMIT_NOFILE"))
}

/// Whether `pid` exists and has not exited (a zombie counts as exited).
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// SIGKILLs a process on drop: for processes that escape baton's tree (a `setsid`
/// grandchild reparented to init), which [`Baton`]'s drop cannot find.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = sys::signal(self.0, Signal::SIGKILL);
    }
}

/// Waits (bounded) until `pid` has exited; returns how long that took.
pub async fn wait_pid_gone(pid: u32, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if !pid_alive(pid) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(HarnessError::Timeout {
                what: format!("pid {pid} to exit"),
                timeout,
                last: "still alive".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The processes of baton `pid`'s generations: its live descendants but its guardian
/// (`baton-guard`, which kills them if baton is SIGKILLed).
pub fn generation_tree(pid: u32) -> Vec<u32> {
    descendants(pid)
        .into_iter()
        .filter(|&p| proc_comm(p) != "baton-guard")
        .collect()
}

/// Every live descendant of `pid` (scans `/proc`: this kernel may lack
/// `/proc/<pid>/task/<tid>/children`).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, ppid)) = proc_stat(p) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                stack.push(k);
            }
        }
    }
    out
}

/// The cgroup v2 directory of this test process (baton inherits it and makes its
/// generations' cgroups below it).
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let cg = fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// The generation cgroups baton `pid` made (`baton-<pid>-…` below this process's).
pub fn generation_cgroups(pid: u32) -> Vec<PathBuf> {
    let Some(base) = own_cgroup_dir() else {
        return Vec::new();
    };
    let prefix = format!("baton-{pid}-");
    fs::read_dir(base)
        .map(|it| {
            it.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in cgroup `dir`, waits (bounded) until they are gone and
/// removes it with the cgroups below it.
fn empty_and_remove_cgroup(dir: &Path) {
    let procs = |d: &Path| -> Vec<u32> {
        fs::read_to_string(d.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    };
    if fs::write(dir.join("cgroup.kill"), b"1").is_err() {
        for p in procs(dir) {
            let _ = sys::signal(p, Signal::SIGKILL);
        }
    }
    fn remove(d: &Path) -> bool {
        if let Ok(entries) = fs::read_dir(d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&e.path());
                }
            }
        }
        fs::remove_dir(d).is_ok() || !d.exists()
    }
    // Removal fails while a killed process is still exiting; that takes milliseconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !remove(dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/proc/<pid>/comm`, or "" when it is gone.
pub fn proc_comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether `pid`'s command line contains `needle`.
pub fn cmdline_has(pid: u32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .contains(needle)
        })
        .unwrap_or(false)
}

/// Live processes whose command line contains `needle`, wherever they are in the tree.
pub fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&p| p != me && pid_alive(p) && cmdline_has(p, needle))
                .collect()
        })
        .unwrap_or_default()
}

/// `/proc/<pid>/fd`: fd number -> link target (`socket:[123]`, `/dev/null`, ...).
pub fn proc_fds(pid: u32) -> Result<BTreeMap<i32, String>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(&dir).map_err(io_err(format!("read {dir}")))? {
        let entry = entry.map_err(io_err(format!("read {dir}")))?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // The fd may close between readdir and readlink; then it is simply not there.
        if let Ok(target) = fs::read_link(entry.path()) {
            out.insert(fd, target.to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// The `flags:` field of `/proc/<pid>/fdinfo/<fd>` (octal open flags, e.g. `O_NONBLOCK`).
pub fn proc_fd_flags(pid: u32, fd: i32) -> Result<u32> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let info = fs::read_to_string(&path).map_err(io_err(format!("read {path}")))?;
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| HarnessError::Setup(format!("no flags in {path}: {info:?}")))
}

/// `/proc/<pid>/environ` as a map.
pub fn proc_environ(pid: u32) -> Result<BTreeMap<String, String>> {
    let path = format!("/proc/{pid}/environ");
    let raw = fs::read(&path).map_err(io_err(format!("read {path}")))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect())
}

/// `VmRSS` of `/proc/<pid>/status`, in KiB.
pub fn proc_rss_kb(pid: u32) -> Result<u64> {
    proc_status_kb(pid, "VmRSS:")
}

/// `pid`'s peak resident memory (VmHWM) in KiB.
///
/// # Errors
/// The process is gone or its status cannot be read.
pub fn proc_peak_rss_kb(pid: u32) -> Result<u64> {
    proc_status_kb(pid, "VmHWM:")
}

fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).map_err(io_err(format!("read {path}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| HarnessError::Setup(format!("no {field} in {path}")))
}

/// A tmpfs mounted at a directory (created if missing), unmounted on drop. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `mount -t tmpfs -o OPTIONS tmpfs AT`.
    ///
    /// # Errors
    /// The directory cannot be made, or the mount failed.
    pub fn mount(at: &Path, options: &str) -> Result<Self> {
        fs::create_dir_all(at).map_err(io_err(format!("mkdir {}", at.display())))?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .status()
            .map_err(io_err("run mount"))?;
        if !ok.success() {
            return Err(HarnessError::Setup(format!(
                "mount -t tmpfs -o {options} on {} failed",
                at.display()
            )));
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a process that still holds a file there must not keep it mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Makes `fd` inheritable (clears `FD_CLOEXEC`): every process spawned afterwards gets it,
/// like a sloppy parent would pass it. Used to check that baton does not pass it on.
pub fn make_inheritable(fd: impl AsFd) -> Result<()> {
    sys::clear_cloexec(fd.as_fd()).map_err(io_err("clear FD_CLOEXEC"))
}

/// The generation pids in a status, oldest first.
pub fn generation_pids(status: &Status) -> Vec<u32> {
    status.generations.iter().map(|g| g.pid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_helpers_see_this_process() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(proc_rss_kb(me).unwrap() > 0);
        let fds = proc_fds(me).unwrap();
        assert!(fds.contains_key(&0));
        let env = proc_environ(me).unwrap();
        assert!(env.contains_key("PATH") || env.is_empty());
    }

    #[tokio::test]
    async fn descendants_and_wait_pid_gone() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let me = std::process::id();
        let sh = child.id();
        // The grandchild appears once sh has forked it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let sleeper = loop {
            let d = descendants(me);
            assert!(d.contains(&sh));
            if let Some(s) = descendants(sh).first().copied() {
                break s;
            }
            assert!(Instant::now() < deadline, "sh never forked sleep");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(descendants(me).contains(&sleeper));
        sys::signal(sleeper, Signal::SIGKILL).unwrap();
        wait_pid_gone(sleeper, Duration::from_secs(10))
            .await
            .unwrap();
        child.wait().unwrap();
        assert!(!pid_alive(sh));
        assert!(wait_pid_gone(me, Duration::from_millis(50)).await.is_err());
    }

    #[test]
    fn finds_binaries_dir() {
        let dir = target_dir().unwrap();
        assert_ne!(dir.file_name(), Some(OsStr::new("deps")));
        let err = bin("definitely-not-a-baton-binary")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo build --workspace"), "{err}");
    }
}
