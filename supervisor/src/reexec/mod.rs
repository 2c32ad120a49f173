//! baton re-executing itself in place: the probe of the new executable, the
//! hand-over state, and the exec, in both directions (forward to the new
//! executable, and back to the previous one when the new one cannot take over).
//! The driver's side (what is handed over, and taking it back) is in
//! `supervise::reexec`.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use baton_protocol::BatonBuild;

use crate::release::exe::Exe;
use crate::sys;

pub mod build;
pub mod state;

pub use build::{ENV_PROBE, answer_probe, own_build};
pub use state::{ENV_FAILED, ENV_PREV, ENV_STATE, FORMAT, HandOver};

/// How long the new executable may take to answer the probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens baton's executable at `path` (re-resolved: after a package upgrade this
/// is the new file) and asks it about itself, running it the way the exec will.
///
/// # Errors
/// One line naming the executable: missing, not executable, not for this
/// machine, or its probe failed or does not read this baton's hand-over format.
pub async fn probe(path: PathBuf) -> Result<(Exe, BatonBuild), String> {
    let exe = Exe::open(&path)?;
    let name = path.display().to_string();
    // baton runs this as itself, often as root: nobody else may have placed it.
    let meta = exe
        .metadata()
        .map_err(|e| format!("new baton {name}: {e}"))?;
    let (euid, egid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    crate::release::store::owner::check_own_exec(&path, &meta, euid, egid)
        .map_err(|why| format!("new baton {why}"))?;
    exe.check_runs_here()
        .map_err(|why| format!("new baton {name}: {why}"))?;
    // Through baton's own fd: what answers is the file that will be exec'd.
    let via = format!("/proc/{}/fd/{}", std::process::id(), exe.fd().as_raw_fd());
    let mut cmd = tokio::process::Command::new(&via);
    cmd.arg0(&path)
        .env(ENV_PROBE, "1")
        .env_remove(ENV_STATE)
        .env_remove(ENV_PREV)
        .env_remove(ENV_FAILED)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
        Err(_) => {
            return Err(format!(
                "new baton {name} did not answer its probe in {PROBE_TIMEOUT:?}"
            ));
        }
        Ok(Err(e)) => return Err(format!("new baton {name} cannot run: {e}")),
        Ok(Ok(o)) => o,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let how = crate::text::exit_status(out.status);
        return Err(if first.is_empty() {
            format!("new baton {name} failed its probe ({how})")
        } else {
            format!(
                "new baton {name} failed its probe ({how}): {}",
                first.trim()
            )
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let p: build::Probe = serde_json::from_str(text.trim()).map_err(|e| {
        format!("new baton {name} answered its probe with something else ({e}): is it baton?")
    })?;
    if !(p.formats.0..=p.formats.1).contains(&FORMAT) {
        return Err(format!(
            "new baton {name} ({}) reads hand-over formats {} to {}, not {FORMAT}",
            p.version, p.formats.0, p.formats.1
        ));
    }
    Ok((
        exe,
        BatonBuild {
            version: p.version,
            build_id: p.build_id,
            exe: name,
        },
    ))
}

fn cstrings<'a>(items: impl Iterator<Item = &'a OsStr>) -> Result<Vec<CString>, String> {
    items
        .map(|a| CString::new(a.as_bytes()).map_err(|_| "NUL byte in argument".to_string()))
        .collect()
}

/// Checks, before taking anything, that a hand-over can be taken over: every
/// fd it names is open, and the machine decodes.
///
/// # Errors
/// What cannot be taken over.
pub fn check_takeover(state: &HandOver) -> Result<(), String> {
    if let Some(fd) = state.fds().into_iter().find(|fd| !sys::handed_fd_open(*fd)) {
        return Err(format!("handed-over fd {fd} is not open"));
    }
    machine(state)?;
    Ok(())
}

/// The machine a hand-over carries.
///
/// # Errors
/// It is malformed, or carries work under way.
pub fn machine(state: &HandOver) -> Result<baton_machine::Machine, String> {
    let carried: baton_machine::Carried = serde_json::from_value(state.machine.clone())
        .map_err(|e| format!("malformed hand-over: the machine: {e}"))?;
    baton_machine::Machine::resume(carried, &crate::clock::Mono)
        .map_err(|e| format!("malformed hand-over: the machine: {e}"))
}

/// baton's environment for the next image: its own, without reexec variables,
/// plus `extra`.
fn next_env(extra: &[(&str, String)]) -> Result<Vec<CString>, String> {
    let ours = [ENV_STATE, ENV_PREV, ENV_FAILED, ENV_PROBE];
    let mut env: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| !ours.iter().any(|o| OsStr::new(o) == k.as_os_str()))
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e
        })
        .collect();
    for (k, v) in extra {
        env.push(format!("{k}={v}").into_bytes());
    }
    env.into_iter()
        .map(|e| CString::new(e).map_err(|_| "NUL byte in the environment".to_string()))
        .collect()
}

