//! The driver: real processes, sockets, signals and time around the pure machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use baton_protocol::{
    ChildMsg, ControlReply, ControlRequest, GenerationStatus, ListenerStatus, PROTOCOL_VERSION,
    Status, SupervisorMsg, UpgradeReport,
};
use futures_util::StreamExt;
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::cgroup::Containment;
use crate::config::RunConfig;
use crate::control::{ControlServer, Incoming};
use crate::generation::{GenEvent, GenHandle};
use crate::listeners::{ListenAddr, Listener};
use crate::notify::{self, NotifyIn, SystemdOut};
use crate::spawn::{self, SpawnConfig};
use crate::sys;
use crate::upgrade::{GenId, Host, Kill, Machine, SdEvent, Settings, WaiterId};

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
    waiters: HashMap<WaiterId, oneshot::Sender<ControlReply>>,
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
}

/// How long a notify sender found outside every generation stays known as such.
const STRANGER_TTL: Duration = Duration::from_secs(1);
/// Bound on [`Driver::strangers`].
const MAX_STRANGERS: usize = 256;

impl Host for Driver {
    fn spawn(&mut self, gen_id: GenId) -> Result<u32, String> {
        let t = Instant::now();
        let cg = self.containment.prepare(gen_id);
        self.last_cgroup = t.elapsed();
        let t = Instant::now();
        let s = match spawn::spawn(&self.spawn_cfg, &self.listeners, gen_id, cg) {
            Ok(s) => s,
            Err(e) => {
                self.containment.spawn_failed(gen_id);
                return Err(e.to_string());
            }
        };
        self.last_spawn = t.elapsed();
        let h = GenHandle::start(
            gen_id,
            s.child,
            s.pid,
            s.control,
            self.events.clone(),
            self.relay_slots.clone(),
        )
        .map_err(|e| e.to_string())?;
        self.handles.insert(gen_id, h);
        Ok(s.pid)
    }

    fn kill(&mut self, gen_id: GenId, pid: u32, how: Kill) {
        let r = match how {
            Kill::Stop => sys::kill(pid, self.stop_signal),
            // The whole process group: nothing of a killed generation lingers.
            Kill::Now => {
                self.containment.kill(gen_id);
                sys::kill_group(pid).and_then(|()| sys::kill(pid, Signal::SIGKILL))
            }
        };
        if let Err(e) = r {
            tracing::warn!(generation = gen_id, pid, error = %e, "kill failed");
        }
    }

    fn send(&mut self, gen_id: GenId, msg: SupervisorMsg) {
        if let Some(h) = self.handles.get(&gen_id) {
            h.send(msg, Vec::new());
        }
    }

    fn pass_snapshot(&mut self, from: GenId, to: GenId) -> Result<(), String> {
        let (fd, size) = self
            .handles
            .get_mut(&from)
            .and_then(|h| h.snapshot.take())
            .ok_or("no snapshot received")?;
        let h = self.handles.get(&to).ok_or("candidate is gone")?;
        h.send(SupervisorMsg::Restore { fds: 1, size }, vec![fd]);
        Ok(())
    }

    fn systemd(&mut self, event: SdEvent, status: &str) {
        let status = notify::one_line(status);
        match event {
            SdEvent::Ready => self.sd.send(&format!("READY=1\nSTATUS={status}")),
            SdEvent::Reloading => self.sd.reloading(&status),
            SdEvent::Stopping => self.sd.send(&format!("STOPPING=1\nSTATUS={status}")),
        }
    }

    fn finished(&mut self, report: &mut UpgradeReport, waiters: Vec<WaiterId>) {
        if let Some(t) = self.ready_received {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let ready = t.elapsed();
            report.supervisor_ms = Some(ms(self.last_cgroup + self.last_spawn + ready));
            report.cgroup_ms = Some(ms(self.last_cgroup));
            report.spawn_ms = Some(ms(self.last_spawn));
            report.ready_to_drain_ms = Some(ms(ready));
        }
        for w in waiters {
            if let Some(tx) = self.waiters.remove(&w) {
                let _ = tx.send(ControlReply::Upgrade(report.clone()));
            }
        }
    }

