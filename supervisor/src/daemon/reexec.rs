//! The driver's side of a reexec: asking for one, waiting until the machine is
//! idle, pausing every channel between messages, handing everything over, and,
//! in the new image, taking it all back.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use baton_protocol::wire::FrameReader;
use baton_protocol::{BatonBuild, ControlReply, ReexecReport, ReexecResult, SupervisorInfo};
use tokio::sync::mpsc;

use super::{Driver, DriverParts, Io, LoopEvent, Waiter, on_gen_event, serve};
use crate::config::RunConfig;
use crate::daemon::io::control::{self, ControlServer};
use crate::daemon::io::listeners::Listener;
use crate::daemon::io::notify::{NotifyIn, SystemdOut};
use crate::daemon::process::generation::{ExitWatch, GenEvent, GenHandle};
use crate::reexec::state::{
    GenOver, HandOver, ImageOver, ListenerOver, SocketOver, WaitKind, WaiterOver,
};
use crate::reexec::{self as rx, FORMAT};
use crate::release::exe::Exe;
use crate::release::lifecycle::Lifecycle;
use crate::sys;
use baton_machine::{GenId, Machine, WaiterId};

/// How long a child's control channel may take to take what baton queued for it.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// A reexec asked for and not done yet.
pub(super) struct Pending {
    waiters: Vec<WaiterId>,
    requested: Instant,
    /// The new executable, once it answered its probe.
    target: Option<(Exe, BatonBuild)>,
}

impl Driver {
    /// The reply to a reexec not waited for.
    pub(super) fn accepted_reexec(&self) -> ReexecReport {
        ReexecReport {
            result: ReexecResult::Accepted,
            old: self.build.clone(),
            new: None,
            reason: None,
            duration_ms: 0.0,
        }
    }

    /// baton itself, for status.
    pub(super) fn supervisor_info(&self) -> SupervisorInfo {
        SupervisorInfo {
            build: self.build.clone(),
            started_at: self.me.started_at,
            reexecs: self.me.reexecs,
            last_reexec: self.me.last_reexec.clone(),
            nice: crate::sys::own_nice().ok(),
        }
    }

    fn reply_reexec(&mut self, waiters: &[WaiterId], report: &ReexecReport) {
        for w in waiters {
            if let Some(w) = self.waiters.remove(w) {
                let _ = w.tx.send(ControlReply::Reexec(report.clone()));
            }
        }
    }
}

/// A reexec was asked for (`waiter` waits for its outcome). Requests coalesce;
/// the machine holds back a queued upgrade until it is done.
pub(super) fn request(m: &mut Machine, d: &mut Driver, waiter: Option<WaiterId>) {
    if let Some(p) = &mut d.reexec {
        p.waiters.extend(waiter);
        return;
    }
    let now = Instant::now();
    m.hold(d, now, true);
    d.reexec = Some(Pending {
        waiters: waiter.into_iter().collect(),
        requested: now,
        target: None,
    });
    let path = d.me.exe_path.clone();
    let tx = d.loop_tx.clone();
    tokio::spawn(async move {
        let r = rx::probe(path).await;
        let _ = tx.send(LoopEvent::Probed(r));
    });
}

/// The new executable answered its probe.
pub(super) fn on_probed(
    m: &mut Machine,
    d: &mut Driver,
    result: Result<(Exe, BatonBuild), String>,
) {
    match result {
        Ok((exe, build)) => {
            tracing::info!(version = %build.version, build_id = %build.build_id, "new baton answered its probe");
            if let Some(p) = &mut d.reexec {
                p.target = Some((exe, build));
            }
        }
        Err(e) => fail(m, d, e, None),
    }
}

