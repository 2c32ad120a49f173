//! An upgrade's figures become final only once every older generation has exited
//! and everything it handed over was delivered or counted as lost. Until then its
//! history line waits here, and takes the migration tally as it comes in.

use std::collections::BTreeSet;

use baton_protocol::{EventKind, HistoryEntry, StartReason};

use super::Driver;
use baton_machine::{GenId, Handover, Machine};

/// Promoted upgrades whose history line is not final yet, oldest first.
#[derive(Debug, Default)]
pub(super) struct Settling {
    pending: Vec<Pending>,
}

#[derive(Debug)]
struct Pending {
    entry: HistoryEntry,
    /// Older generations still running (or still being read) at promotion.
    waits: BTreeSet<GenId>,
}

impl Settling {
    /// Holds `entry` until the generations in `waits` are gone.
    pub(super) fn hold(&mut self, entry: HistoryEntry, waits: BTreeSet<GenId>) {
        self.pending.push(Pending { entry, waits });
    }

    /// The lines still waiting, for a reexec to carry over.
    pub(super) fn carried(&self) -> Vec<(HistoryEntry, Vec<GenId>)> {
        self.pending
            .iter()
            .map(|p| (p.entry.clone(), p.waits.iter().copied().collect()))
            .collect()
    }

    /// What a reexec carried over.
    pub(super) fn restore(carried: &[(HistoryEntry, Vec<GenId>)]) -> Settling {
        Settling {
            pending: carried
                .iter()
                .map(|(entry, waits)| Pending {
                    entry: entry.clone(),
                    waits: waits.iter().copied().collect(),
                })
                .collect(),
        }
    }

    fn apply(&mut self, target: GenId, h: Handover) {
        for p in &mut self.pending {
            if p.entry.report.generation == target {
                h.apply(&mut p.entry.report);
            }
        }
    }

    /// The oldest lines whose generations are all gone, and whose target has no
    /// hand-over left in flight (`busy`).
    fn ready(
        &mut self,
        alive: impl Fn(GenId) -> bool,
        busy: impl Fn(GenId) -> bool,
    ) -> Vec<HistoryEntry> {
        let mut out = Vec::new();
        while let Some(p) = self.pending.first_mut() {
            p.waits.retain(|g| alive(*g));
            if !p.waits.is_empty() || busy(p.entry.report.generation) {
                break;
            }
            out.push(self.pending.remove(0).entry);
        }
        out
    }
}

impl Driver {
    /// Counts a hand-over to `target` in the machine's report, the metrics and
    /// the history line waiting for it.
    pub(super) fn note_handover(&mut self, m: &mut Machine, target: GenId, h: Handover) {
        m.note_handover(target, h);
        self.metrics.handover(h);
        self.settling.apply(target, h);
    }

    /// Records a promotion: at once if nothing older runs, else once it is gone.
    pub(super) fn record_promotion(&mut self, entry: HistoryEntry) {
        let target = entry.report.generation;
        let waits: BTreeSet<GenId> = self
            .handles
            .keys()
            .copied()
            .filter(|g| *g < target)
            .collect();
        self.settling.hold(entry, waits);
        self.settle();
    }

    /// Writes the history lines that became final, each with a `settled` event.
    pub(super) fn settle(&mut self) {
        let handles = &self.handles;
        let ready = self.settling.ready(
            |g| handles.contains_key(&g),
            |g| handles.get(&g).is_some_and(|h| h.relaying()),
        );
        for entry in ready {
            self.write_settled(entry);
        }
    }

    /// Writes a final history line; an upgrade (not a first start or a crash
    /// replacement, which hand nothing over) also gets its `settled` event.
    fn write_settled(&mut self, entry: HistoryEntry) {
        let generation = entry.report.generation;
        let report = entry.report.clone();
        let handed_over = !matches!(entry.why, StartReason::Initial | StartReason::Replace);
        self.history.push(entry);
        if handed_over {
            self.emit(generation, report.pid, EventKind::Settled { report });
        }
    }

    /// At exit: writes what is still waiting, as it stands.
    pub(super) fn settle_all(&mut self) {
        for p in std::mem::take(&mut self.settling.pending) {
            self.write_settled(p.entry);
        }
    }
}
