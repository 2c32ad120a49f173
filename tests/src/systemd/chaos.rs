//! Issue 14's last chaos fault: SIGKILL of baton itself, at a random moment of an upgrade
//! under load, under a real systemd (the sandbox) with the shipped template unit. baton
//! binds the listener itself (port 0), so only systemd's fd store keeps it across the
//! crash; `Restart=on-failure` brings baton back, and `KillMode=mixed` takes down every
//! generation the dead baton left (in-flight requests in them are cut: counted, bounded).
//!
//! Seeded like `crate::chaos` (`BATON_CHAOS_SEED`). Each trial then checks: no connection
//! refused, only cut connections and at most two per client (see below), a new baton
//! (MainPID) answering status, exactly one active generation and no other app process,
//! the same listener (inherited, same port), the fd store still holding it, and baton's
//! fd count where a fresh start has it. kv-server is not run here: with baton killed,
//! every generation is killed, and an in-memory store loses its data by definition.

use std::thread;
use std::time::{Duration, Instant};

use crate::chaos::Rng;
use crate::load::{FailureKind, LoadOpts, LoadReport};
use baton_protocol::{Phase, Status, UpgradeResult};

use super::*;

/// hello-http's delay before READY: a window in which the candidate is starting.
const READY_DELAY: &str = "400ms";
/// The slow clients' requests keep an old generation draining this long.
const SLOW_MS: u64 = 1500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// No upgrade running.
    Steady,
    /// The candidate runs and is not READY yet.
    CandidateStarting,
    /// The candidate was promoted; the old generation drains its slow requests.
    OldDraining,
}

const MOMENTS: [Moment; 3] = [
    Moment::Steady,
    Moment::CandidateStarting,
    Moment::OldDraining,
];

