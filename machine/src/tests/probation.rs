//! Probation, make_permanent and revert, without processes.

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn on_probation(p: Probation, stateful: bool) -> Settings {
    let mut s = settings();
    s.probation = p;
    s.stateful = stateful;
    s
}

/// v1 booted permanent and active as generation 1.
fn booted(s: Settings) -> (Machine, Fake, Instant) {
    let mut m = Machine::new(s);
    let mut h = Fake::default();
    let t = Instant::now();
    m.boot_with("v1".into(), true);
    m.start(&mut h, t);
    if s.stateful {
        m.on_hello(1, vec![Feature::State], Some(vec![1]));
        m.on_prepared(&mut h, t, 1);
    }
    m.on_ready(&mut h, t, 1);
    assert_eq!(m.active(), Some(1));
    assert_eq!(m.permanent_image().map(String::as_str), Some("v1"));
    h.take();
    h.releases.clear();
    h.outcomes.clear();
    (m, h, t)
}

/// Installs v2 as generation 2 with a waiter (id 9) for permanence; READY at `t`.
fn install_v2(m: &mut Machine, h: &mut Fake, t: Instant) {
    let w = Waiters {
        promoted: Vec::new(),
        permanent: vec![9],
    };
    m.request_install(h, t, "v2".into(), w).unwrap();
    m.on_ready(h, t, 2);
    assert_eq!(m.active(), Some(2));
    assert_eq!(h.releases, vec!["current v2"]);
    h.releases.clear();
}

#[test]
fn probation_passes_then_the_release_is_permanent() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    install_v2(&mut m, &mut h, t);
    assert_eq!(m.on_probation().map(|p| p.0.as_str()), Some("v2"));
    assert!(
        m.status_line(t + SEC)
            .starts_with("v2 on probation (9 s left)")
    );
    assert_eq!(m.next_deadline(), Some(t + 10 * SEC));
    m.tick(&mut h, t + 9 * SEC);
    assert!(h.outcomes.is_empty());
    m.tick(&mut h, t + 10 * SEC);
    assert_eq!(h.releases, vec!["permanent v2"]);
    assert_eq!(
        h.outcomes,
        vec![(ReleaseResultKind::Permanent, None, vec![9])]
    );
    assert_eq!(m.permanent_image().map(String::as_str), Some("v2"));
    assert!(m.on_probation().is_none());
}

#[test]
fn a_crash_during_probation_reverts_to_the_permanent_release() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    install_v2(&mut m, &mut h, t);
    m.on_exit(&mut h, t + 3 * SEC, 1, "exit status 0");
    h.take();
    m.on_exit(&mut h, t + 3 * SEC, 2, "exit status 1");
    // At once, no back-off: a new process of v1.
    let calls = h.take();
    assert!(calls.contains(&Call::Spawn(3)), "{calls:?}");
    assert_eq!(m.generation(3).unwrap().image, "v1");
    assert_eq!(m.crashes(), 1);
    m.on_ready(&mut h, t + 4 * SEC, 3);
    assert_eq!(m.active(), Some(3));
    assert_eq!(h.releases.len(), 1, "{:?}", h.releases);
    assert!(h.releases[0].starts_with("failed v2: generation 2 exited during probation"));
    let (kind, reason, waiters) = &h.outcomes[0];
    assert_eq!(*kind, ReleaseResultKind::Reverted);
    assert!(
        reason.as_deref().unwrap().contains("reverted to v1"),
        "{reason:?}"
    );
    assert_eq!(waiters, &vec![9]);
    assert!(m.on_probation().is_none());
    assert_eq!(m.permanent_image().map(String::as_str), Some("v1"));
}

#[test]
fn failed_health_checks_in_a_row_revert_and_one_success_resets_the_count() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    install_v2(&mut m, &mut h, t);
    assert_eq!(m.probation_generation(), Some(2));
    m.on_health(&mut h, t, 2, false, "exit status 1");
    m.on_health(&mut h, t, 2, false, "exit status 1");
    m.on_health(&mut h, t, 2, true, "");
    m.on_health(&mut h, t, 2, false, "exit status 1");
    m.on_health(&mut h, t, 2, false, "exit status 1");
    assert!(!m.upgrading());
    // A check of another generation does not count.
    m.on_health(&mut h, t, 1, false, "x");
    assert!(!m.upgrading());
    m.on_health(&mut h, t, 2, false, "exit status 1");
    assert!(m.upgrading());
    assert_eq!(m.generation(3).unwrap().image, "v1");
    // The bad version is alive: it drains normally once v1 is ready.
    h.take();
    m.on_ready(&mut h, t + SEC, 3);
    assert_eq!(m.active(), Some(3));
    assert!(h.take().contains(&Call::Kill(2, Kill::Stop)));
    assert!(h.releases[0].contains("health check failed 3 time(s) in a row"));
    assert_eq!(h.outcomes[0].0, ReleaseResultKind::Reverted);
}