    fn exit(&mut self, code: i32, reason: &str) {
        self.exit = Some((code, reason.to_string()));
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn status(m: &Machine, d: &Driver) -> Status {
    let active = m.active();
    Status {
        supervisor_pid: std::process::id(),
        generation: active.unwrap_or(0),
        pid: active.and_then(|a| m.generation(a)).map(|g| g.pid),
        generations: m
            .gens()
            .map(|(id, g)| GenerationStatus {
                generation: id,
                pid: g.pid,
                phase: g.phase,
                started_at: d.handles.get(&id).map(|h| h.started_at).unwrap_or(0),
                connections: d.handles.get(&id).and_then(|h| h.connections),
            })
            .collect(),
        last_upgrade: m.last_upgrade().cloned(),
        upgrading: m.upgrading(),
        queued_upgrades: u32::from(m.queued()),
        crashes: m.crashes(),
        listeners: d
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                name: l.name.clone(),
                addr: l.addr.to_string(),
                inherited: l.inherited,
            })
            .collect(),
        rss_kb: rss_kb(),
        containment: d.containment.describe(),
        strays_killed: d.containment.strays_killed(),
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
) -> Result<i32, RunError> {
    let mut signals =
        signal_hook_tokio::Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(RunError::Signals)?;
    let control = ControlServer::bind(&cfg.control, cfg.control_group)
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let mut notify_path = cfg.control.clone().into_os_string();
    notify_path.push(".notify");
    let notify_in = NotifyIn::bind(&PathBuf::from(notify_path))
        .map_err(|e| RunError::Setup(format!("notify socket: {e}")))?;

    // Park the listeners we bound in systemd's fd store: a crash of baton loses no socket.
    if sd.enabled() {
        for l in listeners.iter().filter(|l| !l.inherited) {
            sd.send_fds(&format!("FDSTORE=1\nFDNAME={}", l.name), &[l.fd()]);
        }
    }
    for l in &listeners {
        tracing::info!(name = %l.name, addr = %l.addr, inherited = l.inherited, "listening");
    }

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Incoming>(64);
    let settings = Settings {
        ready: cfg.ready,
        ready_timeout: cfg.ready_timeout,
        drain_timeout: cfg.drain_timeout,
        stateful: cfg.state,
        snapshot_timeout: cfg.snapshot_timeout,
        restore_timeout: cfg.restore_timeout,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(10),
    };
    let watchdog = sd.watchdog_interval();
    let mut d = Driver {
        spawn_cfg: SpawnConfig {
            program: cfg.program.clone(),
            args: cfg.args.clone(),
            death_signal: cfg.stop_signal,
            notify_path: notify_in.path().to_path_buf(),
            base_env: spawn::base_env(),
        },
        listeners,
        stop_signal: cfg.stop_signal,
        handles: HashMap::new(),
        events: ev_tx,
        waiters: HashMap::new(),
        next_waiter: 1,
        sd,
        exit: None,
        last_cgroup: Duration::ZERO,
        last_spawn: Duration::ZERO,
        ready_received: None,
        strangers: HashMap::new(),
        relay_slots: Arc::new(Semaphore::new(crate::generation::RELAY_SLOTS)),
        containment: Containment::detect(),
    };
    let mut m = Machine::new(settings);
    let serve = control.serve(ctl_tx);
    tokio::pin!(serve);
    let mut housekeeping = tokio::time::interval(
        watchdog
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1)),
    );
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    m.start(&mut d, Instant::now());
    while d.exit.is_none() {
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
            _ = sleep => m.tick(&mut d, Instant::now()),
            _ = housekeeping.tick() => {
                if watchdog.is_some() && m.active().is_some() {
                    d.sd.send("WATCHDOG=1");
                }
                rearm_listeners(&d.listeners, cfg.backlog);
                d.containment.sweep();
            }
            () = &mut serve => {}
        }
    }
    let (code, reason) = d.exit.take().unwrap_or((1, String::new()));
    // Exiting with children left (the first generation failed): kill them.
    for (gen_id, g) in m.gens() {
        tracing::warn!(
            generation = gen_id,
            pid = g.pid,
            "killing leftover generation"
        );
        let _ = sys::kill_group(g.pid);
        let _ = sys::kill(g.pid, Signal::SIGKILL);
    }
    d.containment.shutdown().await;
    if code == 0 {
        tracing::info!("stopped");
    } else {
        tracing::error!("{reason}");
        eprintln!("baton: error: {reason}");
    }
    Ok(code)
}

