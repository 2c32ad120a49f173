//! A closed-loop HTTP/1.1 load generator that counts every outcome honestly.
//!
//! Two kinds of clients run side by side:
//! - keep-alive clients hold one connection and send request after request on it. A
//!   response carrying `Connection: close` is read in full and the next request goes out
//!   on a new connection; that is a reconnect, not a failure.
//! - connection-per-request ("fresh") clients connect, send one request with
//!   `Connection: close`, read the response and close.
//!
//! Every request attempt ends as exactly one of: ok (status 200) or one failure kind
//! ([`FailureKind`]). Nothing is retried behind the caller's back. The latency of every
//! attempt, failed or not, goes into the histogram, measured from the moment the attempt
//! started (including a connect, if one was needed) to the moment its outcome was known, so
//! a stalled request shows up in the tail.
//!
//! The client is hand-written on purpose: an HTTP library would hide exactly the events
//! (an early EOF, a reset on a reused connection) that the upgrade tests must see.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Responses larger than this are treated as a parse error: the servers under test answer
/// a few bytes, and an unbounded body would turn a server bug into an OOM here.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// How the load is shaped.
#[derive(Debug, Clone)]
pub struct LoadOpts {
    /// Number of keep-alive clients (one connection each, closed loop).
    pub keepalive: usize,
    /// Number of connection-per-request clients.
    pub fresh: usize,
    /// Bound on one request attempt, connect included. Exceeding it is a `timeout` failure.
    pub request_timeout: Duration,
    /// Request target, e.g. `/`.
    pub path: String,
    /// Pause after a failed attempt, so that a refused port does not turn a client into a
    /// busy loop that starves the machine (and inflates the failure count to no purpose).
    pub failure_backoff: Duration,
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            keepalive: 4,
            fresh: 4,
            request_timeout: Duration::from_secs(5),
            path: "/".to_owned(),
            failure_backoff: Duration::from_millis(10),
        }
    }
}

/// Why a request attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// `connect()` got ECONNREFUSED.
    ConnectRefused,
    /// `connect()` failed otherwise (e.g. EADDRNOTAVAIL).
    ConnectOther,
    /// ECONNRESET / EPIPE / ECONNABORTED while sending or receiving.
    Reset,
    /// The server closed the connection before a complete response to a sent request.
    EofBeforeResponse,
    /// The attempt took longer than [`LoadOpts::request_timeout`].
    Timeout,
    /// A complete response with a status other than 200.
    BadStatus,
    /// The response was not valid HTTP/1.x (or too large, or had trailing garbage).
    ParseError,
    /// Any other I/O error; listed separately so that nothing is silently folded in.
    IoOther,
}

impl FailureKind {
    /// Every kind, in a fixed order (the order of [`FailureCounts`]'s fields).
    pub const ALL: [FailureKind; 8] = [
        FailureKind::ConnectRefused,
        FailureKind::ConnectOther,
        FailureKind::Reset,
        FailureKind::EofBeforeResponse,
        FailureKind::Timeout,
        FailureKind::BadStatus,
        FailureKind::ParseError,
        FailureKind::IoOther,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The snake_case name used in JSON and in the human summary.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::ConnectRefused => "connect_refused",
            FailureKind::ConnectOther => "connect_other",
            FailureKind::Reset => "reset",
            FailureKind::EofBeforeResponse => "eof_before_response",
            FailureKind::Timeout => "timeout",
            FailureKind::BadStatus => "bad_status",
            FailureKind::ParseError => "parse_error",
            FailureKind::IoOther => "io_other",
        }
    }
}

/// Failure counts by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCounts {
    /// See [`FailureKind::ConnectRefused`].
    pub connect_refused: u64,
    /// See [`FailureKind::ConnectOther`].
    pub connect_other: u64,
    /// See [`FailureKind::Reset`].
    pub reset: u64,
    /// See [`FailureKind::EofBeforeResponse`].
    pub eof_before_response: u64,
    /// See [`FailureKind::Timeout`].
    pub timeout: u64,
    /// See [`FailureKind::BadStatus`].
    pub bad_status: u64,
    /// See [`FailureKind::ParseError`].
    pub parse_error: u64,
    /// See [`FailureKind::IoOther`].
    pub io_other: u64,
}

