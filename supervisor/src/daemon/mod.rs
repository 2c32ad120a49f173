//! `baton run`, the daemon: the driver that puts real processes, sockets, signals and
//! time around the pure machine ([`baton_machine`]).
//!
//! - `process/`: a generation's process: spawning it, waiting on it, its cgroup, the
//!   strays it may leave;
//! - `io/`: what baton talks through: listeners, the control server, the notify
//!   socket, metrics, events and history;
//! - this file and its siblings: the loop, the machine's host, a generation's channel
//!   (`child.rs`), control requests, reexec, and when an upgrade is settled.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_protocol::{BatonBuild, ControlReply, Event, EventKind, ReleaseReply, WaitFor};
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::RunConfig;
use crate::daemon::io::control::{ControlServer, Incoming};
use crate::daemon::io::events::EventLog;
use crate::daemon::io::history::History;
use crate::daemon::io::listeners::{ListenAddr, Listener};
use crate::daemon::io::metrics::Metrics;
use crate::daemon::io::notify::{NotifyIn, SystemdOut};
use crate::daemon::process::cgroup::Containment;
use crate::daemon::process::generation::{GenEvent, GenHandle};
use crate::daemon::process::spawn::{self, SpawnConfig};
use crate::reexec::state::{SelfOver, WaitKind};
use crate::release::exe::Exe;
use crate::release::lifecycle::{Boot, Lifecycle};
use crate::sys;
use baton_machine::{GenId, Image, Machine, Settings, WaiterId};

pub mod io;
pub mod process;

mod child;
mod host;
mod housekeeping;
mod reexec;
mod requests;
mod settle;

pub use reexec::{Inherited, resume};

use child::{on_gen_event, on_notify};
use housekeeping::{rearm_listeners, refresh_metrics, start_health_check};
use requests::{on_checked, on_control};

/// Failures that stop `baton run` before it supervises anything.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The control or notify socket could not be set up.
    #[error("{0}")]
    Setup(String),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

struct Driver {
    spawn_cfg: SpawnConfig,
    listeners: Vec<Listener>,
    stop_signal: Signal,
    handles: HashMap<GenId, GenHandle>,
    events: mpsc::UnboundedSender<GenEvent>,
    waiters: HashMap<WaiterId, Waiter>,
    next_waiter: WaiterId,
    sd: SystemdOut,
    exit: Option<(i32, String)>,
    /// How long the last spawn took (baton's share of an upgrade): the cgroup, then
    /// fork + exec.
    last_cgroup: Duration,
    last_spawn: Duration,
    /// When the READY being handled was received.
    ready_received: Option<Instant>,
    /// Notify senders recently found outside every generation, so that a flood
    /// from one is dropped without walking `/proc` again.
    strangers: HashMap<u32, Instant>,
    /// Bounds the fds held for relaying between generations.
    relay_slots: Arc<Semaphore>,
    /// Generation cgroups.
    containment: Containment,
    /// Without cgroups: processes outside every generation that hold a listener.
    strays: Vec<u32>,
    /// Every executable a generation runs or may run next (a revert), open.
    images: HashMap<Image, Exe>,
    /// Labels for executables opened from PROGRAM (without a store).
    next_exe: u64,
    /// The release store, with `--releases`.
    lifecycle: Option<Lifecycle>,
    /// Which release booted, and why.
    boot_note: String,
    /// Versions last recorded as in use.
    in_use: Vec<String>,
    /// Results of work done off the loop.
    loop_tx: mpsc::UnboundedSender<LoopEvent>,
    /// A health check is running.
    health_running: bool,
    /// baton itself: its path, command line, and reexecs so far.
    me: SelfOver,
    /// The executable running now.
    build: BatonBuild,
    /// A reexec asked for and not done yet.
    reexec: Option<reexec::Pending>,
    /// The listeners went to systemd's fd store.
    fd_stored: bool,
    /// Every state change, for `baton events`.
    event_log: EventLog,
    /// The last upgrades, for `baton history`.
    history: History,
    /// Promotions whose history line waits for the older generations to go.
    settling: settle::Settling,
    /// The version a `release rollback` is installing (its checks run off the loop).
    rollback_to: Option<String>,
    /// Generations whose first malformed message was logged.
    warned_bad: std::collections::HashSet<GenId>,
    /// `--metrics`.
    metrics: Metrics,
    /// Something changed that the metrics' gauges describe.
    metrics_dirty: bool,
    /// The `--metrics` socket (a duplicate serves it), kept for a reexec.
    metrics_listener: Option<Listener>,
    /// Clients waiting for the dry-run snapshot under way: the reply, and where the
    /// memfd goes.
    dry_runs: Vec<(oneshot::Sender<ControlReply>, oneshot::Sender<OwnedFd>)>,
}

