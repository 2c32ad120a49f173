//! What several scenarios share: the control-socket client, a directly run app, a small
//! HTTP/1.1 keep-alive client, and bounded waits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_protocol::{ControlReply, ControlRequest, ReexecReport, Status, UpgradeReport};
use baton_tests::harness::{Baton, pid_alive};
use baton_tests::load::{LoadHandle, LoadOpts, LoadSnapshot};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::sys;

/// Bound on one control-socket round trip that is not an upgrade.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on an upgrade waited for: above every ready/snapshot/restore timeout used here.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(600);
/// Poll interval of the bounded waits on status or on a pid.
const POLL: Duration = Duration::from_millis(2);

/// A client of baton's control socket. One request per connection, as baton serves it;
/// talking to the socket directly (rather than running `baton status`) keeps process
/// spawning out of the measured loop.
pub struct Control {
    path: PathBuf,
}

impl Control {
    /// The control socket at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    async fn request(
        &self,
        req: &ControlRequest,
        timeout: Duration,
    ) -> anyhow::Result<ControlReply> {
        let exchange = async {
            let stream = UnixStream::connect(&self.path)
                .await
                .with_context(|| format!("connect to {}", self.path.display()))?;
            let (read, mut write) = stream.into_split();
            let mut line = serde_json::to_vec(req)?;
            line.push(b'\n');
            write
                .write_all(&line)
                .await
                .context("send control request")?;
            let mut reply = String::new();
            BufReader::new(read)
                .read_line(&mut reply)
                .await
                .context("read control reply")?;
            if reply.is_empty() {
                bail!("baton closed the control connection without a reply");
            }
            serde_json::from_str::<ControlReply>(reply.trim())
                .with_context(|| format!("unparsable control reply {reply:?}"))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .with_context(|| format!("no control reply within {timeout:?} to {req:?}"))?
    }

    /// baton's status.
    pub async fn status(&self) -> anyhow::Result<Status> {
        match self
            .request(&ControlRequest::Status, CONTROL_TIMEOUT)
            .await?
        {
            ControlReply::Status(s) => Ok(s),
            other => bail!("status: unexpected reply {other:?}"),
        }
    }

    /// Runs one upgrade and waits for its outcome; returns the report and the wall time
    /// from sending the request to reading the outcome (baton's own `duration_ms` has
    /// whole-millisecond resolution, this one has microseconds).
    pub async fn upgrade(&self) -> anyhow::Result<(UpgradeReport, Duration)> {
        let started = Instant::now();
        let reply = self
            .request(&ControlRequest::Upgrade { wait: true }, UPGRADE_TIMEOUT)
            .await?;
        let took = started.elapsed();
        match reply {
            ControlReply::Upgrade(report) => Ok((report, took)),
            other => bail!("upgrade: unexpected reply {other:?}"),
        }
    }

    /// Re-executes baton and waits for the outcome; returns the report and the wall
    /// time from the request to the reply (sent by the new image).
    pub async fn reexec(&self) -> anyhow::Result<(ReexecReport, Duration)> {
        let started = Instant::now();
        let reply = self
            .request(&ControlRequest::Reexec { wait: true }, UPGRADE_TIMEOUT)
            .await?;
        let took = started.elapsed();
        match reply {
            ControlReply::Reexec(report) => Ok((report, took)),
            other => bail!("reexec: unexpected reply {other:?}"),
        }
    }

    /// Asks baton to drain every generation and exit.
    pub async fn stop(&self) -> anyhow::Result<()> {
        match self.request(&ControlRequest::Stop, CONTROL_TIMEOUT).await? {
            ControlReply::Stopping => Ok(()),
            other => bail!("stop: unexpected reply {other:?}"),
        }
    }

    /// Polls status (bounded) until `cond` holds.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await?;
            if cond(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {what}; last status: {}",
                    serde_json::to_string(&status).unwrap_or_default()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until no upgrade runs and a single generation is left: the previous one has
    /// drained and exited.
    pub async fn wait_settled(&self, timeout: Duration) -> anyhow::Result<Status> {
        self.wait_status("one generation left, no upgrade running", timeout, |s| {
            !s.upgrading && s.queued_upgrades == 0 && s.generations.len() == 1
        })
        .await
    }
}

/// Stops baton the orderly way (`stop`, then wait for it to exit) so that it reaps its
/// generations and the bench reaps it: their CPU time then counts as the bench's own in
/// [`CpuMeter`]. Dropping a [`Baton`] SIGKILLs the tree instead, which is the fallback.
pub async fn shutdown(mut baton: Baton) -> anyhow::Result<()> {
    Control::new(baton.control()).stop().await?;
    let status = baton.wait_exit(Duration::from_secs(60)).await?;
    if !status.success() {
        bail!("baton exited with {status} after stop");
    }
    Ok(())
}

/// Adds baton's log tail to an error, since that is where the reason usually is.
pub fn with_log(baton: &Baton, e: anyhow::Error) -> anyhow::Error {
    let log = baton.log();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    e.context(format!("baton log tail:\n{tail}"))
}

/// Waits (bounded) until `pid` has exited; returns how long that took.
pub async fn wait_pid_gone(pid: u32, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while pid_alive(pid) {
        if started.elapsed() >= timeout {
            bail!("pid {pid} still alive after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(started.elapsed())
}

/// Waits (bounded) until the load's counters satisfy `cond`.
pub async fn wait_load(
    load: &LoadHandle,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&LoadSnapshot) -> bool,
) -> anyhow::Result<LoadSnapshot> {
    load.wait_until(timeout, cond).await.map_err(|last| {
        anyhow::anyhow!(
            "timed out after {timeout:?} waiting for {what}; load: {} requests, {} failed ({}), pids {:?}",
            last.requests,
            last.failed,
            last.failures,
            last.pids
        )
    })
}

/// A free TCP port on 127.0.0.1 (bound and released; the app binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// hello-http run directly, binding its own port (no baton): SIGKILLed on drop.
pub struct DirectApp {
    child: tokio::process::Child,
    pid: u32,
}

impl DirectApp {
    /// Starts `program --listen-fallback <addr> args...`; stderr is discarded unless
    /// `log` is given (the app logs every connection event at info level otherwise).
    pub fn spawn(
        program: &Path,
        addr: SocketAddr,
        args: &[&str],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("open {}", path.display()))?,
            ),
            None => Stdio::null(),
        };
        let child = tokio::process::Command::new(program)
            .arg("--listen-fallback")
            .arg(addr.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", program.display()))?;
        let pid = child
            .id()
            .context("spawned child has no pid (already reaped?)")?;
        Ok(Self { child, pid })
    }

    /// Starts `program args...` socket-activated, without baton: `listener` as fd 3 with
    /// `LISTEN_FDS=1`, `LISTEN_FDNAMES=http` and `LISTEN_PID` = its own pid (a shell sets it
    /// and execs the program, which keeps the pid). This is what systemd does for a
    /// service with a `.socket` unit.
    pub fn spawn_activated(
        program: &Path,
        listener: &std::net::TcpListener,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        use std::os::fd::AsFd;
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
            .arg(program)
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "http")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        sys::pass_as_fd3(&mut cmd, listener.as_fd());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} (socket-activated)", program.display()))?;
        let pid = child
            .id()
            .context("spawned child has no pid (already reaped?)")?;
        Ok(Self { child, pid })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits (bounded) until it answers `GET /` on `addr` with its own pid. Fails early
    /// if it exits (e.g. its port was taken).
    pub async fn wait_serving(
        &mut self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited before serving: {status}", self.pid);
            }
            if let Ok(Ok(pid)) =
                tokio::time::timeout(Duration::from_secs(1), http_get_pid(addr)).await
            {
                if pid == self.pid {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("pid {} not serving on {addr} after {timeout:?}", self.pid);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `systemctl stop` for a service without a socket unit: SIGTERM, then wait (bounded)
    /// for the process to exit.
    pub async fn terminate(mut self, timeout: Duration) -> anyhow::Result<()> {
        sys::signal(self.pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("SIGTERM {}", self.pid))?;
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "pid {} did not exit within {timeout:?} of SIGTERM",
                    self.pid
                )
            })?
            .context("wait for the app")?;
        Ok(())
    }
}