impl FailureCounts {
    /// The count of one kind.
    pub fn get(&self, kind: FailureKind) -> u64 {
        match kind {
            FailureKind::ConnectRefused => self.connect_refused,
            FailureKind::ConnectOther => self.connect_other,
            FailureKind::Reset => self.reset,
            FailureKind::EofBeforeResponse => self.eof_before_response,
            FailureKind::Timeout => self.timeout,
            FailureKind::BadStatus => self.bad_status,
            FailureKind::ParseError => self.parse_error,
            FailureKind::IoOther => self.io_other,
        }
    }

    fn from_array(a: [u64; 8]) -> Self {
        Self {
            connect_refused: a[0],
            connect_other: a[1],
            reset: a[2],
            eof_before_response: a[3],
            timeout: a[4],
            bad_status: a[5],
            parse_error: a[6],
            io_other: a[7],
        }
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        FailureKind::ALL.iter().map(|k| self.get(*k)).sum()
    }

    /// The kinds that occurred, with their counts.
    pub fn nonzero(&self) -> Vec<(FailureKind, u64)> {
        FailureKind::ALL
            .iter()
            .map(|k| (*k, self.get(*k)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

impl fmt::Display for FailureCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds = self.nonzero();
        if kinds.is_empty() {
            return f.write_str("none");
        }
        for (i, (kind, n)) in kinds.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}={}", kind.name(), n)?;
        }
        Ok(())
    }
}

/// Counters shared by all clients; read live by [`LoadHandle::snapshot`].
struct Shared {
    stop: AtomicBool,
    ok: AtomicU64,
    failures: [AtomicU64; 8],
    reconnects: AtomicU64,
    /// Every pid seen in a body. Each client publishes a pid here only the first time it
    /// sees it, so the lock is taken a handful of times per run, not per request.
    pids: Mutex<BTreeSet<u32>>,
    started: Instant,
}

impl Shared {
    fn failures(&self) -> FailureCounts {
        let mut a = [0u64; 8];
        for (slot, counter) in a.iter_mut().zip(self.failures.iter()) {
            *slot = counter.load(Ordering::Relaxed);
        }
        FailureCounts::from_array(a)
    }

    fn pids(&self) -> BTreeSet<u32> {
        self.pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Live counters of a running load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// Time since the load started.
    pub elapsed: Duration,
    /// Attempts that finished (ok + failed).
    pub requests: u64,
    /// Responses with status 200.
    pub ok: u64,
    /// Attempts that failed, any kind.
    pub failed: u64,
    /// Failures by kind.
    pub failures: FailureCounts,
    /// New connections opened by keep-alive clients after their first one.
    pub reconnects: u64,
    /// Every `pid=<n>` seen in a response body so far.
    pub pids: BTreeSet<u32>,
}

/// Entry point.
pub struct LoadGen;

impl LoadGen {
    /// Starts the clients on the current tokio runtime and returns at once.
    ///
    /// Must be called from within a tokio runtime (the clients are spawned tasks); with a
    /// multi-threaded runtime they spread over its workers.
    pub fn start(addr: SocketAddr, opts: LoadOpts) -> LoadHandle {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            failures: Default::default(),
            reconnects: AtomicU64::new(0),
            pids: Mutex::new(BTreeSet::new()),
            started: Instant::now(),
        });
        let host = addr.to_string();
        let path = if opts.path.is_empty() {
            "/"
        } else {
            opts.path.as_str()
        };
        let keepalive_req: Arc<[u8]> =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: baton-loadgen\r\n\r\n")
                .into_bytes()
                .into();
        let fresh_req: Arc<[u8]> = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: baton-loadgen\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
        .into();

        let mut tasks = Vec::with_capacity(opts.keepalive + opts.fresh);
        for _ in 0..opts.keepalive {
            let client = Client::new(addr, &opts, Arc::clone(&shared), Arc::clone(&keepalive_req));
            tasks.push(tokio::spawn(client.run_keepalive()));
        }
        for _ in 0..opts.fresh {
            let client = Client::new(addr, &opts, Arc::clone(&shared), Arc::clone(&fresh_req));
            tasks.push(tokio::spawn(client.run_fresh()));
        }
        LoadHandle {
            addr,
            opts,
            shared,
            tasks,
        }
    }
}