/// baton's open fds, counted inside the sandbox (its pids are the sandbox's).
fn baton_fds(fx: &Fixture, pid: u32) -> usize {
    let out = fx.sb().exec(&["ls", &format!("/proc/{pid}/fd")]);
    fx.check(out.status.success(), || {
        format!("ls /proc/{pid}/fd: {out:?}")
    });
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// The app processes running in the sandbox (the wrapper execs `real-hello-http`).
fn app_pids(fx: &Fixture) -> Vec<u32> {
    fx.processes()
        .into_iter()
        .filter(|(_, comm)| comm.starts_with("real-hello"))
        .map(|(p, _)| p)
        .collect()
}

/// Polls status until the upgrade away from `old` reaches `m`; false when it ended first.
fn reach(fx: &Fixture, old: u32, m: Moment) -> bool {
    let deadline = Instant::now() + SHORT;
    while Instant::now() < deadline {
        let s = fx.status();
        let cand = s.generations.iter().find(|g| g.pid != old);
        let old_phase = s.generations.iter().find(|g| g.pid == old).map(|g| g.phase);
        let hit = match (m, cand) {
            (Moment::Steady, _) => true,
            (Moment::CandidateStarting, Some(c)) => c.phase == Phase::Starting,
            (Moment::OldDraining, Some(c)) => {
                s.pid == Some(c.pid) && old_phase == Some(Phase::Draining)
            }
            (_, None) => false,
        };
        if hit {
            return true;
        }
        if cand.is_some_and(|c| s.pid == Some(c.pid)) && m == Moment::CandidateStarting {
            return false;
        }
        if old_phase.is_none() {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Status, once baton is back and its first generation is active.
fn settled(fx: &Fixture) -> Status {
    let deadline = Instant::now() + LONG;
    loop {
        let s = fx.status();
        if s.generations.len() == 1 && s.generations[0].phase == Phase::Active && !s.upgrading {
            return s;
        }
        if Instant::now() >= deadline {
            fx.fail(&format!("baton did not settle after the restart: {s:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What [`baton_kills`] saw.
pub struct BatonKills {
    /// One line per trial: the moment and the requests that failed.
    pub trials: Vec<String>,
    /// The load generators' reports (fast clients, slow clients).
    pub reports: Vec<LoadReport>,
}

/// `trials` SIGKILLs of baton under systemd, each at a moment picked with `seed` (every
/// moment once first). Panics, with the unit's state and logs, on a broken invariant.
pub fn baton_kills(tools: Tools, trials: usize, seed: u64) -> BatonKills {
    let mut rng = Rng::new(seed ^ 0x5D);
    // Every moment once, then random ones.
    let mut moments = MOMENTS.to_vec();
    while moments.len() < trials {
        moments.push(rng.pick(&MOMENTS));
    }

    let mut fx = Fixture::new(
        "batonkill",
        tools,
        Layout::Template,
        &["--ready-delay", READY_DELAY],
    );
    fx.boot();
    fx.ctl_ok(&["start", fx.unit]);
    let addr = fx.addr();
    let first = settled(&fx);
    let fresh_fds = baton_fds(&fx, fx.main_pid());
    fx.wait_prop("NFileDescriptorStore", SHORT, |v| v == "1");

    let fast = LoadOpts {
        keepalive: 4,
        fresh: 2,
        request_timeout: Duration::from_secs(15),
        ..LoadOpts::default()
    };
    let slow = LoadOpts {
        keepalive: 2,
        fresh: 0,
        path: format!("/sleep?ms={SLOW_MS}"),
        request_timeout: Duration::from_secs(15),
        ..LoadOpts::default()
    };
    let clients = (fast.keepalive + fast.fresh + slow.keepalive) as u64;
    let load = Load::start_with(&fx, addr, vec![fast, slow]);
    // Failures over every generator: (all, refused, other than a cut connection).
    let failed_now = || -> (u64, u64, u64) {
        load.handles
            .iter()
            .fold((0, 0, 0), |(all, refused, odd), h| {
                let f = h.snapshot().failures;
                let cut = f.get(FailureKind::Reset) + f.get(FailureKind::EofBeforeResponse);
                (
                    all + f.total(),
                    refused + f.get(FailureKind::ConnectRefused),
                    odd + f.total() - cut,
                )
            })
    };

    let mut summary = Vec::new();
    for (i, m) in moments.into_iter().enumerate() {
        let i = i + 1;
        let (failed_before, _, _) = failed_now();
        let old_main = fx.main_pid();
        let old_app = fx.status().pid.unwrap_or_else(|| fx.fail("no active pid"));
        if m != Moment::Steady {
            fx.ctl_ok(&["reload", "--no-block", fx.unit]);
        }
        let hit = reach(&fx, old_app, m);
        fx.check(hit, || {
            format!("trial {i} (seed {seed:#x}): the upgrade never reached {m:?}")
        });
        let kill = fx.sb().exec(&["kill", "-9", &old_main.to_string()]);
        fx.check(kill.status.success(), || {
            format!("kill -9 {old_main}: {kill:?}")
        });

        // systemd restarts baton (RestartSec=1s); its fd store hands the listener back.
        // (NRestarts is not a witness: a crash during a reload job restarts the unit
        // without counting it.)
        let deadline = Instant::now() + LONG;
        let main = loop {
            let p = fx.show(fx.unit, &["MainPID", "ActiveState"]);
            let main: u32 = p.get("MainPID").and_then(|v| v.parse().ok()).unwrap_or(0);
            if main != 0 && main != old_main && p.get("ActiveState").is_some_and(|s| s == "active")
            {
                break main;
            }
            fx.check(Instant::now() < deadline, || {
                format!("trial {i}: baton was not restarted after SIGKILL ({m:?}): {p:?}")
            });
            thread::sleep(Duration::from_millis(20));
        };
        let st = settled(&fx);
        fx.check(st.supervisor_pid == main, || {
            format!(
                "trial {i}: status from pid {}, MainPID {main}",
                st.supervisor_pid
            )
        });
        let active = st.pid.unwrap_or(0);
        let apps = app_pids(&fx);
        fx.check(apps == vec![active], || {
            format!("trial {i} ({m:?}): app processes {apps:?}, only the active {active} may run")
        });
        fx.check_listener_inherited(&first, &st, addr);
        let stored = fx.prop("NFileDescriptorStore");
        fx.check(stored == "1", || {
            format!("trial {i}: NFileDescriptorStore={stored} after the restart")
        });
        let fds = baton_fds(&fx, main);
        fx.check(fds <= fresh_fds + 2, || {
            format!("trial {i}: the restarted baton holds {fds} fds, a fresh one {fresh_fds}")
        });
        // The restart counts against StartLimitBurst= (5 in 10 s); these trials come
        // faster than any real crash loop should.
        fx.ctl_ok(&["reset-failed", fx.unit]);

        load.progress_any(&fx, 30);
        let (failed_after, refused, odd) = failed_now();
        let failed = failed_after - failed_before;
        fx.check(refused == 0, || {
            format!("trial {i} ({m:?}): {refused} connections refused in all")
        });
        // A killed generation cuts the requests in flight in it: one per client, and one
        // more for a client that reconnected in the instant between baton's death and
        // systemd's SIGKILL of the generations (KillMode=mixed).
        fx.check(failed <= 2 * clients, || {
            format!(
                "trial {i} ({m:?}): {failed} requests failed; only those in flight in the \
                 killed generations may ({clients} clients)"
            )
        });
        fx.check(odd == 0, || {
            let all: Vec<String> = load
                .handles
                .iter()
                .map(|h| h.snapshot().failures.to_string())
                .collect();
            format!("trial {i} ({m:?}): failures other than a cut connection: {all:?}")
        });
        summary.push(format!(
            "trial {i}: SIGKILL baton when {m:?}: {failed} failed"
        ));
    }

    // The restarted baton upgrades as ever, with no failure.
    let (failed_before, _, _) = failed_now();
    fx.ctl_ok(&["reload", fx.unit]);
    load.progress_any(&fx, 30);
    let (failed_after, _, _) = failed_now();
    fx.check(failed_after == failed_before, || {
        format!(
            "{} requests failed in the reload after the trials",
            failed_after - failed_before
        )
    });
    let st = fx.status();
    let promoted = st
        .last_upgrade
        .as_ref()
        .is_some_and(|u| u.result == UpgradeResult::Promoted);
    fx.check(promoted, || {
        format!("the reload after the trials: {:?}", st.last_upgrade)
    });
    let reports = load.stop_all();
    for r in &reports {
        fx.check(r.failures.get(FailureKind::ConnectRefused) == 0, || {
            format!("connections refused:\n{r}")
        });
    }
    BatonKills {
        trials: summary,
        reports,
    }
}
