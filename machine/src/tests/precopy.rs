//! Pre-copy: rounds while serving, when they stop, and every abort.

use super::*;

const MIB: u64 = 1 << 20;
const BOTH: &[Feature] = &[Feature::State, Feature::Precopy];

/// Generation 1 pre-copies to candidate 2; round 0 has been asked for.
fn precopying(s: impl FnOnce(&mut Settings)) -> (Machine, Fake, Instant) {
    let (mut m, mut h, t) = stateful_with(BOTH);
    s(&mut m.s);
    m.request_upgrade(&mut h, t, Some(7));
    m.on_hello(2, BOTH.to_vec(), None);
    m.on_prepared(&mut h, t, 2);
    let calls = h.take();
    assert!(
        calls.contains(&Call::Send(1, SupervisorMsg::Precopy { round: 0 })),
        "{calls:?}"
    );
    // Serving all along: nothing is quiesced yet.
    assert_eq!(m.generation(1).unwrap().phase, Phase::Active);
    (m, h, t)
}

/// Generation 1 sends `round` as `chunks` chunks of `size` bytes, starting at `seq`.
fn send_round(
    m: &mut Machine,
    h: &mut Fake,
    t: Instant,
    round: u32,
    seq: u64,
    chunks: u64,
    size: u64,
) {
    send_round_unapplied(m, h, t, round, seq, chunks, size);
    for i in 0..chunks {
        m.on_applied(h, t, 2, seq + i);
    }
}

/// Like [`send_round`], but the candidate applies nothing yet.
fn send_round_unapplied(
    m: &mut Machine,
    h: &mut Fake,
    t: Instant,
    round: u32,
    seq: u64,
    chunks: u64,
    size: u64,
) {
    for i in 0..chunks {
        m.on_chunk(h, t, 1, round, seq + i, size);
    }
    m.on_round_done(h, t, 1, round);
}

#[test]
fn rounds_shrink_until_converged_then_the_last_one_is_quiesced() {
    let (mut m, mut h, t) = precopying(|_| {});
    send_round(&mut m, &mut h, t, 0, 0, 3, 64 * MIB);
    let calls = h.take();
    for seq in 0..3 {
        assert!(calls.contains(&Call::PassChunk(1, 2, seq)), "{calls:?}");
    }
    assert!(calls.contains(&Call::Send(1, SupervisorMsg::Precopy { round: 1 })));
    // The candidate applied one: the sender gets its credit back.
    m.on_applied(&mut h, t, 2, 0);
    assert_eq!(
        h.take(),
        vec![Call::Send(1, SupervisorMsg::Acked { seq: 0 })]
    );

    let t1 = t + Duration::from_millis(500);
    send_round(&mut m, &mut h, t1, 1, 3, 1, 8 * MIB);
    assert!(
        h.take()
            .contains(&Call::Send(1, SupervisorMsg::Precopy { round: 2 }))
    );
    send_round(&mut m, &mut h, t1, 2, 4, 1, MIB / 2);
    let calls = h.take();
    assert!(
        calls.contains(&Call::Send(1, SupervisorMsg::PrecopyFinal { round: 3 })),
        "{calls:?}"
    );
    assert_eq!(m.generation(1).unwrap().phase, Phase::Quiesced);

    let t2 = t1 + Duration::from_millis(10);
    send_round(&mut m, &mut h, t2, 3, 5, 1, 4096);
    assert!(
        h.take()
            .contains(&Call::Send(2, SupervisorMsg::Complete { chunks: 6 }))
    );
    m.on_ready(&mut h, t2, 2);
    assert_eq!(m.active(), Some(1), "READY before restored waits");
    m.on_restored(&mut h, t2 + Duration::from_millis(5), 2);
    assert_eq!(m.active(), Some(2));
    let r = m.last_upgrade().unwrap();
    assert_eq!(r.precopy_rounds, Some(3));
    assert_eq!(r.precopy_bytes, Some(192 * MIB + 8 * MIB + MIB / 2));
    assert_eq!(r.final_delta_bytes, Some(4096));
    assert_eq!(r.precopy_stop.as_deref(), Some("converged"));
    // The gap runs from the last quiesce, not from the start of pre-copy.
    let gap = r.accept_gap_ms.unwrap();
    assert!((15.0..16.0).contains(&gap), "{gap}");
}

