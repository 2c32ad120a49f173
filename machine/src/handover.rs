//! The tally of connections handed over to a generation in an upgrade.

use baton_protocol::UpgradeReport;

/// What happened to connections handed over to a generation. The report keeps
/// `handed_over_connections = migrated_connections + lost_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Sent by the old generation and queued for the target.
    Relayed(u64),
    /// Sent by the old generation and closed unrelayed (no target, or the stall
    /// bound ran out).
    Dropped(u64),
    /// The target's channel wrote `written` of those queued, and could not write
    /// `lost` (the target is gone).
    Delivered {
        /// Written to the target's socket.
        written: u64,
        /// Never written.
        lost: u64,
    },
}

impl Handover {
    /// Adds this to an upgrade's figures.
    pub fn apply(self, r: &mut UpgradeReport) {
        match self {
            Handover::Relayed(n) => {
                r.handed_over_connections += n;
                r.migrated_connections += n;
            }
            Handover::Dropped(n) => {
                r.handed_over_connections += n;
                r.lost_connections += n;
            }
            Handover::Delivered { lost, .. } => {
                r.migrated_connections = r.migrated_connections.saturating_sub(lost);
                r.lost_connections += lost;
            }
        }
    }

    /// What to add to the running totals (handed over, written, lost): a
    /// connection counts as migrated once it is written to the target.
    pub fn counts(self) -> (u64, u64, u64) {
        match self {
            Handover::Relayed(n) => (n, 0, 0),
            Handover::Dropped(n) => (n, 0, n),
            Handover::Delivered { written, lost } => (0, written, lost),
        }
    }
}
