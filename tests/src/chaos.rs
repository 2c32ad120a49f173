//! Seeded, reproducible chaos for upgrades (issue 14): trials of `baton upgrade` under
//! load while one fault hits a random moment of it, each followed by the invariants that
//! must hold whatever the fault. `BATON_CHAOS_SEED` picks the trials; a failure names the
//! seed and the trial, so `BATON_CHAOS_SEED=<seed> cargo test --test chaos` replays it.
//!
//! Faults: SIGKILL, or SIGSTOP then SIGCONT, of the old generation or of the candidate; a
//! candidate whose exec fails; an old generation that writes a corrupt snapshot; a
//! candidate that never finishes its restore. A stateful generation is never SIGKILLed
//! once it holds the only copy of the state (the old one before commit, the new one after
//! promotion): that loses the data by definition, and `stateful_kv` tests the STATE LOST
//! report for it. baton itself is killed in `crate::systemd::chaos`, under systemd, which
//! restarts it with its fd store.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_protocol::Phase;

use crate::harness::{
    Baton, Signal, TestDir, UpgradeOutcome, descendants, generation_tree, hello_http_bin,
    kv_server_bin, pid_alive, proc_fds, signal_pid,
};
use crate::kv::{App, Writers};
use crate::load::{FailureKind, LoadGen, LoadHandle, LoadOpts, LoadReport};

/// The seed when `BATON_CHAOS_SEED` is unset: CI replays the same trials every run.
pub const DEFAULT_SEED: u64 = 0xBA70_0001;

/// Bound on one trial's upgrade and on settling after it.
pub const TRIAL_TIMEOUT: Duration = Duration::from_secs(60);

/// `BATON_CHAOS_SEED` (decimal or `0x` hex), else [`DEFAULT_SEED`].
///
/// # Panics
/// When it is set but not a number.
pub fn seed() -> u64 {
    match std::env::var("BATON_CHAOS_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("BATON_CHAOS_SEED={s} is not a number"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

/// splitmix64: small, seedable, and plenty for picking trials.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// One of `xs`.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    /// A trial of one of `faults`, at one of the moments it can hit; a stop lasts 50 ms
    /// to 1.5 s.
    pub fn trial(&mut self, faults: &[Fault]) -> Trial {
        let fault = self.pick(faults);
        self.trial_of(fault)
    }

    /// `n` trials: every one of `faults` once (so that each is exercised), then random ones.
    pub fn trials(&mut self, faults: &[Fault], n: usize) -> Vec<Trial> {
        let mut out: Vec<Trial> = faults.iter().map(|&f| self.trial_of(f)).collect();
        while out.len() < n {
            out.push(self.trial(faults));
        }
        out
    }

    /// A trial of `fault`, at one of the moments it can hit.
    pub fn trial_of(&mut self, fault: Fault) -> Trial {
        let when = match fault {
            Fault::KillOld | Fault::StopOld => {
                self.pick(&[When::CandidateStarting, When::OldRetiring])
            }
            Fault::KillCandidate | Fault::StopCandidate => {
                self.pick(&[When::CandidateStarting, When::CandidatePromoted])
            }
            _ => When::CandidateStarting,
        };
        Trial {
            fault,
            when,
            stop_for: Duration::from_millis(50 + self.below(1450)),
        }
    }
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the old generation.
    KillOld,
    /// SIGKILL the candidate (kv-server: before it is promoted).
    KillCandidate,
    /// SIGSTOP the old generation, then SIGCONT it.
    StopOld,
    /// SIGSTOP the candidate, then SIGCONT it.
    StopCandidate,
    /// The new executable cannot be executed.
    FailedExec,
    /// The old generation writes a snapshot that is not JSON.
    CorruptSnapshot,
    /// The candidate never answers `restored` (baton's restore timeout fires).
    SlowRestore,
}

/// The faults for hello-http (stateless, with connection migration).
pub const HELLO_FAULTS: &[Fault] = &[
    Fault::KillOld,
    Fault::KillCandidate,
    Fault::StopOld,
    Fault::StopCandidate,
    Fault::FailedExec,
];

/// The faults for kv-server (stateful, with writers).
pub const KV_FAULTS: &[Fault] = &[
    Fault::KillCandidate,
    Fault::StopOld,
    Fault::StopCandidate,
    Fault::FailedExec,
    Fault::CorruptSnapshot,
    Fault::SlowRestore,
];

/// The moment of the upgrade a fault hits, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The candidate runs and is not promoted (starting, or restoring the state).
    CandidateStarting,
    /// The old generation is on its way out (quiesced for the snapshot, or draining).
    OldRetiring,
    /// The candidate was promoted (the old one may still drain).
    CandidatePromoted,
}

