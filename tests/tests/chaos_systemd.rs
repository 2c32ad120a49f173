//! Issue 14: SIGKILL of baton itself at a random moment of an upgrade under load, under a
//! real systemd with the shipped template unit and its fd store (`BATON_CHAOS_SEED`; see
//! `baton_tests::systemd::chaos`). A modest number of trials here; `baton-bench --scenario
//! chaos` runs more.

use baton_tests::chaos::seed;
use baton_tests::systemd::{SERIAL, baton_kills, tools};

const TRIALS: usize = 5;

#[test]
fn sigkill_of_baton_mid_upgrade_is_restarted_with_its_fd_store() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(tools) = tools("sigkill_of_baton_mid_upgrade_is_restarted_with_its_fd_store") else {
        return;
    };
    let seed = seed();
    let r = baton_kills(tools, TRIALS, seed);
    println!("seed {seed:#x}:\n{}", r.trials.join("\n"));
    for l in &r.reports {
        println!("{l}");
    }
    assert_eq!(r.trials.len(), TRIALS, "every trial ran");
}