/// A running load. Dropping it without [`LoadHandle::stop`] tells the clients to stop but
/// does not wait for them.
pub struct LoadHandle {
    addr: SocketAddr,
    opts: LoadOpts,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<ClientResult>>,
}

impl LoadHandle {
    /// The live counters.
    pub fn snapshot(&self) -> LoadSnapshot {
        let failures = self.shared.failures();
        let ok = self.shared.ok.load(Ordering::Relaxed);
        let failed = failures.total();
        LoadSnapshot {
            elapsed: self.shared.started.elapsed(),
            requests: ok + failed,
            ok,
            failed,
            failures,
            reconnects: self.shared.reconnects.load(Ordering::Relaxed),
            pids: self.shared.pids(),
        }
    }

    /// Waits, bounded, until `cond` holds for the live counters; returns the snapshot that
    /// satisfied it, or the last one seen on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        cond: impl Fn(&LoadSnapshot) -> bool,
    ) -> Result<LoadSnapshot, LoadSnapshot> {
        let deadline = Instant::now() + timeout;
        loop {
            let snap = self.snapshot();
            if cond(&snap) {
                return Ok(snap);
            }
            if Instant::now() >= deadline {
                return Err(snap);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the clients and returns the final report. Requests in flight are finished (or
    /// time out) and counted, so this takes at most about one request timeout.
    pub async fn stop(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut hist = Histogram::new();
        let mut pid_counts: BTreeMap<u32, u64> = BTreeMap::new();
        let mut keepalive_reconnects = Vec::new();
        let mut samples = Vec::new();
        for task in std::mem::take(&mut self.tasks) {
            match task.await {
                Ok(result) => {
                    hist.merge(&result.hist);
                    samples.extend(result.samples);
                    for (pid, n) in result.pid_counts {
                        *pid_counts.entry(pid).or_default() += n;
                    }
                    if let Some(r) = result.keepalive_reconnects {
                        keepalive_reconnects.push(r);
                    }
                }
                // A client panicked: that is a bug in this module, surface it as such.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Cancelled only when the runtime shuts down under us; nothing to merge.
                Err(_) => {}
            }
        }
        let elapsed = self.shared.started.elapsed();
        let failures = self.shared.failures();
        let ok = self.shared.ok.load(Ordering::Relaxed);
        let failed = failures.total();
        let requests = ok + failed;
        let secs = elapsed.as_secs_f64();
        LoadReport {
            addr: self.addr.to_string(),
            keepalive_clients: self.opts.keepalive,
            fresh_clients: self.opts.fresh,
            duration_s: secs,
            requests,
            ok,
            failed,
            failures,
            requests_per_sec: if secs > 0.0 {
                requests as f64 / secs
            } else {
                0.0
            },
            latency_us: hist.summary(),
            pids: pid_counts.keys().copied().collect(),
            pid_counts,
            keepalive_reconnects,
            timeline: timeline(&samples),
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }
}

impl Drop for LoadHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Number of samples (= requests).
    pub count: u64,
    /// Smallest sample.
    pub min: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median (within 0.1%).
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest sample (exact).
    pub max: u64,
}

/// The outcome of a load run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Target address.
    pub addr: String,
    /// Number of keep-alive clients.
    pub keepalive_clients: usize,
    /// Number of connection-per-request clients.
    pub fresh_clients: usize,
    /// Wall time from start to the end of the last request.
    pub duration_s: f64,
    /// Attempts (= ok + failed).
    pub requests: u64,
    /// Responses with status 200.
    pub ok: u64,
    /// Failed attempts, any kind.
    pub failed: u64,
    /// Failed attempts by kind.
    pub failures: FailureCounts,
    /// requests / duration.
    pub requests_per_sec: f64,
    /// Latency of every attempt, ok or failed, in microseconds.
    pub latency_us: LatencySummary,
    /// Every `pid=<n>` seen in a body, ascending.
    pub pids: Vec<u32>,
    /// How many responses each pid served.
    pub pid_counts: BTreeMap<u32, u64>,
    /// Per keep-alive client: connections opened after its first one.
    pub keepalive_reconnects: Vec<u64>,
    /// Every [`SLOT`] of the run (not serialized: `--plot` draws it).
    #[serde(skip)]
    pub timeline: Vec<Slot>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_us;
        writeln!(
            f,
            "{} requests in {:.2}s to {} ({} keep-alive + {} fresh clients): {:.0} req/s",
            self.requests,
            self.duration_s,
            self.addr,
            self.keepalive_clients,
            self.fresh_clients,
            self.requests_per_sec
        )?;
        writeln!(f, "ok {}  failed {}", self.ok, self.failed)?;
        if self.failed > 0 {
            writeln!(f, "failures: {}", self.failures)?;
        }
        writeln!(
            f,
            "latency us: p50 {}  p90 {}  p99 {}  max {}  mean {:.0}",
            l.p50, l.p90, l.p99, l.max, l.mean
        )?;
        let reconnects: u64 = self.keepalive_reconnects.iter().sum();
        writeln!(
            f,
            "keep-alive reconnects: {} {:?}",
            reconnects, self.keepalive_reconnects
        )?;
        write!(f, "pids:")?;
        for (pid, n) in &self.pid_counts {
            write!(f, " {pid}({n})")?;
        }
        Ok(())
    }
}

/// What one client hands back when it stops.
struct ClientResult {
    hist: Histogram,
    samples: Vec<Sample>,
    pid_counts: HashMap<u32, u64>,
    /// `Some` for keep-alive clients.
    keepalive_reconnects: Option<u64>,
}

struct Client {
    addr: SocketAddr,
    timeout: Duration,
    backoff: Duration,
    shared: Arc<Shared>,
    request: Arc<[u8]>,
    buf: Vec<u8>,
    hist: Histogram,
    samples: Vec<Sample>,
    pid_counts: HashMap<u32, u64>,
    published: HashSet<u32>,
}

/// One attempt, for the timeline: its [`SLOT`], latency and outcome.
#[derive(Clone, Copy)]
struct Sample {
    slot: u32,
    latency_us: u32,
    failed: bool,
}

/// The timeline's resolution.
pub const SLOT: Duration = Duration::from_millis(100);

/// One [`SLOT`] of the timeline: the attempts that started in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Its start, in ms since the load started.
    pub t_ms: u64,
    /// Attempts.
    pub requests: u64,
    /// Failed ones.
    pub failed: u64,
    /// Their p99 latency.
    pub p99_us: u64,
}

