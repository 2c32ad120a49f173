//! The load a rehearsal runs through its upgrades: built-in HTTP clients (keep-alive
//! and a fresh connection per request), or any command (`--load CMD`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;

use super::cleanup::Cleanup;
use crate::sys;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<(Instant, String)>>,
}

/// Built-in HTTP/1.1 clients, running until stopped.
pub struct HttpLoad {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl HttpLoad {
    /// Starts `clients` keep-alive clients and as many that open a connection per
    /// request, each sending `GET path` to `addr` in a loop.
    pub fn start(addr: SocketAddr, path: &str, clients: usize) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut threads = Vec::new();
        for i in 0..clients.max(1) * 2 {
            let (stop, tally, path) = (stop.clone(), tally.clone(), path.to_owned());
            let keep_alive = i % 2 == 0;
            threads.push(std::thread::spawn(move || {
                client(addr, &path, keep_alive, &stop, &tally);
            }));
        }
        HttpLoad {
            stop,
            tally,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::Relaxed)
    }

    /// The failures between `from` and `to`: how many, and the first one's kind.
    pub fn failures_between(&self, from: Instant, to: Instant) -> (u64, Option<String>) {
        let f = self
            .tally
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut hits = f.iter().filter(|(t, _)| *t >= from && *t <= to);
        let first = hits.next().map(|(_, k)| k.clone());
        (u64::from(first.is_some()) + hits.count() as u64, first)
    }

    /// Stops the clients: (answered, failed, the first failure).
    pub fn stop(mut self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let f = self
            .tally
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (self.ok(), f.len() as u64, f.first().map(|(_, k)| k.clone()))
    }
}

impl Drop for HttpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn client(addr: SocketAddr, path: &str, keep_alive: bool, stop: &AtomicBool, tally: &Tally) {
    let request = if keep_alive {
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: baton-rehearse\r\n\r\n")
    } else {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: baton-rehearse\r\nConnection: close\r\n\r\n"
        )
    };
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let reused = conn.is_some();
        let c = match conn.take() {
            Some(c) => c,
            None => match TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
                    let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
                    let _ = s.set_nodelay(true);
                    BufReader::new(s)
                }
                Err(e) => {
                    fail(tally, format!("connect: {}", e.kind()));
                    // Not a busy loop against a port nobody listens on.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        match exchange(c, request.as_bytes()) {
            Ok((status, c)) if status < 500 => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                conn = c.filter(|_| keep_alive);
            }
            Ok((status, _)) => fail(tally, format!("HTTP {status}")),
            Err(why) if reused => fail(tally, format!("{why} (on a reused keep-alive connection)")),
            Err(why) => fail(tally, why),
        }
    }
}

/// One `GET path` on a fresh connection, bounded as any request: the status, or why not.
pub fn get_once(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: baton-rehearse\r\nConnection: close\r\n\r\n"
    );
    exchange(BufReader::new(s), request.as_bytes()).map(|(status, _)| status)
}

fn fail(tally: &Tally, why: String) {
    tally
        .failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((Instant::now(), why));
}

/// Sends one request and reads the response: its status, and the connection when it
/// may carry another request.
fn exchange(
    mut c: BufReader<TcpStream>,
    request: &[u8],
) -> Result<(u16, Option<BufReader<TcpStream>>), String> {
    let kind = |what: &str, e: std::io::Error| match e.kind() {
        // A read timeout (SO_RCVTIMEO) reports EAGAIN.
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!(
                "{what}: no answer within {}",
                humantime::format_duration(REQUEST_TIMEOUT)
            )
        }
        k => format!("{what}: {k}"),
    };
    c.get_mut()
        .write_all(request)
        .map_err(|e| kind("send", e))?;
    let mut head = Vec::new();
    loop {
        let n = c
            .read_until(b'\n', &mut head)
            .map_err(|e| kind("read", e))?;
        if n == 0 {
            return Err(if head.is_empty() {
                "connection closed before the response".into()
            } else {
                "connection closed in the response head".into()
            });
        }
        if head.ends_with(b"\r\n\r\n") || head.len() > 64 * 1024 {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("malformed response head".into()),
    }
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let close =
        header("connection").is_some_and(|v| v.contains("close")) || resp.version == Some(0);
    let body_err = |e: std::io::Error| kind("body", e);
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut line = String::new();
            c.read_line(&mut line).map_err(body_err)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| "malformed chunk size".to_string())?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if c.read_line(&mut line).map_err(body_err)? == 0 || line == "\r\n" {
                        break;
                    }
                }
                break;
            }
            std::io::copy(&mut c.by_ref().take(size as u64 + 2), &mut std::io::sink())
                .map_err(body_err)?;
        }
    } else if let Some(len) = header("content-length") {
        let len: u64 = len
            .trim()
            .parse()
            .map_err(|_| "bad content-length".to_string())?;
        let got =
            std::io::copy(&mut c.by_ref().take(len), &mut std::io::sink()).map_err(body_err)?;
        if got < len {
            return Err("connection closed in the body".into());
        }
    } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
        std::io::copy(&mut c, &mut std::io::sink()).map_err(body_err)?;
        return Ok((status, None));
    }
    Ok((status, (!close).then_some(c)))
}