#[test]
fn errno_during_probation_reverts_but_not_after() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    install_v2(&mut m, &mut h, t);
    m.tick(&mut h, t + 10 * SEC);
    m.on_errno(&mut h, t + 11 * SEC, 2, "5");
    assert!(!m.upgrading(), "permanent already");
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    install_v2(&mut m, &mut h, t);
    m.on_errno(&mut h, t, 2, "5");
    assert!(m.upgrading());
}

#[test]
fn manual_probation_waits_for_make_permanent() {
    let (mut m, mut h, t) = booted(on_probation(Probation::Manual, false));
    install_v2(&mut m, &mut h, t);
    assert_eq!(
        m.next_deadline(),
        Some(t + 10 * SEC),
        "only the old one's drain"
    );
    assert!(m.status_line(t).contains("until made permanent"));
    let e = m.make_permanent(&mut h, t, &"v3".to_string()).unwrap_err();
    assert!(e.contains("v2 is"), "{e}");
    m.make_permanent(&mut h, t, &"v2".to_string()).unwrap();
    assert_eq!(h.releases, vec!["permanent v2"]);
    assert_eq!(h.outcomes[0].0, ReleaseResultKind::Permanent);
}

#[test]
fn a_candidate_that_never_gets_ready_fails_the_release_and_its_waiter() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    let w = Waiters {
        promoted: vec![8],
        permanent: vec![9],
    };
    m.request_install(&mut h, t, "v2".into(), w).unwrap();
    let e = m
        .request_install(&mut h, t, "v3".into(), Waiters::default())
        .unwrap_err();
    assert!(e.contains("in progress"), "{e}");
    m.on_exit(&mut h, t + SEC, 2, "exit status 2");
    assert_eq!(m.active(), Some(1));
    assert!(h.releases[0].starts_with("failed v2: candidate exited"));
    assert_eq!(h.outcomes[0].0, ReleaseResultKind::RolledBack);
    assert_eq!(h.outcomes[0].2, vec![9]);
    assert!(finished(&h.take()).contains(&&Call::Finished(
        UpgradeResult::RolledBack,
        Some("candidate exited before it was ready (exit status 2)".into()),
        vec![8]
    )));
}

#[test]
fn rollback_by_hand_reverts_at_once() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    assert!(m.rollback(&mut h, t, None).is_err(), "nothing on probation");
    install_v2(&mut m, &mut h, t);
    m.rollback(&mut h, t, Some(4)).unwrap();
    m.on_ready(&mut h, t, 3);
    assert_eq!(m.active(), Some(3));
    assert_eq!(h.outcomes[0].0, ReleaseResultKind::Reverted);
    assert_eq!(h.outcomes[0].2, vec![9, 4]);
}

#[test]
fn a_plain_upgrade_during_probation_keeps_the_probation() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    install_v2(&mut m, &mut h, t);
    h.plain = Some("v2".into());
    m.request_upgrade(&mut h, t + SEC, None);
    m.on_ready(&mut h, t + SEC, 3);
    assert_eq!(m.on_probation().map(|p| p.1), Some(Some(t + 10 * SEC)));
    m.on_exit(&mut h, t + 2 * SEC, 3, "signal 11 (SIGSEGV)");
    assert_eq!(
        m.generation(4).unwrap().image,
        "v1",
        "reverts, not restarts v2"
    );
}

/// A fresh store: v1 booted, on probation, nothing permanent.
fn fresh(p: Probation) -> (Machine, Fake, Instant) {
    let mut m = Machine::new(on_probation(p, false));
    let mut h = Fake::default();
    let t = Instant::now();
    m.boot_with("v1".into(), false);
    m.start(&mut h, t);
    m.on_ready(&mut h, t, 1);
    assert_eq!(h.releases, vec!["current v1"]);
    h.releases.clear();
    h.take();
    (m, h, t)
}

#[test]
fn the_very_first_version_failing_keeps_running_marked_failed_and_never_passes_probation() {
    let (mut m, mut h, t) = fresh(Probation::For(10 * SEC));
    m.on_exit(&mut h, t + SEC, 1, "exit status 1");
    assert_eq!(h.outcomes[0].0, ReleaseResultKind::RevertRefused);
    assert!(
        h.releases[0].starts_with("revert refused v1")
            && h.releases[0].contains("no earlier version"),
        "{:?}",
        h.releases
    );
    assert!(
        m.status_line(t + SEC)
            .contains("no earlier version to revert to"),
        "{}",
        m.status_line(t + SEC)
    );
    // Nothing else exists: it is restarted (with back-off), in the same probation.
    m.tick(&mut h, t + SEC);
    assert_eq!(m.generation(2).unwrap().image, "v1");
    m.on_ready(&mut h, t + SEC, 2);
    m.tick(&mut h, t + 60 * SEC);
    assert_eq!(
        m.permanent_image(),
        None,
        "a failed version never passes probation"
    );
    assert!(m.on_probation().is_some());
    // Only by hand.
    m.make_permanent(&mut h, t + 61 * SEC, &"v1".into())
        .unwrap();
    assert_eq!(m.permanent_image().map(String::as_str), Some("v1"));
}