/// Groups `samples` by slot, with every slot up to the last present (empty ones
/// are zero: a stall shows as a dip, not as a gap in the line).
fn timeline(samples: &[Sample]) -> Vec<Slot> {
    let n = samples
        .iter()
        .map(|s| s.slot as usize + 1)
        .max()
        .unwrap_or(0);
    let mut lat: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut failed = vec![0u64; n];
    for s in samples {
        lat[s.slot as usize].push(s.latency_us);
        failed[s.slot as usize] += u64::from(s.failed);
    }
    lat.into_iter()
        .zip(failed)
        .enumerate()
        .map(|(i, (mut l, failed))| {
            l.sort_unstable();
            let p99 = if l.is_empty() {
                0
            } else {
                l[((l.len() - 1) as f64 * 0.99).round() as usize]
            };
            Slot {
                t_ms: i as u64 * SLOT.as_millis() as u64,
                requests: l.len() as u64,
                failed,
                p99_us: u64::from(p99),
            }
        })
        .collect()
}

/// The parsed outcome of one exchange.
struct Response {
    status: u16,
    close: bool,
    pid: Option<u32>,
}

impl Client {
    fn new(addr: SocketAddr, opts: &LoadOpts, shared: Arc<Shared>, request: Arc<[u8]>) -> Self {
        Self {
            addr,
            timeout: opts.request_timeout,
            backoff: opts.failure_backoff,
            shared,
            request,
            buf: Vec::with_capacity(4096),
            hist: Histogram::new(),
            samples: Vec::new(),
            pid_counts: HashMap::new(),
            published: HashSet::new(),
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    async fn run_keepalive(mut self) -> ClientResult {
        let mut conn: Option<TcpStream> = None;
        let mut connects: u64 = 0;
        while !self.stopped() {
            let started = Instant::now();
            let attempt = tokio::time::timeout(self.timeout, async {
                if conn.is_none() {
                    conn = Some(connect(self.addr).await?);
                    connects += 1;
                    if connects > 1 {
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match conn.as_mut() {
                    Some(stream) => exchange(stream, &self.request, &mut self.buf).await,
                    None => Err(FailureKind::IoOther),
                }
            })
            .await
            .unwrap_or(Err(FailureKind::Timeout));
            if !matches!(&attempt, Ok(resp) if !resp.close) {
                // Closed by the server after a response, or in an unknown state after a
                // failure: either way the next request needs a new connection.
                conn = None;
            }
            self.record(started, attempt).await;
        }
        let reconnects = connects.saturating_sub(1);
        ClientResult {
            hist: self.hist,
            samples: self.samples,
            pid_counts: self.pid_counts,
            keepalive_reconnects: Some(reconnects),
        }
    }

    async fn run_fresh(mut self) -> ClientResult {
        while !self.stopped() {
            let started = Instant::now();
            let attempt = tokio::time::timeout(self.timeout, async {
                let mut stream = connect(self.addr).await?;
                exchange(&mut stream, &self.request, &mut self.buf).await
            })
            .await
            .unwrap_or(Err(FailureKind::Timeout));
            self.record(started, attempt).await;
        }
        ClientResult {
            hist: self.hist,
            samples: self.samples,
            pid_counts: self.pid_counts,
            keepalive_reconnects: None,
        }
    }

    async fn record(&mut self, started: Instant, attempt: Result<Response, FailureKind>) {
        let latency = duration_us(started.elapsed());
        self.hist.record(latency);
        self.samples.push(Sample {
            slot: u32::try_from(
                started
                    .saturating_duration_since(self.shared.started)
                    .as_millis()
                    / SLOT.as_millis(),
            )
            .unwrap_or(u32::MAX),
            latency_us: u32::try_from(latency).unwrap_or(u32::MAX),
            failed: !matches!(&attempt, Ok(r) if r.status == 200),
        });
        match attempt {
            Ok(resp) => {
                if let Some(pid) = resp.pid {
                    *self.pid_counts.entry(pid).or_default() += 1;
                    if self.published.insert(pid) {
                        self.shared
                            .pids
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(pid);
                    }
                }
                if resp.status == 200 {
                    self.shared.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.fail(FailureKind::BadStatus).await;
                }
            }
            Err(kind) => self.fail(kind).await,
        }
    }

    async fn fail(&mut self, kind: FailureKind) {
        self.shared.failures[kind.index()].fetch_add(1, Ordering::Relaxed);
        if !self.backoff.is_zero() {
            tokio::time::sleep(self.backoff).await;
        }
    }
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, FailureKind> {
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            FailureKind::ConnectRefused
        } else {
            FailureKind::ConnectOther
        }
    })?;
    // Requests are tiny and strictly alternate with responses: Nagle would only add delay.
    stream.set_nodelay(true).map_err(|e| classify_io(&e))?;
    Ok(stream)
}

fn classify_io(e: &io::Error) -> FailureKind {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => FailureKind::Reset,
        io::ErrorKind::UnexpectedEof => FailureKind::EofBeforeResponse,
        io::ErrorKind::TimedOut => FailureKind::Timeout,
        _ => FailureKind::IoOther,
    }
}

/// Sends one request and reads exactly one response.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Response, FailureKind> {
    stream
        .write_all(request)
        .await
        .map_err(|e| classify_io(&e))?;
    buf.clear();
    let mut scanned = 0;
    let mut head: Option<Head> = None;
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let n = stream.read_buf(buf).await.map_err(|e| classify_io(&e))?;
        let eof = n == 0;
        if head.is_none() {
            match find_head_end(buf, scanned) {
                Some(end) => {
                    head = Some(parse_head(&buf[..end]).map_err(|_| FailureKind::ParseError)?)
                }
                None => {
                    // Keep re-scanning only the tail that could hold a split "\r\n\r\n".
                    scanned = buf.len().saturating_sub(3);
                    if buf.len() > MAX_RESPONSE_BYTES {
                        return Err(FailureKind::ParseError);
                    }
                    if eof {
                        return Err(FailureKind::EofBeforeResponse);
                    }
                    continue;
                }
            }
        }
        let Some(h) = head.as_ref() else {
            continue;
        };
        match body_end(h, buf, eof) {
            Ok(Some((body, consumed))) => {
                if consumed != buf.len() {
                    // Bytes after the response we asked for: the server is out of step
                    // with us (or answered twice); the connection is unusable.
                    return Err(FailureKind::ParseError);
                }
                let pid = find_pid(&buf[body.0..body.1]);
                return Ok(Response {
                    status: h.status,
                    close: h.close,
                    pid,
                });
            }
            Ok(None) => {
                if buf.len() > MAX_RESPONSE_BYTES {
                    return Err(FailureKind::ParseError);
                }
                if eof {
                    return Err(FailureKind::EofBeforeResponse);
                }
            }
            Err(()) => return Err(FailureKind::ParseError),
        }
    }
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// No length and not chunked: the body runs until the server closes.
    UntilEof,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    status: u16,
    /// The server will close after this response.
    close: bool,
    framing: Framing,
    /// Offset of the first body byte.
    len: usize,
}

