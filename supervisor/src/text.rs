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

/// A byte count as people read it: `120 B`, `4.0 KiB`, `1.28 GiB` (three significant
/// digits). `--json` keeps the exact count.
pub fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let digits = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    format!("{v:.digits$} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.00 KiB");
        assert_eq!(size(1_376_919_383), "1.28 GiB");
        assert_eq!(size(120 << 20), "120 MiB");
        assert_eq!(size(u64::MAX), "16384 PiB");
    }
}
