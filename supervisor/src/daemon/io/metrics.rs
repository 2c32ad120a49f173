//! `--metrics ADDR`: baton's own figures in the Prometheus (OpenMetrics) text format,
//! built with prometheus-client, served on a socket of baton's own.
//!
//! Counters and histograms move with events (see [`Metrics::on_event`]); gauges
//! that describe the present (generations by phase, connections, probation) are
//! set by the driver as things change, and baton's RSS and open fds are read at
//! each scrape.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use baton_protocol::{BatonBuild, Event, EventKind, Phase, UpgradeResult};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The registry and every metric in it.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    upgrades: Family<Labels, Counter>,
    upgrade_seconds: Histogram,
    accept_gap_seconds: Histogram,
    snapshot_bytes: Histogram,
    migrated: Counter,
    handed_over: Counter,
    lost: Counter,
    crashes: Counter,
    restarts: Counter,
    reexecs: Family<Labels, Counter>,
    reverts: Family<Labels, Counter>,
    releases_failed: Counter,
    log_dropped: Counter,
    active: Gauge,
    generations: Family<Labels, Gauge>,
    connections: Family<Labels, Gauge>,
    on_probation: Gauge,
    probation_left: Gauge<f64, AtomicU64>,
    permanent: Family<Labels, Gauge>,
    rss: Gauge,
    fds: Gauge,
    /// Label sets set last, to zero the ones that went away.
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    connections: Vec<Labels>,
    permanent: Vec<Labels>,
}

const PHASES: [Phase; 5] = [
    Phase::Starting,
    Phase::Restoring,
    Phase::Active,
    Phase::Quiesced,
    Phase::Draining,
];

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Starting => "starting",
        Phase::Restoring => "restoring",
        Phase::Active => "active",
        Phase::Quiesced => "quiesced",
        Phase::Draining => "draining",
    }
}

fn label(k: &str, v: impl Into<String>) -> Labels {
    vec![(k.to_string(), v.into())]
}

/// What the gauges describe now.
pub struct Present<'a> {
    /// The active generation (0: none).
    pub active: u64,
    /// Phase of every running generation.
    pub phases: Vec<Phase>,
    /// Connections by generation, as the SDKs reported them.
    pub connections: Vec<(u64, u64)>,
    /// The release on probation, and seconds left (None: until made permanent).
    pub probation: Option<(&'a str, Option<f64>)>,
    /// The permanent release.
    pub permanent: Option<&'a str>,
}