#[test]
fn a_version_installed_during_the_first_ones_probation_reverts_to_it() {
    let (mut m, mut h, t) = fresh(Probation::For(10 * SEC));
    // v2 during v1's probation: v1 is what v2 falls back to.
    m.request_install(&mut h, t + SEC, "v2".into(), Waiters::default())
        .unwrap();
    m.on_ready(&mut h, t + SEC, 2);
    assert_eq!(m.on_probation().map(|p| p.0.as_str()), Some("v2"));
    m.on_exit(&mut h, t + 2 * SEC, 1, "exit status 0");
    h.take();
    h.releases.clear();
    // v2 crashes 3 s after READY: back to v1, not a restart of v2.
    m.on_exit(&mut h, t + 4 * SEC, 2, "exit status 1");
    assert_eq!(m.generation(3).unwrap().image, "v1");
    m.on_ready(&mut h, t + 4 * SEC, 3);
    assert_eq!(m.active(), Some(3));
    assert!(
        h.releases.iter().any(|r| r.starts_with("failed v2")),
        "{:?}",
        h.releases
    );
    assert_eq!(h.outcomes.last().unwrap().0, ReleaseResultKind::Reverted);
    // v1 serves on probation again, and passes it: the crash loop never starts.
    assert_eq!(m.on_probation().map(|p| p.0.as_str()), Some("v1"));
    m.tick(&mut h, t + 15 * SEC);
    assert_eq!(m.permanent_image().map(String::as_str), Some("v1"));
}

#[test]
fn upgrades_during_probation_keep_the_last_version_known_to_serve_as_the_target() {
    let (mut m, mut h, t) = fresh(Probation::For(10 * SEC));
    for (i, v) in ["v2", "v3"].iter().enumerate() {
        let g = i as u64 + 2;
        m.request_install(&mut h, t + SEC, (*v).into(), Waiters::default())
            .unwrap();
        m.on_ready(&mut h, t + SEC, g);
        m.on_exit(&mut h, t + SEC, g - 1, "exit status 0");
    }
    // v3 fails: v2 never finished its probation either, so back to v1.
    m.on_exit(&mut h, t + 2 * SEC, 3, "signal 11 (SIGSEGV)");
    assert_eq!(m.generation(4).unwrap().image, "v1");
}

#[test]
fn a_rollback_to_a_formerly_permanent_release_is_permanent_at_once() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), false));
    install_v2(&mut m, &mut h, t);
    m.tick(&mut h, t + 10 * SEC);
    assert_eq!(m.permanent_image().map(String::as_str), Some("v2"));
    h.releases.clear();
    m.request_rollback(&mut h, t + 11 * SEC, "v1".into(), Waiters::default())
        .unwrap();
    assert!(m.status_line(t + 11 * SEC).contains("rolling back to v1"));
    m.on_ready(&mut h, t + 11 * SEC, 3);
    assert_eq!(m.permanent_image().map(String::as_str), Some("v1"));
    assert!(m.on_probation().is_none(), "no new probation");
    assert_eq!(h.releases, vec!["permanent v1"]);
}

#[test]
fn stateful_revert_asks_for_the_old_schema_and_a_refusal_keeps_the_new_one() {
    let (mut m, mut h, t) = booted(on_probation(Probation::For(10 * SEC), true));
    m.request_install(&mut h, t, "v2".into(), Waiters::default())
        .unwrap();
    m.on_hello(2, vec![Feature::State], Some(vec![1, 2]));
    m.on_prepared(&mut h, t, 2);
    assert!(h.take().contains(&Call::Send(
        1,
        SupervisorMsg::Quiesce {
            accept: Some(vec![1, 2]),
            dry_run: false,
        }
    )));
    m.on_snapshot(&mut h, t, 1, 10);
    m.on_restored(&mut h, t, 2);
    m.on_ready(&mut h, t, 2);
    assert_eq!(m.active(), Some(2));
    m.on_exit(&mut h, t, 1, "exit status 0");
    h.take();
    // Health fails: the revert candidate (v1) restores schema 1 only.
    for _ in 0..3 {
        m.on_health(&mut h, t + SEC, 2, false, "HTTP 500");
    }
    assert_eq!(m.generation(3).unwrap().image, "v1");
    m.on_hello(3, vec![Feature::State], Some(vec![1]));
    m.on_prepared(&mut h, t + SEC, 3);
    assert!(h.take().contains(&Call::Send(
        2,
        SupervisorMsg::Quiesce {
            accept: Some(vec![1]),
            dry_run: false,
        }
    )));
    m.on_snapshot_failed(&mut h, t + SEC, 2, "cannot write schema 1");
    assert_eq!(m.active(), Some(2), "the new one carries on");
    let calls = h.take();
    assert!(calls.contains(&Call::Kill(3, Kill::Now)), "{calls:?}");
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::Send(2, SupervisorMsg::Resume { .. })))
    );
    let (kind, reason, _) = h.outcomes.last().unwrap();
    assert_eq!(*kind, ReleaseResultKind::RevertRefused);
    assert!(
        reason.as_deref().unwrap().contains("cannot write schema 1"),
        "{reason:?}"
    );
    assert!(h.releases.last().unwrap().starts_with("revert refused v2"));
    assert!(m.on_probation().is_none(), "no revert loop");
}
