//! Test-only fault injection (`--fault KIND`, hidden from `--help`): each fault takes a real
//! code path of the stateful upgrade and breaks it the way a buggy release would, so the
//! end-to-end tests can check that baton rolls back and the old generation keeps its data.
//!
//! A fault fires once per process, the first time its code path runs. An old generation whose
//! snapshot fault made an upgrade abort therefore resumes as a healthy process: the next
//! upgrade out of it succeeds, like retrying after a transient failure. (Firing at every
//! quiesce would make such a process impossible to upgrade, ever.)

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// One injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Candidate: abort the process after receiving the snapshot, before `restored`.
    CrashDuringRestore,
    /// Candidate: never answer `restored` (baton's restore timeout must fire).
    HangDuringRestore,
    /// Old generation: send a snapshot whose bytes are scrambled (not JSON).
    CorruptSnapshot,
    /// Old generation: send only the first half of the snapshot's JSON.
    TruncateSnapshot,
    /// Old generation: quiesce but never send the snapshot (baton's snapshot timeout must
    /// fire; on resume it serves again).
    HangDuringSnapshot,
    /// Old generation: quiesce, then abort the process before sending the snapshot. The
    /// state is lost; baton starts the candidate empty and reports "STATE LOST".
    DieDuringSnapshot,
    /// Old generation: answer pre-copy round 1 (the first delta) with `precopy_failed`.
    FailDeltaRound,
    /// Old generation: abort the process in pre-copy round 1, while it serves.
    DieDuringPrecopy,
    /// Old generation: take 150 ms per chunk in live pre-copy rounds (a slow link), so that
    /// writers outpace the deltas. Fires every time.
    SlowPrecopy,
    /// Candidate: a lossy restore that drops every key whose name starts with `x` (a
    /// broken release for `baton rehearse`'s state check to catch). Fires every time.
    LoseXKeys,
    /// Old generation: refuse every down-migration (a release that cannot write the older
    /// schema). Fires every time.
    RefuseDowngrade,
}

/// Set once in `main`, read where the fault fires. A global because one of those places is a
/// serde `Deserialize` impl, which cannot be handed the options.
static ACTIVE: OnceLock<Fault> = OnceLock::new();

/// Set when the armed fault has fired: it never fires again in this process.
static FIRED: AtomicBool = AtomicBool::new(false);

/// Arms `fault` (if any) for the rest of the process.
pub fn arm(fault: Option<Fault>) {
    if let Some(f) = fault {
        tracing::warn!(fault = ?f, "fault injection armed (test only)");
        // Only `main` calls this, once; a second call would be a bug but is harmless.
        let _ = ACTIVE.set(f);
    }
}

/// Whether `fault` is armed and has not fired yet; if so, it counts as fired from now on.
/// Call it where the fault would take effect, once per pass through that code path.
pub fn fire(fault: Fault) -> bool {
    ACTIVE.get() == Some(&fault) && !FIRED.swap(true, Ordering::AcqRel)
}

/// Whether `fault` is armed (for faults that act every time).
pub fn armed(fault: Fault) -> bool {
    ACTIVE.get() == Some(&fault)
}

/// Candidate side, called once the snapshot has arrived and is being read (before the SDK
/// answers `restored`).
pub fn on_restore() {
    if fire(Fault::CrashDuringRestore) {
        tracing::error!("fault crash-during-restore: aborting");
        std::process::abort();
    }
    if fire(Fault::HangDuringRestore) {
        tracing::error!("fault hang-during-restore: never answering restored");
        // Blocks this thread for good (restore runs on the main task). baton SIGKILLs the
        // candidate when its restore timeout fires; the SDK's tasks run on the runtime's
        // workers meanwhile, so a second SIGTERM still exits at once.
        loop {
            std::thread::park();
        }
    }
}

/// A way to damage a well-formed snapshot.
pub type Damage = fn(Vec<u8>) -> Vec<u8>;

/// Old-generation side, at a quiesce: the armed snapshot damage if it fires now, else `None`.
pub fn snapshot_damage() -> Option<Damage> {
    if fire(Fault::CorruptSnapshot) {
        return Some(scramble);
    }
    if fire(Fault::TruncateSnapshot) {
        return Some(halve);
    }
    None
}

/// Flips bits in every 7th byte, the first included: `{` becomes `!`, so the result is never
/// valid JSON whatever the keyspace holds.
fn scramble(mut bytes: Vec<u8>) -> Vec<u8> {
    for b in bytes.iter_mut().step_by(7) {
        *b ^= 0x5a;
    }
    bytes
}

/// The first half: the candidate's parser hits the end of input ("truncated?").
fn halve(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.truncate(bytes.len() / 2);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corruptions_are_never_valid_json() {
        // Nothing is armed in unit tests: snapshots pass through untouched, and nothing fires.
        assert!(snapshot_damage().is_none());
        assert!(!fire(Fault::DieDuringSnapshot));
        for sample in [
            &br#"{"version":2,"state":{"entries":[],"stats":{}}}"#[..],
            br#"{"version":1,"state":{"entries":{"a":"b"}}}"#,
        ] {
            let scrambled = scramble(sample.to_vec());
            assert_eq!(scrambled.len(), sample.len());
            assert!(serde_json::from_slice::<serde_json::Value>(&scrambled).is_err());
            let half = halve(sample.to_vec());
            let err = serde_json::from_slice::<serde_json::Value>(&half).unwrap_err();
            assert!(err.is_eof(), "{err}");
        }
    }
}