fn rearm_listeners(listeners: &[Listener], backlog: i32) {
    for l in listeners {
        if !sys::is_listening(l.fd()) {
            match sys::relisten(l.fd(), backlog) {
                Ok(()) => match sys::inspect_listener(l.fd()) {
                    Ok(sys::SocketKind::Tcp(now)) if ListenAddr::Tcp(now) != l.addr => {
                        // The kernel drops an auto-assigned port on shutdown().
                        tracing::error!(name = %l.name, was = %l.addr, now = %now, "a child shut down listener; re-armed it, but on another port (bind an explicit port to avoid this)");
                    }
                    _ => tracing::warn!(name = %l.name, "a child shut down listener; re-armed it"),
                },
                Err(e) => {
                    tracing::error!(name = %l.name, error = %e, "listener stopped listening and cannot be re-armed")
                }
            }
        }
    }
}

fn on_gen_event(m: &mut Machine, d: &mut Driver, ev: GenEvent) {
    let now = Instant::now();
    if let GenEvent::Message { gen_id, .. } | GenEvent::BadMessage { gen_id, .. } = &ev {
        if let Some(h) = d.handles.get(gen_id) {
            h.handled_one();
        }
    }
    match ev {
        GenEvent::Exited { gen_id, how } => {
            d.handles.remove(&gen_id);
            d.containment.reap(gen_id);
            m.on_exit(d, now, gen_id, &how);
        }
        GenEvent::BadMessage { gen_id, why } => {
            tracing::warn!(generation = gen_id, why, "bad control message");
            deferred_ready(m, d, gen_id);
        }
        GenEvent::Message {
            gen_id,
            msg,
            mut fds,
            slots,
        } => {
            let pid = d.handles.get(&gen_id).map_or(0, |h| h.pid);
            tracing::debug!(generation = gen_id, pid, ?msg, "control message");
            match msg {
                ChildMsg::Hello { protocol, features } => {
                    if protocol != PROTOCOL_VERSION {
                        tracing::warn!(
                            generation = gen_id,
                            pid,
                            protocol,
                            "child speaks another protocol version; treating it as SDK-less"
                        );
                        // Its READY may be waiting for this hello.
                        deferred_ready(m, d, gen_id);
                        return;
                    }
                    m.on_hello(gen_id, features);
                    deferred_ready(m, d, gen_id);
                }
                ChildMsg::Connections { active } => {
                    if let Some(h) = d.handles.get_mut(&gen_id) {
                        h.connections = Some(active);
                    }
                }
                ChildMsg::Prepared => m.on_prepared(d, now, gen_id),
                ChildMsg::Snapshot { size, version, .. } => {
                    let Some(fd) = fds.pop() else { return };
                    tracing::info!(generation = gen_id, pid, size, version, "snapshot received");
                    if let Some(h) = d.handles.get_mut(&gen_id) {
                        h.snapshot = Some((fd, size));
                    }
                    m.on_snapshot(d, now, gen_id, size);
                }
                ChildMsg::SnapshotFailed { reason } => {
                    m.on_snapshot_failed(d, now, gen_id, &reason)
                }
                ChildMsg::Restored {
                    from_version,
                    restore_ms,
                } => {
                    tracing::info!(
                        generation = gen_id,
                        pid,
                        from_version,
                        restore_ms,
                        "snapshot restored"
                    );
                    m.on_restored(d, now, gen_id);
                }
                ChildMsg::Rejected { reason } => m.on_rejected(d, now, gen_id, &reason),
                ChildMsg::Migrate {
                    listener,
                    buffered,
                    meta,
                    ..
                } => {
                    let Some(fd) = fds.pop() else { return };
                    let target = m
                        .active()
                        .filter(|a| *a != gen_id)
                        .and_then(|a| d.handles.get(&a));
                    match target {
                        Some(h) => {
                            h.relay(
                                SupervisorMsg::Adopt {
                                    fds: 1,
                                    listener,
                                    buffered,
                                    meta,
                                },
                                vec![fd],
                                slots,
                            );
                            m.note_migrated(1);
                        }
                        None => {
                            tracing::error!(
                                generation = gen_id,
                                pid,
                                "migrated connection has no active generation to go to; closing it"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Acts on a READY that waited for the generation's hello.
fn deferred_ready(m: &mut Machine, d: &mut Driver, gen_id: GenId) {
    let Some(h) = d.handles.get_mut(&gen_id) else {
        return;
    };
    if std::mem::take(&mut h.ready_deferred) {
        ready(m, d, gen_id);
    }
}

/// Hands READY to the machine, timing baton's own share of the promotion.
fn ready(m: &mut Machine, d: &mut Driver, gen_id: GenId) {
    let now = Instant::now();
    d.ready_received = Some(now);
    m.on_ready(d, now, gen_id);
    d.ready_received = None;
}

/// The generation process `pid` belongs to (itself or an ancestor), remembering
/// strangers for a while so that a flood from one costs a map lookup each.
fn notify_owner(m: &Machine, d: &mut Driver, pid: u32) -> Option<u32> {
    if m.gen_by_pid(pid).is_some() {
        return Some(pid);
    }
    let now = Instant::now();
    if d.strangers
        .get(&pid)
        .is_some_and(|t| now.duration_since(*t) < STRANGER_TTL)
    {
        return None;
    }
    let owner = notify::owning_pid(pid, |p| m.gen_by_pid(p).is_some());
    if owner.is_none() {
        if d.strangers.len() >= MAX_STRANGERS {
            d.strangers
                .retain(|_, t| now.duration_since(*t) < STRANGER_TTL);
            if d.strangers.len() >= MAX_STRANGERS {
                d.strangers.clear();
            }
        }
        d.strangers.insert(pid, now);
        tracing::debug!(
            pid,
            "notify message from a process outside every generation; ignored"
        );
    }
    owner
}

fn on_notify(m: &mut Machine, d: &mut Driver, pid: u32, text: &str) {
    let Some(owner) = notify_owner(m, d, pid) else {
        return;
    };
    let Some(gen_id) = m.gen_by_pid(owner) else {
        return;
    };
    for (k, v) in notify::parse(text) {
        match k {
            "READY" if v == "1" => {
                tracing::info!(generation = gen_id, pid = owner, "READY");
                // Promotion decides whether connections migrate, from the features the
                // candidate's hello announced: never decide before reading that hello.
                let no_hello = m.generation(gen_id).is_some_and(|g| g.features.is_none());
                if let Some(h) = d.handles.get_mut(&gen_id) {
                    if no_hello && h.has_unread() {
                        tracing::debug!(
                            generation = gen_id,
                            "READY before hello was read; deferring"
                        );
                        h.ready_deferred = true;
                        continue;
                    }
                }
                ready(m, d, gen_id);
            }
            "STATUS" => {
                if let Some(h) = d.handles.get_mut(&gen_id) {
                    h.status_text = Some(v.to_string());
                }
            }
            "STOPPING" | "WATCHDOG" | "ERRNO" | "RELOADING" | "MAINPID" | "MONOTONIC_USEC" => {}
            _ => tracing::debug!(generation = gen_id, key = k, "ignored notify key"),
        }
    }
}

fn on_control(m: &mut Machine, d: &mut Driver, req: Incoming) {
    let now = Instant::now();
    match req.request {
        ControlRequest::Status => {
            let _ = req.reply.send(ControlReply::Status(status(m, d)));
        }
        ControlRequest::Upgrade { wait } => {
            tracing::info!(wait, "upgrade requested on the control socket");
            if wait {
                let id = d.next_waiter;
                d.next_waiter += 1;
                d.waiters.insert(id, req.reply);
                m.request_upgrade(d, now, Some(id));
            } else {
                let _ = req.reply.send(ControlReply::Queued);
                m.request_upgrade(d, now, None);
            }
        }
        ControlRequest::Stop => {
            let _ = req.reply.send(ControlReply::Stopping);
            m.request_stop(d, now);
        }
    }
}