/// `--load CMD`, run by `sh -c` in its own process group, its output in a file.
pub struct CmdLoad {
    child: Option<Child>,
    out: PathBuf,
    cleanup: Cleanup,
}

/// How a load command ended.
pub struct CmdEnd {
    /// Its exit status (`None`: it had to be killed).
    pub status: Option<ExitStatus>,
    /// It was still running when the rehearsal stopped it (SIGTERM to the shell, which
    /// lets the request in flight finish when the command traps it).
    pub stopped: bool,
    /// The last lines of its output.
    pub tail: String,
}

impl CmdLoad {
    /// Starts `cmd` with `env`, its output going to `dir/load.log`.
    ///
    /// # Errors
    /// It cannot be started.
    pub fn start(
        cmd: &str,
        env: &[(String, String)],
        dir: &Path,
        cleanup: Cleanup,
    ) -> anyhow::Result<CmdLoad> {
        let out = dir.join("load.log");
        let child = shell(cmd, env, &out, &cleanup)
            .with_context(|| format!("cannot start the load command {cmd:?}"))?;
        Ok(CmdLoad {
            child: Some(child),
            out,
            cleanup,
        })
    }

    /// Whether it has exited already.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Lets it finish within `grace`; one still running is stopped: SIGTERM to the shell
    /// only (a command that traps it ends after the request in flight; the whole group
    /// would kill that request), then SIGKILL to the group after 5 s.
    pub fn finish(mut self, grace: Duration) -> CmdEnd {
        let Some(mut c) = self.child.take() else {
            return CmdEnd {
                status: None,
                stopped: false,
                tail: String::new(),
            };
        };
        let pgid = c.id();
        let mut stopped = false;
        let status = wait_for(&mut c, grace).or_else(|| {
            stopped = true;
            let _ = sys::kill(pgid, Signal::SIGTERM);
            wait_for(&mut c, Duration::from_secs(5))
        });
        let status = status.or_else(|| {
            let _ = sys::signal_group(pgid, Signal::SIGKILL);
            let _ = c.wait();
            None
        });
        // Whatever it started in its group goes too.
        let _ = sys::signal_group(pgid, Signal::SIGKILL);
        self.cleanup.forget_group(pgid);
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        CmdEnd {
            stopped,
            status,
            tail: lines[lines.len().saturating_sub(5)..].join("\n"),
        }
    }
}

impl Drop for CmdLoad {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = sys::signal_group(c.id(), Signal::SIGKILL);
            let _ = c.wait();
            self.cleanup.forget_group(c.id());
        }
    }
}

/// Starts `sh -c cmd` with `env`, its output in the file `out`, in a process group of its
/// own that `cleanup` takes down (forget it once it is reaped); a SIGKILLed rehearsal
/// takes it along too.
///
/// # Errors
/// `out` cannot be created, or the shell cannot start.
pub fn shell(
    cmd: &str,
    env: &[(String, String)],
    out: &Path,
    cleanup: &Cleanup,
) -> std::io::Result<Child> {
    let f = std::fs::File::create(out)?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0);
    sys::die_with_parent(&mut command, Signal::SIGKILL);
    let child = command.spawn()?;
    cleanup.add_group(child.id());
    Ok(child)
}

/// The child's exit status, once it exits within `bound`; `None` if it is still running.
pub fn wait_for(c: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + bound;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
