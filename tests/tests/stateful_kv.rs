//! Issue 3: stateful two-phase upgrades of kv-server under `baton run --state`, end to end.
//!
//! baton runs `<tmp>/app`, a symlink to one of the wrapper scripts written into the test dir
//! before baton starts (`kv1.sh` = `exec kv-server --schema 1 "$@"`, `kv2.sh`, and one per
//! `--fault`). PROGRAM is resolved again at every upgrade, so re-pointing the symlink picks the
//! next candidate. The scripts are never rewritten while baton runs: a script held open for
//! writing while baton execs it fails with ETXTBSY.
//!
//! The writer clients ([`Writers`]) keep one connection each, send one command at a time and
//! wait for its reply, and reconnect when the server closes the connection (kv-server closes
//! idle and paused connections at a command boundary on commit, unless it migrates them). Every
//! acknowledged write is recorded and checked at the end.
//!
//! # Accounting for a command whose reply never came
//!
//! When the connection closes after a command was sent and before its reply arrived, the
//! command is *unanswered*: it may or may not have run. The writer resolves it on the next
//! connection, before anything else:
//! - `INCR c{i}`: the writer sends `INCR c{i}` again. Its reply `v` against the last
//!   acknowledged value `last` tells: `v == last + 1` means the lost INCR never ran;
//!   `v == last + 1 + k` means `k` lost INCRs ran although their replies were dropped; any
//!   other value is a skipped or repeated value.
//! - `SET w{i}:{n} n`: the writer sends `GET w{i}:{n}`: `n` means it ran and the reply was
//!   dropped, nil means it never ran, and the SET is sent again.
//!
//! kv-server's contract (and the design goal) is that a command either runs and its reply is
//! written before the connection closes, or it does not run at all (held back while quiesced,
//! then left to the successor). So the number of commands that ran without their reply
//! reaching the client (`lost_applied`) must be 0; unanswered commands that never ran are
//! allowed and reported.

use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton_protocol::{Status, UpgradeResult};
use baton_tests::harness::{Baton, exclusive, generation_pids, proc_rss_kb, wait_pid_gone, which};
use baton_tests::kv::{
    self, App, CMD_TIMEOUT, WAIT, Writers, assert_clean, command, connect, info, reason,
    serving_pid, totals, upgrade_promoted, upgrade_rolled_back, verify_writes,
};
use baton_tests::resp::{Reply, RespClient};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Steps every writer must complete between two upgrades, so that each upgrade happens
/// under load and the next one starts only once the new generation has served everybody.
const STEPS_BETWEEN: u64 = 50;
/// baton is not in the data path and never copies a snapshot: its RSS must stay small
/// whatever the size of the state handed over.
const MAX_BATON_RSS_KB: u64 = 20 * 1024;

/// The wrapper scripts, by name: kv-server arguments.
const SCRIPTS: &[(&str, &str)] = &[
    ("kv1", "--schema 1"),
    ("kv2", "--schema 2"),
    ("kv1-no-adopt", "--schema 1 --no-adopt"),
    ("kv2-no-adopt", "--schema 2 --no-adopt"),
    (
        "kv2-crash-during-restore",
        "--schema 2 --no-precopy --fault crash-during-restore",
    ),
    (
        "kv2-hang-during-restore",
        "--schema 2 --no-precopy --fault hang-during-restore",
    ),
    (
        "kv2-corrupt-snapshot",
        "--schema 2 --no-precopy --fault corrupt-snapshot",
    ),
    (
        "kv2-truncate-snapshot",
        "--schema 2 --no-precopy --fault truncate-snapshot",
    ),
    (
        "kv2-hang-during-snapshot",
        "--schema 2 --no-precopy --fault hang-during-snapshot",
    ),
    (
        "kv2-die-during-snapshot",
        "--schema 2 --no-precopy --fault die-during-snapshot",
    ),
];

/// Starts baton on the scripts above, `app` pointing at `initial`.
async fn start(tag: &str, initial: &str, extra: &[&str]) -> (Baton, App, SocketAddr) {
    kv::start(tag, SCRIPTS, initial, extra).await
}

// ---------------------------------------------------------------------------------------
// 1. Thirty stateful upgrades, a schema migration, downgrades and a refused one under load
// ---------------------------------------------------------------------------------------