/// Someone waiting on the control socket for an outcome.
struct Waiter {
    tx: oneshot::Sender<ControlReply>,
    kind: WaitKind,
    /// The client's connection, for handing it over in a reexec.
    conn: Option<OwnedFd>,
}

/// Work finished off the main loop.
enum LoopEvent {
    /// The checks before an install finished.
    Checked {
        version: String,
        result: Result<Exe, String>,
        reply: oneshot::Sender<ControlReply>,
        wait: WaitFor,
        conn: Option<OwnedFd>,
    },
    /// The new executable of a reexec answered its probe (or not).
    Probed(Result<(Exe, BatonBuild), String>),
    /// A health check of a generation on probation finished.
    Health {
        gen_id: GenId,
        result: Result<(), String>,
    },
}

impl Driver {
    /// Records an event: the stream, the metrics.
    fn emit(&mut self, generation: GenId, pid: Option<u32>, kind: EventKind) {
        let e = Event {
            at_ms: crate::text::now_ms(),
            generation,
            pid,
            kind,
        };
        self.metrics.on_event(&e);
        self.event_log.emit(e);
        self.metrics_dirty = true;
    }

    fn add_waiter(
        &mut self,
        tx: oneshot::Sender<ControlReply>,
        kind: WaitKind,
        conn: Option<OwnedFd>,
    ) -> WaiterId {
        let id = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.insert(id, Waiter { tx, kind, conn });
        id
    }

    /// The executable a plain upgrade runs: with a store, the current (else
    /// permanent) release; without, PROGRAM opened now.
    fn plain_image(&mut self) -> Result<Image, String> {
        if let Some(lc) = &self.lifecycle {
            let v = lc.plain_upgrade_version()?;
            if !self.images.contains_key(&v) {
                let exe = lc.open_exe(&v)?;
                self.images.insert(v.clone(), exe);
            }
            return Ok(v);
        }
        let path = spawn::resolve_program(&self.spawn_cfg.program)?;
        let exe = Exe::open(&path)?;
        if let Some((label, _)) = self.images.iter().find(|(_, e)| e.same_file(&exe)) {
            return Ok(label.clone());
        }
        self.next_exe += 1;
        let label = format!("exe-{}", self.next_exe);
        self.images.insert(label.clone(), exe);
        Ok(label)
    }

    /// Closes executables nothing runs or may run next, and records the
    /// versions in use in the store.
    fn housekeep_images(&mut self, m: &Machine) {
        let keep = m.images_in_use();
        self.images.retain(|k, _| keep.contains(k));
        if let Some(lc) = &self.lifecycle {
            let mut running: Vec<String> = m.gens().map(|(_, g)| g.image.clone()).collect();
            running.sort();
            running.dedup();
            if running != self.in_use {
                lc.set_in_use(running.clone());
                self.in_use = running;
            }
        }
    }

    fn reply_release(&mut self, id: WaiterId, reply: ReleaseReply) {
        if let Some(w) = self.waiters.remove(&id) {
            let _ = w.tx.send(ControlReply::Release(self.with_list(reply)));
        }
    }

    /// `reply` with the store's releases attached.
    fn with_list(&self, mut reply: ReleaseReply) -> ReleaseReply {
        if let Some(lc) = &self.lifecycle {
            reply.releases = lc.list().unwrap_or_default();
        }
        reply
    }
}

/// How long a notify sender found outside every generation stays known as such.
const STRANGER_TTL: Duration = Duration::from_secs(1);
/// Bound on [`Driver::strangers`].
const MAX_STRANGERS: usize = 256;

/// The supervisor's sockets and the receiving ends of its channels.
struct Io {
    control: ControlServer,
    notify_in: NotifyIn,
    ev_rx: mpsc::UnboundedReceiver<GenEvent>,
    loop_rx: mpsc::UnboundedReceiver<LoopEvent>,
}

/// The machine's settings from the configuration.
fn settings(cfg: &RunConfig) -> Settings {
    Settings {
        ready: cfg.ready,
        ready_timeout: cfg.ready_timeout,
        drain_timeout: cfg.drain_timeout,
        stateful: cfg.state,
        snapshot_timeout: cfg.snapshot_timeout,
        restore_timeout: cfg.restore_timeout,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(10),
        probation: cfg.release.probation,
        health_failures: cfg.release.health_failures,
        precopy: cfg.precopy,
    }
}

/// Everything a driver starts from, fresh or handed over.
struct DriverParts {
    listeners: Vec<Listener>,
    sd: SystemdOut,
    notify_path: PathBuf,
    lifecycle: Option<Lifecycle>,
    boot_note: String,
    images: HashMap<Image, Exe>,
    me: SelfOver,
    history: History,
    metrics_listener: Option<Listener>,
}

