//! Pre-copy, as the machine sees it: the old generation sends its state in
//! rounds while it serves (a full copy, then what changed), and quiesces only
//! for the last one. The machine decides when the rounds stop; baton relays
//! the chunks' fds and never maps them.

use std::time::{Duration, Instant};

use baton_protocol::{EventKind, Feature, SupervisorMsg, UpgradeReport};

use super::{GenId, Host, Machine, Stage, Upgrade, later, ms_f};
use crate::{Channel, Outside};

/// A live round this small means the deltas have converged: the last one,
/// sent while quiesced, is smaller still.
pub const CONVERGED_BYTES: u64 = 1 << 20;

/// One pre-copy hand-over in progress.
#[derive(Debug, Clone)]
pub struct Run {
    /// The old generation sending.
    pub(super) from: GenId,
    /// The round being sent.
    round: u32,
    /// Whether that round is the last, sent while quiesced.
    last: bool,
    started: Instant,
    round_started: Instant,
    /// Bytes and chunks of the round being sent, as forwarded.
    round_bytes: u64,
    round_chunks: u64,
    /// The next chunk's sequence number.
    next_seq: u64,
    /// Chunks the candidate has applied.
    applied: u64,
    /// Rounds completed while serving, and their bytes.
    live_rounds: u32,
    live_bytes: u64,
    /// The last completed delta round's bytes (round 0 is not a delta).
    last_delta: Option<u64>,
    /// Why the live rounds stopped.
    stop: Option<String>,
    /// The last round's bytes, once it is in.
    final_bytes: Option<u64>,
}

impl Run {
    /// Copies the figures into an upgrade report.
    pub(super) fn fill(&self, r: &mut UpgradeReport) {
        r.precopy_rounds = Some(self.live_rounds);
        r.precopy_bytes = Some(self.live_bytes);
        r.precopy_stop = self.stop.clone();
        r.final_delta_bytes = self.final_bytes;
    }

    /// The old generation's own state version: the newest it restores.
    fn compatible(old: Option<&Vec<u32>>, candidate: Option<&Vec<u32>>) -> bool {
        match (old.and_then(|v| v.iter().max()), candidate) {
            (_, None) => true,
            (Some(v), Some(accept)) => accept.contains(v),
            (None, Some(_)) => false,
        }
    }
}

/// Why the live rounds stop after a round of `bytes`, or `None` to go on.
fn stop_reason(
    run: &Run,
    bytes: u64,
    max_rounds: u32,
    timeout: Duration,
    now: Instant,
) -> Option<String> {
    let r = run.round;
    if bytes <= CONVERGED_BYTES {
        return Some("converged".into());
    }
    if let Some(prev) = run.last_delta.filter(|p| bytes >= *p) {
        return Some(format!(
            "not converging: round {r} sent {bytes} bytes, round {} sent {prev}; the rest is copied while quiesced",
            r - 1
        ));
    }
    if r >= max_rounds {
        return Some("round limit".into());
    }
    if now - run.started >= timeout {
        return Some("timeout".into());
    }
    None
}

impl Machine {
    /// The active generation `gen_id` died. If it was sending a pre-copy, the
    /// candidate holds part of a state that is gone: it is aborted, and the dead
    /// generation replaced as after any crash. `true` if so.
    pub(super) fn precopy_source_died(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        gen_id: GenId,
        image: &super::Image,
        how: &str,
    ) -> bool {
        if self.precopy_from() != Some(gen_id) {
            return false;
        }
        self.restart_image = Some(image.clone());
        let why = format!(
            "STATE LOST: generation {gen_id} died ({how}) during pre-copy; the candidate is aborted"
        );
        tracing::error!(generation = gen_id, "{why}");
        self.lost_state = Some(why.clone());
        self.fail(host, now, why);
        true
    }

    /// Starts the chunked hand-over from `old` to the candidate if both can:
    /// live rounds, or (with pre-copy off) one round while quiesced. Returns
    /// false to use the one-shot snapshot.
    pub(super) fn try_precopy(
        &mut self,
        host: &mut impl Channel,
        now: Instant,
        old: GenId,
        candidate: GenId,
    ) -> bool {
        let (Some(o), Some(c)) = (self.gens.get(&old), self.gens.get(&candidate)) else {
            return false;
        };
        if !(o.has(Feature::Precopy)
            && c.has(Feature::Precopy)
            && Run::compatible(o.restores.as_ref(), c.restores.as_ref()))
        {
            return false;
        }
        let Some(u) = self.upgrade.as_mut() else {
            return false;
        };
        let live = self.s.precopy.enabled;
        u.state.precopy = Some(Run {
            from: old,
            round: 0,
            last: !live,
            started: now,
            round_started: now,
            round_bytes: 0,
            round_chunks: 0,
            next_seq: 0,
            applied: 0,
            live_rounds: 0,
            live_bytes: 0,
            last_delta: None,
            stop: (!live).then(|| "pre-copy off".to_string()),
            final_bytes: None,
        });
        if live {
            u.stage = Stage::Precopy;
            u.stage_deadline = Some(later(now, self.s.precopy_deadline()));
            tracing::info!(
                generation = old,
                "pre-copy: sending the state while serving"
            );
            host.send(old, SupervisorMsg::Precopy { round: 0 });
        } else {
            self.quiesce_for_last_round(host, now, old, 0);
        }
        true
    }

