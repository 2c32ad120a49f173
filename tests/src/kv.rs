//! kv-server under `baton run --state`: the wrapper scripts baton runs, and the writers that
//! check every acknowledged write across upgrades (see `tests/stateful_kv.rs` for how an
//! unanswered command is accounted for).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton_protocol::{UpgradeReport, UpgradeResult};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::harness::{
    Baton, TestDir, UpgradeOutcome, generation_pids, kv_server_bin, pid_alive, replace_symlink,
    wait_pid_gone, write_script,
};
use crate::resp::{Reply, RespClient, RespError};

/// Bound on one client command (connect included). A command sent while the old generation
/// is quiesced waits for the whole accept gap, which the abort cases stretch to the 2 s
/// timeouts, so this is far above anything legitimate.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one status-driven wait (settling, progress after an upgrade).
pub const WAIT: Duration = Duration::from_secs(30);

/// `<dir>/app` and the scripts it can point at.
pub struct App {
    pub link: PathBuf,
    pub dir: PathBuf,
}

impl App {
    /// Writes every wrapper script (kv-server with those arguments) into `dir` and points
    /// `app` at `initial`.
    pub fn prepare(dir: &TestDir, scripts: &[(&str, &str)], initial: &str) -> App {
        let kv = kv_server_bin().unwrap();
        let commands: Vec<(&str, String)> = scripts
            .iter()
            .map(|(name, args)| (*name, format!("'{}' {args}", kv.display())))
            .collect();
        Self::prepare_commands(dir, &commands, initial)
    }

    /// Writes a wrapper script `exec <command> "$@"` per entry into `dir` and points
    /// `app` at `initial`.
    pub fn prepare_commands(dir: &TestDir, scripts: &[(&str, String)], initial: &str) -> App {
        for (name, command) in scripts {
            write_script(
                &dir.join(format!("{name}.sh")),
                &format!("#!/bin/sh\nexec {command} \"$@\"\n"),
            )
            .unwrap();
        }
        let app = App {
            link: dir.join("app"),
            dir: dir.path().to_path_buf(),
        };
        app.select(initial);
        app
    }

    /// Points `app` at `<script>.sh` (atomically).
    pub fn select(&self, script: &str) {
        let target = self.dir.join(format!("{script}.sh"));
        assert!(target.is_file(), "no wrapper script {}", target.display());
        replace_symlink(&self.link, &target).unwrap();
    }
}

/// Starts `baton run --state --listen kv=127.0.0.1:0 <extra> -- <tmp>/app`, with `app` first
/// pointing at `initial`.
pub async fn start(
    tag: &str,
    scripts: &[(&str, &str)],
    initial: &str,
    extra: &[&str],
) -> (Baton, App, SocketAddr) {
    let dir = TestDir::new(tag).unwrap();
    let app = App::prepare(&dir, scripts, initial);
    let mut args = vec![
        "--state",
        "--listen",
        "kv=127.0.0.1:0",
        "--drain-timeout",
        "10s",
    ];
    if !extra.contains(&"--ready-timeout") {
        args.extend(["--ready-timeout", "20s"]);
    }
    args.extend_from_slice(extra);
    let baton = Baton::start_in(dir, args, [&app.link]).await.unwrap();
    let addr = baton.tcp_addr("kv").await.unwrap();
    (baton, app, addr)
}