impl Driver {
    fn new(
        cfg: &RunConfig,
        p: DriverParts,
    ) -> (
        Driver,
        mpsc::UnboundedReceiver<GenEvent>,
        mpsc::UnboundedReceiver<LoopEvent>,
    ) {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (loop_tx, loop_rx) = mpsc::unbounded_channel();
        let build = crate::reexec::own_build(&p.me.exe_path);
        let d = Driver {
            spawn_cfg: SpawnConfig {
                program: cfg.program.clone(),
                args: cfg.args.clone(),
                death_signal: cfg.stop_signal,
                child_nofile: cfg.child_nofile,
                notify_path: p.notify_path,
                base_env: spawn::base_env(),
            },
            listeners: p.listeners,
            stop_signal: cfg.stop_signal,
            handles: HashMap::new(),
            events: ev_tx,
            waiters: HashMap::new(),
            next_waiter: 1,
            sd: p.sd,
            exit: None,
            last_cgroup: Duration::ZERO,
            last_spawn: Duration::ZERO,
            ready_received: None,
            strangers: HashMap::new(),
            relay_slots: Arc::new(Semaphore::new(
                crate::daemon::process::generation::RELAY_SLOTS,
            )),
            containment: Containment::detect(),
            strays: Vec::new(),
            images: p.images,
            next_exe: 0,
            lifecycle: p.lifecycle,
            boot_note: p.boot_note,
            in_use: Vec::new(),
            loop_tx,
            health_running: false,
            me: p.me,
            metrics: Metrics::new(&build),
            build,
            reexec: None,
            fd_stored: false,
            event_log: EventLog::default(),
            history: p.history,
            settling: settle::Settling::default(),
            rollback_to: None,
            warned_bad: std::collections::HashSet::new(),
            metrics_dirty: true,
            metrics_listener: p.metrics_listener,
            dry_runs: Vec::new(),
        };
        (d, ev_rx, loop_rx)
    }
}

/// Runs the supervisor until it is stopped; returns the exit code.
///
/// # Errors
/// [`RunError`] if the control socket, notify socket or signal handlers cannot be set up.
pub async fn run(
    cfg: RunConfig,
    listeners: Vec<Listener>,
    sd: SystemdOut,
    boot: Option<(Lifecycle, Boot)>,
    me: SelfOver,
    metrics_listener: Option<Listener>,
) -> Result<i32, RunError> {
    let signals = signals()?;
    let control = ControlServer::bind(&cfg.control, cfg.control_group)
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let mut notify_path = cfg.control.clone().into_os_string();
    notify_path.push(".notify");
    let notify_in = NotifyIn::bind(&PathBuf::from(notify_path))
        .map_err(|e| RunError::Setup(format!("notify socket: {e}")))?;

    let mut m = Machine::new(settings(&cfg));
    let mut images = HashMap::new();
    let (lifecycle, boot_note) = match boot {
        Some((lc, boot)) => {
            tracing::info!(release = %boot.version, why = %boot.why, "booting");
            m.boot_with(boot.version.clone(), boot.permanent);
            images.insert(boot.version, boot.exe);
            (Some(lc), boot.why)
        }
        None => (None, String::new()),
    };
    let history = History::open(cfg.state_dir.as_deref()).map_err(RunError::Setup)?;
    let parts = DriverParts {
        listeners,
        sd,
        notify_path: notify_in.path().to_path_buf(),
        lifecycle,
        boot_note,
        images,
        me,
        history,
        metrics_listener,
    };
    let (mut d, ev_rx, loop_rx) = Driver::new(&cfg, parts);
    // Park the listeners we bound in systemd's fd store: a crash of baton loses no socket.
    if d.sd.enabled() {
        for l in d.listeners.iter().filter(|l| !l.inherited) {
            d.sd.send_fds(&format!("FDSTORE=1\nFDNAME={}", l.name), &[l.fd()]);
        }
        d.fd_stored = true;
    }
    for l in &d.listeners {
        tracing::info!(name = %l.name, addr = %l.addr, inherited = l.inherited, "listening");
    }
    m.start(&mut d, Instant::now());
    let io = Io {
        control,
        notify_in,
        ev_rx,
        loop_rx,
    };
    Ok(serve(&cfg, m, d, io, signals).await)
}

type Signals = signal_hook_tokio::Signals;

/// baton's signal handlers. Then the signals a reexec held back (blocked across
/// the exec) are let through, to be handled now.
fn signals() -> Result<Signals, RunError> {
    let s = signal_hook_tokio::Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR2])
        .map_err(RunError::Signals)?;
    sys::hold_signals(false).map_err(RunError::Signals)?;
    Ok(s)
}

