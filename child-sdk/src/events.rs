//! [`Event`]: what the supervisor asks of a running stateful generation.

use crate::drain::DrainInfo;

/// The next thing to do, from [`Baton::next_event`](crate::Baton::next_event).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Stateful upgrade: stop accepting **without closing the listeners**
    /// (connections wait in the kernel backlog), finish in-flight work,
    /// pause live connections, then answer with
    /// [`Baton::snapshot`](crate::Baton::snapshot) (or
    /// [`Baton::snapshot_failed`](crate::Baton::snapshot_failed)).
    Quiesce,
    /// Pre-copy (announced with [`Builder::precopy`](crate::Builder::precopy)):
    /// **keep serving** and send round `round` with
    /// [`Baton::chunks`](crate::Baton::chunks). Round 0 is the whole state:
    /// start tracking the keys written or deleted first. Round `n` is what
    /// changed since round `n - 1` started.
    Precopy {
        /// The round.
        round: u32,
    },
    /// Pre-copy's last round: quiesce as for [`Event::Quiesce`], then send
    /// what changed since the last round (round 0: everything) with
    /// [`Baton::chunks`](crate::Baton::chunks). Commit or resume follows.
    PrecopyFinal {
        /// The round.
        round: u32,
    },
    /// The upgrade was aborted: accept again, state intact.
    Resume {
        /// Why it was aborted.
        reason: String,
    },
    /// Stop: hand over or close the live connections, then exit. After a
    /// quiesce this is the commit ([`DrainCause::Commit`](crate::DrainCause::Commit)):
    /// the successor owns the state now.
    Drain(DrainInfo),
}