const UPGRADES: usize = 30;
/// Upgrades 1..=15 run schema 1; upgrade 16 migrates 1 -> 2; the rest run schema 2.
const FIRST_SCHEMA_2: usize = 16;
/// Before these upgrades, a downgrade to schema 1: the schema-1 candidate restores schema 1
/// only, so the schema-2 generation writes schema 1 (`code_change({down, 1})`).
const DOWNGRADE_BEFORE: [usize; 2] = [18, 23];
/// Before this one, the keyspace holds a key schema 1 cannot represent (not UTF-8): the
/// downgrade is refused and rolled back.
const REFUSED_DOWNGRADE_BEFORE: usize = 28;
const BINARY_KEY: &[u8] = b"bin\xff\xfe";
const WRITERS: usize = 8;
/// Upgrades `5*b+1 ..= 5*b+5` for these `b` start candidates with `--no-adopt`, so that both
/// ways an old generation leaves its connections are covered: handed over (migration) and
/// closed at a command boundary (the writers reconnect and resolve unanswered commands).
const NO_ADOPT_BLOCKS: [usize; 3] = [1, 3, 5];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_stateful_upgrades_lose_no_acknowledged_write() {
    thirty_stateful_upgrades(false).await;
}

/// The same, with every core contended by a CPU hog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_stateful_upgrades_lose_no_acknowledged_write_under_a_cpu_hog() {
    thirty_stateful_upgrades(true).await;
}

async fn thirty_stateful_upgrades(hog: bool) {
    let _serial = exclusive().await;
    let _hog = hog.then(|| baton_tests::hog::CpuHog::per_core().unwrap());
    let started = Instant::now();
    let (baton, app, addr) = start("kv-writers", "kv1", &[]).await;
    let first = info(addr).await;
    assert_eq!(first["kv_schema"], "1", "{first:?}");
    assert_eq!(first["kv_restored_from_schema"], "none", "{first:?}");

    let mut writers = Writers::start(addr, WRITERS);
    writers.wait_progress(20, "generation 1").await;

    let mut max_gap = 0f64;
    let mut gaps = Vec::new();
    let mut downgrade_reasons = Vec::new();
    let mut migrated = 0;
    let mut close_rounds = 0u64;
    let mut prev_adopt = true;
    let mut prev_schema = "1";
    for round in 1..=UPGRADES {
        if DOWNGRADE_BEFORE.contains(&round) {
            let what = format!("downgrade to schema 1 before upgrade {round}");
            app.select("kv1");
            let report = upgrade_promoted(&baton, &what).await;
            let now = info(addr).await;
            assert_eq!(now["process_id"], report.pid.unwrap().to_string(), "{what}");
            assert_eq!(now["kv_schema"], "1", "{what}: {now:?}");
            assert_eq!(now["kv_restored_from_schema"], "1", "{what}: {now:?}");
            prev_schema = "1";
            close_rounds += u64::from(!prev_adopt);
            prev_adopt = true;
            writers.wait_progress(STEPS_BETWEEN, &what).await;
        }
        if round == REFUSED_DOWNGRADE_BEFORE {
            let what = format!("refused downgrade to schema 1 before upgrade {round}");
            let mut c = connect(addr).await;
            assert!(
                command(&mut c, &[b"SET".as_slice(), BINARY_KEY, b"x"])
                    .await
                    .is_ok()
            );
            let old = baton.status().await.unwrap().pid.unwrap();
            app.select("kv1");
            let (last, message) = upgrade_rolled_back(&baton, &what).await;
            let why = reason(&last);
            assert!(
                why.contains("schema 1 cannot represent non-UTF-8"),
                "{what}: the reason must name the schema: {why:?} (CLI: {message:?})"
            );
            downgrade_reasons.push(why);
            // The old generation resumed: it serves old and new connections.
            assert_eq!(serving_pid(addr).await, old, "{what}");
            let mut c = connect(addr).await;
            assert_eq!(
                command(&mut c, &[b"DEL".as_slice(), BINARY_KEY]).await,
                Reply::Integer(1)
            );
            writers.wait_progress(STEPS_BETWEEN, &what).await;
        }
        let schema = if round < FIRST_SCHEMA_2 { "1" } else { "2" };
        let adopt = !NO_ADOPT_BLOCKS.contains(&((round - 1) / 5));
        app.select(&format!(
            "kv{schema}{}",
            if adopt { "" } else { "-no-adopt" }
        ));
        // Connections migrate only when both sides support it; otherwise the old
        // generation closes them at a command boundary and every writer reconnects.
        if !(adopt && prev_adopt) {
            close_rounds += 1;
        }
        prev_adopt = adopt;
        let what = format!("upgrade {round} (schema {schema}, adopt {adopt})");
        let report = upgrade_promoted(&baton, &what).await;
        let gap = report.accept_gap_ms.unwrap_or_else(|| {
            panic!("{what}: no accept_gap_ms in a stateful upgrade: {report:?}")
        });
        assert!(
            report.snapshot_bytes.is_some_and(|b| b > 0),
            "{what}: {report:?}"
        );
        max_gap = max_gap.max(gap);
        gaps.push(gap);
        migrated += report.migrated_connections;

        let now = info(addr).await;
        let restored_from = prev_schema;
        prev_schema = schema;
        assert_eq!(
            now["process_id"],
            report.pid.unwrap().to_string(),
            "{what}: {now:?}"
        );
        assert_eq!(now["kv_schema"], schema, "{what}: {now:?}");
        assert_eq!(
            now["kv_restored_from_schema"], restored_from,
            "{what}: {now:?}"
        );
        writers.wait_progress(STEPS_BETWEEN, &what).await;
    }

    let logs = writers.stop().await;
    assert_clean(&logs, "after 30 upgrades");
    let keys = verify_writes(addr, &logs, 0, "after 30 upgrades").await;
    let t = totals(&logs);
    let status = baton.status().await.unwrap();
    gaps.sort_by(f64::total_cmp);
    println!(
        "{UPGRADES} stateful upgrades + {} downgrades + 1 refused with {WRITERS} writers in {:?}: \
         {t}; {close_rounds} upgrades closed connections, {migrated} connections migrated; \
         {keys} keys verified; accept gap ms: median {:.2}, max {max_gap:.2}; \
         baton rss {} kB; downgrade reasons: {downgrade_reasons:?}",
        DOWNGRADE_BEFORE.len(),
        started.elapsed(),
        gaps[gaps.len() / 2],
        status.rss_kb,
    );
    let reconnects: u64 = logs.iter().map(|l| l.reconnects).sum();
    // Each writer always holds one connection to the active generation, so an upgrade that
    // cannot migrate closes exactly one connection per writer, and one that migrates closes
    // none. More closes mean a connection made after the commit was closed too: one that a
    // generation which no longer accepts took from the shared queue instead of leaving it to
    // its successor, or one the new generation dropped.
    assert_eq!(
        reconnects,
        close_rounds * WRITERS as u64,
        "{close_rounds} upgrades could not migrate and must have closed exactly one \
         connection per writer ({WRITERS} writers); the rest migrated and must have closed \
         none. Reconnects per writer: {:?}",
        logs.iter().map(|l| l.reconnects).collect::<Vec<_>>()
    );
    assert!(status.rss_kb < MAX_BATON_RSS_KB, "{status:?}");
}

