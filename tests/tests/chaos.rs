//! Issue 14: seeded chaos (`BATON_CHAOS_SEED`, see `baton_tests::chaos`). A modest number
//! of trials per app here; `baton-bench --scenario chaos` runs more and reports.

use baton_tests::chaos::{HELLO_FAULTS, HelloChaos, KV_FAULTS, KvChaos, Rng, seed};
use baton_tests::harness::exclusive;
use baton_tests::load::FailureKind;

const TRIALS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_http_upgrades_hold_their_invariants_under_random_faults() {
    let _serial = exclusive().await;
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut chaos = HelloChaos::start().await;
    let mut broken = Vec::new();
    for (i, t) in rng.trials(HELLO_FAULTS, TRIALS).into_iter().enumerate() {
        let i = i + 1;
        let r = chaos.trial(t).await;
        println!("seed {seed:#x} trial {i}: {r}");
        if !r.violations.is_empty() {
            broken.push(format!("trial {i}: {r}"));
        }
    }
    let (report, slow) = chaos.finish().await;
    println!("{report}\nslow requests: {slow}");
    for r in [&report, &slow] {
        assert_eq!(r.failures.get(FailureKind::ConnectRefused), 0, "{r}");
    }
    assert!(
        broken.is_empty(),
        "BATON_CHAOS_SEED={seed:#x}:\n{}",
        broken.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_server_keeps_every_acknowledged_write_under_random_faults() {
    let _serial = exclusive().await;
    let seed = seed();
    // Not the same sequence as the hello-http trials.
    let mut rng = Rng::new(seed ^ 0x6B76);
    let mut chaos = KvChaos::start(4).await;
    let mut broken = Vec::new();
    for (i, t) in rng.trials(KV_FAULTS, TRIALS).into_iter().enumerate() {
        let i = i + 1;
        let r = chaos.trial(t).await;
        println!("seed {seed:#x} trial {i}: {r}");
        if !r.violations.is_empty() {
            broken.push(format!("trial {i}: {r}"));
        }
    }
    let (totals, writers) = chaos.finish().await;
    println!("writers: {totals}");
    broken.extend(writers);
    assert!(
        broken.is_empty(),
        "BATON_CHAOS_SEED={seed:#x}:\n{}",
        broken.join("\n")
    );
}