/// The reexec did not happen; this image carries on.
fn fail(m: &mut Machine, d: &mut Driver, reason: String, tried: Option<BatonBuild>) {
    let Some(p) = d.reexec.take() else { return };
    tracing::error!(reason = %reason, "reexec failed; this baton carries on");
    let report = ReexecReport {
        result: ReexecResult::Failed,
        old: d.build.clone(),
        new: tried,
        reason: Some(reason),
        duration_ms: p.requested.elapsed().as_secs_f64() * 1000.0,
    };
    d.me.last_reexec = Some(report.clone());
    d.reply_reexec(&p.waiters, &report);
    d.emit(0, None, baton_protocol::EventKind::Reexec { report });
    m.hold(d, Instant::now(), false);
}

/// Whether to reexec now: the new executable is vetted and nothing is under way.
pub(super) fn due(m: &Machine, d: &Driver) -> bool {
    d.reexec.as_ref().is_some_and(|p| p.target.is_some())
        && m.idle()
        // A hand-over in flight (fds in relay, an exit whose channel is still
        // being read) finishes first: a read task waiting for relay slots
        // cannot be paused.
        && d.relay_slots.available_permits() == crate::daemon::process::generation::RELAY_SLOTS
        && !d.handles.values().any(GenHandle::settling)
}

/// Pauses every generation's channel, hands everything over and execs. Returns
/// when the exec failed (reported to the waiters) or the machine got busy in
/// the meantime (tried again once it is idle).
pub(super) async fn perform(
    m: &mut Machine,
    d: &mut Driver,
    ev_rx: &mut mpsc::UnboundedReceiver<GenEvent>,
    control: &ControlServer,
    notify_in: &NotifyIn,
    cfg: &RunConfig,
) {
    let mut readers: HashMap<GenId, FrameReader> = HashMap::new();
    let pauses: Vec<_> = d
        .handles
        .iter_mut()
        .map(|(id, h)| (*id, h.pause()))
        .collect();
    let mut unpaused = None;
    for (id, mut p) in pauses {
        // Events are handled meanwhile: a read task waiting for room in the queue
        // gets it, and reaches the pause.
        let deadline = tokio::time::sleep(FLUSH_TIMEOUT);
        tokio::pin!(deadline);
        let r = loop {
            tokio::select! {
                r = &mut p => break Some(r),
                Some(ev) = ev_rx.recv() => on_gen_event(m, d, ev),
                () = &mut deadline => break None,
            }
        };
        match r {
            Some(r) => {
                // A read task that has ended (the child closed its end) hands nothing back.
                readers.insert(id, r.unwrap_or_default());
            }
            // Still reading (it keeps its reader when nobody takes it): not resumed.
            None => unpaused = Some(id),
        }
    }
    if let Some(id) = unpaused {
        for (gid, h) in d.handles.iter_mut() {
            if let Some(r) = readers.remove(gid) {
                h.resume(r);
            }
        }
        let why = format!("generation {id} did not pause its control channel");
        return fail(m, d, why, None);
    }
    let flushes: Vec<_> = d.handles.iter().map(|(id, h)| (*id, h.flushed())).collect();
    for (id, f) in flushes {
        if tokio::time::timeout(FLUSH_TIMEOUT, f).await.is_err() {
            resume_readers(d, readers);
            let why = format!("generation {id} does not read its control socket");
            return fail(m, d, why, None);
        }
    }
    // From here on nothing awaits: no event can slip in unseen before the exec.
    while let Ok(ev) = ev_rx.try_recv() {
        on_gen_event(m, d, ev);
    }
    // Events handled just now may have queued relays (a connection handed over
    // after the flush): those fds live only in this image, so it waits for them.
    let busy = !m.idle()
        || d.relay_slots.available_permits() != crate::daemon::process::generation::RELAY_SLOTS
        || d.handles
            .values()
            .any(|h| h.snapshot.is_some() || h.ready_deferred || h.relaying());
    if busy {
        tracing::info!("reexec waits: something started while channels were paused");
        resume_readers(d, readers);
        return;
    }
    let carried = match m.carry(&crate::clock::Mono).map(serde_json::to_value) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return fail(m, d, format!("cannot write the machine: {e}"), None),
        Err(why) => return fail(m, d, why.to_string(), None),
    };
    let Some(p) = d.reexec.as_ref() else {
        return resume_readers(d, readers);
    };
    let Some((exe, to)) = p.target.as_ref() else {
        return resume_readers(d, readers);
    };
    let requested = p.requested;
    let mut parts: HashMap<GenId, (Vec<u8>, Vec<OwnedFd>)> = readers
        .into_iter()
        .map(|(id, r)| (id, r.into_parts()))
        .collect();
    let state = hand_over(
        carried, d, &mut parts, control, notify_in, cfg, to, requested,
    );
    tracing::info!(
        generation = m.active().unwrap_or(0),
        pid = std::process::id(),
        to = %exe.path.display(),
        "re-executing"
    );
    let err = rx::exec_forward(exe, &state, &d.me.argv);
    let to = to.clone();
    let readers = parts
        .into_iter()
        .map(|(id, (bytes, fds))| (id, FrameReader::from_parts(&bytes, fds)))
        .collect();
    resume_readers(d, readers);
    fail(m, d, err, Some(to));
}

