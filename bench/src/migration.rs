//! `migration`: P persistent, idle connections across K upgrades. With connection
//! migration the old generation hands each one to the new generation, so the client keeps
//! its TCP connection and the next request is answered by the new pid. Without it every
//! connection is closed by the draining generation: a disconnect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_protocol::UpgradeResult;
use baton_tests::harness::Baton;
use baton_tests::resp::{Reply, RespClient};
use clap::ValueEnum;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::Bins;
use crate::common::{Control, HttpConn, shutdown, wait_pid_gone, with_log};
use crate::report::{RSS_TARGET_KB, Row, Target, median, percentile};

/// Which app holds the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum App {
    /// hello-http: keep-alive HTTP/1.1 connections, `GET /`.
    Http,
    /// kv-server: RESP connections, `INFO`.
    Kv,
}

/// Shape of the run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Connections held open.
    pub connections: usize,
    /// Upgrades.
    pub upgrades: usize,
    /// The app.
    pub app: App,
    /// baton's `--drain-timeout`: the bound on a hand-over.
    pub drain_timeout: Duration,
}

const SCENARIO: &str = "migration";
/// Concurrent connects while opening the connections (below the listen backlog).
const CONNECT_BATCH: usize = 256;
/// Bound on one request on a held connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

enum Conn {
    Http(HttpConn),
    Kv(RespClient<TcpStream>),
}

/// How one request on a held connection went.
enum Outcome {
    /// Answered by `pid`, and the connection stays open.
    Served(u32),
    /// Answered, but the server closes the connection (`Connection: close`).
    ServedThenClosed,
    /// The connection was closed or reset, or the request failed.
    Lost(String),
}

impl Conn {
    async fn open(app: App, addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(match app {
            App::Http => Conn::Http(HttpConn::connect(addr).await?),
            App::Kv => Conn::Kv(RespClient::connect(addr).await?),
        })
    }

    async fn request(&mut self) -> Outcome {
        let attempt = tokio::time::timeout(REQUEST_TIMEOUT, async {
            match self {
                Conn::Http(c) => {
                    let r = c.get().await?;
                    if r.status != 200 {
                        bail!("status {}", r.status);
                    }
                    let pid = r.pid.context("no pid in the body")?;
                    Ok(if r.close {
                        Outcome::ServedThenClosed
                    } else {
                        Outcome::Served(pid)
                    })
                }
                Conn::Kv(c) => match c.command(&["INFO"]).await? {
                    Reply::Bulk(Some(text)) => {
                        let text = String::from_utf8_lossy(&text);
                        let pid = text
                            .lines()
                            .find_map(|l| l.strip_prefix("process_id:"))
                            .and_then(|p| p.trim().parse().ok())
                            .context("no process_id in INFO")?;
                        Ok(Outcome::Served(pid))
                    }
                    other => bail!("INFO returned {other}"),
                },
            }
        })
        .await;
        match attempt {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Outcome::Lost(format!("{e:#}")),
            Err(_) => Outcome::Lost(format!("no answer within {REQUEST_TIMEOUT:?}")),
        }
    }
}

/// Runs the scenario.
pub async fn run(bins: &Bins, opts: &Opts) -> anyhow::Result<Row> {
    let (listener, program) = match opts.app {
        App::Http => ("http=127.0.0.1:0", bins.hello.as_os_str()),
        App::Kv => ("kv=127.0.0.1:0", bins.kv.as_os_str()),
    };
    let drain = humantime::format_duration(opts.drain_timeout).to_string();
    let baton = Baton::start(
        ["--listen", listener, "--drain-timeout", drain.as_str()],
        [program],
    )
    .await?;
    let control = Control::new(baton.control());
    let row = measure(&baton, &control, opts)
        .await
        .map_err(|e| with_log(&baton, e))?;
    shutdown(baton).await?;
    Ok(row)
}

