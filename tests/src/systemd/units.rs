//! The shipped unit files as text: entries, values and checked substitutions.

use std::fs;
use std::net::TcpListener;
use std::time::Duration;

use super::*;

/// The assignments of one section of a unit file, in order, with `\`-continued lines
/// joined the way systemd joins them.
pub fn unit_entries(text: &str, section: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_section = false;
    let mut pending: Option<String> = None;
    for raw in text.lines() {
        if let Some(mut acc) = pending.take() {
            let line = raw.trim();
            if line.starts_with('#') || line.starts_with(';') {
                pending = Some(acc);
                continue;
            }
            match line.strip_suffix('\\') {
                Some(head) => {
                    acc.push(' ');
                    acc.push_str(head.trim());
                    pending = Some(acc);
                }
                None => {
                    acc.push(' ');
                    acc.push_str(line);
                    push_entry(&mut out, &acc);
                }
            }
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_section = line == format!("[{section}]");
            continue;
        }
        if !in_section {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending = Some(head.trim().to_owned()),
            None => push_entry(&mut out, line),
        }
    }
    out
}

pub fn push_entry(out: &mut Vec<(String, String)>, line: &str) {
    if let Some((k, v)) = line.split_once('=') {
        let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push((k.trim().to_owned(), v));
    }
}

/// The last value of `key` in `[section]`; panics if there is none.
pub fn unit_value(text: &str, file: &str, section: &str, key: &str) -> String {
    unit_entries(text, section)
        .into_iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{file}: no {key}= in [{section}]"))
}

pub fn read_shipped(file: &str) -> String {
    let path = systemd_dir().join(file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `value` with every `(from, to)` applied; each `from` must occur, so that a change to
/// the shipped unit shows up here as a failure rather than as a silently stale test.
pub fn substitute(file: &str, key: &str, value: &str, subs: &[(&str, &str)]) -> String {
    let mut out = value.to_owned();
    for (from, to) in subs {
        assert!(
            out.contains(from),
            "{file}: {key}= no longer contains {from:?} (the systemd tests derive their \
             drop-ins from it; update tests/tests/systemd.rs): {value}"
        );
        out = out.replace(from, to);
    }
    out
}

/// The value following `flag` in a command line (`--flag VALUE`).
pub fn flag_value<'a>(cmdline: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = cmdline.split_whitespace();
    while let Some(w) = words.next() {
        if w == flag {
            return words.next();
        }
        if let Some(v) = w.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

pub fn duration(file: &str, what: &str, s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{file}: {what} {s:?}: {e}"))
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}
