//! `migration`: P persistent, idle connections across K upgrades. With connection
//! migration the old generation hands each one to the new generation, so the client keeps
//! its TCP connection and the next request is answered by the new pid. Every connection
//! that is not is a disconnect; baton's own count of lost connections must agree.
//!
//! Past about 28,000 connections one loopback address runs out of ephemeral ports, so the
//! connections come from several source addresses in 127.0.0.0/8 (`idle::PER_SOURCE`
//! each).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_protocol::UpgradeResult;
use baton_tests::harness::{Baton, proc_fds, proc_peak_rss_kb};
use baton_tests::idle::{self, Conn};
use clap::ValueEnum;

use crate::Bins;
use crate::common::{Control, shutdown, wait_pid_gone, with_log};
use crate::report::{Row, Target, median, percentile};

/// Which app holds the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum App {
    /// hello-http: keep-alive HTTP/1.1 connections, `GET /`.
    Http,
    /// kv-server: RESP connections, `INFO`.
    Kv,
}

impl From<App> for idle::App {
    fn from(a: App) -> Self {
        match a {
            App::Http => idle::App::Http,
            App::Kv => idle::App::Kv,
        }
    }
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
/// Bound on one request on a held connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests in flight at once in a round: the latency measured is the server's,
/// not the queue of 100,000 client tasks.
const ROUND_PARALLEL: usize = 64;
/// baton's resident memory while it hands connections over.
const RSS_TARGET_KB: Target = Target::Le(16.0 * 1024.0);

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
    let app = idle::App::from(opts.app);
    let name = match opts.app {
        App::Http => "http",
        App::Kv => "kv",
    };
    let addr: SocketAddr = baton.tcp_addr(name).await?;
    let status = control.status().await?;
    let mut pid = status.pid.context("no active pid")?;
    let baton_pid = baton.pid();
    let base_fds = proc_fds(baton_pid)?.len();

    let t = Instant::now();
    let conns = idle::open_all(app, addr, 0, opts.connections).await?;
    let open_s = t.elapsed().as_secs_f64();
    let r = idle::round(conns, pid, ROUND_PARALLEL, REQUEST_TIMEOUT).await;
    if r.lost > 0 {
        bail!(
            "{} of {} connections failed before any upgrade (e.g. {:?})",
            r.lost,
            opts.connections,
            r.first_loss
        );
    }
    let usual_p99 = percentile(&r.latencies_ms, 0.99);
    let mut conns: Vec<Conn> = r.kept;
    tracing::info!(
        connections = conns.len(),
        open_s,
        "migration: connections open"
    );

    let mut disconnects = 0u64;
    let (mut migrated, mut lost_reported) = (0u64, 0u64);
    let mut handover_ms = Vec::new();
    let mut upgrade_ms = Vec::new();
    let mut first_p99 = Vec::new();
    let mut fds_after = 0usize;
    for i in 1..=opts.upgrades {
        let old = pid;
        let (report, took) = control.upgrade().await?;
        if report.result != UpgradeResult::Promoted {
            bail!("upgrade {i} rolled back: {:?}", report.reason);
        }
        upgrade_ms.push(took.as_secs_f64() * 1000.0);
        pid = report.pid.context("promoted without a pid")?;
        // The old generation exits once it has handed over (or closed) every connection.
        let gone = wait_pid_gone(old, opts.drain_timeout + Duration::from_secs(30))
            .await
            .with_context(|| format!("upgrade {i}: old generation {old} did not exit"))?;
        handover_ms.push(gone.as_secs_f64() * 1000.0);
        let status = control.wait_settled(Duration::from_secs(60)).await?;
        let last = status.last_upgrade.context("no last upgrade")?;
        migrated += last.migrated_connections;
        lost_reported += last.lost_connections;

        let r = idle::round(conns, pid, ROUND_PARALLEL, REQUEST_TIMEOUT).await;
        // Every connection answered by the new pid: nothing is in relay any more.
        fds_after = fds_after.max(proc_fds(baton_pid)?.len());
        disconnects += r.lost;
        first_p99.push(percentile(&r.latencies_ms, 0.99));
        tracing::info!(
            upgrade = i,
            migrated = last.migrated_connections,
            lost_reported = last.lost_connections,
            lost_seen = r.lost,
            handover_ms = gone.as_secs_f64() * 1000.0,
            "migration: upgrade done"
        );
        if i == 1 && last.migrated_connections == 0 {
            let mut row = Row::skipped(
                SCENARIO,
                format!(
                    "no connection was migrated: the app does not adopt connections; \
                     after 1 upgrade {} of {} connections were lost{}",
                    r.lost,
                    opts.connections,
                    r.first_loss
                        .map(|e| format!(" (e.g. {e})"))
                        .unwrap_or_default(),
                ),
            );
            row.set("connections", opts.connections);
            return Ok(row);
        }
        // Reopen what was lost so every upgrade starts with P connections.
        let mut back = r.kept;
        let missing = opts.connections - back.len();
        back.extend(idle::open_all(app, addr, opts.connections, missing).await?);
        conns = back;
    }

    let handover_p50 = median(&handover_ms);
    let mut row = Row::new(SCENARIO);
    row.set("connections", opts.connections)
        .set("upgrades", opts.upgrades)
        .set("app", format!("{:?}", opts.app).to_lowercase())
        .set("disconnects", disconnects)
        .target("disconnects", Target::Eq(0.0))
        .set("lost_connections_reported", lost_reported)
        .target("lost_connections_reported", Target::Eq(0.0))
        .set("migrated_connections", migrated)
        .set_ms("handover_ms_p50", handover_p50)
        .set_ms("handover_ms_max", percentile(&handover_ms, 1.0))
        .set(
            "migrated_per_s",
            (opts.connections as f64 / (handover_p50 / 1000.0)).round(),
        )
        .set_ms("upgrade_ms_p50", median(&upgrade_ms))
        .set_ms("request_p99_ms_before", usual_p99)
        .set_ms("first_request_p99_ms_after", median(&first_p99))
        .set(
            "supervisor_peak_rss_kb",
            proc_peak_rss_kb(baton_pid).unwrap_or(0),
        )
        .target("supervisor_peak_rss_kb", RSS_TARGET_KB)
        .set("supervisor_fds_base", base_fds)
        .set("supervisor_fds_after_max", fds_after)
        .note(
            "handover_ms: from promotion until the old generation exited having handed over \
             every connection; first_request_p99_ms_after: p99 of the first request on each \
             migrated connection (64 in flight), median over the upgrades, against \
             request_p99_ms_before measured the same way before any upgrade; \
             supervisor_peak_rss_kb is baton's VmHWM over the whole run",
        );
    if opts.connections >= 100_000 {
        row.target("handover_ms_p50", Target::Le(1000.0));
    }
    Ok(row)
}
