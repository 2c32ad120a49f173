//! Requests on the control socket, and the status they report.

use std::time::Instant;

use baton_protocol::{
    ControlReply, ControlRequest, GenerationStatus, ListenerStatus, ProbationStatus, ReleaseReply,
    ReleaseRequest, ReleaseResultKind, ReleasesStatus, Status, WaitFor,
};
use tokio::sync::oneshot;

use super::{Driver, LoopEvent};
use crate::daemon::io::control::Incoming;
use crate::reexec::state::WaitKind;
use crate::release::exe::Exe;
use baton_machine::{Machine, Waiters};
use std::os::fd::OwnedFd;

pub(super) fn status(m: &Machine, d: &Driver) -> Status {
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
                connections: d
                    .handles
                    .get(&id)
                    .and_then(crate::daemon::process::generation::GenHandle::connections),
                release: d.lifecycle.as_ref().map(|_| g.image.clone()),
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
        rss_kb: crate::sys::own_rss_kb(),
        containment: d.containment.describe(),
        strays_killed: d.containment.strays_killed(),
        strays: d.strays.clone(),
        releases: d.lifecycle.as_ref().map(|lc| {
            let now = Instant::now();
            Box::new(ReleasesStatus {
                store: lc.dir().display().to_string(),
                permanent: m.permanent_image().cloned(),
                probation: m
                    .on_probation()
                    .map(|(v, until, failures)| ProbationStatus {
                        version: v.clone(),
                        seconds_left: until.map(|t| t.saturating_duration_since(now).as_secs()),
                        health_failures: failures,
                    }),
                boot: d.boot_note.clone(),
                store_error: lc.store_error(),
            })
        }),
        supervisor: Some(Box::new(d.supervisor_info())),
    }
}

