//! Dry-run snapshots: quiesce, snapshot, resume, and nothing interleaves with them.

use super::*;

fn dry_quiesce(accept: Option<Vec<u32>>) -> SupervisorMsg {
    SupervisorMsg::Quiesce {
        accept,
        dry_run: true,
    }
}

fn resumed(calls: &[Call], gen_id: GenId) -> bool {
    calls
        .iter()
        .any(|c| matches!(c, Call::Send(g, SupervisorMsg::Resume { .. }) if *g == gen_id))
}

#[test]
fn a_dry_run_quiesces_snapshots_and_resumes_the_active_generation() {
    let (mut m, mut h, t) = stateful();
    assert_eq!(m.request_dry_run(&mut h, t, Some(1)), Ok(1));
    assert_eq!(h.take(), vec![Call::Send(1, dry_quiesce(Some(vec![1])))]);
    assert_eq!(m.generation(1).unwrap().phase, Phase::Quiesced);
    assert!(!m.idle(), "a reexec must not run during a dry run");
    // A second request joins the one under way: one quiesce only.
    assert_eq!(m.request_dry_run(&mut h, t, None), Ok(1));
    assert!(h.take().is_empty());
    m.on_snapshot(&mut h, t, 1, 77);
    let calls = h.take();
    assert!(resumed(&calls, 1), "{calls:?}");
    assert!(calls.contains(&Call::DryRun(1, Ok(77))), "{calls:?}");
    assert!(!calls.iter().any(|c| matches!(c, Call::Pass(..))));
    assert_eq!(m.generation(1).unwrap().phase, Phase::Active);
    assert!(m.idle());
    assert!(m.last_upgrade().is_none(), "a dry run is not an upgrade");
}

#[test]
fn a_dry_run_is_refused_without_state_or_during_an_upgrade() {
    let (mut m, mut h, t) = running(settings());
    assert!(
        m.request_dry_run(&mut h, t, None)
            .unwrap_err()
            .contains("--state")
    );
    let (mut m, mut h, t) = stateful_with(&[]);
    assert!(
        m.request_dry_run(&mut h, t, None)
            .unwrap_err()
            .contains("does not take part")
    );
    let (mut m, mut h, t) = stateful();
    m.request_upgrade(&mut h, t, None);
    h.take();
    assert!(
        m.request_dry_run(&mut h, t, None)
            .unwrap_err()
            .contains("upgrade")
    );
    assert!(h.take().is_empty(), "nothing was sent");
}

#[test]
fn an_upgrade_requested_during_a_dry_run_starts_after_it() {
    let (mut m, mut h, t) = stateful();
    m.request_dry_run(&mut h, t, None).unwrap();
    h.take();
    m.request_upgrade(&mut h, t, Some(9));
    assert!(h.take().is_empty(), "queued, not started");
    m.on_snapshot(&mut h, t, 1, 5);
    let calls = h.take();
    let resume = calls
        .iter()
        .position(|c| matches!(c, Call::Send(1, SupervisorMsg::Resume { .. })));
    let spawn = calls.iter().position(|c| *c == Call::Spawn(2));
    assert!(
        resume.is_some() && spawn.is_some() && resume < spawn,
        "{calls:?}"
    );
}

#[test]
fn a_candidate_prepared_during_a_dry_run_quiesces_the_old_one_only_after_it() {
    let (mut m, mut h, t) = stateful();
    m.request_dry_run(&mut h, t, None).unwrap();
    // An install begins at once (it is not queued); its candidate gets ready fast.
    m.request_install(&mut h, t, "v2".into(), Waiters::default())
        .unwrap();
    m.on_hello(2, vec![Feature::State], None);
    m.on_prepared(&mut h, t, 2);
    let calls = h.take();
    assert!(
        !calls.iter().any(|c| matches!(
            c,
            Call::Send(1, SupervisorMsg::Quiesce { dry_run: false, .. })
        )),
        "the upgrade's quiesce went out during the dry run: {calls:?}"
    );
    // The dry run's snapshot is never passed to the candidate.
    m.on_snapshot(&mut h, t, 1, 5);
    let calls = h.take();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::Pass(..))),
        "{calls:?}"
    );
    assert!(calls.contains(&Call::DryRun(1, Ok(5))));
    let resume = calls
        .iter()
        .position(|c| matches!(c, Call::Send(1, SupervisorMsg::Resume { .. })));
    let quiesce = calls.iter().position(|c| {
        matches!(
            c,
            Call::Send(1, SupervisorMsg::Quiesce { dry_run: false, .. })
        )
    });
    assert!(
        resume.is_some() && quiesce.is_some() && resume < quiesce,
        "{calls:?}"
    );
    // Then the upgrade goes on as usual with the next snapshot.
    m.on_snapshot(&mut h, t, 1, 6);
    assert!(h.take().contains(&Call::Pass(1, 2)));
}

#[test]
fn a_dry_run_that_fails_times_out_or_loses_its_process_answers_with_why() {
    let (mut m, mut h, t) = stateful();
    m.request_dry_run(&mut h, t, Some(1)).unwrap();
    m.on_snapshot_failed(&mut h, t, 1, "cannot write schema 1");
    let calls = h.take();
    assert!(resumed(&calls, 1));
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::DryRun(1, Err(e)) if e.contains("cannot write schema 1")))
    );
    assert_eq!(m.active(), Some(1), "a failed dry run changes nothing");

    m.request_dry_run(&mut h, t, None).unwrap();
    assert_eq!(m.next_deadline(), Some(t + Duration::from_secs(3)));
    m.tick(&mut h, t + Duration::from_secs(3));
    let calls = h.take();
    assert!(resumed(&calls, 1));
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::DryRun(1, Err(e)) if e.contains("within 3s")))
    );

    m.request_dry_run(&mut h, t, None).unwrap();
    m.on_exit(&mut h, t, 1, "signal 9 (SIGKILL)");
    assert!(
        h.take()
            .iter()
            .any(|c| matches!(c, Call::DryRun(1, Err(e)) if e.contains("exited")))
    );
    assert_ne!(m.course(), Course::DryRun);
}

/// Records what is sent on the channel seam, and nothing else.
#[derive(Default)]
struct Sent(Vec<(GenId, SupervisorMsg)>);

impl Channel for Sent {
    fn send(&mut self, gen_id: GenId, msg: SupervisorMsg) {
        self.0.push((gen_id, msg));
    }

    fn pass_snapshot(&mut self, _from: GenId, _to: GenId) -> Result<(), String> {
        Err("no snapshot here".into())
    }

    fn pass_chunk(&mut self, _: GenId, _: GenId, _: u32, _: u64, _: u64) -> Result<(), String> {
        Err("no chunk here".into())
    }
}

/// A dry-run request needs only the channel seam: a recorder of messages is a
/// whole host for it.
#[test]
fn a_dry_run_request_needs_only_the_channel() {
    let (mut m, _, t) = stateful();
    let mut sent = Sent::default();
    assert_eq!(m.request_dry_run(&mut sent, t, Some(1)), Ok(1));
    assert_eq!(sent.0, vec![(1, dry_quiesce(Some(vec![1])))]);
    assert_eq!(m.course(), Course::DryRun);
}
