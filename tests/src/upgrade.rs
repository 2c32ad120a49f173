//! Upgrade steps the end-to-end tests share: promote and check, and count migrated
//! connections.

use std::time::{Duration, Instant};

use baton_protocol::{Status, UpgradeReport, UpgradeResult};

use crate::harness::{Baton, UpgradeOutcome, generation_pids, wait_pid_gone};

/// `baton upgrade --wait`, which must promote a candidate with a pid; also returns when it
/// returned (the old generation was told to drain no later than that).
///
/// # Panics
///
/// If the upgrade rolls back or the control socket fails: these are test assertions.
pub async fn upgrade_promoted(baton: &Baton, what: &str) -> (UpgradeReport, Instant) {
    match baton.upgrade_wait().await {
        Ok(UpgradeOutcome::Promoted(r)) => {
            let at = Instant::now();
            assert_eq!(r.result, UpgradeResult::Promoted, "{what}: {r:?}");
            assert!(r.pid.is_some(), "{what}: promoted without a pid: {r:?}");
            (r, at)
        }
        Ok(UpgradeOutcome::RolledBack { message }) => panic!("{what}: rolled back: {message}"),
        Err(e) => panic!("{what}: baton upgrade --wait: {e}"),
    }
}

/// `last_upgrade.migrated_connections`, if `last_upgrade` is the upgrade to `generation`.
pub fn migrated_into(status: &Status, generation: u64) -> Option<u64> {
    status
        .last_upgrade
        .as_ref()
        .filter(|l| l.generation == generation)
        .map(|l| l.migrated_connections)
}

/// Waits (at most `within`) until at least `n` connections were handed over to
/// `generation`.
///
/// # Panics
///
/// When they were not.
pub async fn wait_migrated(
    baton: &Baton,
    generation: u64,
    n: u64,
    within: Duration,
    what: &str,
) -> Status {
    baton
        .wait_for(
            &format!("{what}: {n} connection(s) migrated into generation {generation}"),
            within,
            |s| migrated_into(s, generation).is_some_and(|m| m >= n),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits (at most `within` for each step) until the old generation `old_pid` has exited and
/// `new_pid` is the only generation left; returns that settled status.
///
/// # Panics
///
/// When either does not happen in time.
pub async fn wait_replaced(
    baton: &Baton,
    old_pid: u32,
    new_pid: u32,
    within: Duration,
    what: &str,
) -> Status {
    wait_pid_gone(old_pid, within)
        .await
        .unwrap_or_else(|e| panic!("{what}: old generation {old_pid} did not exit: {e}"));
    let settled = baton
        .wait_settled(within)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(generation_pids(&settled), vec![new_pid], "{what}");
    settled
}
