//! The machine's [`Host`]: how its decisions reach real processes, sockets and
//! systemd.

use crate::daemon::process::generation::GenHandle;
use crate::daemon::process::spawn::{self};
use crate::reexec::state::WaitKind;
use crate::release::lifecycle::Lifecycle;
use crate::sys;
use baton_machine::{
    Answers, Channel, GenId, Image, Kill, Outside, ProbationOutcome, Processes, ReleaseEvent,
    SdEvent, WaiterId,
};
use baton_protocol::{
    ControlReply, EventKind, HistoryEntry, ReleaseReply, ReleaseResultKind, SupervisorMsg,
    UpgradeReport, UpgradeResult,
};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

use super::Driver;

impl Processes for Driver {
    fn spawn(&mut self, gen_id: GenId, image: Option<&Image>) -> Result<(u32, Image), String> {
        let label = match image {
            Some(i) if self.images.contains_key(i) => i.clone(),
            Some(i) => match &self.lifecycle {
                Some(lc) => {
                    let exe = lc.open_exe(i)?;
                    self.images.insert(i.clone(), exe);
                    i.clone()
                }
                None => return Err(format!("the executable of {i} is no longer open")),
            },
            None => self.plain_image()?,
        };
        let exe = self.images.get(&label).ok_or("executable vanished")?;
        // What runs is what was checked, at every exec (crash restarts included).
        exe.verify()?;
        let t = Instant::now();
        let cg = self.containment.prepare(gen_id);
        self.last_cgroup = t.elapsed();
        let t = Instant::now();
        let s = match spawn::spawn(&self.spawn_cfg, &self.listeners, gen_id, cg, exe) {
            Ok(s) => s,
            Err(e) => {
                self.containment.spawn_failed(gen_id);
                return Err(e.to_string());
            }
        };
        self.last_spawn = t.elapsed();
        let h = GenHandle::start(
            gen_id,
            s.exit,
            s.pid,
            s.control,
            baton_protocol::wire::FrameReader::new(),
            self.events.clone(),
            self.relay_slots.clone(),
        )
        .map_err(|e| e.to_string())?;
        self.handles.insert(gen_id, h);
        Ok((s.pid, label))
    }

    fn kill(&mut self, gen_id: GenId, pid: u32, how: Kill) {
        if self.handles.get(&gen_id).is_some_and(GenHandle::is_gone) {
            // Reaped already (its channel is still being read): the pid may be reused.
            return;
        }
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

    fn peak_rss(&mut self, gen_id: GenId) -> Option<u64> {
        let pid = self.handles.get(&gen_id)?.pid;
        crate::sys::peak_rss(pid)
    }
}

impl Channel for Driver {
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

    fn pass_chunk(
        &mut self,
        from: GenId,
        to: GenId,
        round: u32,
        seq: u64,
        size: u64,
    ) -> Result<(), String> {
        let (fd, slots) = self
            .handles
            .get_mut(&from)
            .and_then(|h| h.chunk.take())
            .ok_or("no chunk received")?;
        let h = self.handles.get(&to).ok_or("candidate is gone")?;
        let msg = SupervisorMsg::Chunk {
            fds: 1,
            size,
            round,
            seq,
        };
        // A sender that ignores the window waits for relay slots, like a migration.
        h.relay(msg, vec![fd], slots);
        Ok(())
    }
}

impl Answers for Driver {
    fn dry_run_done(&mut self, gen_id: GenId, outcome: Result<u64, String>) {
        let waiters = std::mem::take(&mut self.dry_runs);
        let snap = self.handles.get_mut(&gen_id).and_then(|h| {
            let (v, dropped) = (h.snapshot_version, std::mem::take(&mut h.snapshot_dropped));
            h.snapshot.take().map(|(fd, size)| (fd, size, v, dropped))
        });
        let outcome = outcome.and_then(|_| snap.ok_or_else(|| "no snapshot received".to_string()));
        match &outcome {
            Ok((_, size, version, _)) => {
                tracing::info!(generation = gen_id, size, version, "dry-run snapshot taken")
            }
            Err(e) => tracing::warn!(generation = gen_id, error = %e, "dry-run snapshot failed"),
        }
        for (reply, body) in waiters {
            let answer = match &outcome {
                Ok((fd, size, version, dropped)) => match fd.try_clone() {
                    Ok(dup) => {
                        let _ = body.send(dup);
                        ControlReply::Snapshot {
                            generation: gen_id,
                            version: *version,
                            size: *size,
                            dropped: dropped.clone(),
                        }
                    }
                    Err(e) => ControlReply::Error {
                        message: format!("cannot take a snapshot: dup: {e}"),
                    },
                },
                Err(e) => ControlReply::Error {
                    message: format!("cannot take a snapshot: {e}"),
                },
            };
            let _ = reply.send(answer);
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
            let Some(waiter) = self.waiters.remove(&w) else {
                continue;
            };
            let reply = match waiter.kind {
                WaitKind::Upgrade | WaitKind::Reexec => ControlReply::Upgrade(report.clone()),
                WaitKind::Release(version) => {
                    let promoted = report.result == UpgradeResult::Promoted;
                    ControlReply::Release(self.with_list(ReleaseReply {
                        result: if promoted {
                            ReleaseResultKind::Promoted
                        } else {
                            ReleaseResultKind::RolledBack
                        },
                        version: Some(version),
                        detail: report.reason.clone().unwrap_or_default(),
                        releases: Vec::new(),
                        upgrade: Some(report.clone()),
                    }))
                }
            };
            let _ = waiter.tx.send(reply);
        }
    }