    fn quiesce_for_last_round(
        &mut self,
        host: &mut impl Channel,
        now: Instant,
        old: GenId,
        round: u32,
    ) {
        self.quiesce_old(now, old);
        tracing::info!(generation = old, round, "quiescing for the last round");
        host.send(old, SupervisorMsg::PrecopyFinal { round });
    }

    /// Pre-copy: a chunk arrived from `from` (the driver holds its fd).
    pub(super) fn on_chunk(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        round: u32,
        seq: u64,
        size: u64,
    ) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        let to = u.candidate;
        let Some(p) = u.state.precopy.as_mut().filter(|p| p.from == from) else {
            return;
        };
        if round != p.round || seq != p.next_seq {
            let why = format!(
                "old generation sent chunk {seq} of round {round}; expected chunk {} of round {}",
                p.next_seq, p.round
            );
            self.fail(host, now, why);
            return;
        }
        p.next_seq += 1;
        p.round_chunks += 1;
        p.round_bytes += size;
        if let Err(e) = host.pass_chunk(from, to, round, seq, size) {
            self.fail(host, now, format!("cannot pass a pre-copy chunk: {e}"));
        }
    }

    /// Pre-copy: the candidate applied chunk `seq`; the old generation may send one more.
    pub(super) fn on_applied(
        &mut self,
        host: &mut impl Channel,
        now: Instant,
        gen_id: GenId,
        seq: u64,
    ) {
        let Some(u) = self.upgrade.as_mut().filter(|u| u.candidate == gen_id) else {
            return;
        };
        let Some(p) = u.state.precopy.as_mut() else {
            return;
        };
        host.send(p.from, SupervisorMsg::Acked { seq });
        p.applied = p.applied.max(seq + 1);
        self.quiesce_when_caught_up(host, now);
    }

    /// Once the live rounds have stopped and the candidate has applied everything sent,
    /// quiesces the old generation for the last round. Quiescing earlier would put the
    /// candidate's backlog inside the accept gap.
    fn quiesce_when_caught_up(&mut self, host: &mut impl Channel, now: Instant) {
        let Some(u) = self.upgrade.as_ref() else {
            return;
        };
        let Some(p) = u.state.precopy.as_ref() else {
            return;
        };
        if p.last && u.state.quiesced.is_none() && p.applied >= p.next_seq {
            let (from, round) = (p.from, p.round);
            self.quiesce_for_last_round(host, now, from, round);
        }
    }

    /// Pre-copy: the old generation finished round `round`.
    pub(super) fn on_round_done(
        &mut self,
        host: &mut (impl Channel + Outside),
        now: Instant,
        from: GenId,
        round: u32,
    ) {
        let (max_rounds, timeout) = (self.s.precopy.rounds, self.s.precopy.timeout);
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        let to = u.candidate;
        let Some(p) = u
            .state
            .precopy
            .as_mut()
            .filter(|p| p.from == from && p.round == round)
        else {
            return;
        };
        let (bytes, chunks) = (p.round_bytes, p.round_chunks);
        let ms = ms_f(now - p.round_started);
        let pid = self.gens.get(&from).map_or(0, |g| g.pid);
        let last = p.last;
        tracing::info!(
            generation = from,
            pid,
            round,
            bytes,
            chunks,
            ms,
            last,
            "pre-copy round done"
        );
        let paused_ms = if last {
            u.state.quiesced_at.map(|t| ms_f(now - t))
        } else {
            None
        };
        if last {
            p.final_bytes = Some(bytes);
            let total = p.next_seq;
            let sent = p.live_bytes + bytes;
            u.state.snapshot_ms = u.state.quiesced_at.map(|t| ms_f(now - t));
            u.state.snapshot_bytes = Some(sent);
            u.stage = Stage::Restoring;
            u.stage_deadline = Some(later(now, self.s.restore_timeout));
            u.state.restore_sent_at = Some(now);
            host.send(to, SupervisorMsg::Complete { chunks: total });
        } else {
            p.live_rounds += 1;
            p.live_bytes += bytes;
            let stop = stop_reason(p, bytes, max_rounds, timeout, now);
            if round > 0 {
                p.last_delta = Some(bytes);
            }
            p.round = round + 1;
            p.round_started = now;
            p.round_bytes = 0;
            p.round_chunks = 0;
            match stop {
                Some(why) => {
                    tracing::info!(generation = from, reason = why, "pre-copy rounds stop");
                    p.stop = Some(why);
                    p.last = true;
                    self.quiesce_when_caught_up(host, now);
                }
                None => host.send(from, SupervisorMsg::Precopy { round: round + 1 }),
            }
        }
        let kind = EventKind::Precopy {
            round,
            bytes,
            chunks,
            ms,
            quiesced: last,
            paused_ms,
        };
        host.event(from, pid, kind);
    }

    /// Pre-copy: the old generation could not send a round.
    pub(super) fn on_precopy_failed(
        &mut self,
        host: &mut impl Host,
        now: Instant,
        from: GenId,
        why: &str,
    ) {
        let round = self
            .upgrade
            .as_ref()
            .and_then(|u| u.state.precopy.as_ref())
            .filter(|p| p.from == from)
            .map(|p| p.round);
        if let Some(round) = round {
            let why = format!("old generation failed pre-copy round {round}: {why}");
            self.fail(host, now, why);
        }
    }

    /// The old generation that is sending, if pre-copy runs.
    pub(super) fn precopy_from(&self) -> Option<GenId> {
        self.upgrade.as_ref().and_then(Upgrade::precopy_from)
    }
}