/// What one trial does.
#[derive(Debug, Clone, Copy)]
pub struct Trial {
    /// The fault.
    pub fault: Fault,
    /// When it hits.
    pub when: When,
    /// How long a SIGSTOP lasts.
    pub stop_for: Duration,
}

/// How one trial went.
#[derive(Debug, Clone)]
pub struct TrialReport {
    /// What it did.
    pub trial: Trial,
    /// What was injected, and on which pid (or why nothing was).
    pub injected: String,
    /// How the upgrade ended.
    pub outcome: String,
    /// Requests that failed during the trial (hello-http).
    pub failed_requests: u64,
    /// Broken invariants; empty when the trial passed.
    pub violations: Vec<String>,
}

impl fmt::Display for TrialReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} when {:?}: {}; {}; {} failed requests",
            self.trial.fault, self.trial.when, self.injected, self.outcome, self.failed_requests
        )?;
        if !self.violations.is_empty() {
            write!(f, "; VIOLATED: {}", self.violations.join("; "))?;
        }
        Ok(())
    }
}

/// The app under chaos: its baton and the scripts trials switch between.
struct Target {
    baton: Baton,
    app: App,
    base_fds: usize,
}

impl Target {
    async fn start(tag: &str, scripts: &[(&str, String)], args: &[&str]) -> Self {
        let dir = TestDir::new(tag).unwrap();
        let app = App::prepare_commands(&dir, scripts, "good");
        let mut all = vec!["--drain-timeout", "10s", "--ready-timeout", "5s"];
        all.extend_from_slice(args);
        let baton = Baton::start_in(dir, all, [&app.link]).await.unwrap();
        let base_fds = proc_fds(baton.pid()).map(|f| f.len()).unwrap_or(0);
        Target {
            baton,
            app,
            base_fds,
        }
    }

    /// Runs the upgrade with the fault injected when it reaches `t.when`.
    async fn upgrade(&self, t: &Trial, stateful: bool) -> (String, String) {
        let old = self.baton.status().await.unwrap().pid.unwrap();
        let script = match t.fault {
            Fault::FailedExec => "missing",
            Fault::SlowRestore => "slow",
            _ => "good",
        };
        self.app.select(script);
        let upgrade = async {
            match tokio::time::timeout(TRIAL_TIMEOUT, self.baton.upgrade_wait()).await {
                Err(_) => format!("no outcome within {TRIAL_TIMEOUT:?}"),
                Ok(Err(e)) => format!("upgrade failed: {e}"),
                Ok(Ok(UpgradeOutcome::Promoted(r))) => format!("promoted pid {:?}", r.pid),
                Ok(Ok(UpgradeOutcome::RolledBack { message })) => {
                    format!("rolled back: {}", message.lines().last().unwrap_or(""))
                }
            }
        };
        let (outcome, injected) = tokio::join!(upgrade, self.inject(t, old, stateful));
        self.app.select("good");
        (outcome, injected)
    }

    async fn inject(&self, t: &Trial, old: u32, stateful: bool) -> String {
        if !matches!(
            t.fault,
            Fault::KillOld | Fault::KillCandidate | Fault::StopOld | Fault::StopCandidate
        ) {
            return "nothing to inject (a bad release)".into();
        }
        let Some(candidate) = self.reach(old, t.when).await else {
            return format!("missed: the upgrade ended before {:?}", t.when);
        };
        // A promoted stateful generation holds the only copy of the state: never killed.
        if stateful && t.fault == Fault::KillCandidate && t.when == When::CandidatePromoted {
            return "skipped: a promoted stateful generation is never killed".into();
        }
        let pid = match t.fault {
            Fault::KillOld | Fault::StopOld => old,
            _ => candidate,
        };
        match t.fault {
            Fault::KillOld | Fault::KillCandidate => {
                let hit = signal_pid(pid, Signal::SIGKILL).unwrap_or(false);
                format!(
                    "SIGKILL pid {pid}{}",
                    if hit { "" } else { " (already gone)" }
                )
            }
            _ => {
                if !signal_pid(pid, Signal::SIGSTOP).unwrap_or(false) {
                    return format!("pid {pid} gone before SIGSTOP");
                }
                // The fault's own length, not a wait for an event.
                tokio::time::sleep(t.stop_for).await;
                let _ = signal_pid(pid, Signal::SIGCONT);
                format!("SIGSTOP pid {pid} for {} ms", t.stop_for.as_millis())
            }
        }
    }