/// How a listener goes over.
fn listener_over(l: &Listener) -> ListenerOver {
    ListenerOver {
        name: l.name.clone(),
        addr: l.addr.clone(),
        inherited: l.inherited,
        fd: l.fd().as_raw_fd(),
        bound_file: l.bound_file().cloned(),
    }
}

fn resume_readers(d: &mut Driver, mut readers: HashMap<GenId, FrameReader>) {
    for (id, h) in d.handles.iter_mut() {
        h.resume(readers.remove(id).unwrap_or_default());
    }
}

#[allow(clippy::too_many_arguments)]
fn hand_over(
    machine: serde_json::Value,
    d: &Driver,
    parts: &mut HashMap<GenId, (Vec<u8>, Vec<OwnedFd>)>,
    control: &ControlServer,
    notify_in: &NotifyIn,
    cfg: &RunConfig,
    to: &BatonBuild,
    requested: Instant,
) -> HandOver {
    let (cfd, cpath, group) = control.parts();
    let gens = d
        .handles
        .iter()
        .map(|(id, h)| {
            let (bytes, fds) = parts.remove(id).unwrap_or_default();
            let over = GenOver {
                id: *id,
                pid: h.pid,
                control_fd: h.control_fd().as_raw_fd(),
                started_at: h.started_at,
                connections: h.connections(),
                status_text: h.status_text.clone(),
                buffered: bytes.clone(),
                buffered_fds: fds.iter().map(AsRawFd::as_raw_fd).collect(),
            };
            parts.insert(*id, (bytes, fds));
            over
        })
        .collect();
    HandOver {
        format: FORMAT,
        from: d.build.clone(),
        to: to.clone(),
        requested,
        me: d.me.clone(),
        config: cfg.clone(),
        listeners: d.listeners.iter().map(listener_over).collect(),
        control: SocketOver {
            fd: cfd.as_raw_fd(),
            path: cpath.to_path_buf(),
            group,
        },
        notify: SocketOver {
            fd: notify_in.fd().as_raw_fd(),
            path: notify_in.path().to_path_buf(),
            group: None,
        },
        fd_stored: d.fd_stored,
        gens,
        cgroups: d.containment.handover(),
        strays_killed: d.containment.strays_killed(),
        strays: d.strays.clone(),
        images: d
            .images
            .iter()
            .map(|(label, e)| ImageOver {
                label: label.clone(),
                fd: e.fd().as_raw_fd(),
                path: e.path.clone(),
                script: e.script,
                release: e.release.clone(),
                sha256: e.expected_sha256().map(str::to_owned),
            })
            .collect(),
        next_exe: d.next_exe,
        waiters: d
            .waiters
            .iter()
            .filter_map(|(id, w)| {
                w.conn.as_ref().map(|c| WaiterOver {
                    id: *id,
                    fd: c.as_raw_fd(),
                    kind: w.kind.clone(),
                })
            })
            .collect(),
        next_waiter: d.next_waiter,
        machine,
        boot_note: d.boot_note.clone(),
        in_use: d.in_use.clone(),
        metrics: d.metrics_listener.as_ref().map(listener_over),
        history: d.history.entries(),
        settling: d.settling.carried(),
        events: d.event_log.subscribe().0,
    }
}