impl Metrics {
    /// A registry with every metric at zero, and baton's build as `baton_build_info`.
    pub fn new(build: &BatonBuild) -> Self {
        let mut registry = Registry::default();
        let upgrades = Family::<Labels, Counter>::default();
        let upgrade_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let accept_gap_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let snapshot_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 12));
        let reexecs = Family::<Labels, Counter>::default();
        let reverts = Family::<Labels, Counter>::default();
        let generations = Family::<Labels, Gauge>::default();
        let connections = Family::<Labels, Gauge>::default();
        let permanent = Family::<Labels, Gauge>::default();
        let inner = Inner {
            upgrades: upgrades.clone(),
            upgrade_seconds: upgrade_seconds.clone(),
            accept_gap_seconds: accept_gap_seconds.clone(),
            snapshot_bytes: snapshot_bytes.clone(),
            migrated: Counter::default(),
            handed_over: Counter::default(),
            lost: Counter::default(),
            crashes: Counter::default(),
            restarts: Counter::default(),
            reexecs: reexecs.clone(),
            reverts: reverts.clone(),
            releases_failed: Counter::default(),
            log_dropped: Counter::default(),
            active: Gauge::default(),
            generations: generations.clone(),
            connections: connections.clone(),
            on_probation: Gauge::default(),
            probation_left: Gauge::default(),
            permanent: permanent.clone(),
            rss: Gauge::default(),
            fds: Gauge::default(),
            seen: Mutex::new(Seen::default()),
            registry: Registry::default(),
        };
        registry.register(
            "baton_build",
            "The baton executable running",
            Info::new(vec![
                ("version".to_string(), build.version.clone()),
                ("build_id".to_string(), build.build_id.clone()),
            ]),
        );
        registry.register(
            "baton_upgrades",
            "Upgrades (requested, and reverts) by result",
            upgrades,
        );
        registry.register(
            "baton_upgrade_duration_seconds",
            "From an upgrade's start to its promotion",
            upgrade_seconds,
        );
        registry.register(
            "baton_accept_gap_seconds",
            "Stateful upgrades: time no generation accepted, quiesce to promotion",
            accept_gap_seconds,
        );
        registry.register(
            "baton_snapshot_size_bytes",
            "Stateful upgrades: size of the state handed over",
            snapshot_bytes,
        );
        registry.register(
            "baton_migrated_connections",
            "Live connections handed from a draining generation to the active one",
            inner.migrated.clone(),
        );
        registry.register(
            "baton_handed_over_connections",
            "Live connections a draining generation sent to baton to hand over",
            inner.handed_over.clone(),
        );
        registry.register(
            "baton_lost_connections",
            "Connections handed over that never reached the active generation (each closed)",
            inner.lost.clone(),
        );
        registry.register(
            "baton_crashes",
            "Unexpected exits of the active generation",
            inner.crashes.clone(),
        );
        registry.register(
            "baton_restarts",
            "Generations started to replace a dead active one",
            inner.restarts.clone(),
        );
        registry.register(
            "baton_reverts",
            "Failed versions on probation: reverted to the last version known to serve, or refused (no earlier version)",
            reverts.clone(),
        );
        registry.register(
            "baton_releases_failed",
            "Versions that failed their readiness gate or their probation",
            inner.releases_failed.clone(),
        );
        registry.register(
            "baton_log_lines_dropped",
            "baton's own log lines dropped because stderr could not take them",
            inner.log_dropped.clone(),
        );
        // Counters with known label values start at 0, as Prometheus expects.
        for r in ["promoted", "rolled_back", "reverted"] {
            let _ = inner.upgrades.get_or_create(&label("result", r));
        }
        for r in ["reverted", "refused"] {
            let _ = reverts.get_or_create(&label("result", r));
        }
        for r in ["done", "failed"] {
            let _ = reexecs.get_or_create(&label("result", r));
        }
        registry.register(
            "baton_reexecs",
            "baton re-executing itself, by result",
            reexecs,
        );
        registry.register(
            "baton_active_generation",
            "The active generation's number (0: none)",
            inner.active.clone(),
        );
        registry.register(
            "baton_generations",
            "Running generations by phase",
            generations,
        );
        registry.register(
            "baton_connections",
            "Connections per generation, as its SDK reports them",
            connections,
        );
        registry.register(
            "baton_release_on_probation",
            "1 while a promoted release is on probation",
            inner.on_probation.clone(),
        );
        registry.register(
            "baton_probation_remaining_seconds",
            "Seconds of probation left (0: none, or until made permanent)",
            inner.probation_left.clone(),
        );
        registry.register(
            "baton_release_permanent",
            "1 for the permanent release",
            permanent,
        );
        registry.register(
            "baton_resident_memory_bytes",
            "baton's own resident memory",
            inner.rss.clone(),
        );
        registry.register(
            "baton_open_fds",
            "baton's own open file descriptors",
            inner.fds.clone(),
        );
        let mut inner = inner;
        inner.registry = registry;
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// Counts what `e` says happened.
    pub fn on_event(&self, e: &Event) {
        let m = &self.inner;
        match &e.kind {
            EventKind::Promoted { why, report, .. } | EventKind::RolledBack { why, report, .. } => {
                use baton_protocol::StartReason as R;
                if matches!(why, R::Upgrade | R::Revert | R::Rollback) {
                    // A revert (or a rollback by hand) that went through is not a
                    // promotion of something new.
                    let result = match (report.result, why) {
                        (UpgradeResult::Promoted, R::Upgrade) => "promoted",
                        (UpgradeResult::Promoted, _) => "reverted",
                        (UpgradeResult::RolledBack, _) => "rolled_back",
                    };
                    m.upgrades.get_or_create(&label("result", result)).inc();
                    if report.result == UpgradeResult::Promoted {
                        m.upgrade_seconds
                            .observe(report.duration_ms as f64 / 1000.0);
                        if let Some(gap) = report.accept_gap_ms {
                            m.accept_gap_seconds.observe(gap / 1000.0);
                        }
                    }
                }
            }
            EventKind::Snapshot { bytes, .. } => m.snapshot_bytes.observe(*bytes as f64),
            EventKind::Crashed { .. } => {
                m.crashes.inc();
            }
            EventKind::Spawned {
                why: baton_protocol::StartReason::Replace,
                ..
            } => {
                m.restarts.inc();
            }
            EventKind::Reexec { report } => {
                let result = match report.result {
                    baton_protocol::ReexecResult::Done => "done",
                    baton_protocol::ReexecResult::Failed => "failed",
                    baton_protocol::ReexecResult::Accepted => return,
                };
                m.reexecs.get_or_create(&label("result", result)).inc();
            }
            _ => {}
        }
    }

    /// A version on probation failed: `reverted` to the last one known to serve,
    /// or `refused` (no earlier version).
    pub fn revert(&self, result: &str) {
        self.inner
            .reverts
            .get_or_create(&label("result", result))
            .inc();
    }

    /// A version failed its readiness gate or its probation.
    pub fn release_failed(&self) {
        self.inner.releases_failed.inc();
    }

    /// A migration tally (see [`baton_machine::Handover`]).
    pub fn handover(&self, h: baton_machine::Handover) {
        let (handed_over, migrated, lost) = h.counts();
        self.inner.handed_over.inc_by(handed_over);
        self.inner.migrated.inc_by(migrated);
        self.inner.lost.inc_by(lost);
    }

    /// Sets the gauges that describe the present.
    pub fn set_present(&self, p: &Present<'_>) {
        let m = &self.inner;
        m.active.set(i64::try_from(p.active).unwrap_or(i64::MAX));
        for phase in PHASES {
            let n = p.phases.iter().filter(|x| **x == phase).count();
            m.generations
                .get_or_create(&label("phase", phase_name(phase)))
                .set(n as i64);
        }
        let mut seen = m.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let conns: Vec<Labels> = p
            .connections
            .iter()
            .map(|(g, n)| {
                let l = label("generation", g.to_string());
                m.connections.get_or_create(&l).set(*n as i64);
                l
            })
            .collect();
        for gone in seen.connections.iter().filter(|l| !conns.contains(l)) {
            m.connections.remove(gone);
        }
        seen.connections = conns;
        m.on_probation.set(i64::from(p.probation.is_some()));
        m.probation_left
            .set(p.probation.and_then(|(_, left)| left).unwrap_or(0.0));
        let perm: Vec<Labels> = p
            .permanent
            .map(|v| label("release", v))
            .into_iter()
            .collect();
        for l in &perm {
            m.permanent.get_or_create(l).set(1);
        }
        for gone in seen.permanent.iter().filter(|l| !perm.contains(l)) {
            m.permanent.remove(gone);
        }
        seen.permanent = perm;
    }

    /// The text exposition, with baton's RSS and fds read now.
    pub fn render(&self) -> String {
        let m = &self.inner;
        m.rss
            .set(i64::try_from(crate::sys::own_rss_kb() * 1024).unwrap_or(i64::MAX));
        m.fds
            .set(i64::try_from(crate::sys::own_open_fds()).unwrap_or(i64::MAX));
        let dropped = crate::logsink::dropped();
        let counted = m.log_dropped.get();
        if dropped > counted {
            m.log_dropped.inc_by(dropped - counted);
        }
        let mut out = String::new();
        if encode(&mut out, &m.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Scrape connections served at once; more are closed at accept, so that nobody who
/// can reach the port can fill baton's fd table.
pub const MAX_SCRAPERS: usize = 16;

/// Answers `GET /metrics` (anything else: 404) on `listener`, a TCP or Unix one.
pub async fn serve(listener: std::os::fd::OwnedFd, tcp: bool, metrics: Metrics) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    let mut live = Live::default();
    let r = if tcp {
        let l = std::net::TcpListener::from(listener);
        match l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
        {
            Ok(l) => loop {
                match l.accept().await {
                    Ok((s, _)) => connection(s, metrics.clone(), &slots, &mut live).await,
                    Err(e) => backoff(e).await,
                }
            },
            Err(e) => e,
        }
    } else {
        let l = std::os::unix::net::UnixListener::from(listener);
        match l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(l))
        {
            Ok(l) => loop {
                match l.accept().await {
                    Ok((s, _)) => connection(s, metrics.clone(), &slots, &mut live).await,
                    Err(e) => backoff(e).await,
                }
            },
            Err(e) => e,
        }
    };
    tracing::error!(error = %r, "cannot serve metrics");
}