    /// Polls status until the upgrade from `old` reaches `when`; the candidate's pid, or
    /// None when the upgrade ended first.
    async fn reach(&self, old: u32, when: When) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen_upgrading = false;
        while Instant::now() < deadline {
            let s = self.baton.status().await.ok()?;
            seen_upgrading |= s.upgrading;
            let cand = s.generations.iter().find(|g| g.pid != old);
            let old_phase = s.generations.iter().find(|g| g.pid == old).map(|g| g.phase);
            if let Some(c) = cand {
                let starting = matches!(c.phase, Phase::Starting | Phase::Restoring);
                let hit = match when {
                    When::CandidateStarting => starting,
                    When::OldRetiring => {
                        matches!(old_phase, Some(Phase::Quiesced | Phase::Draining))
                    }
                    When::CandidatePromoted => s.pid == Some(c.pid),
                };
                if hit {
                    return Some(c.pid);
                }
                if when == When::CandidateStarting && !starting {
                    return None;
                }
            } else if seen_upgrading && !s.upgrading {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    }

    /// The invariants once the dust settles: one active generation, status consistent, no
    /// process left but the active one's, baton's fds back to where they were.
    async fn settled(&self) -> Vec<String> {
        let mut v = Vec::new();
        let s = match self.baton.wait_settled(TRIAL_TIMEOUT).await {
            Ok(s) => s,
            Err(e) => return vec![format!("did not settle: {e}")],
        };
        let active = s.generations[0].pid;
        if !pid_alive(active) {
            v.push(format!("status shows pid {active}, which is not alive"));
        }
        let mut allowed: BTreeSet<u32> = descendants(active).into_iter().collect();
        allowed.insert(active);
        let extra: Vec<u32> = generation_tree(self.baton.pid())
            .into_iter()
            .filter(|p| !allowed.contains(p))
            .collect();
        if !extra.is_empty() {
            v.push(format!("processes left behind: {extra:?}"));
        }
        let fds = proc_fds(self.baton.pid()).map(|f| f.len()).unwrap_or(0);
        // A few control connections may still be closing.
        if fds > self.base_fds + 4 {
            v.push(format!(
                "baton holds {fds} fds, {} at the start",
                self.base_fds
            ));
        }
        v
    }
}

/// Whether `fault` takes down a process that serves requests (their in-flight requests
/// may fail: at most one per client).
fn kills(fault: Fault) -> bool {
    matches!(fault, Fault::KillOld | Fault::KillCandidate)
}

fn expect_rollback(t: &Trial, outcome: &str, v: &mut Vec<String>) {
    let must = matches!(
        t.fault,
        Fault::FailedExec | Fault::CorruptSnapshot | Fault::SlowRestore
    );
    if must && !outcome.starts_with("rolled back") {
        v.push(format!("a bad release was not rolled back: {outcome}"));
    }
}

/// hello-http under baton with migrating keep-alive and fresh clients.
pub struct HelloChaos {
    target: Target,
    load: LoadHandle,
    slow: LoadHandle,
    clients: u64,
}

impl HelloChaos {
    /// Starts baton, hello-http and the load.
    pub async fn start() -> Self {
        let hello = hello_http_bin().unwrap();
        let scripts = [
            // A candidate takes 200 ms to say READY: a window to hit it in.
            (
                "good",
                format!("'{}' --label chaos --ready-delay 200ms", hello.display()),
            ),
            ("missing", "/nonexistent/hello-http".to_owned()),
        ];
        let target =
            Target::start("chaos-hello", &scripts, &["--listen", "http=127.0.0.1:0"]).await;
        let addr = target.baton.tcp_addr("http").await.unwrap();
        let opts = LoadOpts {
            keepalive: 4,
            fresh: 2,
            ..LoadOpts::default()
        };
        // Requests of 100 ms keep an old generation draining: a window to hit it in.
        let slow_opts = LoadOpts {
            keepalive: 2,
            fresh: 0,
            path: "/sleep?ms=100".into(),
            ..LoadOpts::default()
        };
        let clients = (opts.keepalive + opts.fresh + slow_opts.keepalive) as u64;
        let load = LoadGen::start(addr, opts);
        let slow = LoadGen::start(addr, slow_opts);
        load.wait_until(Duration::from_secs(10), |s| s.ok >= 100)
            .await
            .unwrap();
        HelloChaos {
            target,
            load,
            slow,
            clients,
        }
    }