// ---------------------------------------------------------------------------------------
// 2. Aborted upgrades under load
// ---------------------------------------------------------------------------------------

/// One abort path.
struct AbortCase {
    tag: &'static str,
    /// The script generation 1 runs.
    old: &'static str,
    /// The script the failing upgrade starts.
    candidate: &'static str,
    /// Extra `baton run` options (timeouts).
    extra: &'static [&'static str],
    /// The rollback reason must contain each of these (lowercased).
    reason_has: &'static [&'static str],
}

const ABORT_WRITERS: usize = 4;

/// Runs one abort path under writer load: the upgrade rolls back with a sensible reason, the
/// old generation keeps serving (old and new connections) with every acknowledged write.
///
/// Then a normal upgrade (app pointed back at `kv2`) must succeed and carry every
/// acknowledged write over. When the fault was on the old generation (it wrote a bad snapshot
/// or none at all), that upgrade quiesces the very process that failed: kv-server's `--fault`
/// fires once per process, so this shows that resume leaves the old generation fully able to
/// quiesce and snapshot again, i.e. that an aborted upgrade is retried successfully.
async fn abort_case(case: AbortCase) {
    let _serial = exclusive().await;
    let AbortCase {
        tag,
        old,
        candidate,
        extra,
        reason_has,
    } = case;
    let (baton, app, addr) = start(tag, old, extra).await;
    let old_pid = baton.status().await.unwrap().pid.unwrap();
    let mut writers = Writers::start(addr, ABORT_WRITERS);
    writers.wait_progress(20, tag).await;

    app.select(candidate);
    let old_side = old != "kv2";
    let mut reasons = Vec::new();
    {
        let what = format!("{tag}: the faulty upgrade");
        let started = Instant::now();
        let (last, message) = upgrade_rolled_back(&baton, &what).await;
        let took = started.elapsed();
        let why = reason(&last);
        let lower = why.to_lowercase();
        for needle in reason_has {
            assert!(
                lower.contains(needle),
                "{what}: reason {why:?} should mention {needle:?} (CLI: {message:?})"
            );
        }
        // The old generation serves again: a fresh connection reaches it, and every writer
        // (whose connection was paused, not closed) completes more steps.
        assert_eq!(serving_pid(addr).await, old_pid, "{what}");
        writers.wait_progress(STEPS_BETWEEN, &what).await;
        reasons.push(format!(
            "{why} (rolled back in {took:?}, accept gap {:?} ms)",
            last.accept_gap_ms
        ));
    }

    // Switch the wrapper back to the plain build (for an old-side fault the candidate was
    // `kv2` already; the old process's fault has fired and will not fire again).
    app.select("kv2");
    let report = upgrade_promoted(&baton, &format!("{tag}: normal upgrade after the abort")).await;
    let new_pid = report.pid.unwrap();
    assert!(
        report.reason.is_none(),
        "{tag}: a clean promotion has no reason: {report:?}"
    );
    assert!(
        report.snapshot_bytes.is_some_and(|b| b > 0),
        "{tag}: the state must travel in a snapshot: {report:?}"
    );
    let now = info(addr).await;
    assert_eq!(now["process_id"], new_pid.to_string(), "{tag}: {now:?}");
    assert_eq!(
        now["kv_restored_from_schema"], "2",
        "{tag}: the new generation must have restored the old one's state: {now:?}"
    );
    writers.wait_progress(STEPS_BETWEEN, tag).await;
    if old_side {
        // The fault fired exactly once, in the aborted upgrade: the retry sent a good snapshot.
        let log = baton.log();
        let fired = log
            .lines()
            .filter(|l| {
                l.contains("fault: sending a damaged snapshot")
                    || l.contains("fault hang-during-snapshot")
            })
            .count();
        assert_eq!(fired, 1, "{tag}: old-side fault fired {fired} times");
    }

    let logs = writers.stop().await;
    assert_clean(&logs, tag);
    let keys = verify_writes(addr, &logs, 0, tag).await;
    println!(
        "{tag}: reasons {reasons:?}; {}; {keys} keys verified; then: {report:?}",
        totals(&logs)
    );
}

