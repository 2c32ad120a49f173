//! What a reexec needs from the machine: holding a queued upgrade back until it
//! is done, the machine surviving a hand-over with its deadlines, and the named
//! top-level state that says when it is idle.

use super::*;

#[test]
fn a_held_machine_finishes_its_upgrade_but_keeps_the_queued_one() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, Some(1));
    m.hold(&mut h, t, true);
    assert!(!m.idle(), "upgrading");
    m.request_upgrade(&mut h, t, Some(2));
    assert!(m.queued());
    h.take();
    m.on_ready(&mut h, t, 2);
    let calls = h.take();
    assert!(calls.contains(&Call::Finished(UpgradeResult::Promoted, None, vec![1])));
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Spawn(_))),
        "{calls:?}"
    );
    assert!(m.idle() && m.queued());
    // Released: the queued upgrade starts, with its waiter.
    m.hold(&mut h, t, false);
    assert!(h.take().contains(&Call::Spawn(3)));
    m.on_ready(&mut h, t, 3);
    assert!(
        h.take()
            .contains(&Call::Finished(UpgradeResult::Promoted, None, vec![2]))
    );
}

#[test]
fn a_request_while_held_and_idle_waits_for_the_release() {
    let (mut m, mut h, t) = running(settings());
    m.hold(&mut h, t, true);
    m.request_upgrade(&mut h, t, Some(7));
    assert!(h.take().is_empty(), "nothing starts while held");
    assert!(m.idle() && m.queued());
    m.hold(&mut h, t, false);
    assert!(h.take().contains(&Call::Spawn(2)));
    assert!(!m.idle());
}

#[test]
fn idle_means_nothing_under_way() {
    let (mut m, mut h, t) = running(settings());
    assert!(m.idle());
    m.on_exit(&mut h, t, 1, "exit status 1");
    assert!(!m.idle(), "a replacement is due");
    let mut m = Machine::new(settings());
    assert!(!m.idle(), "nothing active yet");
    m.start(&mut h, t);
    assert!(!m.idle());
}

/// Times as microseconds from a base instant.
struct TestClock(Instant);

impl MonoClock for TestClock {
    fn micros(&self, t: Instant) -> i64 {
        if t >= self.0 {
            (t - self.0).as_micros() as i64
        } else {
            -((self.0 - t).as_micros() as i64)
        }
    }

    fn instant(&self, v: i64) -> Instant {
        let d = Duration::from_micros(v.unsigned_abs());
        if v >= 0 { self.0 + d } else { self.0 - d }
    }
}

#[test]
fn a_serialized_machine_keeps_its_generations_deadlines_and_waiters() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, Some(1));
    m.on_ready(&mut h, t, 2);
    // Generation 1 drains with a deadline; an upgrade is queued with a waiter.
    m.hold(&mut h, t, true);
    m.request_upgrade(&mut h, t, Some(9));
    h.take();
    let deadline = m.next_deadline().unwrap();
    let clock = TestClock(t);
    let json = serde_json::to_string(&m.carry(&clock).unwrap()).unwrap();
    let mut back = Machine::resume(serde_json::from_str(&json).unwrap(), &clock).unwrap();
    let d = back.next_deadline().unwrap();
    let off = if d > deadline {
        d - deadline
    } else {
        deadline - d
    };
    assert!(off < Duration::from_millis(2), "{off:?}");
    assert_eq!(back.active(), Some(2));
    assert_eq!(back.generation(1).unwrap().phase, Phase::Draining);
    assert_eq!(back.last_upgrade(), m.last_upgrade());
    // It goes on as the original would: the queued upgrade (the hold is not
    // carried) starts, and the drain deadline kills generation 1.
    back.hold(&mut h, t, false);
    assert!(h.take().contains(&Call::Spawn(3)));
    back.tick(&mut h, deadline + Duration::from_millis(5));
    assert!(h.take().contains(&Call::Kill(1, Kill::Now)));
}

/// The top-level state is named, and one holds at a time: down, upgrading, idle,
/// dry run, restart due, stopping.
#[test]
fn the_course_names_the_top_level_state() {
    let mut m = Machine::new(settings());
    let mut h = Fake::default();
    let t = Instant::now();
    assert_eq!(m.course(), Course::Down);
    m.start(&mut h, t);
    assert_eq!(m.course(), Course::Upgrading);
    m.on_ready(&mut h, t, 1);
    assert_eq!(m.course(), Course::Idle);
    m.request_upgrade(&mut h, t, None);
    assert_eq!(m.course(), Course::Upgrading);
    m.on_ready(&mut h, t, 2);
    assert_eq!(m.course(), Course::Idle);
    m.on_exit(&mut h, t, 2, "signal 11");
    assert_eq!(m.course(), Course::RestartDue);
    m.tick(&mut h, t);
    assert_eq!(m.course(), Course::Upgrading);
    m.request_stop(&mut h, t);
    assert_eq!(m.course(), Course::Stopping);

    let (mut m, mut h, t) = stateful();
    assert_eq!(m.request_dry_run(&mut h, t, Some(1)), Ok(1));
    assert_eq!(m.course(), Course::DryRun);
    m.on_snapshot(&mut h, t, 1, 77);
    assert_eq!(m.course(), Course::Idle);
}