    /// One trial and its invariants.
    pub async fn trial(&mut self, t: Trial) -> TrialReport {
        let before = (self.load.snapshot(), self.slow.snapshot());
        let (outcome, injected) = self.target.upgrade(&t, false).await;
        let mut violations = self.target.settled().await;
        expect_rollback(&t, &outcome, &mut violations);
        // The survivor serves.
        let ok = self.load.snapshot().ok;
        if let Err(s) = self
            .load
            .wait_until(TRIAL_TIMEOUT, |s| s.ok >= ok + 50)
            .await
        {
            violations.push(format!("no progress after the trial: {s:?}"));
        }
        let after = (self.load.snapshot(), self.slow.snapshot());
        let failed = after.0.failed + after.1.failed - before.0.failed - before.1.failed;
        let refused_of =
            |s: &crate::load::LoadSnapshot| s.failures.get(FailureKind::ConnectRefused);
        let refused = refused_of(&after.0) + refused_of(&after.1)
            - refused_of(&before.0)
            - refused_of(&before.1);
        if refused > 0 {
            violations.push(format!("{refused} connections refused"));
        }
        let allowed = if kills(t.fault) { self.clients } else { 0 };
        if failed > allowed {
            violations.push(format!(
                "{failed} requests failed ({}; slow: {}), at most {allowed} may",
                after.0.failures, after.1.failures
            ));
        }
        TrialReport {
            trial: t,
            injected,
            outcome,
            failed_requests: failed,
            violations,
        }
    }

    /// Stops the load: the fast and the slow clients' reports.
    pub async fn finish(self) -> (LoadReport, LoadReport) {
        (self.load.stop().await, self.slow.stop().await)
    }
}

/// kv-server under `baton run --state` with writers that check every acknowledged write.
pub struct KvChaos {
    target: Target,
    writers: Writers,
    addr: SocketAddr,
}

impl KvChaos {
    /// Starts baton, kv-server and the writers.
    pub async fn start(writers: usize) -> Self {
        let kv = kv_server_bin().unwrap();
        let kv = kv.display();
        let scripts = [
            // A candidate takes 200 ms to start: a window to hit it in.
            (
                "good",
                format!("sh -c 'sleep 0.2; exec \"$0\" \"$@\"' '{kv}' --schema 2"),
            ),
            (
                "corrupt",
                format!("'{kv}' --schema 2 --no-precopy --fault corrupt-snapshot"),
            ),
            (
                "slow",
                format!("'{kv}' --schema 2 --fault hang-during-restore"),
            ),
            ("missing", "/nonexistent/kv-server".to_owned()),
        ];
        let target = Target::start(
            "chaos-kv",
            &scripts,
            &[
                "--state",
                "--listen",
                "kv=127.0.0.1:0",
                "--snapshot-timeout",
                "5s",
                "--restore-timeout",
                "3s",
            ],
        )
        .await;
        let addr = target.baton.tcp_addr("kv").await.unwrap();
        let mut writers = Writers::start(addr, writers);
        writers.wait_progress(20, "kv chaos start").await;
        KvChaos {
            target,
            writers,
            addr,
        }
    }

    /// One trial and its invariants (the writes are checked in [`finish`](Self::finish)).
    pub async fn trial(&mut self, t: Trial) -> TrialReport {
        if t.fault == Fault::CorruptSnapshot {
            // The corrupt snapshot comes from the old generation: make one that writes it.
            self.target.app.select("corrupt");
            let setup = self.target.baton.upgrade_wait().await;
            self.target.app.select("good");
            if !matches!(setup, Ok(UpgradeOutcome::Promoted(_))) {
                return TrialReport {
                    trial: t,
                    injected: "none".into(),
                    outcome: format!("{setup:?}"),
                    failed_requests: 0,
                    violations: vec![format!(
                        "setting up the faulty generation failed: {setup:?}"
                    )],
                };
            }
            let _ = self.target.baton.wait_settled(TRIAL_TIMEOUT).await;
        }
        let (outcome, injected) = self.target.upgrade(&t, true).await;
        let mut violations = self.target.settled().await;
        expect_rollback(&t, &outcome, &mut violations);
        if tokio::time::timeout(
            TRIAL_TIMEOUT,
            self.writers.wait_progress(5, "after a trial"),
        )
        .await
        .is_err()
        {
            violations.push("the writers made no progress after the trial".into());
        }
        TrialReport {
            trial: t,
            injected,
            outcome,
            failed_requests: 0,
            violations,
        }
    }

    /// Stops the writers and checks that every acknowledged write is there; the
    /// violations, if any.
    pub async fn finish(self) -> (String, Vec<String>) {
        let logs = self.writers.stop().await;
        let totals = crate::kv::totals(&logs);
        let mut v = Vec::new();
        for l in &logs {
            if !l.errors.is_empty() || !l.violations.is_empty() || l.lost_applied > 0 {
                v.push(format!(
                    "writer {}: errors {:?}, violations {:?}, {} ran with the reply lost",
                    l.id, l.errors, l.violations, l.lost_applied
                ));
            }
        }
        if v.is_empty() {
            // Panics, naming the key, if an acknowledged write is missing.
            crate::kv::verify_writes(self.addr, &logs, 0, "after the chaos trials").await;
        }
        (totals, v)
    }
}
