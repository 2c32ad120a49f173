//! `baton release ...`: on a running baton through the control socket, or on the
//! store itself with `--releases DIR`.
//!
//! `add` always copies with the caller's own rights (the client writes the store,
//! never baton on its behalf), so a control-socket user can never make baton
//! read a file it could not read itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_protocol::{
    ControlReply, ControlRequest, Release, ReleaseReply, ReleaseRequest, ReleaseResultKind,
    ReleaseStatus, WaitFor,
};

use super::conn;
use crate::cli::args::{ReleaseArgs, ReleaseOp};
use crate::release::store::Store;

/// Runs one `baton release` command.
///
/// # Errors
/// The command failed; the message says why, in one line.
pub fn run(a: ReleaseArgs) -> anyhow::Result<ExitCode> {
    match a.releases {
        Some(dir) => offline(&dir, a.op, a.json),
        None => online(a.control, a.op, a.json),
    }
}

fn offline(dir: &Path, op: ReleaseOp, json: bool) -> anyhow::Result<ExitCode> {
    let create = matches!(op, ReleaseOp::Add { .. });
    let store = Store::open(dir, create)?;
    match op {
        ReleaseOp::Add {
            version,
            path,
            mv,
            program,
        } => add(&store, &version, &path, mv, program.as_deref(), json),
        ReleaseOp::Check { version, preflight } => {
            let meta = store.read()?;
            let exe = crate::release::lifecycle::open_exe(&store, &meta, &version)
                .map_err(anyhow::Error::msg)?;
            exe.check_runs_here()
                .map_err(|why| anyhow::anyhow!("release {version} cannot run here: {why}"))?;
            let mut out = String::new();
            if let Some(cmd) = preflight {
                let vars = crate::release::health::Vars {
                    exe: exe.path.display().to_string(),
                    version: version.clone(),
                    dir: store.release_dir(&version).display().to_string(),
                    pid: String::new(),
                };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the runtime")?;
                let (ok, text) = rt.block_on(crate::release::health::run_command(
                    &vars.expand(&cmd),
                    Duration::from_secs(30),
                ));
                if !ok {
                    bail!("preflight of {version} {text}");
                }
                out = text;
            }
            print_done(json, "checked", &version, &out, &[])
        }
        ReleaseOp::Install { .. } | ReleaseOp::Rollback { .. } => bail!(
            "installing needs a running baton: drop --releases to use its control socket (or start one with 'baton run --releases {}')",
            dir.display()
        ),
        ReleaseOp::Permanent { version } => {
            store.update(|m| {
                if let Some(u) = m.in_use.as_ref().filter(|u| crate::sys::pid_alive(u.pid)) {
                    return Err(crate::release::store::StoreError(format!(
                        "baton (pid {}) runs this store: ask it through its control socket (drop --releases)",
                        u.pid
                    )));
                }
                m.set_permanent(&version)?;
                m.record(&version, "permanent", true, "made permanent by hand, offline");
                Ok(())
            })?;
            print_done(json, "permanent", &version, "", &store.read()?.releases)
        }
        ReleaseOp::List => {
            let list = crate::release::lifecycle::newest_first(store.read()?.releases);
            print_list(json, &list)
        }
        ReleaseOp::Remove { version } => {
            store.remove(&version, &[])?;
            print_done(json, "removed", &version, "", &store.read()?.releases)
        }
    }
}