/// 2a. The candidate aborts after receiving the snapshot, before answering `restored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_candidate_crashes_during_restore() {
    abort_case(AbortCase {
        tag: "kv-crash-restore",
        old: "kv2",
        candidate: "kv2-crash-during-restore",
        extra: &[],
        reason_has: &["exited"],
    })
    .await;
}

/// 2b. The old generation sends a snapshot that is not JSON: the candidate rejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_corrupt_snapshot_is_rejected() {
    abort_case(AbortCase {
        tag: "kv-corrupt",
        old: "kv2-corrupt-snapshot",
        candidate: "kv2",
        extra: &[],
        reason_has: &["json"],
    })
    .await;
}

/// 2c. The candidate never answers `restored`: `--restore-timeout` fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_candidate_misses_restore_timeout() {
    abort_case(AbortCase {
        tag: "kv-hang-restore",
        old: "kv2",
        candidate: "kv2-hang-during-restore",
        extra: &["--restore-timeout", "2s"],
        reason_has: &["restore"],
    })
    .await;
}

/// 2d. The old generation sends half of its snapshot: the candidate rejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_truncated_snapshot_is_rejected() {
    abort_case(AbortCase {
        tag: "kv-truncate",
        old: "kv2-truncate-snapshot",
        candidate: "kv2",
        extra: &[],
        reason_has: &["truncated"],
    })
    .await;
}

/// 2e. The old generation never sends its snapshot: `--snapshot-timeout` fires, and on
/// resume the old generation serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_old_generation_hangs_while_snapshotting() {
    abort_case(AbortCase {
        tag: "kv-hang-snapshot",
        old: "kv2-hang-during-snapshot",
        candidate: "kv2",
        extra: &["--snapshot-timeout", "2s"],
        reason_has: &["snapshot"],
    })
    .await;
}

/// What one writer of [`old_generation_dying_during_snapshot_loses_state_and_says_so`] saw.
#[derive(Debug, Default)]
struct LossyLog {
    /// Every INCR reply, in order.
    replies: Vec<i64>,
    /// Connections that broke (EOF or reset) with a command in flight.
    broken: u64,
}

