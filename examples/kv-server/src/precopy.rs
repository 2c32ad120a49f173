//! Pre-copy rounds, old generation: the keyspace leaves in chunks while the server serves.
//! Round 0 copies shard after shard (the keyspace lock is held for one shard's copy, and
//! the encoding runs outside it, on every core); later rounds send the keys written or
//! deleted since the previous round began. The last round runs while quiesced.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use baton_child::{Baton, Chunks};

use crate::db::{Db, Pair, SHARDS};
use crate::fault::{self, Fault};
use crate::server::Server;
use crate::state::ChunkOut;

/// Keys per delta chunk.
const KEYS_PER_CHUNK: usize = 4096;

/// What a round sends, in pieces the workers take one at a time.
enum Work {
    /// Round 0: every shard.
    Shards,
    /// A delta: these keys, in batches.
    Keys(Vec<Vec<u8>>),
}

impl Work {
    fn pieces(&self) -> usize {
        match self {
            Work::Shards => SHARDS,
            Work::Keys(k) => k.len().div_ceil(KEYS_PER_CHUNK).max(1),
        }
    }

    /// Piece `i`, copied out under the lock.
    fn copy(&self, db: &Db, i: usize) -> (Vec<Pair>, Vec<Vec<u8>>) {
        match self {
            Work::Shards => (db.copy_shard(i), Vec::new()),
            Work::Keys(keys) => {
                let end = keys.len().min((i + 1) * KEYS_PER_CHUNK);
                db.current(keys.get(i * KEYS_PER_CHUNK..end).unwrap_or_default())
            }
        }
    }
}

/// Sends round `round` (`last`: the server is quiesced). Blocks; run it off the runtime.
///
/// # Errors
///
/// The SDK's error when sending fails (an abort: resume follows).
pub fn send_round(
    server: &Server,
    baton: &Baton,
    round: u32,
    last: bool,
) -> Result<(), baton_child::Error> {
    let started = Instant::now();
    if round == 1 && !last {
        if fault::fire(Fault::FailDeltaRound) {
            tracing::error!("fault fail-delta-round: refusing round 1");
            return baton.precopy_failed("fault fail-delta-round");
        }
        if fault::fire(Fault::DieDuringPrecopy) {
            tracing::error!("fault die-during-precopy: aborting in round 1");
            std::process::abort();
        }
    }
    let work = server.with_db_mut(|db| {
        let work = if round == 0 {
            db.track_changes();
            Work::Shards
        } else {
            Work::Keys(db.take_dirty())
        };
        // Quiesced: nothing changes any more.
        if last {
            db.stop_tracking();
        }
        work
    });
    let tx = baton.chunks(round)?;
    let next = AtomicUsize::new(0);
    let pieces = work.pieces();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let slow = !last && round > 0 && fault::armed(Fault::SlowPrecopy);
    let worker = || -> Result<(), baton_child::Error> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= pieces {
                return Ok(());
            }
            let ((set, deleted), stats) = server.with_db(|db| (work.copy(db, i), db.stats));
            // Empty shards are skipped, but a round always carries the counters once.
            if set.is_empty() && deleted.is_empty() && i != 0 {
                continue;
            }
            if slow {
                std::thread::sleep(std::time::Duration::from_millis(150));
            }
            send(&tx, &set, &deleted, stats)?;
        }
    };
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(worker)).collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    for r in results {
        match r {
            Ok(r) => r?,
            Err(_) => return Err(baton_child::Error::Snapshot("an encoder panicked".into())),
        }
    }
    tracing::info!(
        round,
        last,
        pieces,
        ms = started.elapsed().as_millis(),
        "pre-copy round sent"
    );
    tx.finish()
}

fn send(
    tx: &Chunks,
    set: &[Pair],
    deleted: &[Vec<u8>],
    stats: crate::db::Stats,
) -> Result<(), baton_child::Error> {
    tx.send(&ChunkOut {
        set,
        deleted,
        stats,
    })
}