/// One `GET /` on a new connection; the `pid=` in the body.
pub async fn http_get_pid(addr: SocketAddr) -> anyhow::Result<u32> {
    let mut conn = HttpConn::connect(addr).await?;
    let resp = conn.get().await?;
    resp.pid.context("no pid= in the response body")
}

pub use baton_tests::idle::HttpConn;

/// The closed-loop HTTP load every HTTP scenario uses ("the same load").
pub fn http_load(keepalive: usize, fresh: usize) -> LoadOpts {
    LoadOpts {
        keepalive,
        fresh,
        ..LoadOpts::default()
    }
}

/// How busy the machine was with work that is not ours during a scenario: total busy CPU
/// (from `/proc/stat`) minus the CPU used by the bench's own process tree. Other builds or
/// tests on the same 2 cores show up here, so a noisy figure is recognisable as such.
pub struct CpuMeter {
    started: Instant,
    machine: Option<f64>,
    own: Option<Duration>,
}

impl CpuMeter {
    /// Starts measuring.
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            machine: machine_busy_secs(),
            own: sys::own_cpu().ok(),
        }
    }

    /// Foreign CPU use as a percentage of the machine's capacity over the interval.
    pub fn foreign_pct(&self) -> Option<u64> {
        let machine = machine_busy_secs()? - self.machine?;
        let own = (sys::own_cpu().ok()? - self.own?).as_secs_f64();
        let cores = std::thread::available_parallelism().ok()?.get() as f64;
        let capacity = self.started.elapsed().as_secs_f64() * cores;
        (capacity > 0.0).then(|| ((machine - own).max(0.0) / capacity * 100.0).round() as u64)
    }
}

/// Busy CPU seconds of the whole machine since boot (every state but idle and iowait).
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
        .map(|(_, t)| t)
        .sum();
    // USER_HZ is 100 on every Linux ABI the bench runs on.
    Some(busy as f64 / 100.0)
}

/// CPU seconds (user + system) `pid` has used so far, from `/proc/<pid>/stat`.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces; the fields after the last ')' are fixed: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}