/// INCRs `c{id}` one at a time until `stop`, reconnecting whenever the connection breaks
/// (the dying old generation closes or resets it). A timeout or an error reply is fatal.
async fn lossy_writer(
    id: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> Result<LossyLog, String> {
    let counter = format!("c{id}");
    let mut log = LossyLog::default();
    let mut conn: Option<RespClient<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match &mut conn {
            Some(c) => c,
            None => {
                let c = tokio::time::timeout(CMD_TIMEOUT, RespClient::connect(addr))
                    .await
                    .map_err(|_| format!("writer {id}: connect timed out"))?
                    .map_err(|e| format!("writer {id}: connect: {e}"))?;
                conn.insert(c)
            }
        };
        match tokio::time::timeout(CMD_TIMEOUT, c.command(&["INCR", &counter])).await {
            Err(_) => {
                return Err(format!(
                    "writer {id}: INCR: no reply within {CMD_TIMEOUT:?}"
                ));
            }
            Ok(Ok(Reply::Integer(v))) => {
                log.replies.push(v);
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(other)) => return Err(format!("writer {id}: INCR answered {other}")),
            Ok(Err(_)) => {
                log.broken += 1;
                conn = None;
            }
        }
    }
    Ok(log)
}

/// 2f. The old generation dies (SIGABRT) after it quiesced and before it sent its snapshot.
///
/// This is the reported-loss path, the one case where acknowledged writes do not survive: the
/// only copy of the keyspace died with the process. baton cannot prevent that; what it must do
/// is never let it pass silently. The candidate is started with `fresh` ("STATE LOST: ..."),
/// promoted, and the loss is reported in `last_upgrade.reason`, in `baton status` and in
/// baton's log. The new generation serves, with an empty keyspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_generation_dying_during_snapshot_loses_state_and_says_so() {
    const WRITERS: usize = ABORT_WRITERS;
    let _serial = exclusive().await;
    let tag = "kv-die-snapshot";
    let (baton, app, addr) = start(tag, "kv2-die-during-snapshot", &[]).await;
    let before = baton.status().await.unwrap();
    let old_pid = before.pid.unwrap();
    let mut c = connect(addr).await;
    assert!(
        command(&mut c, &["SET", "marker", "acknowledged"])
            .await
            .is_ok()
    );
    drop(c);

    let stop = Arc::new(AtomicBool::new(false));
    let progress: Vec<Arc<AtomicU64>> = (0..WRITERS).map(|_| Arc::default()).collect();
    let tasks: Vec<JoinHandle<Result<LossyLog, String>>> = (0..WRITERS)
        .map(|id| {
            tokio::spawn(lossy_writer(
                id,
                addr,
                Arc::clone(&stop),
                Arc::clone(&progress[id]),
            ))
        })
        .collect();
    let wait_progress = |more: u64, what: &'static str| {
        let from: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        let progress = &progress;
        let tasks = &tasks;
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                assert!(
                    !tasks.iter().any(JoinHandle::is_finished),
                    "{what}: a writer stopped early"
                );
                if progress
                    .iter()
                    .zip(&from)
                    .all(|(p, f)| p.load(Ordering::Relaxed) >= f + more)
                {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: writers made no progress"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_progress(20, "before the upgrade").await;

    // The candidate is a plain build; the old generation's fault fires at this quiesce.
    app.select("kv2");
    let out = baton
        .cli(&["upgrade", "--wait"], Duration::from_secs(60))
        .await
        .unwrap();
    let status = baton.status().await.unwrap();
    let report = status
        .last_upgrade
        .clone()
        .unwrap_or_else(|| panic!("no last_upgrade: {status:?}; CLI: {out:?}"));
    assert_eq!(
        report.result,
        UpgradeResult::Promoted,
        "{report:?}; CLI: {out:?}"
    );
    // Promoted, but `upgrade --wait` (what `systemctl reload` runs) must not report
    // plain success: exit 3 and the loss on stderr.
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stderr.contains("STATE LOST"), "{out:?}");
    assert!(out.stdout.contains("promoted generation"), "{out:?}");
    let why = reason(&report);
    assert!(
        why.contains("STATE LOST"),
        "the loss must be reported in last_upgrade.reason: {report:?}"
    );
    let new_pid = report.pid.expect("promoted pid");
    assert_ne!(new_pid, old_pid);
    assert_eq!(report.generation, before.generation + 1, "{report:?}");
    wait_pid_gone(old_pid, WAIT).await.unwrap();
    let settled = baton.wait_settled(WAIT).await.unwrap();
    assert_eq!(generation_pids(&settled), vec![new_pid]);

    // Reported by `baton status` (text) and in baton's log, not only in the JSON.
    let text = baton
        .cli(&["status"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(text.status.success(), "{text:?}");
    assert!(
        text.stdout.contains("STATE LOST"),
        "`baton status` must show the loss:\n{}",
        text.stdout
    );
    let log = baton.log();
    assert!(
        log.lines().any(|l| l.contains("STATE LOST")),
        "baton must log the loss"
    );

    // The new generation serves, from an empty keyspace: nothing was restored, the marker is
    // gone, and the writers' counters start again from 1.
    let now = info(addr).await;
    assert_eq!(now["process_id"], new_pid.to_string(), "{now:?}");
    assert_eq!(now["kv_restored_from_schema"], "none", "{now:?}");
    let mut c = connect(addr).await;
    assert_eq!(
        command(&mut c, &["GET", "marker"]).await,
        Reply::Bulk(None),
        "the old keyspace cannot have survived"
    );
    wait_progress(20, "after the upgrade").await;
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for (id, t) in tasks.into_iter().enumerate() {
        let log = tokio::time::timeout(CMD_TIMEOUT * 2, t)
            .await
            .unwrap_or_else(|_| panic!("writer {id} did not stop"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        logs.push(log);
    }
    let mut lost = Vec::new();
    for (id, log) in logs.iter().enumerate() {
        // 1..=k from the old generation, then 1..=m from the new one: exactly one loss, and
        // nothing of the old state leaked into the new generation.
        let restart = log
            .replies
            .iter()
            .skip(1)
            .position(|&v| v == 1)
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("writer {id}: its counter never restarted: {log:?}"));
        let (old, new) = log.replies.split_at(restart);
        lost.push(old.len());
        let expect = |n: usize| (1..=n as i64).collect::<Vec<_>>();
        assert_eq!(old, expect(old.len()), "writer {id}: old generation");
        assert_eq!(new, expect(new.len()), "writer {id}: new generation");
        assert!(
            log.broken >= 1,
            "writer {id}: its connection to the dead process broke"
        );
        let got = command(&mut c, &["GET", &format!("c{id}")]).await;
        let want = new.len().to_string();
        assert_eq!(got.as_bytes(), Some(want.as_bytes()), "writer {id}");
    }
    assert_eq!(
        command(&mut c, &["DBSIZE"]).await,
        Reply::Integer(WRITERS as i64),
        "only the counters written since the loss"
    );
    println!(
        "{tag}: reason {why:?}; CLI: {:?}; acknowledged INCRs lost per writer: {:?}; \
         broken connections: {:?}; crashes counted: {}",
        out.stdout.trim(),
        lost,
        logs.iter().map(|l| l.broken).collect::<Vec<_>>(),
        settled.crashes,
    );
}

// ---------------------------------------------------------------------------------------
// 3. Large state
// ---------------------------------------------------------------------------------------

/// Size of one large value.
const LARGE_VALUE: usize = 1 << 20;
/// SETs per pipelined write while filling.
const FILL_BATCH: usize = 8;

/// How many MiB of values the large-state test stores: `BATON_TEST_LARGE_MB`, else a default
/// sized for the CI budget of this file (about 3 minutes on 2 cores, for every test in it).
///
/// The issue asks for 1 GiB where memory allows. Measured on the 2-core dev machine, 1 GiB
/// takes (release build, which is what CI runs) about 12 s for the whole test: fill 2 s,
/// snapshot 3.6-4.2 s, restore 4.5-5.2 s, two read-backs, and about 3.2 GiB of RSS across
/// the two kv-server generations at the peak (old keyspace, the memfd, the candidate's
/// keyspace). A debug build is 5-8 times slower at the JSON (about 57 s for 1 GiB). The
/// defaults, 512 MiB in release and 128 MiB in debug, keep the test at a few seconds and the
/// memory within a small CI runner, while the snapshot stays far larger than any socket
/// buffer and than baton's whole RSS, which is what the test is about. Run it once with
/// `BATON_TEST_LARGE_MB=1024` for the full-size figures.
fn large_mb() -> usize {
    match std::env::var("BATON_TEST_LARGE_MB") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("BATON_TEST_LARGE_MB={v:?} is not a number of MiB")),
        Err(_) if cfg!(debug_assertions) => 128,
        Err(_) => 512,
    }
}

