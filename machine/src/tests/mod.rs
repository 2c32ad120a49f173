use super::exit::STABLE_AFTER;
use super::*;
use baton_protocol::{ReleaseResultKind, SupervisorMsg};

mod dryrun;
mod hold;
mod precopy;
mod probation;

#[test]
fn later_saturates_instead_of_panicking() {
    let now = Instant::now();
    assert_eq!(
        later(now, Duration::from_secs(5)),
        now + Duration::from_secs(5)
    );
    assert!(later(now, Duration::MAX) > now);
}

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Spawn(GenId),
    Kill(GenId, Kill),
    Send(GenId, SupervisorMsg),
    Pass(GenId, GenId),
    PassChunk(GenId, GenId, u64),
    Sd(SdEvent),
    Finished(UpgradeResult, Option<String>, Vec<WaiterId>),
    Exit(i32),
    DryRun(GenId, Result<u64, String>),
}

#[derive(Default)]
struct Fake {
    calls: Vec<Call>,
    fail_spawn: bool,
    /// What a plain upgrade runs (`None`: "v1").
    plain: Option<Image>,
    /// Release events, as text ("current v2", "failed v2: ...").
    releases: Vec<String>,
    /// Probation outcomes with their waiters.
    outcomes: Vec<(ReleaseResultKind, Option<String>, Vec<WaiterId>)>,
    /// Events, as `baton events` would show them.
    events: Vec<(GenId, EventKind)>,
}

impl Processes for Fake {
    fn spawn(&mut self, gen_id: GenId, image: Option<&Image>) -> Result<(u32, Image), String> {
        self.calls.push(Call::Spawn(gen_id));
        if self.fail_spawn {
            Err("No such file or directory".into())
        } else {
            let image = image
                .cloned()
                .or_else(|| self.plain.clone())
                .unwrap_or_else(|| "v1".into());
            Ok((1000 + gen_id as u32, image))
        }
    }

    fn kill(&mut self, gen_id: GenId, _pid: u32, how: Kill) {
        self.calls.push(Call::Kill(gen_id, how));
    }
}

impl Channel for Fake {
    fn send(&mut self, gen_id: GenId, msg: SupervisorMsg) {
        self.calls.push(Call::Send(gen_id, msg));
    }

    fn pass_snapshot(&mut self, from: GenId, to: GenId) -> Result<(), String> {
        self.calls.push(Call::Pass(from, to));
        Ok(())
    }

    fn pass_chunk(
        &mut self,
        from: GenId,
        to: GenId,
        _round: u32,
        seq: u64,
        _size: u64,
    ) -> Result<(), String> {
        self.calls.push(Call::PassChunk(from, to, seq));
        Ok(())
    }
}

impl Answers for Fake {
    fn probation_over(&mut self, o: &ProbationOutcome, waiters: Vec<WaiterId>) {
        self.outcomes.push((o.kind, o.reason.clone(), waiters));
    }

    fn finished(&mut self, r: &mut UpgradeReport, waiters: Vec<WaiterId>) {
        self.calls
            .push(Call::Finished(r.result, r.reason.clone(), waiters));
    }

    fn dry_run_done(&mut self, gen_id: GenId, outcome: Result<u64, String>) {
        self.calls.push(Call::DryRun(gen_id, outcome));
    }
}

impl Outside for Fake {
    fn event(&mut self, gen_id: GenId, _pid: u32, kind: EventKind) {
        self.events.push((gen_id, kind));
    }

    fn release(&mut self, event: ReleaseEvent<'_>) {
        self.releases.push(match event {
            ReleaseEvent::Current(i) => format!("current {i}"),
            ReleaseEvent::Permanent(i) => format!("permanent {i}"),
            ReleaseEvent::Failed { image, reason } => format!("failed {image}: {reason}"),
            ReleaseEvent::RevertRefused { image, reason } => {
                format!("revert refused {image}: {reason}")
            }
        });
    }

    fn systemd(&mut self, event: SdEvent, _status: &str) {
        self.calls.push(Call::Sd(event));
    }

    fn exit(&mut self, code: i32, _reason: &str) {
        self.calls.push(Call::Exit(code));
    }
}

impl Fake {
    fn take(&mut self) -> Vec<Call> {
        std::mem::take(&mut self.calls)
    }
}