/// Marks `fds` inheritable (or not) and the held signals blocked (or not): the
/// moment of an exec, and its undoing when the exec fails.
fn arm(fds: &[RawFd], on: bool) -> Result<(), String> {
    for fd in fds {
        sys::set_inheritable_raw(*fd, on).map_err(|e| format!("fd {fd}: {e}"))?;
    }
    sys::hold_signals(on).map_err(|e| format!("signal mask: {e}"))
}

/// Execs `exe` with `state`, handing over the fds it names and the previous
/// executable. Returns only when the exec failed, with everything as before.
pub fn exec_forward(exe: &Exe, state: &HandOver, argv: &[OsString]) -> String {
    let attempt = || -> Result<String, String> {
        let data = state.encode()?;
        let memfd = sys::sealed_memfd("baton-handover", &data)
            .map_err(|e| format!("cannot create the hand-over memfd: {e}"))?;
        let prev = File::open("/proc/self/exe")
            .map_err(|e| format!("cannot open baton's own executable: {e}"))?;
        let env = next_env(&[
            (ENV_STATE, memfd.as_raw_fd().to_string()),
            (ENV_PREV, prev.as_raw_fd().to_string()),
        ])?;
        let argv = cstrings(argv.iter().map(OsString::as_os_str))?;
        let mut fds = state.fds();
        fds.extend([memfd.as_raw_fd(), prev.as_raw_fd()]);
        arm(&fds, true)?;
        let err = sys::exec_self(exe.fd(), exe.script, &argv, &env);
        let _ = arm(&fds, false);
        Ok(format!("cannot exec {}: {err}", exe.path.display()))
    };
    match attempt() {
        Ok(e) | Err(e) => e,
    }
}

/// Until the take-over is done, a crash of this image (a fatal signal or a panic)
/// execs the previous executable back with the same hand-over, saying so.
///
/// # Errors
/// The handlers cannot be installed.
pub fn arm_crash_fallback(prev: &OwnedFd, memfd: &OwnedFd) -> Result<(), String> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let argv = cstrings(argv.iter().map(OsString::as_os_str))?;
    let state = memfd.as_raw_fd().to_string();
    sys::arm_crash_exec(prev.as_fd(), argv, |sig| {
        next_env(&[
            (ENV_STATE, state.clone()),
            (
                ENV_FAILED,
                format!("the new baton crashed while taking over ({sig})"),
            ),
        ])
        .unwrap_or_default()
    })
    .map_err(|e| format!("cannot arm the crash fallback: {e}"))
}

/// The new image cannot take over: exec the previous executable with the same
/// hand-over and the reason. Returns only when that failed too.
pub fn exec_back(
    prev: OwnedFd,
    memfd: &OwnedFd,
    fds: &[RawFd],
    argv: &[OsString],
    why: &str,
) -> String {
    let attempt = || -> Result<String, String> {
        let env = next_env(&[
            (ENV_STATE, memfd.as_raw_fd().to_string()),
            (ENV_FAILED, why.replace('\0', " ")),
        ])?;
        let argv = cstrings(argv.iter().map(OsString::as_os_str))?;
        let mut all = fds.to_vec();
        all.push(memfd.as_raw_fd());
        arm(&all, true)?;
        let mut head = [0u8; 2];
        let script = nix::sys::uio::pread(prev.as_fd(), &mut head, 0)
            .is_ok_and(|n| n == 2 && &head == b"#!");
        let err = sys::exec_self(prev.as_fd(), script, &argv, &env);
        let _ = arm(&all, false);
        Ok(format!("cannot exec the previous baton: {err}"))
    };
    match attempt() {
        Ok(e) | Err(e) => e,
    }
}
