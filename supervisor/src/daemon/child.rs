//! What generations say: their control messages, exits and sd_notify datagrams.

use std::time::Instant;

use baton_protocol::{ChildMsg, PROTOCOL_VERSION, SupervisorMsg};

use super::{Driver, MAX_STRANGERS, STRANGER_TTL};
use crate::daemon::io::notify;
use crate::daemon::process::generation::GenEvent;
use baton_machine::{GenId, Handover, Input, Machine};

pub(super) fn on_gen_event(m: &mut Machine, d: &mut Driver, ev: GenEvent) {
    let now = Instant::now();
    if let GenEvent::Message { gen_id, .. } | GenEvent::BadMessage { gen_id, .. } = &ev {
        if let Some(h) = d.handles.get(gen_id) {
            h.handled_one();
        }
    }
    match ev {
        GenEvent::Exited { gen_id, how } => {
            // Handled once its channel is read to the end too: what it sent
            // before it exited reaches its destination first.
            // Killed for a reason baton knows: the exit says it.
            let how = match d
                .handles
                .get(&gen_id)
                .and_then(|h| h.kill_reason.as_deref())
            {
                Some(why) => format!("{how}; killed by baton: {why}"),
                None => how,
            };
            let how = explain_not_found(m, d, gen_id, how);
            let closed = match d.handles.get_mut(&gen_id) {
                Some(h) => h.mark_exited(how.clone()),
                None => true,
            };
            if closed {
                exited(m, d, now, gen_id, &how);
            }
        }
        GenEvent::Closed { gen_id, dropped } => {
            if dropped.any() {
                let pid = d.handles.get(&gen_id).map_or(0, |h| h.pid);
                tracing::error!(
                    generation = gen_id,
                    pid,
                    connections = dropped.connections,
                    other = dropped.other,
                    "lost what the exited generation sent: its successor took no fds for {:?}",
                    crate::daemon::process::generation::STALL_BOUND
                );
                if dropped.connections > 0 {
                    let target = m.active().filter(|a| *a != gen_id).unwrap_or(gen_id);
                    d.note_handover(m, target, Handover::Dropped(dropped.connections));
                }
            }
            let how = d.handles.get_mut(&gen_id).and_then(|h| {
                h.closed = true;
                h.exited.clone()
            });
            if let Some(how) = how {
                exited(m, d, now, gen_id, &how);
            }
        }
        GenEvent::Relayed {
            gen_id,
            written,
            lost,
        } => {
            if lost > 0 {
                tracing::error!(
                    generation = gen_id,
                    lost,
                    "connections handed over to this generation were never written to it \
                     (it is gone or its control socket failed); each was closed"
                );
            }
            d.note_handover(m, gen_id, Handover::Delivered { written, lost });
            d.settle();
        }
        GenEvent::BadMessage { gen_id, why } => {
            // One line per generation; the rest are counted (and past a limit, fatal).
            if d.warned_bad.insert(gen_id) {
                tracing::warn!(
                    generation = gen_id,
                    why,
                    "bad control message (more are not logged)"
                );
            }
            deferred_ready(m, d, gen_id);
        }
        GenEvent::Hostile { gen_id, why } => {
            let Some(h) = d.handles.get_mut(&gen_id) else {
                return;
            };
            let pid = h.pid;
            tracing::error!(
                generation = gen_id,
                pid,
                why,
                "killing a hostile generation"
            );
            h.kill_reason = Some(why);
            baton_machine::Processes::kill(d, gen_id, pid, baton_machine::Kill::Now);
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
                ChildMsg::Hello {
                    protocol,
                    features,
                    restores,
                } => {
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
                    m.handle(d, now, gen_id, Input::Hello { features, restores });
                    deferred_ready(m, d, gen_id);
                }
                ChildMsg::Connections { active } => {
                    // The read task stores these itself; one may still come this way
                    // from a reader handed over by an older image.
                    if let Some(h) = d.handles.get(&gen_id) {
                        h.set_connections(Some(active));
                    }
                }
                ChildMsg::Prepared => m.handle(d, now, gen_id, Input::Prepared),
                ChildMsg::Snapshot {
                    size,
                    version,
                    dropped,
                    ..
                } => {
                    let Some(fd) = fds.pop() else { return };
                    tracing::info!(generation = gen_id, pid, size, version, "snapshot received");
                    if let Some(h) = d.handles.get_mut(&gen_id) {
                        h.snapshot = Some((fd, size));
                        h.snapshot_version = version;
                        h.snapshot_dropped = dropped;
                    }
                    m.handle(d, now, gen_id, Input::Snapshot { size });
                }
                ChildMsg::Chunk {
                    size, round, seq, ..
                } => {
                    let Some(fd) = fds.pop() else { return };
                    if let Some(h) = d.handles.get_mut(&gen_id) {
                        h.chunk = Some((fd, slots));
                    }
                    m.handle(d, now, gen_id, Input::Chunk { round, seq, size });
                    // Not passed on (not pre-copying, or out of order): closed here.
                    if let Some(h) = d.handles.get_mut(&gen_id) {
                        h.chunk = None;
                    }
                }
                ChildMsg::RoundDone { round, .. } => {
                    m.handle(d, now, gen_id, Input::RoundDone { round })
                }
                ChildMsg::PrecopyFailed { reason } => {
                    m.handle(d, now, gen_id, Input::PrecopyFailed { why: &reason })
                }
                ChildMsg::Applied { seq } => m.handle(d, now, gen_id, Input::Applied { seq }),
                ChildMsg::SnapshotFailed { reason } => {
                    m.handle(d, now, gen_id, Input::SnapshotFailed { why: &reason })
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
                    m.handle(d, now, gen_id, Input::Restored);
                }
                ChildMsg::Rejected { reason } => {
                    m.handle(d, now, gen_id, Input::Rejected { why: &reason })
                }
                ChildMsg::Migrate {
                    listener,
                    buffered,
                    meta,
                    ..
                } => {
                    // The connection, and a memfd with the bytes read when they are many.
                    if fds.is_empty() || fds.len() > 2 {
                        tracing::error!(
                            generation = gen_id,
                            pid,
                            fds = fds.len(),
                            "migrate must carry 1 or 2 fds; closed"
                        );
                        return;
                    }
                    let target = m
                        .active()
                        .filter(|a| *a != gen_id)
                        .and_then(|a| d.handles.get(&a));
                    let target_id = m.active().filter(|a| *a != gen_id);
                    match target {
                        Some(h) => {
                            h.relay(
                                SupervisorMsg::Adopt {
                                    fds: fds.len() as u32,
                                    listener,
                                    buffered,
                                    meta,
                                },
                                fds,
                                slots,
                            );
                            if let Some(t) = target_id {
                                d.note_handover(m, t, Handover::Relayed(1));
                            }
                        }
                        None => {
                            tracing::error!(
                                generation = gen_id,
                                pid,
                                "migrated connection has no active generation to go to; closing it"
                            );
                            let t = m.active().unwrap_or(gen_id);
                            d.note_handover(m, t, Handover::Dropped(1));
                        }
                    }
                }
            }
        }
    }
}