/// Issue 32, item 1: the last round's time includes waiting for the candidate to catch
/// up while the old generation still served; its event says how much of it was a pause.
#[test]
fn the_last_round_reports_its_pause_apart_from_its_time() {
    let (mut m, mut h, t) = precopying(|_| {});
    send_round(&mut m, &mut h, t, 0, 0, 4, 64 * MIB);
    // Round 1 converges, but the candidate applies it 30 ms later: the quiesce waits.
    send_round_unapplied(&mut m, &mut h, t, 1, 4, 1, 100);
    let quiesce_at = t + Duration::from_millis(30);
    m.on_applied(&mut h, quiesce_at, 2, 4);
    assert_eq!(m.generation(1).unwrap().phase, Phase::Quiesced);
    let done = quiesce_at + Duration::from_millis(3);
    send_round(&mut m, &mut h, done, 2, 5, 1, 120);
    let last = h
        .events
        .iter()
        .find_map(|(_, k)| match k {
            EventKind::Precopy {
                quiesced: true,
                ms,
                paused_ms,
                ..
            } => Some((*ms, *paused_ms)),
            _ => None,
        })
        .expect("no event for the last round");
    assert!((33.0..34.0).contains(&last.0), "round time {last:?}");
    assert_eq!(last.1.map(|p| p.round()), Some(3.0), "{last:?}");
}

#[test]
fn the_last_round_waits_until_the_candidate_has_applied_everything() {
    let (mut m, mut h, t) = precopying(|_| {});
    send_round(&mut m, &mut h, t, 0, 0, 4, 64 * MIB);
    send_round_unapplied(&mut m, &mut h, t, 1, 4, 1, 100);
    let calls = h.take();
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Send(1, SupervisorMsg::PrecopyFinal { .. }))),
        "quiesced with a backlog: {calls:?}"
    );
    assert_eq!(m.generation(1).unwrap().phase, Phase::Active);
    m.on_applied(&mut h, t, 2, 4);
    assert!(
        h.take()
            .contains(&Call::Send(1, SupervisorMsg::PrecopyFinal { round: 2 }))
    );
    assert_eq!(m.generation(1).unwrap().phase, Phase::Quiesced);
}

#[test]
fn deltas_that_do_not_shrink_fall_back_to_stop_and_copy_with_the_reason() {
    let (mut m, mut h, t) = precopying(|_| {});
    send_round(&mut m, &mut h, t, 0, 0, 1, 100 * MIB);
    send_round(&mut m, &mut h, t, 1, 1, 1, 20 * MIB);
    send_round(&mut m, &mut h, t, 2, 2, 1, 30 * MIB);
    let calls = h.take();
    assert!(calls.contains(&Call::Send(1, SupervisorMsg::PrecopyFinal { round: 3 })));
    send_round(&mut m, &mut h, t, 3, 3, 1, 30 * MIB);
    m.on_restored(&mut h, t, 2);
    m.on_ready(&mut h, t, 2);
    let r = m.last_upgrade().unwrap();
    assert_eq!(r.result, UpgradeResult::Promoted);
    let stop = r.precopy_stop.as_deref().unwrap();
    assert!(stop.starts_with("not converging: round 2"), "{stop}");
}

#[test]
fn the_round_limit_and_the_timeout_end_the_live_rounds() {
    let (mut m, mut h, t) = precopying(|s| s.precopy.rounds = 1);
    send_round(&mut m, &mut h, t, 0, 0, 1, 100 * MIB);
    send_round(&mut m, &mut h, t, 1, 1, 1, 50 * MIB);
    assert!(
        h.take()
            .contains(&Call::Send(1, SupervisorMsg::PrecopyFinal { round: 2 }))
    );

    let (mut m, mut h, t) = precopying(|s| s.precopy.timeout = Duration::from_secs(2));
    send_round(
        &mut m,
        &mut h,
        t + Duration::from_secs(2),
        0,
        0,
        1,
        100 * MIB,
    );
    assert!(
        h.take()
            .contains(&Call::Send(1, SupervisorMsg::PrecopyFinal { round: 1 }))
    );
    send_round(&mut m, &mut h, t, 1, 1, 1, MIB);
    m.on_restored(&mut h, t, 2);
    m.on_ready(&mut h, t, 2);
    assert_eq!(
        m.last_upgrade().unwrap().precopy_stop.as_deref(),
        Some("timeout")
    );
}

