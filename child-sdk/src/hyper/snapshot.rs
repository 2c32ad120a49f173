//! The state a stateful HTTP server hands over ([`Snapshot`]), and its pre-copy rounds.

use crate::baton::Baton;
use crate::error::{Error, Result};

/// The app's state, written when baton asks for it ([`Server::state`](super::Server::state)): at that moment no
/// request is in flight and none will reach the app until the upgrade is decided.
///
/// Implemented for every `Fn() -> T` where `T: Serialize` (a closure that reads the
/// state); implement it yourself to write an older schema for a successor that restores
/// only that one ([`Baton::successor_restores`], [`Baton::snapshot_as`]).
pub trait Snapshot: Send + Sync + 'static {
    /// Writes the snapshot, with [`Baton::snapshot`] (or [`Baton::snapshot_as`]).
    ///
    /// # Errors
    ///
    /// As [`Baton::snapshot`]; serve then reports the failure to baton, which
    /// aborts the upgrade, and serving goes on.
    fn write(&self, baton: &Baton) -> Result<()>;

    /// Pre-copy (announced with [`Builder::precopy`](crate::Builder::precopy)): sends
    /// round `round` with [`Baton::chunks`], then [`Chunks::finish`](crate::Chunks::finish).
    /// Round 0 is the whole state (start recording what changes before reading any of
    /// it); round N what changed since round N-1 began. Called on a blocking thread, while
    /// requests are served, except for the last round, which runs paused.
    ///
    /// # Errors
    ///
    /// As [`Chunks::send`](crate::Chunks::send); serve then reports it to baton, which
    /// aborts the upgrade. The default has no chunks to send.
    fn send_round(&self, baton: &Baton, round: u32) -> Result<()> {
        let _ = (baton, round);
        Err(Error::Feature {
            feature: "precopy",
            reason: "this state sends no chunks: implement Snapshot::send_round",
        })
    }
}

/// Sends a pre-copy round; a failure other than an aborted upgrade is reported, and
/// baton aborts the upgrade.
pub(super) fn send_round_or_fail(state: &dyn Snapshot, baton: &Baton, round: u32) {
    match state.send_round(baton, round) {
        Ok(()) | Err(Error::Precopy(_)) => {}
        Err(e) => {
            tracing::warn!(round, error = %e, "pre-copy round not sent");
            if let Err(e) = baton.precopy_failed(&e.to_string()) {
                tracing::warn!(error = %e, "cannot report the failed round");
            }
        }
    }
}

impl<F, T> Snapshot for F
where
    F: Fn() -> T + Send + Sync + 'static,
    T: serde::Serialize,
{
    fn write(&self, baton: &Baton) -> Result<()> {
        baton.snapshot(&self())
    }
}