    fn probation_over(&mut self, outcome: &ProbationOutcome, waiters: Vec<WaiterId>) {
        match outcome.kind {
            ReleaseResultKind::Reverted => self.metrics.revert("reverted"),
            ReleaseResultKind::RevertRefused => self.metrics.revert("refused"),
            _ => {}
        }
        // What runs is not what the store says: no waiter is told it went well.
        if let Some(why) = self.lifecycle.as_ref().and_then(Lifecycle::store_error) {
            let version = outcome.image.clone().unwrap_or_default();
            for w in waiters {
                if let Some(waiter) = self.waiters.remove(&w) {
                    let kind = format!("{:?}", outcome.kind).to_lowercase();
                    let _ = waiter.tx.send(ControlReply::Error {
                        message: format!(
                            "{version}: {kind} here, but the release store could not record it \
                             ({why}); it is out of sync, and a restart would boot what it says"
                        ),
                    });
                }
            }
            return;
        }
        for w in waiters {
            let reply = ReleaseReply {
                result: outcome.kind,
                version: outcome.image.clone(),
                detail: outcome.reason.clone().unwrap_or_default(),
                releases: Vec::new(),
                upgrade: outcome.report.clone(),
            };
            self.reply_release(w, reply);
        }
    }
}

impl Outside for Driver {
    fn systemd(&mut self, event: SdEvent, status: &str) {
        let status = crate::text::one_line(status);
        match event {
            SdEvent::Ready => self.sd.send(&format!("READY=1\nSTATUS={status}")),
            SdEvent::Reloading => self.sd.reloading(&status),
            SdEvent::Stopping => self.sd.send(&format!("STOPPING=1\nSTATUS={status}")),
            SdEvent::Status => self.sd.send(&format!("STATUS={status}")),
        }
    }

    fn release(&mut self, event: ReleaseEvent<'_>) {
        // Without a store nothing is persisted, but what happened is still said.
        if let Some(lc) = &self.lifecycle {
            lc.persist(&event);
        }
        if let ReleaseEvent::Failed { .. } = &event {
            self.metrics.release_failed();
        }
        let kind = match &event {
            ReleaseEvent::Permanent(v) => Some(EventKind::Permanent {
                release: (*v).clone(),
            }),
            ReleaseEvent::Failed { image, reason } => Some(EventKind::ReleaseFailed {
                release: (*image).clone(),
                reason: (*reason).to_string(),
            }),
            _ => None,
        };
        if let Some(kind) = kind {
            self.emit(0, None, kind);
        }
    }

    fn event(&mut self, gen_id: GenId, pid: u32, mut kind: EventKind) {
        if let EventKind::Draining { connections } = &mut kind {
            *connections = self.handles.get(&gen_id).and_then(GenHandle::connections);
        }
        if let EventKind::Promoted { why, image, report }
        | EventKind::RolledBack { why, image, report } = &kind
        {
            let entry = HistoryEntry {
                at_ms: crate::text::now_ms(),
                why: *why,
                release: image.clone(),
                report: report.clone(),
            };
            // A promotion's line is final once the old generations are gone.
            if matches!(kind, EventKind::Promoted { .. }) {
                self.emit(gen_id, (pid != 0).then_some(pid), kind);
                self.record_promotion(entry);
                return;
            }
            self.history.push(entry);
        }
        self.emit(gen_id, (pid != 0).then_some(pid), kind);
    }

    fn exit(&mut self, code: i32, reason: &str) {
        self.exit = Some((code, reason.to_string()));
    }
}