/// The main loop, until baton exits; returns the exit code.
async fn serve(
    cfg: &RunConfig,
    mut m: Machine,
    mut d: Driver,
    io: Io,
    mut signals: Signals,
) -> i32 {
    let Io {
        control,
        notify_in,
        mut ev_rx,
        mut loop_rx,
    } = io;
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Incoming>(64);
    let watchdog = d.sd.watchdog_interval();
    let mut health_timer = tokio::time::interval(cfg.release.health_interval);
    health_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let serve = control.serve(ctl_tx, d.event_log.clone());
    tokio::pin!(serve);
    if let Some(l) = &d.metrics_listener {
        match l.fd().try_clone_to_owned() {
            Ok(fd) => {
                let tcp = matches!(l.addr, ListenAddr::Tcp(_));
                tracing::info!(addr = %l.addr, "serving metrics");
                tokio::spawn(crate::daemon::io::metrics::serve(
                    fd,
                    tcp,
                    d.metrics.clone(),
                ));
            }
            Err(e) => tracing::error!(error = %e, "cannot serve metrics"),
        }
    }
    let mut housekeeping = tokio::time::interval(
        watchdog
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1)),
    );
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    while d.exit.is_none() {
        refresh_metrics(&m, &mut d);
        if reexec::due(&m, &d) {
            reexec::perform(&mut m, &mut d, &mut ev_rx, &control, &notify_in, cfg).await;
            continue;
        }
        let deadline = m.next_deadline();
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        // Not `biased`: tokio picks a random branch first, so a flood on one source
        // (notify datagrams anyone may send) cannot starve the others.
        tokio::select! {
            Some(sig) = signals.next() => match sig {
                SIGHUP => {
                    tracing::info!("SIGHUP: upgrade requested");
                    m.request_upgrade(&mut d, Instant::now(), None);
                }
                SIGUSR2 => {
                    tracing::info!("SIGUSR2: reexec requested");
                    reexec::request(&mut m, &mut d, None);
                }
                _ => {
                    tracing::info!(signal = sig, "stopping: draining every generation");
                    m.request_stop(&mut d, Instant::now());
                }
            },
            Some(ev) = ev_rx.recv() => on_gen_event(&mut m, &mut d, ev),
            r = notify_in.recv() => match r {
                Ok((pid, text)) => on_notify(&mut m, &mut d, pid, &text),
                Err(e) => tracing::warn!(error = %e, "notify socket"),
            },
            Some(req) = ctl_rx.recv() => on_control(&mut m, &mut d, req),
            Some(ev) = loop_rx.recv() => match ev {
                LoopEvent::Checked { version, result, reply, wait, conn } => {
                    on_checked(&mut m, &mut d, version, result, reply, wait, conn);
                }
                LoopEvent::Health { gen_id, result } => {
                    d.health_running = false;
                    let detail = result.as_ref().err().cloned().unwrap_or_default();
                    m.handle(
                        &mut d,
                        Instant::now(),
                        gen_id,
                        baton_machine::Input::Health {
                            ok: result.is_ok(),
                            detail: &detail,
                        },
                    );
                }
                LoopEvent::Probed(result) => reexec::on_probed(&mut m, &mut d, result),
            },
            _ = health_timer.tick(), if cfg.release.health.is_some() => {
                start_health_check(&m, &mut d, cfg);
            }
            _ = sleep => m.tick(&mut d, Instant::now()),
            _ = housekeeping.tick() => {
                if watchdog.is_some() && m.active().is_some() {
                    d.sd.send("WATCHDOG=1");
                }
                rearm_listeners(&d.listeners, cfg.backlog);
                d.metrics_dirty = true;
                d.containment.sweep();
                if let Some(lc) = &d.lifecycle {
                    lc.retry_pending();
                }
                d.strays.retain(|&p| crate::daemon::process::strays::alive(p));
                d.housekeep_images(&m);
                if m.on_probation().is_some() && d.sd.enabled() {
                    let line = crate::text::one_line(&m.status_line(Instant::now()));
                    d.sd.send(&format!("STATUS={line}"));
                }
            }
            () = &mut serve => {}
        }
    }
    let (code, reason) = d.exit.take().unwrap_or((1, String::new()));
    d.settle_all();
    // Exiting with children left (the first generation failed): kill them.
    for (gen_id, g) in m.gens() {
        if d.handles.get(&gen_id).is_some_and(GenHandle::is_gone) {
            continue;
        }
        tracing::warn!(
            generation = gen_id,
            pid = g.pid,
            "killing leftover generation"
        );
        let _ = sys::kill_group(g.pid);
        let _ = sys::kill(g.pid, Signal::SIGKILL);
    }
    d.containment.shutdown().await;
    if let Some(lc) = &d.lifecycle {
        lc.set_in_use(Vec::new());
    }
    if code == 0 {
        tracing::info!("stopped");
    } else {
        tracing::error!("{reason}");
        crate::say_err!("baton: error: {reason}");
    }
    code
}