async fn backoff(e: std::io::Error) {
    tracing::warn!(error = %e, "metrics accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// How long one metrics connection may live, whatever it does: reading a request,
/// having a response written to it, or idling between scrapes.
const CONN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

/// The live connections' eviction handles, oldest first.
#[derive(Default)]
struct Live(std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>);

async fn connection<S>(
    stream: S,
    metrics: Metrics,
    slots: &Arc<tokio::sync::Semaphore>,
    live: &mut Live,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    live.0.retain(|h| !h.is_closed());
    let slot = match slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            // Full: the oldest goes, so that a few slow or hostile clients can never
            // hold every slot and starve the scrapers.
            if let Some(oldest) = live.0.pop_front() {
                let _ = oldest.send(());
            }
            let wait = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                slots.clone().acquire_owned(),
            );
            match wait.await {
                Ok(Ok(slot)) => slot,
                _ => {
                    tracing::debug!(
                        max = MAX_SCRAPERS,
                        "metrics connections full; closing a new one"
                    );
                    return;
                }
            }
        }
    };
    let (evict, evicted) = tokio::sync::oneshot::channel();
    live.0.push_back(evict);
    tokio::spawn(async move {
        let _slot = slot;
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let metrics = metrics.clone();
            async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(5))
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        tokio::select! {
            r = tokio::time::timeout(CONN_LIFETIME, conn) => match r {
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
                Err(_) => tracing::debug!("metrics connection closed at its deadline"),
                Ok(Ok(())) => {}
            },
            _ = evicted => tracing::debug!("metrics connection evicted for a newer one"),
        }
    });
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut r = if req.uri().path() == "/metrics" && req.method() == hyper::Method::GET {
        let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: try /metrics\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}