/// What the image before handed over, read from the environment.
pub struct Inherited {
    /// The hand-over.
    pub state: HandOver,
    /// The memfd it came in.
    pub memfd: OwnedFd,
    /// Why the image that exec'd this one back could not take over (this image
    /// is the previous executable, resumed).
    pub failed: Option<String>,
    /// The previous executable, exec'd back if this image crashes taking over.
    pub prev: Option<OwnedFd>,
}

/// Runs the supervisor from a hand-over until it is stopped.
///
/// # Errors
/// Taking over failed in a way that leaves nothing to go back to.
pub async fn resume(inh: Inherited) -> Result<i32, super::RunError> {
    let Inherited {
        state,
        memfd,
        failed,
        prev,
    } = inh;
    let all_fds = {
        let mut v = state.fds();
        v.push(memfd.as_raw_fd());
        v
    };
    let setup = |e: String| super::RunError::Setup(e);
    let cfg = state.config.clone();
    let take = |fd: RawFd| sys::take_handed_fd(fd).map_err(|e| e.to_string());
    let listener = |l: &ListenerOver| {
        take(l.fd).map(|fd| {
            Listener::from_handover(
                l.name.clone(),
                l.addr.clone(),
                l.inherited,
                fd,
                l.bound_file.clone(),
            )
        })
    };
    let listeners = state
        .listeners
        .iter()
        .map(listener)
        .collect::<Result<Vec<_>, _>>()
        .map_err(setup)?;
    let control = ControlServer::from_handover(
        take(state.control.fd).map_err(setup)?,
        state.control.path.clone(),
        state.control.group,
    )
    .map_err(|e| setup(format!("control socket: {e}")))?;
    let notify_in = NotifyIn::from_handover(
        take(state.notify.fd).map_err(setup)?,
        state.notify.path.clone(),
    )
    .map_err(|e| setup(format!("notify socket: {e}")))?;
    let mut images = HashMap::new();
    for i in &state.images {
        let exe = Exe::from_handover(
            take(i.fd).map_err(setup)?,
            i.path.clone(),
            i.script,
            i.release.clone(),
            i.sha256.clone(),
        )
        .map_err(setup)?;
        images.insert(i.label.clone(), exe);
    }
    let metrics_listener = state
        .metrics
        .as_ref()
        .map(listener)
        .transpose()
        .map_err(setup)?;
    let lifecycle = match &cfg.release.store {
        Some(dir) => Some(
            Lifecycle::reopen(
                dir,
                cfg.release.preflight.clone(),
                cfg.release.preflight_timeout,
                cfg.release.keep,
            )
            .map_err(setup)?,
        ),
        None => None,
    };
    let parts = DriverParts {
        listeners,
        sd: SystemdOut::from_env(),
        notify_path: state.notify.path.clone(),
        lifecycle,
        boot_note: state.boot_note.clone(),
        images,
        me: state.me.clone(),
        history: crate::daemon::io::history::History::open(cfg.state_dir.as_deref())
            .map_err(setup)?,
        metrics_listener,
    };
    let (mut d, ev_rx, loop_rx) = Driver::new(&cfg, parts);
    d.history.adopt(state.history.clone());
    d.settling = super::settle::Settling::restore(&state.settling);
    for e in &state.events {
        d.event_log.emit(e.clone());
    }
    d.next_exe = state.next_exe;
    d.next_waiter = state.next_waiter;
    d.in_use = state.in_use.clone();
    d.fd_stored = state.fd_stored;
    d.strays = state.strays.clone();
    d.containment
        .adopt(&state.cgroups.0, &state.cgroups.1, state.strays_killed);
    for w in &state.waiters {
        let conn = take(w.fd).map_err(setup)?;
        let dup = conn.try_clone().ok();
        d.waiters.insert(
            w.id,
            Waiter {
                tx: control::adopt_waiter(conn),
                kind: w.kind.clone(),
                conn: dup,
            },
        );
    }
    for g in &state.gens {
        adopt_generation(&mut d, g).map_err(setup)?;
    }
    let signals = super::signals()?;
    // Taken over: from now on no handed-over fd may leak into a child.
    for fd in &all_fds {
        let _ = sys::set_inheritable_raw(*fd, false);
    }
    drop(memfd);
    // Taken over: a crash from here on is this image's own.
    sys::disarm_crash_exec();
    drop(prev);
    let mut m = crate::reexec::machine(&state).map_err(setup)?;
    let reexec_waiters: Vec<WaiterId> = state
        .waiters
        .iter()
        .filter(|w| w.kind == WaitKind::Reexec)
        .map(|w| w.id)
        .collect();
    let duration_ms = state.requested.elapsed().as_secs_f64() * 1000.0;
    let report = match failed {
        None => {
            d.me.reexecs += 1;
            ReexecReport {
                result: ReexecResult::Done,
                old: state.from.clone(),
                new: Some(d.build.clone()),
                reason: None,
                duration_ms,
            }
        }
        Some(why) => ReexecReport {
            result: ReexecResult::Failed,
            old: state.from.clone(),
            new: Some(state.to.clone()),
            reason: Some(why),
            duration_ms,
        },
    };
    match report.result {
        ReexecResult::Done => tracing::info!(
            pid = std::process::id(),
            from = %report.old.build_id,
            to = %d.build.build_id,
            version = %d.build.version,
            ms = duration_ms,
            generations = state.gens.len(),
            "re-executed; supervising"
        ),
        _ => tracing::error!(
            pid = std::process::id(),
            reason = report.reason.as_deref().unwrap_or(""),
            "the new baton could not take over; the previous one carries on"
        ),
    }
    d.me.last_reexec = Some(report.clone());
    d.reply_reexec(&reexec_waiters, &report);
    d.emit(
        0,
        None,
        baton_protocol::EventKind::Reexec {
            report: report.clone(),
        },
    );
    for l in &d.listeners {
        tracing::debug!(name = %l.name, addr = %l.addr, "listening (handed over)");
    }
    m.hold(&mut d, Instant::now(), false);
    if d.sd.enabled() {
        let line = crate::text::one_line(&m.status_line(Instant::now()));
        d.sd.send(&format!("STATUS={line}"));
    }
    let io = Io {
        control,
        notify_in,
        ev_rx,
        loop_rx,
    };
    Ok(serve(&cfg, m, d, io, signals).await)
}