fn settings() -> Settings {
    Settings {
        ready: ReadyMode::Notify,
        ready_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(10),
        stateful: false,
        snapshot_timeout: Duration::from_secs(3),
        restore_timeout: Duration::from_secs(4),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        probation: Probation::Off,
        health_failures: 3,
        precopy: PrecopySettings::default(),
    }
}

/// A machine with generation 1 active.
fn running(s: Settings) -> (Machine, Fake, Instant) {
    let mut m = Machine::new(s);
    let mut h = Fake::default();
    let t = Instant::now();
    m.start(&mut h, t);
    m.on_ready(&mut h, t, 1);
    assert_eq!(m.active(), Some(1));
    h.take();
    (m, h, t)
}

fn finished(calls: &[Call]) -> Vec<&Call> {
    calls
        .iter()
        .filter(|c| matches!(c, Call::Finished(..)))
        .collect()
}

#[test]
fn promotes_on_ready_then_drains_old_with_its_own_deadline() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, Some(7));
    assert_eq!(h.take(), vec![Call::Sd(SdEvent::Reloading), Call::Spawn(2)]);
    m.on_ready(&mut h, t + Duration::from_millis(50), 2);
    let calls = h.take();
    assert!(calls.contains(&Call::Kill(1, Kill::Stop)), "{calls:?}");
    assert!(calls.contains(&Call::Finished(UpgradeResult::Promoted, None, vec![7])));
    assert_eq!(m.active(), Some(2));
    assert_eq!(m.generation(1).unwrap().phase, Phase::Draining);
    // Killed exactly at its deadline, not before.
    let kill_at = t + Duration::from_millis(50) + Duration::from_secs(10);
    assert_eq!(m.next_deadline(), Some(kill_at));
    m.tick(&mut h, kill_at - Duration::from_millis(1));
    assert!(h.take().is_empty());
    m.tick(&mut h, kill_at);
    assert_eq!(h.take(), vec![Call::Kill(1, Kill::Now)]);
    m.on_exit(&mut h, kill_at, 1, "signal 9");
    assert_eq!(m.gens().count(), 1);
    assert_eq!(m.crashes(), 0);
}

#[test]
fn sdk_children_get_a_drain_message() {
    let (mut m, mut h, t) = running(settings());
    m.on_hello(1, vec![], None);
    m.request_upgrade(&mut h, t, None);
    m.on_ready(&mut h, t, 2);
    let calls = h.take();
    assert!(calls.contains(&Call::Send(
        1,
        SupervisorMsg::Drain {
            deadline_ms: 10_000,
            migrate: false
        }
    )));
    assert!(!calls.contains(&Call::Kill(1, Kill::Stop)));
}

#[test]
fn ready_timeout_rolls_back_and_old_carries_on() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, Some(1));
    h.take();
    assert_eq!(m.next_deadline(), Some(t + Duration::from_secs(5)));
    m.tick(&mut h, t + Duration::from_secs(5));
    let calls = h.take();
    assert!(calls.contains(&Call::Kill(2, Kill::Stop)), "{calls:?}");
    let f = finished(&calls);
    assert!(
        matches!(f[0], Call::Finished(UpgradeResult::RolledBack, Some(r), w) if r.contains("not ready within 5s") && w == &vec![1])
    );
    assert_eq!(m.active(), Some(1));
    assert_eq!(m.generation(1).unwrap().phase, Phase::Active);
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Kill(1, _) | Call::Send(1, _)))
    );
}

#[test]
fn crash_before_ready_rolls_back() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, None);
    h.take();
    m.on_exit(&mut h, t, 2, "exit status 3");
    let calls = h.take();
    assert!(
        matches!(finished(&calls)[0], Call::Finished(UpgradeResult::RolledBack, Some(r), _) if r.contains("exit status 3"))
    );
    assert_eq!(m.active(), Some(1));
    assert!(m.last_upgrade().is_some());
    assert_eq!(m.crashes(), 0);
}

#[test]
fn spawn_failure_rolls_back() {
    let (mut m, mut h, t) = running(settings());
    h.fail_spawn = true;
    m.request_upgrade(&mut h, t, Some(3));
    let calls = h.take();
    assert!(
        matches!(finished(&calls)[0], Call::Finished(UpgradeResult::RolledBack, Some(r), _) if r.contains("spawn failed"))
    );
    assert!(!m.upgrading());
    assert_eq!(m.active(), Some(1));
}

