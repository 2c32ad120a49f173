//! How baton words things that every layer reports: a time stamp, an exit status, a
//! value that must fit on one line.

/// Unix time now, in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "exit status 3" / "signal 9 (SIGKILL)".
pub fn exit_status(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => format!("signal {s} ({sig})"),
            Err(_) => format!("signal {s}"),
        },
        _ => "unknown status".into(),
    }
}

/// `s` on one line (STATUS=, a store result, a log field).
pub fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}