/// Takes over one generation: its control channel where the image before left
/// off, and its exit through a pidfd.
fn adopt_generation(d: &mut Driver, g: &GenOver) -> Result<(), String> {
    let control_fd = sys::take_handed_fd(g.control_fd).map_err(|e| e.to_string())?;
    let fds = g
        .buffered_fds
        .iter()
        .map(|fd| sys::take_handed_fd(*fd).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let reader = FrameReader::from_parts(&g.buffered, fds);
    let watch = match sys::pidfd_open(g.pid) {
        Ok(fd) => ExitWatch::Pidfd(fd),
        Err(e) => {
            // Gone already (and reaped, so its status is lost): report the exit.
            let how = format!("exited during the reexec ({e})");
            let _ = d.events.send(GenEvent::Exited { gen_id: g.id, how });
            return Ok(());
        }
    };
    let mut h = GenHandle::start(
        g.id,
        watch,
        g.pid,
        control_fd,
        reader,
        d.events.clone(),
        d.relay_slots.clone(),
    )
    .map_err(|e| e.to_string())?;
    h.started_at = g.started_at;
    h.set_connections(g.connections);
    h.status_text = g.status_text.clone();
    d.handles.insert(g.id, h);
    tracing::info!(generation = g.id, pid = g.pid, "adopted generation");
    Ok(())
}