#[test]
fn off_sends_one_round_while_quiesced() {
    let (mut m, mut h, t) = stateful_with(BOTH);
    m.s.precopy.enabled = false;
    m.request_upgrade(&mut h, t, None);
    m.on_hello(2, BOTH.to_vec(), None);
    m.on_prepared(&mut h, t, 2);
    assert!(
        h.take()
            .contains(&Call::Send(1, SupervisorMsg::PrecopyFinal { round: 0 }))
    );
    assert_eq!(m.generation(1).unwrap().phase, Phase::Quiesced);
    send_round(&mut m, &mut h, t, 0, 0, 2, 10);
    assert!(
        h.take()
            .contains(&Call::Send(2, SupervisorMsg::Complete { chunks: 2 }))
    );
    m.on_restored(&mut h, t, 2);
    m.on_ready(&mut h, t, 2);
    let r = m.last_upgrade().unwrap();
    assert_eq!((r.precopy_rounds, r.final_delta_bytes), (Some(0), Some(20)));
    assert_eq!(r.precopy_stop.as_deref(), Some("pre-copy off"));
}

#[test]
fn without_support_on_both_sides_or_a_common_schema_the_snapshot_is_one_shot() {
    type Case = (&'static [Feature], Option<Vec<u32>>, Option<Vec<u32>>);
    let cases: [Case; 3] = [
        (&[Feature::State], None, None),
        (BOTH, Some(vec![1, 2]), Some(vec![1])),
        (BOTH, None, Some(vec![1])),
    ];
    for (candidate, old_restores, new_restores) in cases {
        let (mut m, mut h, t) = stateful_with(BOTH);
        if let Some(g) = m.gens.get_mut(&1) {
            g.restores = old_restores.clone();
        }
        m.request_upgrade(&mut h, t, None);
        m.on_hello(2, candidate.to_vec(), new_restores.clone());
        m.on_prepared(&mut h, t, 2);
        let calls = h.take();
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::Send(1, SupervisorMsg::Quiesce { .. }))),
            "{candidate:?} {old_restores:?} {new_restores:?}: {calls:?}"
        );
    }
}

#[test]
fn aborts_resume_the_old_generation_and_kill_the_candidate() {
    type Abort = fn(&mut Machine, &mut Fake, Instant);
    let cases: Vec<(&str, Abort)> = vec![
        ("candidate crashed", |m, h, t| {
            m.on_exit(h, t, 2, "signal 9")
        }),
        ("round failed", |m, h, t| {
            m.on_precopy_failed(h, t, 1, "out of memory")
        }),
        ("chunk rejected", |m, h, t| {
            m.on_rejected(h, t, 2, "bad chunk")
        }),
        ("out of order", |m, h, t| m.on_chunk(h, t, 1, 1, 9, 10)),
        ("hung", |m, h, t| m.tick(h, t + Duration::from_secs(63))),
    ];
    for (name, abort) in cases {
        let (mut m, mut h, t) = precopying(|_| {});
        send_round(&mut m, &mut h, t, 0, 0, 2, 10 * MIB);
        h.take();
        abort(&mut m, &mut h, t);
        let calls = h.take();
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::Send(1, SupervisorMsg::Resume { .. }))),
            "{name}: {calls:?}"
        );
        assert!(
            calls.iter().any(
                |c| matches!(c, Call::Finished(UpgradeResult::RolledBack, _, w) if w == &vec![7])
            ),
            "{name}: {calls:?}"
        );
        if name != "candidate crashed" {
            assert!(
                calls.contains(&Call::Kill(2, Kill::Now)),
                "{name}: {calls:?}"
            );
        }
        assert_eq!(m.active(), Some(1), "{name}");
        assert_eq!(m.generation(1).unwrap().phase, Phase::Active, "{name}");
        assert!(!m.upgrading(), "{name}");
        // Chunks that come late go nowhere.
        m.on_chunk(&mut h, t, 1, 1, 2, 10);
        assert!(
            !h.take().iter().any(|c| matches!(c, Call::PassChunk(..))),
            "{name}"
        );
    }
}

#[test]
fn the_old_generation_dying_mid_precopy_aborts_the_candidate_and_replaces_it() {
    let (mut m, mut h, t) = precopying(|_| {});
    send_round(&mut m, &mut h, t, 0, 0, 1, 10 * MIB);
    h.take();
    m.on_exit(&mut h, t, 1, "signal 11");
    let calls = h.take();
    assert!(calls.contains(&Call::Kill(2, Kill::Now)), "{calls:?}");
    let reason = match finished(&calls).first() {
        Some(Call::Finished(UpgradeResult::RolledBack, Some(r), _)) => r.clone(),
        other => panic!("{other:?} in {calls:?}"),
    };
    assert!(reason.contains("STATE LOST"), "{reason}");
    assert_eq!(m.active(), None);
    m.on_exit(&mut h, t, 2, "signal 9");
    // A replacement starts after the back-off, and reports the loss.
    let due = m.next_deadline().unwrap();
    m.tick(&mut h, due);
    assert!(h.take().contains(&Call::Spawn(3)));
}
