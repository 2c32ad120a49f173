//! `chaos`: many seeded trials of `baton_tests::chaos` (the same runner as the CI test,
//! which runs a few): hello-http with migrating clients and kv-server with writers, one
//! random fault per upgrade. Reports, per app, the trials, the faults that hit, the
//! requests that failed (only in SIGKILLed processes) and the broken invariants (target 0).

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