/// Finds the end of the header block (index just past `\r\n\r\n`), scanning from `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4)
}

/// Parses a response's status line and headers with httparse, handing each header to
/// `each` (name as sent, value trimmed): `(minor version, status, head length)`.
pub(crate) fn parse_response_head(
    head: &[u8],
    mut each: impl FnMut(&str, &str) -> Result<(), ()>,
) -> Result<(u8, u16, usize), ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let len = match r.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(()),
    };
    for h in r.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| ())?;
        each(h.name, value.trim())?;
    }
    Ok((r.version.ok_or(())?, r.code.ok_or(())?, len))
}

/// Parses a status line and headers; `head` ends with `\r\n\r\n`.
fn parse_head(head: &[u8]) -> Result<Head, ()> {
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close_token = None;
    let (minor, status, _) = parse_response_head(head, |name, value| {
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| ())?;
            if content_length.is_some_and(|old| old != n) {
                return Err(());
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    close_token = Some(true);
                } else if token.eq_ignore_ascii_case("keep-alive") && close_token.is_none() {
                    close_token = Some(false);
                }
            }
        }
        Ok(())
    })?;
    let mut close = close_token.unwrap_or(minor == 0);
    let framing = if status / 100 == 1 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::UntilEof
    };
    Ok(Head {
        status,
        close,
        framing,
        len: head.len(),
    })
}