/// A generation exited and its channel was read to the end: now the machine
/// hears of it.
fn exited(m: &mut Machine, d: &mut Driver, now: Instant, gen_id: GenId, how: &str) {
    d.handles.remove(&gen_id);
    d.warned_bad.remove(&gen_id);
    d.containment.reap(gen_id);
    m.handle(d, now, gen_id, Input::Exited { how });
    if !d.containment.contains() {
        find_strays(m, d, gen_id);
    }
    d.settle();
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

/// Without cgroups: after generation `gen_id` exited, looks for processes that still
/// hold a listener outside every live generation, and says so (log and status).
fn find_strays(m: &Machine, d: &mut Driver, gen_id: GenId) {
    let inodes = crate::daemon::process::strays::inodes(&d.listeners);
    let found = crate::daemon::process::strays::holders(&inodes, |p| {
        notify::owning_pid(p, |q| m.gen_by_pid(q).is_some()).is_some()
    });
    for pid in found {
        if !d.strays.contains(&pid) {
            tracing::warn!(
                generation = gen_id,
                pid,
                "a process outlived its generation and holds a listener (setsid?); \
                 without cgroups baton cannot contain it: stop it yourself"
            );
            d.strays.push(pid);
        }
    }
}

/// Hands READY to the machine, timing baton's own share of the promotion.
fn ready(m: &mut Machine, d: &mut Driver, gen_id: GenId) {
    let now = Instant::now();
    d.ready_received = Some(now);
    m.handle(d, now, gen_id, Input::Ready);
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

pub(super) fn on_notify(m: &mut Machine, d: &mut Driver, pid: u32, text: &str) {
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
            "ERRNO" if v.trim() != "0" => {
                tracing::warn!(generation = gen_id, pid = owner, errno = v, "ERRNO");
                m.handle(d, Instant::now(), gen_id, Input::Errno { errno: v });
            }
            "STOPPING" | "WATCHDOG" | "ERRNO" | "RELOADING" | "MAINPID" | "MONOTONIC_USEC" => {}
            _ => tracing::debug!(generation = gen_id, key = k, "ignored notify key"),
        }
    }
}

/// A `#!` script that exits 127 ("command not found") most likely looked for itself by
/// `$0`, as pyenv, rbenv and asdf shims do: baton runs a script as
/// `/proc/<baton>/fd/N`, so `$0` is that path. Say so, with the way out.
fn explain_not_found(m: &Machine, d: &Driver, gen_id: baton_machine::GenId, how: String) -> String {
    let script = m
        .generation(gen_id)
        .and_then(|g| d.images.get(&g.image))
        .is_some_and(|exe| exe.script);
    if script && how == "exit status 127" {
        format!(
            "{how}; PROGRAM is a #! script, which runs as /proc/<baton pid>/fd/N: a script that finds \
             itself by $0 (a pyenv, rbenv or asdf shim) cannot, so give the real interpreter \
             (for Python: $(python3 -c 'import sys; print(sys.executable)'))"
        )
    } else {
        how
    }
}