#[test]
fn hup_during_upgrade_is_queued_and_coalesced() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, Some(1));
    m.request_upgrade(&mut h, t, Some(2));
    m.request_upgrade(&mut h, t, None);
    m.request_upgrade(&mut h, t, Some(3));
    let spawns = h
        .take()
        .iter()
        .filter(|c| matches!(c, Call::Spawn(_)))
        .count();
    assert_eq!(spawns, 1, "never two upgrades at once");
    assert!(m.queued());
    m.on_ready(&mut h, t, 2);
    let calls = h.take();
    // Waiter 1 gets upgrade 2; the three queued requests became one upgrade (3).
    assert!(calls.contains(&Call::Finished(UpgradeResult::Promoted, None, vec![1])));
    assert!(calls.contains(&Call::Spawn(3)));
    assert!(!m.queued());
    m.on_ready(&mut h, t, 3);
    let calls = h.take();
    assert!(calls.contains(&Call::Finished(UpgradeResult::Promoted, None, vec![2, 3])));
    assert_eq!(m.active(), Some(3));
    // Generations 1 and 2 drain at the same time, each with its own deadline.
    assert_eq!(m.generation(1).unwrap().phase, Phase::Draining);
    assert_eq!(m.generation(2).unwrap().phase, Phase::Draining);
    assert!(!calls.iter().any(|c| matches!(c, Call::Spawn(_))));
}

#[test]
fn queued_request_runs_after_a_rollback_too() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, Some(1));
    m.request_upgrade(&mut h, t, Some(2));
    h.take();
    m.on_exit(&mut h, t, 2, "exit status 1");
    let calls = h.take();
    assert!(calls.contains(&Call::Spawn(3)), "{calls:?}");
}

#[test]
fn active_crash_is_replaced_with_backoff() {
    let (mut m, mut h, t) = running(settings());
    m.on_exit(&mut h, t, 1, "signal 11");
    assert_eq!(m.crashes(), 1);
    assert_eq!(m.active(), None);
    // First crash: replaced at once.
    assert_eq!(m.next_deadline(), Some(t));
    m.tick(&mut h, t);
    assert!(h.take().contains(&Call::Spawn(2)));
    // Replacement crashes before ready: backoff grows.
    m.on_exit(&mut h, t, 2, "exit status 1");
    h.take();
    let d1 = m.next_deadline().unwrap() - t;
    m.tick(&mut h, t + d1);
    m.on_exit(&mut h, t + d1, 3, "exit status 1");
    let d2 = m.next_deadline().unwrap() - (t + d1);
    assert!(d1 >= Duration::from_millis(100), "{d1:?}");
    assert!(d2 > d1, "{d1:?} then {d2:?}");
    // An upgrade requested while waiting to replace is queued, not lost.
    m.request_upgrade(&mut h, t + d1, Some(9));
    assert!(m.queued());
}

#[test]
fn crash_soon_after_ready_still_backs_off() {
    let (mut m, mut h, t) = running(settings());
    let mut now = t;
    let mut delays = Vec::new();
    for gen_id in 1..=4 {
        m.on_exit(&mut h, now, gen_id, "exit status 7");
        let at = m.next_deadline().unwrap();
        delays.push(at - now);
        now = at;
        m.tick(&mut h, now);
        m.on_ready(&mut h, now, gen_id + 1);
        assert_eq!(m.active(), Some(gen_id + 1));
    }
    assert_eq!(delays[0], Duration::ZERO);
    assert!(delays.windows(2).skip(1).all(|w| w[1] > w[0]), "{delays:?}");
    // Up for a while: the next crash is replaced at once again.
    now += STABLE_AFTER;
    m.on_exit(&mut h, now, 5, "exit status 7");
    assert_eq!(m.next_deadline(), Some(now));
}

#[test]
fn first_generation_failure_exits() {
    let mut m = Machine::new(settings());
    let mut h = Fake::default();
    let t = Instant::now();
    m.start(&mut h, t);
    m.on_exit(&mut h, t, 1, "exit status 1");
    assert!(h.take().contains(&Call::Exit(1)));
}

#[test]
fn delay_readiness() {
    let mut s = settings();
    s.ready = ReadyMode::Delay(Duration::from_secs(1));
    let mut m = Machine::new(s);
    let mut h = Fake::default();
    let t = Instant::now();
    m.start(&mut h, t);
    assert_eq!(m.next_deadline(), Some(t + Duration::from_secs(1)));
    m.tick(&mut h, t + Duration::from_secs(1));
    assert_eq!(m.active(), Some(1));
}