/// The value of `big:{i}`: letters from a per-key xorshift pattern, repeated, with the key
/// and block number stamped into every 4 KiB block so that no two blocks (of any key) are
/// alike. Built with `slice::repeat` and a short loop: cheap even in a debug build.
fn large_value(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let pattern: Vec<u8> = (0..256)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect();
    let mut value = pattern.repeat(LARGE_VALUE / pattern.len());
    for (block, chunk) in value.chunks_mut(4096).enumerate() {
        let stamp = format!("<{i}:{block}>");
        chunk[..stamp.len()].copy_from_slice(stamp.as_bytes());
    }
    value
}

/// A digest of one entry (std's SipHash: fast even when this test is a debug build, since
/// std is always optimised).
fn digest(key: &[u8], value: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(key);
    h.write_usize(value.len());
    h.write(value);
    h.finish()
}

/// Reads every `big:{i}` back on a fresh connection; returns the serving pid and the digests.
async fn read_large(addr: SocketAddr, count: usize) -> (u32, Vec<u64>) {
    let pid = serving_pid(addr).await;
    let mut c = connect(addr).await;
    let mut digests = Vec::with_capacity(count);
    for start in (0..count).step_by(FILL_BATCH) {
        let keys: Vec<String> = (start..(start + FILL_BATCH).min(count))
            .map(|i| format!("big:{i}"))
            .collect();
        let cmds: Vec<Vec<&str>> = keys.iter().map(|k| vec!["GET", k.as_str()]).collect();
        let replies = tokio::time::timeout(CMD_TIMEOUT, c.pipeline(&cmds))
            .await
            .expect("GET batch timed out")
            .expect("GET batch");
        for (k, r) in keys.iter().zip(&replies) {
            let v = r
                .as_bytes()
                .unwrap_or_else(|| panic!("GET {k} answered {r}"));
            digests.push(digest(k.as_bytes(), v));
        }
    }
    (pid, digests)
}