pub(super) fn on_control(m: &mut Machine, d: &mut Driver, req: Incoming) {
    let now = Instant::now();
    let conn = req.conn;
    match req.request {
        ControlRequest::Status => {
            let _ = req.reply.send(ControlReply::Status(status(m, d)));
        }
        ControlRequest::Upgrade { wait } => {
            tracing::info!(wait, "upgrade requested on the control socket");
            if wait {
                let id = d.add_waiter(req.reply, WaitKind::Upgrade, conn);
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
        ControlRequest::Release(r) => on_release(m, d, r, req.reply, conn),
        ControlRequest::Snapshot { schema } => {
            tracing::info!(?schema, "dry-run snapshot requested on the control socket");
            let Some(body) = req.body else {
                return error(req.reply, "snapshot request without a body channel".into());
            };
            match m.request_dry_run(d, now, schema) {
                Ok(_) => d.dry_runs.push((req.reply, body)),
                Err(e) => error(req.reply, format!("cannot take a snapshot: {e}")),
            }
        }
        ControlRequest::History { n } => {
            let _ = req.reply.send(ControlReply::History {
                entries: d.history.last(n),
                file: d.history.file().map(|f| f.display().to_string()),
            });
        }
        // Streamed by the control server itself.
        ControlRequest::Events { .. } => {
            let _ = req.reply.send(ControlReply::Error {
                message: "events are streamed by the control server".into(),
            });
        }
        ControlRequest::Reexec { wait } => {
            tracing::info!(wait, "reexec requested on the control socket");
            let waiter = if wait {
                Some(d.add_waiter(req.reply, WaitKind::Reexec, conn))
            } else {
                let _ = req.reply.send(ControlReply::Reexec(d.accepted_reexec()));
                None
            };
            super::reexec::request(m, d, waiter);
        }
    }
}

fn error(reply: oneshot::Sender<ControlReply>, message: String) {
    let _ = reply.send(ControlReply::Error { message });
}

fn done(d: &Driver, reply: oneshot::Sender<ControlReply>, version: Option<String>, detail: String) {
    let r = d.with_list(ReleaseReply {
        result: ReleaseResultKind::Ok,
        version,
        detail,
        releases: Vec::new(),
        upgrade: None,
    });
    let _ = reply.send(ControlReply::Release(r));
}

fn on_release(
    m: &mut Machine,
    d: &mut Driver,
    r: ReleaseRequest,
    reply: oneshot::Sender<ControlReply>,
    conn: Option<OwnedFd>,
) {
    let Some(lc) = d.lifecycle.clone() else {
        return error(
            reply,
            "this baton runs without a release store (start it with --releases DIR)".into(),
        );
    };
    let now = Instant::now();
    tracing::info!(request = ?r, "release request");
    match r {
        ReleaseRequest::List => match lc.list() {
            Ok(releases) => {
                let _ = reply.send(ControlReply::Release(ReleaseReply {
                    result: ReleaseResultKind::Ok,
                    version: None,
                    detail: String::new(),
                    releases,
                    upgrade: None,
                }));
            }
            Err(e) => error(reply, e),
        },
        ReleaseRequest::Check { version } => {
            tokio::spawn(async move {
                let msg = match lc.check(&version).await {
                    Ok((_, out)) => ControlReply::Release(ReleaseReply {
                        result: ReleaseResultKind::Ok,
                        version: Some(version),
                        detail: out,
                        releases: lc.list().unwrap_or_default(),
                        upgrade: None,
                    }),
                    Err(message) => ControlReply::Error { message },
                };
                let _ = reply.send(msg);
            });
        }
        ReleaseRequest::Install { version, wait } => install(m, d, version, wait, reply, conn),
        ReleaseRequest::Permanent { version } => match m.make_permanent(d, now, &version) {
            Ok(()) => done(d, reply, Some(version), String::new()),
            Err(e) => error(reply, e),
        },
        ReleaseRequest::Rollback { wait } => {
            if m.on_probation().is_some() {
                let version = m.on_probation().map(|(v, _, _)| v.clone());
                let (waiter, reply) = if wait == WaitFor::Nothing {
                    (None, Some(reply))
                } else {
                    let kind = WaitKind::Release(version.clone().unwrap_or_default());
                    (Some(d.add_waiter(reply, kind, conn)), None)
                };
                match m.rollback(d, now, waiter) {
                    Ok(()) => {
                        if let Some(reply) = reply {
                            done(d, reply, version, "reverting".into());
                        }
                    }
                    Err(e) => {
                        let tx = waiter
                            .and_then(|id| d.waiters.remove(&id))
                            .map(|w| w.tx)
                            .or(reply);
                        if let Some(tx) = tx {
                            error(tx, e);
                        }
                    }
                }
                return;
            }
            let previous = lc.meta().ok().and_then(|meta| meta.previous_permanent);
            match previous {
                Some(v) => {
                    d.rollback_to = Some(v.clone());
                    install(m, d, v, wait, reply, conn);
                }
                None => error(
                    reply,
                    "nothing to roll back to: no release is on probation and none was permanent before the permanent one".into(),
                ),
            }
        }
        ReleaseRequest::Remove { version } => {
            let in_use = m.images_in_use();
            match lc.remove(&version, &in_use) {
                Ok(()) => done(d, reply, Some(version), String::new()),
                Err(e) => error(reply, e),
            }
        }
    }
}

/// install_release, first half: refuse what cannot be installed, then check the
/// release off the loop ([`on_checked`] goes on).
fn install(
    m: &Machine,
    d: &Driver,
    version: String,
    wait: WaitFor,
    reply: oneshot::Sender<ControlReply>,
    conn: Option<OwnedFd>,
) {
    let Some(lc) = d.lifecycle.clone() else {
        return;
    };
    if m.upgrading() {
        return error(
            reply,
            "an upgrade is in progress; try again when it has finished".into(),
        );
    }
    if m.on_probation().is_some_and(|(v, _, _)| *v == version) {
        return error(
            reply,
            format!("{version} is installed already and on probation"),
        );
    }
    let running = m
        .active()
        .and_then(|a| m.generation(a))
        .map(|g| g.image.clone());
    if running.as_deref() == Some(version.as_str()) && m.permanent_image() == Some(&version) {
        return error(
            reply,
            format!("{version} is running already, and permanent"),
        );
    }
    let tx = d.loop_tx.clone();
    tokio::spawn(async move {
        let result = lc.check(&version).await.map(|(exe, _)| exe);
        let _ = tx.send(LoopEvent::Checked {
            version,
            result,
            reply,
            wait,
            conn,
        });
    });
}

/// install_release, second half: the release passed its checks; upgrade to it.
pub(super) fn on_checked(
    m: &mut Machine,
    d: &mut Driver,
    version: String,
    result: Result<Exe, String>,
    reply: oneshot::Sender<ControlReply>,
    wait: WaitFor,
    conn: Option<OwnedFd>,
) {
    let exe = match result {
        Ok(exe) => exe,
        Err(e) => return error(reply, e),
    };
    d.images.entry(version.clone()).or_insert(exe);
    let (waiters, reply) = match wait {
        WaitFor::Nothing => (Waiters::default(), Some(reply)),
        WaitFor::Promoted => {
            let id = d.add_waiter(reply, WaitKind::Release(version.clone()), conn);
            (
                Waiters {
                    promoted: vec![id],
                    permanent: Vec::new(),
                },
                None,
            )
        }
        WaitFor::Permanent => {
            let id = d.add_waiter(reply, WaitKind::Release(version.clone()), conn);
            (
                Waiters {
                    promoted: Vec::new(),
                    permanent: vec![id],
                },
                None,
            )
        }
    };
    let ids: Vec<u64> = waiters
        .promoted
        .iter()
        .chain(&waiters.permanent)
        .copied()
        .collect();
    let rollback = d.rollback_to.take_if(|v| *v == version).is_some();
    let asked = if rollback {
        m.request_rollback(d, Instant::now(), version.clone(), waiters)
    } else {
        m.request_install(d, Instant::now(), version.clone(), waiters)
    };
    match asked {
        Ok(()) => {
            if let Some(reply) = reply {
                done(d, reply, Some(version), "installing".into());
            }
        }
        Err(e) => {
            let tx = ids
                .first()
                .and_then(|id| d.waiters.remove(id))
                .map(|w| w.tx)
                .or(reply);
            if let Some(tx) = tx {
                error(tx, e);
            }
        }
    }
}