#[test]
fn stop_drains_everything_and_exits_when_all_are_gone() {
    let (mut m, mut h, t) = running(settings());
    m.request_upgrade(&mut h, t, Some(4));
    h.take();
    m.request_stop(&mut h, t);
    let calls = h.take();
    assert!(calls.contains(&Call::Sd(SdEvent::Stopping)));
    assert!(calls.contains(&Call::Kill(1, Kill::Stop)));
    assert!(calls.contains(&Call::Kill(2, Kill::Stop)));
    assert!(
        matches!(finished(&calls)[0], Call::Finished(UpgradeResult::RolledBack, _, w) if w == &vec![4])
    );
    m.request_upgrade(&mut h, t, None);
    assert!(!h.take().iter().any(|c| matches!(c, Call::Spawn(_))));
    m.on_exit(&mut h, t, 1, "exit status 0");
    assert!(!h.take().contains(&Call::Exit(0)));
    m.on_exit(&mut h, t, 2, "exit status 0");
    assert_eq!(h.take(), vec![Call::Exit(0)]);
}

fn stateful() -> (Machine, Fake, Instant) {
    stateful_with(&[Feature::State])
}

/// A `--state` machine whose generation 1 announced `features` and is active.
fn stateful_with(features: &[Feature]) -> (Machine, Fake, Instant) {
    let mut s = settings();
    s.stateful = true;
    let mut m = Machine::new(s);
    let mut h = Fake::default();
    let t = Instant::now();
    m.start(&mut h, t);
    m.on_hello(1, features.to_vec(), None);
    m.on_prepared(&mut h, t, 1);
    assert!(h.take().contains(&Call::Send(
        1,
        SupervisorMsg::Fresh {
            reason: "first generation".into()
        }
    )));
    m.on_ready(&mut h, t, 1);
    assert_eq!(m.active(), Some(1));
    h.take();
    (m, h, t)
}

#[test]
fn stateful_commit() {
    let (mut m, mut h, t) = stateful();
    m.request_upgrade(&mut h, t, Some(1));
    m.on_hello(2, vec![Feature::State], None);
    m.on_prepared(&mut h, t, 2);
    assert!(h.take().contains(&Call::Send(
        1,
        SupervisorMsg::Quiesce {
            accept: None,
            dry_run: false
        }
    )));
    assert_eq!(m.generation(1).unwrap().phase, Phase::Quiesced);
    let t1 = t + Duration::from_millis(20);
    m.on_snapshot(&mut h, t1, 1, 1234);
    assert!(h.take().contains(&Call::Pass(1, 2)));
    // READY may overtake `restored` (datagram vs stream): promote only after both.
    m.on_ready(&mut h, t1, 2);
    assert_eq!(m.active(), Some(1));
    m.on_restored(&mut h, t + Duration::from_millis(30), 2);
    let calls = h.take();
    assert_eq!(m.active(), Some(2));
    assert!(calls.contains(&Call::Send(
        1,
        SupervisorMsg::Commit {
            deadline_ms: 10_000,
            migrate: false
        }
    )));
    let r = m.last_upgrade().unwrap();
    assert_eq!(r.snapshot_bytes, Some(1234));
    assert!(r.accept_gap_ms.unwrap() >= 30.0);
}

#[test]
fn stateful_aborts_resume_the_old_generation() {
    type Abort = fn(&mut Machine, &mut Fake, Instant);
    let cases: Vec<(&str, Abort)> = vec![
        ("rejected", |m, h, t| {
            m.on_rejected(h, t, 2, "schema 2 is newer")
        }),
        ("exited", |m, h, t| m.on_exit(h, t, 2, "signal 6")),
        ("restore", |m, h, t| m.tick(h, t + Duration::from_secs(4))),
        ("snapshot", |m, h, t| {
            m.on_snapshot_failed(h, t, 1, "disk full")
        }),
    ];
    for (name, abort) in cases {
        let (mut m, mut h, t) = stateful();
        m.request_upgrade(&mut h, t, Some(5));
        m.on_hello(2, vec![Feature::State], None);
        m.on_prepared(&mut h, t, 2);
        if name != "snapshot" {
            m.on_snapshot(&mut h, t, 1, 10);
        }
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
                |c| matches!(c, Call::Finished(UpgradeResult::RolledBack, _, w) if w == &vec![5])
            ),
            "{name}"
        );
        if name != "exited" {
            assert!(
                calls.contains(&Call::Kill(2, Kill::Now)),
                "{name}: {calls:?}"
            );
        }
        assert_eq!(m.active(), Some(1), "{name}");
        assert_eq!(m.generation(1).unwrap().phase, Phase::Active, "{name}");
    }
}

