//! The machine's one input for what a generation does or says: [`Machine::handle`].
//! Requests (upgrade, stop, install, dry run) and the time ([`Machine::tick`]) are the
//! other ways in.

use std::time::Instant;

use baton_protocol::Feature;

use super::{GenId, Host, Machine};

/// Something a generation did or said.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<'a> {
    /// Its SDK said hello (no hello: an SDK-less child).
    Hello {
        /// The features it announced.
        features: Vec<Feature>,
        /// The schema versions it restores, if it said.
        restores: Option<Vec<u32>>,
    },
    /// It is ready (`READY=1`, or its `--ready delay` passed).
    Ready,
    /// A stateful candidate waits for state.
    Prepared,
    /// The old generation's snapshot came (the host holds it).
    Snapshot {
        /// Its size.
        size: u64,
    },
    /// The old generation could not snapshot.
    SnapshotFailed {
        /// Why.
        why: &'a str,
    },
    /// The candidate restored the state.
    Restored,
    /// The candidate refused the state.
    Rejected {
        /// Why.
        why: &'a str,
    },
    /// Pre-copy: a chunk from the old generation (the host holds it).
    Chunk {
        /// Its round.
        round: u32,
        /// Its sequence number.
        seq: u64,
        /// Its size.
        size: u64,
    },
    /// Pre-copy: the candidate applied chunk `seq`.
    Applied {
        /// Which.
        seq: u64,
    },
    /// Pre-copy: the old generation sent every chunk of `round`.
    RoundDone {
        /// Which.
        round: u32,
    },
    /// Pre-copy: the old generation gave up.
    PrecopyFailed {
        /// Why.
        why: &'a str,
    },
    /// It exited ("exit status 0", "signal 9 (SIGKILL)").
    Exited {
        /// How.
        how: &'a str,
    },
    /// A health check of it ended.
    Health {
        /// It passed.
        ok: bool,
        /// What it said.
        detail: &'a str,
    },
    /// It reported a fatal error (`ERRNO=`).
    Errno {
        /// The value.
        errno: &'a str,
    },
}

impl Machine {
    /// Generation `gen_id` did or said `input`.
    pub fn handle(&mut self, host: &mut impl Host, now: Instant, gen_id: GenId, input: Input<'_>) {
        match input {
            Input::Hello { features, restores } => self.on_hello(gen_id, features, restores),
            Input::Ready => self.on_ready(host, now, gen_id),
            Input::Prepared => self.on_prepared(host, now, gen_id),
            Input::Snapshot { size } => self.on_snapshot(host, now, gen_id, size),
            Input::SnapshotFailed { why } => self.on_snapshot_failed(host, now, gen_id, why),
            Input::Restored => self.on_restored(host, now, gen_id),
            Input::Rejected { why } => self.on_rejected(host, now, gen_id, why),
            Input::Chunk { round, seq, size } => self.on_chunk(host, now, gen_id, round, seq, size),
            Input::Applied { seq } => self.on_applied(host, now, gen_id, seq),
            Input::RoundDone { round } => self.on_round_done(host, now, gen_id, round),
            Input::PrecopyFailed { why } => self.on_precopy_failed(host, now, gen_id, why),
            Input::Exited { how } => self.on_exit(host, now, gen_id, how),
            Input::Health { ok, detail } => self.on_health(host, now, gen_id, ok, detail),
            Input::Errno { errno } => self.on_errno(host, now, gen_id, errno),
        }
    }
}