fn combined(digests: &[u64]) -> u64 {
    let mut h = DefaultHasher::new();
    for d in digests {
        h.write_u64(*d);
    }
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_state_survives_a_stateful_upgrade_and_baton_stays_small() {
    let _serial = exclusive().await;
    let mb = large_mb();
    let count = mb * (1 << 20) / LARGE_VALUE;
    assert!(count > 0, "BATON_TEST_LARGE_MB must be at least 1");
    // Generous timeouts: the size is configurable, and a debug build is slow at JSON.
    let (baton, _app, addr) = start(
        "kv-large",
        "kv2",
        &[
            "--snapshot-timeout",
            "600s",
            "--restore-timeout",
            "600s",
            "--ready-timeout",
            "900s",
        ],
    )
    .await;

    let fill_started = Instant::now();
    let mut c = connect(addr).await;
    let mut expected = Vec::with_capacity(count);
    for start in (0..count).step_by(FILL_BATCH) {
        let batch: Vec<(String, Vec<u8>)> = (start..(start + FILL_BATCH).min(count))
            .map(|i| (format!("big:{i}"), large_value(i as u64)))
            .collect();
        let cmds: Vec<Vec<&[u8]>> = batch
            .iter()
            .map(|(k, v)| vec![&b"SET"[..], k.as_bytes(), v.as_slice()])
            .collect();
        let replies = tokio::time::timeout(CMD_TIMEOUT, c.pipeline(&cmds))
            .await
            .expect("SET batch timed out")
            .expect("SET batch");
        for ((k, v), r) in batch.iter().zip(&replies) {
            assert!(r.is_ok(), "SET {k}: {r}");
            expected.push(digest(k.as_bytes(), v));
        }
    }
    drop(c);
    let fill = fill_started.elapsed();

    let check_started = Instant::now();
    let (old_pid, before) = read_large(addr, count).await;
    let check = check_started.elapsed();
    assert_eq!(
        before, expected,
        "the values read back differ from those written"
    );
    let checksum = combined(&expected);

    // Sample baton's RSS every ~50 ms for the whole upgrade.
    let baton_pid = baton.pid();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let sampling = Arc::clone(&sampling);
        async move {
            let (mut max, mut samples) = (0u64, 0u64);
            while sampling.load(Ordering::Relaxed) {
                if let Ok(kb) = proc_rss_kb(baton_pid) {
                    max = max.max(kb);
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (max, samples)
        }
    });

    let upgrade_started = Instant::now();
    let out = baton
        .cli(&["upgrade", "--wait"], Duration::from_secs(1200))
        .await
        .unwrap();
    let upgrade = upgrade_started.elapsed();
    let status = baton.status().await.unwrap();
    sampling.store(false, Ordering::Relaxed);
    let (max_rss, samples) = sampler.await.unwrap();
    assert!(
        out.status.success(),
        "upgrade with {mb} MiB of state failed: {out:?}\nstatus: {status:?}"
    );
    let report = status.last_upgrade.clone().expect("last_upgrade");
    assert_eq!(report.result, UpgradeResult::Promoted, "{report:?}");
    let new_pid = report.pid.unwrap();
    assert_ne!(new_pid, old_pid);
    let snapshot_bytes = report.snapshot_bytes.expect("snapshot_bytes");
    assert!(
        snapshot_bytes >= (mb as u64) << 20,
        "a {snapshot_bytes}-byte snapshot cannot hold {mb} MiB of values: {report:?}"
    );
    assert!(report.accept_gap_ms.is_some(), "{report:?}");

    let (pid, after) = read_large(addr, count).await;
    assert_eq!(
        pid, new_pid,
        "the values must be read from the new generation"
    );
    let mismatched: Vec<usize> = (0..count).filter(|&i| after[i] != expected[i]).collect();
    assert!(
        mismatched.is_empty(),
        "{} of {count} values changed across the upgrade, e.g. big:{:?}",
        mismatched.len(),
        &mismatched[..mismatched.len().min(10)]
    );
    assert_eq!(combined(&after), checksum);
    let info = info(addr).await;
    assert_eq!(info["keys"], count.to_string(), "{info:?}");

    println!(
        "large state: {mb} MiB in {count} values of {LARGE_VALUE} bytes; fill {fill:?} \
         ({:.0} MiB/s), read back + checksum {check:?}; checksum {checksum:016x}; \
         upgrade {upgrade:?}: snapshot {snapshot_bytes} bytes in {:?} ms, restore {:?} ms, \
         accept gap {:?} ms, duration {} ms; baton RSS max {max_rss} kB over {samples} samples, \
         status.rss_kb {}",
        mb as f64 / fill.as_secs_f64(),
        report.snapshot_ms,
        report.restore_ms,
        report.accept_gap_ms,
        report.duration_ms,
        status.rss_kb,
    );
    assert!(
        samples >= 1,
        "baton's RSS was never sampled during the upgrade"
    );
    assert!(
        max_rss < MAX_BATON_RSS_KB,
        "baton's VmRSS reached {max_rss} kB during the upgrade"
    );
    assert!(
        status.rss_kb < MAX_BATON_RSS_KB,
        "status.rss_kb = {}",
        status.rss_kb
    );
}

// ---------------------------------------------------------------------------------------
// 4. The README walkthrough with redis-cli
// ---------------------------------------------------------------------------------------

/// `redis-cli -h 127.0.0.1 -p PORT <args>`, bounded; returns its trimmed stdout.
async fn redis_cli(cli: &Path, port: u16, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        CMD_TIMEOUT,
        tokio::process::Command::new(cli)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("redis-cli {args:?} timed out"))
    .unwrap_or_else(|e| panic!("running redis-cli: {e}"));
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_with_redis_cli_and_sighup() {
    let Some(cli) = which("redis-cli") else {
        eprintln!(
            "SKIPPED readme_walkthrough_with_redis_cli_and_sighup: redis-cli is not in PATH \
             (scripts/install-test-deps installs redis-tools)"
        );
        return;
    };
    let _serial = exclusive().await;
    let (baton, _app, addr) = start("kv-readme", "kv2", &[]).await;
    let port = addr.port();
    let before: Status = baton.status().await.unwrap();
    let old_pid = before.pid.unwrap();

    assert_eq!(redis_cli(&cli, port, &["SET", "a", "1"]).await, "OK");
    baton.hup().unwrap();
    let target = before.generation + 1;
    let after = baton
        .wait_for("the SIGHUP upgrade to be promoted and settle", WAIT, |s| {
            s.generation == target
                && !s.upgrading
                && s.generations.len() == 1
                && s.last_upgrade
                    .as_ref()
                    .is_some_and(|u| u.generation == target && u.result == UpgradeResult::Promoted)
        })
        .await
        .unwrap();
    let new_pid = after.pid.unwrap();
    assert_ne!(new_pid, old_pid);
    assert_eq!(redis_cli(&cli, port, &["GET", "a"]).await, "1");
    let info = redis_cli(&cli, port, &["INFO", "server"]).await;
    assert!(
        info.lines()
            .any(|l| l.trim() == format!("process_id:{new_pid}")),
        "GET was not answered by the new generation {new_pid}: {info}"
    );
}