#[test]
fn snapshot_timeout_aborts() {
    let (mut m, mut h, t) = stateful();
    m.request_upgrade(&mut h, t, None);
    m.on_hello(2, vec![Feature::State], None);
    m.on_prepared(&mut h, t, 2);
    h.take();
    m.tick(&mut h, t + Duration::from_secs(3));
    let calls = h.take();
    assert!(calls.iter().any(|c| matches!(c, Call::Finished(UpgradeResult::RolledBack, Some(r), _) if r.contains("snapshot within 3s"))));
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::Send(1, SupervisorMsg::Resume { .. })))
    );
}

#[test]
fn stateful_refuses_a_candidate_without_state_support() {
    let (mut m, mut h, t) = stateful();
    m.request_upgrade(&mut h, t, None);
    m.on_ready(&mut h, t, 2);
    assert_eq!(m.active(), Some(1));
    assert_eq!(m.last_upgrade().unwrap().result, UpgradeResult::RolledBack);
}

#[test]
fn old_generation_dying_during_snapshot_is_reported() {
    let (mut m, mut h, t) = stateful();
    m.request_upgrade(&mut h, t, None);
    m.on_hello(2, vec![Feature::State], None);
    m.on_prepared(&mut h, t, 2);
    h.take();
    m.on_exit(&mut h, t, 1, "signal 9");
    assert!(h.take().iter().any(|c| matches!(c, Call::Send(2, SupervisorMsg::Fresh { reason }) if reason.contains("STATE LOST"))));
    m.on_ready(&mut h, t, 2);
    let r = m.last_upgrade().unwrap();
    assert_eq!(r.result, UpgradeResult::Promoted);
    assert!(r.reason.as_deref().unwrap().contains("STATE LOST"));
}

/// A candidate that goes READY without restoring is failed, and the reason says which
/// mistake it is: announcing state hand-over and forgetting `restore`, or not
/// supporting it at all.
#[test]
fn ready_without_restore_names_the_mistake() {
    for (features, want) in [
        (vec![Feature::State], "never called restore before ready"),
        (vec![], "does not support state hand-over"),
    ] {
        let (mut m, mut h, t) = stateful();
        m.request_upgrade(&mut h, t, None);
        m.on_hello(2, features, None);
        m.on_ready(&mut h, t, 2);
        assert_eq!(m.active(), Some(1));
        let r = m.last_upgrade().unwrap();
        assert!(
            r.reason.as_deref().is_some_and(|why| why.contains(want)),
            "{r:?}"
        );
    }
}

/// The one input drives a whole stateful upgrade, as the daemon does it.
#[test]
fn handle_drives_a_stateful_upgrade_end_to_end() {
    let (mut m, mut h, t) = stateful();
    m.request_upgrade(&mut h, t, Some(7));
    m.handle(
        &mut h,
        t,
        2,
        Input::Hello {
            features: vec![Feature::State],
            restores: None,
        },
    );
    m.handle(&mut h, t, 2, Input::Prepared);
    assert!(h.take().iter().any(|c| matches!(
        c,
        Call::Send(1, SupervisorMsg::Quiesce { dry_run: false, .. })
    )));
    m.handle(&mut h, t, 1, Input::Snapshot { size: 9 });
    assert!(h.take().contains(&Call::Pass(1, 2)));
    m.handle(&mut h, t, 2, Input::Restored);
    m.handle(&mut h, t, 2, Input::Ready);
    assert_eq!(m.active(), Some(2));
    assert!(h.take().iter().any(|c| matches!(
        c,
        Call::Finished(UpgradeResult::Promoted, None, w) if w == &vec![7]
    )));
    m.handle(
        &mut h,
        t,
        1,
        Input::Exited {
            how: "exit status 0",
        },
    );
    assert!(m.generation(1).is_none());
    assert_eq!(m.crashes(), 0, "a retired generation's exit is not a crash");
}
