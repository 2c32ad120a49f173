//! `chaos`: many seeded trials of `baton_tests::chaos` (the same runner as the CI test,
//! which runs a few): hello-http with migrating clients and kv-server with writers, one
//! random fault per upgrade. Reports, per app, the trials, the faults that hit, the
//! requests that failed (only in SIGKILLed processes) and the broken invariants (target 0).
//! As root, it then SIGKILLs baton itself under the systemd sandbox
//! (`baton_tests::systemd::baton_kills`), one trial per 5 of the others.

use std::collections::BTreeMap;

use baton_tests::chaos::{HELLO_FAULTS, HelloChaos, KV_FAULTS, KvChaos, Rng, TrialReport};
use baton_tests::load::FailureKind;

use crate::report::{Row, Target};

const SCENARIO: &str = "chaos";

/// Runs `trials` trials per app with `seed`.
pub async fn run(seed: u64, trials: usize) -> anyhow::Result<Row> {
    let mut row = Row::new(SCENARIO);
    row.set("seed", format!("{seed:#x}"));
    row.set("trials_per_app", trials as u64);
    let mut broken = Vec::new();

    let mut rng = Rng::new(seed);
    let mut hello = HelloChaos::start().await;
    let mut reports = Vec::new();
    for t in rng.trials(HELLO_FAULTS, trials) {
        reports.push(hello.trial(t).await);
    }
    let (fast, slow) = hello.finish().await;
    summarise(&mut row, "hello", &reports, &mut broken);
    let refused = fast.failures.get(FailureKind::ConnectRefused)
        + slow.failures.get(FailureKind::ConnectRefused);
    row.set("hello_requests", fast.requests + slow.requests);
    row.set("hello_connections_refused", refused);
    row.target("hello_connections_refused", Target::Eq(0.0));

    let mut rng = Rng::new(seed ^ 0x6B76);
    let mut kv = KvChaos::start(8).await;
    let mut reports = Vec::new();
    for t in rng.trials(KV_FAULTS, trials) {
        reports.push(kv.trial(t).await);
    }
    let (totals, writers) = kv.finish().await;
    summarise(&mut row, "kv", &reports, &mut broken);
    broken.extend(writers.iter().map(|w| format!("kv: {w}")));
    row.note(format!("kv writers: {totals}"));

    baton_kills(&mut row, seed, (trials / 5).max(3), &mut broken);

    row.set("violations", broken.len() as u64);
    row.target("violations", Target::Eq(0.0));
    for b in broken.iter().take(10) {
        row.note(format!("VIOLATED: {b}"));
    }
    Ok(row)
}

fn summarise(row: &mut Row, app: &str, reports: &[TrialReport], broken: &mut Vec<String>) {
    let mut by_fault: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut failed = 0;
    for r in reports {
        let e = by_fault.entry(format!("{:?}", r.trial.fault)).or_default();
        e.0 += 1;
        if r.injected.starts_with("SIG") || r.injected.starts_with("nothing") {
            e.1 += 1;
        }
        failed += r.failed_requests;
        broken.extend(r.violations.iter().map(|v| format!("{app}: {r}: {v}")));
    }
    row.set(&format!("{app}_failed_requests"), failed);
    row.note(format!(
        "{app}: {}",
        by_fault
            .iter()
            .map(|(f, (n, hit))| format!("{f} {hit}/{n} hit"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
}

/// SIGKILL of baton under systemd, on a thread of its own: the sandbox fixture is blocking
/// and runs its load on a runtime of its own; a broken invariant panics with the unit's
/// logs.
fn baton_kills(row: &mut Row, seed: u64, trials: usize, broken: &mut Vec<String>) {
    let Some(tools) = baton_tests::systemd::tools("chaos baton kills") else {
        row.note("baton kills: skipped (see stderr)".to_owned());
        return;
    };
    let run = std::thread::spawn(move || baton_tests::systemd::baton_kills(tools, trials, seed));
    match run.join() {
        Ok(r) => {
            let failed: u64 = r.reports.iter().map(|l| l.failed).sum();
            let refused: u64 = r
                .reports
                .iter()
                .map(|l| l.failures.get(FailureKind::ConnectRefused))
                .sum();
            row.set("baton_kill_trials", r.trials.len() as u64);
            row.set(
                "baton_kill_requests",
                r.reports.iter().map(|l| l.requests).sum::<u64>(),
            );
            row.set("baton_kill_failed_requests", failed);
            row.set("baton_kill_connections_refused", refused);
            row.target("baton_kill_connections_refused", Target::Eq(0.0));
            for t in &r.trials {
                row.note(format!("baton kills: {t}"));
            }
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            broken.push(format!(
                "baton kills: {}",
                what.lines().next().unwrap_or(what)
            ));
        }
    }
}