async fn measure(baton: &Baton, control: &Control, opts: &Opts) -> anyhow::Result<Row> {
    let name = match opts.app {
        App::Http => "http",
        App::Kv => "kv",
    };
    let addr = baton.tcp_addr(name).await?;
    let status = control.status().await?;
    let mut pid = status.pid.context("no active pid")?;
    let mut rss_kb = status.rss_kb;

    let mut conns = open_all(opts.app, addr, opts.connections).await?;
    let (back, lost, _) = round(conns, pid).await;
    if lost > 0 {
        bail!(
            "{lost} of {} connections failed before any upgrade",
            opts.connections
        );
    }
    conns = back;
    tracing::info!(connections = conns.len(), "migration: connections open");

    let mut disconnects = 0u64;
    let mut migrated = 0u64;
    let mut handover_ms = Vec::new();
    let mut upgrade_ms = Vec::new();
    for i in 1..=opts.upgrades {
        let old = pid;
        let (report, took) = control.upgrade().await?;
        if report.result != UpgradeResult::Promoted {
            bail!("upgrade {i} rolled back: {:?}", report.reason);
        }
        upgrade_ms.push(took.as_secs_f64() * 1000.0);
        pid = report.pid.context("promoted without a pid")?;
        // The old generation exits once it has handed over (or closed) every connection.
        let gone = wait_pid_gone(old, opts.drain_timeout + Duration::from_secs(10))
            .await
            .with_context(|| format!("upgrade {i}: old generation {old} did not exit"))?;
        handover_ms.push(gone.as_secs_f64() * 1000.0);
        let status = control.wait_settled(Duration::from_secs(30)).await?;
        rss_kb = rss_kb.max(status.rss_kb);
        let this_migrated = status
            .last_upgrade
            .as_ref()
            .map_or(0, |u| u.migrated_connections);
        migrated += this_migrated;

        let (mut back, lost, first_loss) = round(conns, pid).await;
        disconnects += lost;
        tracing::info!(
            upgrade = i,
            migrated = this_migrated,
            lost,
            "migration: upgrade done"
        );
        if i == 1 && this_migrated == 0 {
            let mut row = Row::skipped(
                SCENARIO,
                format!(
                    "no connection was migrated: the app does not adopt connections yet; \
                     after 1 upgrade {lost} of {} connections were lost{} and the old \
                     generation exited {:.0} ms after promotion",
                    opts.connections,
                    first_loss
                        .map(|e| format!(" (e.g. {e})"))
                        .unwrap_or_default(),
                    gone.as_secs_f64() * 1000.0
                ),
            );
            row.set("connections", opts.connections)
                .set("app", format!("{:?}", opts.app).to_lowercase());
            return Ok(row);
        }
        // Reopen what was lost so every upgrade starts with P connections.
        let missing = opts.connections - back.len();
        back.extend(open_all(opts.app, addr, missing).await?);
        conns = back;
    }

    let per_1k = opts.connections as f64 / 1000.0;
    let mut row = Row::new(SCENARIO);
    row.set("connections", opts.connections)
        .set("upgrades", opts.upgrades)
        .set("disconnects", disconnects)
        .target("disconnects", Target::Eq(0.0))
        .set_ms("migrate_ms_per_1k", median(&handover_ms) / per_1k)
        .set("supervisor_rss_kb", rss_kb)
        .target("supervisor_rss_kb", RSS_TARGET_KB)
        .set("migrated_connections", migrated)
        .set_ms("handover_ms_max", percentile(&handover_ms, 1.0))
        .set_ms("upgrade_ms_p50", median(&upgrade_ms))
        .set("app", format!("{:?}", opts.app).to_lowercase())
        .note("migrate_ms_per_1k: median time from promotion until the old generation exited having handed over every connection, per 1,000 connections");
    Ok(row)
}

/// Opens `n` connections, `CONNECT_BATCH` at a time.
async fn open_all(app: App, addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Conn>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = CONNECT_BATCH.min(n - out.len());
        let mut set = JoinSet::new();
        for _ in 0..batch {
            set.spawn(Conn::open(app, addr));
        }
        while let Some(joined) = set.join_next().await {
            out.push(joined.context("connect task")??);
        }
    }
    Ok(out)
}

/// One request on every connection, all at once. Returns the connections that are still
/// open and served by `pid`, the number lost (closed, reset, or answered by another pid),
/// and the first loss's description.
async fn round(conns: Vec<Conn>, pid: u32) -> (Vec<Conn>, u64, Option<String>) {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for mut c in conns {
        set.spawn(async move {
            let outcome = c.request().await;
            (c, outcome)
        });
    }
    let mut kept = Vec::new();
    let mut lost = 0;
    let mut first = None;
    while let Some(joined) = set.join_next().await {
        let Ok((conn, outcome)) = joined else {
            lost += 1;
            continue;
        };
        let why = match outcome {
            Outcome::Served(p) if p == pid => {
                kept.push(conn);
                continue;
            }
            Outcome::Served(p) => format!("answered by pid {p}, expected {pid}"),
            Outcome::ServedThenClosed => "closed by the server (Connection: close)".to_owned(),
            Outcome::Lost(e) => e,
        };
        lost += 1;
        first.get_or_insert(why);
    }
    tracing::debug!(ms = started.elapsed().as_millis(), lost, "round done");
    (kept, lost, first)
}