fn add(
    store: &Store,
    version: &str,
    path: &Path,
    mv: bool,
    program: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let r = store.add(version, path, mv, program)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "added {} ({}), sha256 {}",
            r.version,
            r.status.as_str(),
            r.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn online(control: Option<PathBuf>, op: ReleaseOp, json: bool) -> anyhow::Result<ExitCode> {
    let (req, timeout) = match op {
        ReleaseOp::Add {
            version,
            path,
            mv,
            program,
        } => {
            // The store is the running baton's; the copy is ours.
            let s = conn::status(control.clone(), Duration::from_secs(10))?;
            let Some(r) = s.releases else {
                bail!("this baton runs without a release store (start it with --releases DIR)");
            };
            let store = Store::open(Path::new(&r.store), false)?;
            return add(&store, &version, &path, mv, program.as_deref(), json);
        }
        ReleaseOp::Check { version, preflight } => {
            if preflight.is_some() {
                bail!(
                    "--preflight is for --releases DIR; a running baton uses its own (baton run --preflight)"
                );
            }
            (ReleaseRequest::Check { version }, None)
        }
        ReleaseOp::Install {
            version,
            newest,
            wait,
            promoted,
        } => {
            let version = match (version, newest) {
                (Some(v), _) => v,
                (None, _) => match newest_to_install(control.clone())? {
                    Some(v) => v,
                    None => return Ok(ExitCode::SUCCESS),
                },
            };
            let wait = match (wait, promoted) {
                (true, _) => WaitFor::Permanent,
                (_, true) => WaitFor::Promoted,
                _ => WaitFor::Nothing,
            };
            (ReleaseRequest::Install { version, wait }, None)
        }
        ReleaseOp::Permanent { version } => (
            ReleaseRequest::Permanent { version },
            Some(Duration::from_secs(30)),
        ),
        ReleaseOp::Rollback { wait } => {
            let wait = if wait {
                WaitFor::Permanent
            } else {
                WaitFor::Nothing
            };
            (ReleaseRequest::Rollback { wait }, None)
        }
        ReleaseOp::List => (ReleaseRequest::List, Some(Duration::from_secs(30))),
        ReleaseOp::Remove { version } => (
            ReleaseRequest::Remove { version },
            Some(Duration::from_secs(30)),
        ),
    };
    let list = matches!(req, ReleaseRequest::List);
    let waits_for_probation = matches!(
        req,
        ReleaseRequest::Install {
            wait: WaitFor::Permanent,
            ..
        } | ReleaseRequest::Rollback {
            wait: WaitFor::Permanent
        }
    );
    let progress = (waits_for_probation && !json)
        .then(|| crate::cli::observe::ProbationProgress::start(control.clone()));
    let asked = conn::ask(control, ControlRequest::Release(req), timeout);
    if let Some(p) = progress {
        p.finish();
    }
    let reply = match asked? {
        ControlReply::Release(r) => r,
        other => bail!("unexpected reply: {other:?}"),
    };
    if list {
        return print_list(json, &reply.releases);
    }
    report(json, &reply)
}

/// `install --newest`: the newest release, or `None` (said on stdout) when it is
/// the one running already.
fn newest_to_install(control: Option<PathBuf>) -> anyhow::Result<Option<String>> {
    let reply = match conn::ask(
        control,
        ControlRequest::Release(ReleaseRequest::List),
        Some(Duration::from_secs(30)),
    )? {
        ControlReply::Release(r) => r,
        other => bail!("unexpected reply: {other:?}"),
    };
    let Some(newest) = reply.releases.first() else {
        bail!("the store has no release");
    };
    match newest.status {
        ReleaseStatus::Permanent | ReleaseStatus::Current => {
            println!(
                "{}: the newest release is installed already",
                newest.version
            );
            Ok(None)
        }
        ReleaseStatus::Failed => bail!(
            "the newest release, {}, failed ({}): add a fixed one",
            newest.version,
            newest
                .last_result()
                .map(|r| r.detail.as_str())
                .unwrap_or("no details")
        ),
        _ => Ok(Some(newest.version.clone())),
    }
}

fn report(json: bool, r: &ReleaseReply) -> anyhow::Result<ExitCode> {
    let version = r.version.as_deref().unwrap_or("?");
    let failed = matches!(
        r.result,
        ReleaseResultKind::RolledBack
            | ReleaseResultKind::Reverted
            | ReleaseResultKind::RevertRefused
            | ReleaseResultKind::Interrupted
    );
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        let what = match r.result {
            ReleaseResultKind::Ok => "ok",
            ReleaseResultKind::Promoted => "promoted, on probation",
            ReleaseResultKind::Permanent => "permanent",
            ReleaseResultKind::RolledBack => "rolled back",
            ReleaseResultKind::Reverted => "reverted",
            ReleaseResultKind::RevertRefused => "failed, and the revert was refused",
            ReleaseResultKind::Interrupted => "not made permanent",
        };
        if failed {
            eprintln!("baton: {version} {what}: {}", r.detail);
        } else if r.detail.is_empty() {
            println!("{version}: {what}");
        } else if r.result == ReleaseResultKind::Ok {
            println!("{version}: {}", r.detail);
        } else {
            println!("{version}: {what}: {}", r.detail);
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_done(
    json: bool,
    what: &str,
    version: &str,
    detail: &str,
    releases: &[Release],
) -> anyhow::Result<ExitCode> {
    let r = ReleaseReply {
        result: ReleaseResultKind::Ok,
        version: Some(version.to_string()),
        detail: if detail.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {detail}")
        },
        releases: releases.to_vec(),
        upgrade: None,
    };
    report(json, &r)
}

fn print_list(json: bool, list: &[Release]) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<10} {:<20} {:<12} LAST RESULT",
        "VERSION", "STATUS", "ADDED", "SHA256"
    );
    for r in list {
        let added =
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.added));
        let last = r
            .last_result()
            .map(|l| {
                let ok = if l.ok { "ok" } else { "failed" };
                if l.detail.is_empty() {
                    format!("{} {ok}", l.action)
                } else {
                    format!("{} {ok}: {}", l.action, l.detail)
                }
            })
            .unwrap_or_default();
        let mark = if r.status == ReleaseStatus::Permanent {
            "*"
        } else {
            ""
        };
        println!(
            "{:<16} {:<10} {:<20} {:<12} {last}",
            format!("{}{mark}", r.version),
            r.status.as_str(),
            added.to_string(),
            &r.sha256[..r.sha256.len().min(12)],
        );
    }
    Ok(ExitCode::SUCCESS)
}