/// Connects with a bound.
pub async fn connect(addr: SocketAddr) -> RespClient<TcpStream> {
    tokio::time::timeout(CMD_TIMEOUT, RespClient::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

/// One command with a bound; the connection must stay up.
pub async fn command<A: AsRef<[u8]>>(c: &mut RespClient<TcpStream>, args: &[A]) -> Reply {
    let mut shown = args
        .iter()
        .take(6)
        .map(|a| String::from_utf8_lossy(&a.as_ref()[..a.as_ref().len().min(40)]).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    if args.len() > 6 {
        shown.push_str(&format!(" ... ({} arguments)", args.len()));
    }
    tokio::time::timeout(CMD_TIMEOUT, c.command(args))
        .await
        .unwrap_or_else(|_| panic!("`{shown}`: no reply within {CMD_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("`{shown}`: {e}"))
}

/// `INFO` on a fresh connection, as `field -> value`.
pub async fn info(addr: SocketAddr) -> BTreeMap<String, String> {
    let mut c = connect(addr).await;
    let reply = command(&mut c, &["INFO"]).await;
    let text = reply
        .as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|| panic!("INFO answered {reply}"));
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// The pid that serves a fresh connection, from `INFO`.
pub async fn serving_pid(addr: SocketAddr) -> u32 {
    let info = info(addr).await;
    info.get("process_id")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("INFO without process_id: {info:?}"))
}

/// `baton upgrade --wait`, which must promote a new pid; waits until the old generation has
/// exited and returns the report.
pub async fn upgrade_promoted(baton: &Baton, what: &str) -> UpgradeReport {
    let before = baton.status().await.unwrap();
    let old = before.pid.expect("an active generation before the upgrade");
    let (report, _) = crate::upgrade::upgrade_promoted(baton, what).await;
    let new = report
        .pid
        .unwrap_or_else(|| panic!("{what}: no pid: {report:?}"));
    assert_ne!(new, old, "{what}: same pid after promotion");
    crate::upgrade::wait_replaced(baton, old, new, WAIT, what).await;
    report
}

/// `baton upgrade --wait`, which must roll back. Checks that the old generation stays active
/// and the candidate is gone; returns the rollback's `last_upgrade` and the CLI's message.
pub async fn upgrade_rolled_back(baton: &Baton, what: &str) -> (UpgradeReport, String) {
    let before = baton.status().await.unwrap();
    let old = before.pid.expect("an active generation before the upgrade");
    let message = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::RolledBack { message } => message,
        UpgradeOutcome::Promoted(r) => panic!("{what}: promoted instead of rolled back: {r:?}"),
    };
    assert!(!message.is_empty(), "{what}: rollback without a message");
    let after = baton.status().await.unwrap();
    let last = after
        .last_upgrade
        .clone()
        .unwrap_or_else(|| panic!("{what}: no last_upgrade after a rollback: {after:?}"));
    assert_eq!(last.result, UpgradeResult::RolledBack, "{what}: {last:?}");
    assert_eq!(
        after.pid,
        Some(old),
        "{what}: the old generation must stay active"
    );
    assert_eq!(after.generation, before.generation, "{what}");
    if let Some(candidate) = last.pid {
        assert_ne!(candidate, old, "{what}");
        wait_pid_gone(candidate, WAIT).await.unwrap();
    }
    let settled = baton.wait_settled(WAIT).await.unwrap();
    assert_eq!(generation_pids(&settled), vec![old], "{what}");
    assert!(pid_alive(old), "{what}");
    (last, message)
}

pub fn reason(report: &UpgradeReport) -> String {
    report.reason.clone().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------------------

/// What one writer did: every acknowledged write and every anomaly.
#[derive(Debug, Default)]
pub struct WriterLog {
    pub id: usize,
    /// Steps completed (one acknowledged INCR and one acknowledged SET each).
    pub steps: u64,
    /// `n` of every `SET w{id}:{n} n` answered `+OK`.
    pub acked_sets: Vec<u64>,
    /// SETs whose reply was lost but that ran (found by GET). Must stay empty.
    pub applied_unacked: Vec<u64>,
    /// The last INCR reply.
    pub last_incr: i64,
    /// Commands sent whose connection closed before the reply.
    pub unanswered: u64,
    /// Of those, how many ran anyway (their reply was dropped). Must be 0.
    pub lost_applied: u64,
    /// Connections the server closed.
    pub reconnects: u64,
    /// INCR replies that skipped or repeated a value.
    pub violations: Vec<String>,
    /// Anything else: resets, refused connections, timeouts, error replies. Fatal.
    pub errors: Vec<String>,
}

/// How one command went.
pub enum Sent {
    Reply(Reply),
    /// The server closed the connection (clean EOF) before the reply.
    Lost,
}

/// Sends one command on the writer's connection (connecting first if needed).
/// `Err` is fatal for the writer: a reset, a refused connection, a timeout.
pub async fn send(
    conn: &mut Option<RespClient<TcpStream>>,
    addr: SocketAddr,
    args: &[&str],
    log: &mut WriterLog,
) -> Result<Sent, String> {
    let c = match conn {
        Some(c) => c,
        None => {
            let c = tokio::time::timeout(CMD_TIMEOUT, RespClient::connect(addr))
                .await
                .map_err(|_| format!("connect: no answer within {CMD_TIMEOUT:?}"))?
                .map_err(|e| format!("connect: {e}"))?;
            conn.insert(c)
        }
    };
    match tokio::time::timeout(CMD_TIMEOUT, c.command(args)).await {
        Err(_) => Err(format!("{args:?}: no reply within {CMD_TIMEOUT:?}")),
        Ok(Ok(Reply::Error(e))) => Err(format!("{args:?}: error reply {e:?}")),
        Ok(Ok(reply)) => Ok(Sent::Reply(reply)),
        Ok(Err(RespError::Eof)) => {
            *conn = None;
            log.reconnects += 1;
            Ok(Sent::Lost)
        }
        Ok(Err(e)) => Err(format!("{args:?}: {e}")),
    }
}

/// One writer: `INCR c{id}` then `SET w{id}:{n} n`, step after step, until `stop`.
pub async fn writer(
    id: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> WriterLog {
    let mut log = WriterLog {
        id,
        ..WriterLog::default()
    };
    if let Err(e) = writer_loop(id, addr, &stop, &progress, &mut log).await {
        log.errors.push(e);
    }
    log
}

pub async fn writer_loop(
    id: usize,
    addr: SocketAddr,
    stop: &AtomicBool,
    progress: &AtomicU64,
    log: &mut WriterLog,
) -> Result<(), String> {
    let counter = format!("c{id}");
    let mut conn = None;
    // INCRs sent whose reply was lost and that are not yet accounted for.
    let mut incr_unresolved = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let n = log.steps + 1;

        // INCR: resend until a reply comes; the reply resolves the lost ones.
        loop {
            match send(&mut conn, addr, &["INCR", &counter], log).await? {
                Sent::Lost => {
                    log.unanswered += 1;
                    incr_unresolved += 1;
                }
                Sent::Reply(Reply::Integer(v)) => {
                    let expected = log.last_incr + 1;
                    let ran_unacked = v - expected;
                    if (0..=incr_unresolved).contains(&ran_unacked) {
                        log.lost_applied += u64::try_from(ran_unacked).unwrap_or(0);
                    } else {
                        log.violations.push(format!(
                            "INCR {counter}: reply {v} after {} \
                             ({incr_unresolved} unanswered before it)",
                            log.last_incr
                        ));
                    }
                    log.last_incr = v;
                    incr_unresolved = 0;
                    break;
                }
                Sent::Reply(other) => return Err(format!("INCR {counter}: answered {other}")),
            }
        }

        // SET: on a lost reply, GET tells whether it ran; if not, send it again.
        let key = format!("w{id}:{n}");
        let value = n.to_string();
        'set: loop {
            match send(&mut conn, addr, &["SET", &key, &value], log).await? {
                Sent::Reply(r) if r.is_ok() => {
                    log.acked_sets.push(n);
                    break 'set;
                }
                Sent::Reply(other) => return Err(format!("SET {key}: answered {other}")),
                Sent::Lost => {
                    log.unanswered += 1;
                    loop {
                        match send(&mut conn, addr, &["GET", &key], log).await? {
                            // A lost GET changes nothing: ask again.
                            Sent::Lost => {}
                            Sent::Reply(Reply::Bulk(None)) => continue 'set,
                            Sent::Reply(Reply::Bulk(Some(v))) if v == value.as_bytes() => {
                                log.lost_applied += 1;
                                log.applied_unacked.push(n);
                                break 'set;
                            }
                            Sent::Reply(other) => {
                                return Err(format!("GET {key} after a lost SET: {other}"));
                            }
                        }
                    }
                }
            }
        }
        log.steps = n;
        progress.store(n, Ordering::Relaxed);
    }
    Ok(())
}

/// A set of writer tasks on one address.
pub struct Writers {
    stop: Arc<AtomicBool>,
    progress: Vec<Arc<AtomicU64>>,
    tasks: Vec<JoinHandle<WriterLog>>,
}

impl Writers {
    pub fn start(addr: SocketAddr, n: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let tasks = progress
            .iter()
            .enumerate()
            .map(|(id, p)| tokio::spawn(writer(id, addr, Arc::clone(&stop), Arc::clone(p))))
            .collect();
        Writers {
            stop,
            progress,
            tasks,
        }
    }

    pub fn steps(&self) -> Vec<u64> {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits (bounded) until every writer has completed `more` steps from now. Fails at once
    /// with the writer's log if a writer stopped on an error.
    pub async fn wait_progress(&mut self, more: u64, what: &str) {
        let from = self.steps();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.tasks.iter().position(JoinHandle::is_finished) {
                let log = (&mut self.tasks[i]).await.expect("writer task panicked");
                panic!("{what}: writer {i} stopped: {log:#?}");
            }
            let now = self.steps();
            if now.iter().zip(&from).all(|(n, f)| *n >= f + more) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: writers did not complete {more} more steps within {WAIT:?}: \
                 steps then {from:?}, now {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every writer after its current step and returns the logs.
    pub async fn stop(self) -> Vec<WriterLog> {
        self.stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::new();
        for t in self.tasks {
            let log = tokio::time::timeout(CMD_TIMEOUT * 4, t)
                .await
                .expect("a writer did not stop")
                .expect("writer task panicked");
            logs.push(log);
        }
        logs
    }
}

/// Totals over every writer, for the report.
pub fn totals(logs: &[WriterLog]) -> String {
    let sum = |f: fn(&WriterLog) -> u64| logs.iter().map(f).sum::<u64>();
    format!(
        "{} steps, {} acknowledged SETs, {} reconnects, {} unanswered commands \
         (resolved as not run: {}), {} ran with their reply dropped",
        sum(|l| l.steps),
        sum(|l| l.acked_sets.len() as u64),
        sum(|l| l.reconnects),
        sum(|l| l.unanswered),
        sum(|l| l.unanswered - l.lost_applied),
        sum(|l| l.lost_applied),
    )
}

/// No writer saw an error, a skipped or repeated INCR value, or a dropped reply.
pub fn assert_clean(logs: &[WriterLog], what: &str) {
    for l in logs {
        assert!(
            l.errors.is_empty(),
            "{what}: writer {}: {:?}",
            l.id,
            l.errors
        );
        assert!(
            l.violations.is_empty(),
            "{what}: writer {}: INCR replies skipped or repeated: {:?}",
            l.id,
            l.violations
        );
        assert_eq!(
            l.lost_applied, 0,
            "{what}: writer {}: commands ran but their reply was dropped (SETs: {:?})",
            l.id, l.applied_unacked
        );
        assert!(
            l.steps > 0,
            "{what}: writer {} never completed a step",
            l.id
        );
    }
}

/// Every acknowledged write is in the keyspace, with its value, and nothing else is:
/// counters equal their last acknowledged INCR, every acknowledged SET key holds its value,
/// and DBSIZE is exactly the number of counters and acknowledged keys plus `other_keys`.
pub async fn verify_writes(
    addr: SocketAddr,
    logs: &[WriterLog],
    other_keys: u64,
    what: &str,
) -> u64 {
    let mut c = connect(addr).await;
    let mut keys = other_keys;
    for l in logs {
        let counter = format!("c{}", l.id);
        let got = command(&mut c, &["GET", counter.as_str()]).await;
        let want = l.last_incr.to_string();
        assert_eq!(
            got.as_bytes(),
            Some(want.as_bytes()),
            "{what}: counter {counter}: got {got}, last acknowledged INCR was {want}"
        );
        keys += 1;
        let acked: Vec<u64> = l
            .acked_sets
            .iter()
            .chain(&l.applied_unacked)
            .copied()
            .collect();
        for chunk in acked.chunks(500) {
            let mut args = vec!["MGET".to_owned()];
            args.extend(chunk.iter().map(|n| format!("w{}:{n}", l.id)));
            let reply = command(&mut c, &args).await;
            let Reply::Array(Some(values)) = reply else {
                panic!("{what}: MGET answered {reply}");
            };
            assert_eq!(values.len(), chunk.len(), "{what}");
            for (n, v) in chunk.iter().zip(&values) {
                let want = n.to_string();
                assert_eq!(
                    v.as_bytes(),
                    Some(want.as_bytes()),
                    "{what}: acknowledged key w{}:{n} lost or changed: {v}",
                    l.id
                );
            }
        }
        keys += acked.len() as u64;
    }
    let dbsize = command(&mut c, &["DBSIZE"]).await;
    assert_eq!(
        dbsize,
        Reply::Integer(i64::try_from(keys).unwrap()),
        "{what}: keys that no client wrote (or lost keys)"
    );
    keys
}