/// Returns `(body range, bytes consumed)` once the whole response is in `buf`.
/// For chunked bodies the range spans the raw chunked encoding, which is good enough to
/// find `pid=` in (chunk boundaries inside the token are not a concern for tiny bodies).
#[allow(clippy::type_complexity)]
fn body_end(head: &Head, buf: &[u8], eof: bool) -> Result<Option<((usize, usize), usize)>, ()> {
    let start = head.len;
    match head.framing {
        Framing::Length(n) => {
            let end = start.checked_add(n).ok_or(())?;
            if n > MAX_RESPONSE_BYTES {
                return Err(());
            }
            Ok((buf.len() >= end).then_some(((start, end), end)))
        }
        Framing::UntilEof => Ok(eof.then_some(((start, buf.len()), buf.len()))),
        Framing::Chunked => {
            let mut pos = start;
            loop {
                let Some(line_end) = find_crlf(buf, pos) else {
                    return Ok(None);
                };
                let line = std::str::from_utf8(&buf[pos..line_end]).map_err(|_| ())?;
                let size_hex = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_hex, 16).map_err(|_| ())?;
                if size > MAX_RESPONSE_BYTES {
                    return Err(());
                }
                pos = line_end + 2;
                if size == 0 {
                    // Trailers, then an empty line.
                    loop {
                        let Some(end) = find_crlf(buf, pos) else {
                            return Ok(None);
                        };
                        let empty = end == pos;
                        pos = end + 2;
                        if empty {
                            return Ok(Some(((start, pos), pos)));
                        }
                    }
                }
                if buf.len() < pos + size + 2 {
                    return Ok(None);
                }
                if &buf[pos + size..pos + size + 2] != b"\r\n" {
                    return Err(());
                }
                pos += size + 2;
            }
        }
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// Extracts `<n>` from the first `pid=<n>` in a body.
pub fn find_pid(body: &[u8]) -> Option<u32> {
    let at = body.windows(4).position(|w| w == b"pid=")? + 4;
    let digits: &[u8] = &body[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

/// A latency histogram (HDR, 3 significant figures: every value within 0.1%),
/// mergeable across clients.
#[derive(Clone)]
pub struct Histogram(hdrhistogram::Histogram<u64>, Exact);

/// The exact extremes (HDR keeps them within its precision only).
#[derive(Clone, Copy)]
struct Exact {
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram, for values up to an hour in microseconds (larger ones are
    /// recorded as that).
    pub fn new() -> Self {
        // Valid bounds and precision: it fails only for low < 1, high < 2 * low, or
        // more than 5 significant figures.
        Self(
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            Exact {
                min: u64::MAX,
                max: 0,
            },
        )
    }

    /// Adds one sample.
    pub fn record(&mut self, v: u64) {
        self.0.saturating_record(v);
        self.1.min = self.1.min.min(v);
        self.1.max = self.1.max.max(v);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        // Same bounds on both sides: nothing is out of range.
        let _ = self.0.add(&other.0);
        self.1.min = self.1.min.min(other.1.min);
        self.1.max = self.1.max.max(other.1.max);
    }

    /// The value below which `q` of the samples fall (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q).min(self.1.max)
    }

    /// Count, min, mean, p50/p90/p99 and max.
    pub fn summary(&self) -> LatencySummary {
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.0.len(),
            min: self.1.min,
            mean: self.0.mean(),
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            max: self.1.max,
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_timeline_has_every_slot_and_its_p99() {
        let mut samples = Vec::new();
        for i in 0..100u32 {
            samples.push(Sample {
                slot: 0,
                latency_us: i + 1,
                failed: false,
            });
        }
        samples.push(Sample {
            slot: 3,
            latency_us: 7,
            failed: true,
        });
        let t = timeline(&samples);
        assert_eq!(t.len(), 4);
        assert_eq!((t[0].requests, t[0].failed, t[0].p99_us), (100, 0, 99));
        assert_eq!((t[1].requests, t[2].requests), (0, 0));
        assert_eq!(
            (t[3].t_ms, t[3].requests, t[3].failed, t[3].p99_us),
            (300, 1, 1, 7)
        );
    }

    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.min, 1);
        assert_eq!(s.max, 1000);
        assert_eq!((s.p50, s.p90, s.p99), (500, 900, 990), "{s:?}");
        let mut other = Histogram::new();
        other.record(1_000_000);
        h.merge(&other);
        assert_eq!(h.summary().max, 1_000_000);
        assert_eq!(h.summary().count, 1001);
    }

    #[test]
    fn parses_heads() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(
            (h.status, h.close, h.framing),
            (200, false, Framing::Length(12))
        );
        let h = parse_head(b"HTTP/1.1 503 Busy\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        assert_eq!(
            (h.status, h.close, h.framing),
            (503, true, Framing::Length(0))
        );
        let h = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        assert_eq!((h.close, h.framing), (true, Framing::UntilEof));
        let h = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert!(parse_head(b"HTTP/2 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 20 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
    }

    #[test]
    fn chunked_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npid=\r\n2\r\n42\r\n0\r\n\r\n";
        let end = find_head_end(raw, 0).unwrap();
        let h = parse_head(&raw[..end]).unwrap();
        assert_eq!(body_end(&h, &raw[..raw.len() - 1], false), Ok(None));
        let ((s, e), consumed) = body_end(&h, raw, false).unwrap().unwrap();
        assert_eq!(consumed, raw.len());
        assert_eq!(&raw[s..e], b"4\r\npid=\r\n2\r\n42\r\n0\r\n\r\n");
    }

    #[test]
    fn finds_pids() {
        assert_eq!(find_pid(b"hello pid=1234 gen=2\n"), Some(1234));
        assert_eq!(find_pid(b"pid=7"), Some(7));
        assert_eq!(find_pid(b"pid=\n"), None);
        assert_eq!(find_pid(b"nothing"), None);
    }

    /// A server that answers each connection with `script(request_index)` raw bytes, then
    /// closes the connection if the script says so.
    async fn scripted_server(
        script: impl Fn(u64) -> (Vec<u8>, bool) + Send + Sync + 'static,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(script);
        let counter = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let script = Arc::clone(&script);
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // Read one request head.
                        while find_head_end(&buf, 0).is_none() {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = find_head_end(&buf, 0).unwrap();
                        buf.drain(..end);
                        let i = counter.fetch_add(1, Ordering::Relaxed);
                        let (bytes, close) = script(i);
                        if s.write_all(&bytes).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn ok_response(close: bool) -> Vec<u8> {
        let body = "pid=4242\n";
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
            body
        )
        .into_bytes()
    }

    fn opts(keepalive: usize, fresh: usize) -> LoadOpts {
        LoadOpts {
            keepalive,
            fresh,
            request_timeout: Duration::from_millis(300),
            failure_backoff: Duration::from_millis(1),
            ..LoadOpts::default()
        }
    }

    async fn run_until(addr: SocketAddr, o: LoadOpts, min_requests: u64) -> LoadReport {
        let load = LoadGen::start(addr, o);
        load.wait_until(Duration::from_secs(10), |s| s.requests >= min_requests)
            .await
            .unwrap();
        load.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_ok_and_pids_on_keepalive_and_fresh() {
        let addr = scripted_server(|_| (ok_response(false), false)).await;
        let r = run_until(addr, opts(2, 2), 200).await;
        assert_eq!(r.failed, 0, "{r}");
        assert_eq!(r.ok, r.requests);
        assert_eq!(r.pids, vec![4242]);
        assert_eq!(r.pid_counts[&4242], r.ok);
        assert_eq!(r.keepalive_reconnects, vec![0, 0]);
        assert_eq!(r.latency_us.count, r.requests);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_close_is_a_reconnect_not_a_failure() {
        let addr = scripted_server(|i| (ok_response(i % 3 == 0), i % 3 == 0)).await;
        let r = run_until(addr, opts(1, 0), 100).await;
        assert_eq!(r.failed, 0, "{r}");
        assert!(r.keepalive_reconnects[0] >= 30, "{r}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_without_answer_is_eof_before_response() {
        // Every 4th request gets no answer at all: the server just closes.
        let addr = scripted_server(|i| {
            if i % 4 == 3 {
                (Vec::new(), true)
            } else {
                (ok_response(false), false)
            }
        })
        .await;
        let r = run_until(addr, opts(1, 1), 100).await;
        assert!(r.failures.eof_before_response > 0, "{r}");
        assert_eq!(r.failed, r.failures.eof_before_response, "{r}");
        assert_eq!(r.requests, r.ok + r.failed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_200_is_bad_status_and_garbage_is_parse_error() {
        let addr = scripted_server(|i| match i % 3 {
            0 => (
                b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n".to_vec(),
                false,
            ),
            1 => (b"SSH-2.0-nope\r\n\r\n".to_vec(), true),
            _ => (ok_response(false), false),
        })
        .await;
        let r = run_until(addr, opts(1, 0), 60).await;
        assert!(r.failures.bad_status > 0, "{r}");
        assert!(r.failures.parse_error > 0, "{r}");
        assert_eq!(
            r.failed,
            r.failures.bad_status + r.failures.parse_error,
            "{r}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_and_timeout() {
        // A port nobody listens on: bind, learn the port, close.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let r = run_until(addr, opts(1, 1), 10).await;
        assert_eq!(r.failed, r.requests);
        assert_eq!(r.failed, r.failures.connect_refused, "{r}");

        // A server that reads the request and never answers.
        let addr = scripted_server(|_| (Vec::new(), false)).await;
        let started = Instant::now();
        let r = run_until(addr, opts(1, 1), 2).await;
        assert!(r.failures.timeout >= 2, "{r}");
        assert_eq!(r.failed, r.failures.timeout, "{r}");
        // The stall is in the latency, not hidden.
        assert!(r.latency_us.max >= 300_000, "{r}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reset_is_counted() {
        // Accept and close with SO_LINGER 0 after reading the request: the client sees RST.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s.set_zero_linger();
                drop(s);
            }
        });
        let r = run_until(addr, opts(1, 1), 20).await;
        assert_eq!(r.ok, 0);
        assert!(r.failures.reset > 0, "{r}");
        // A reset may race with the orderly EOF of a read; nothing else is acceptable.
        assert_eq!(
            r.failed,
            r.failures.reset + r.failures.eof_before_response,
            "{r}"
        );
    }
}
