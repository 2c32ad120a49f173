//! The state round trip: dry-run snapshots of A, of B (in its own schema and in A's),
//! and of A again, compared exactly.

use std::path::Path;

use super::Rehearsal;
use super::diff;
use super::private::{PrivateBaton, Snap};
use super::report::Outcome;

impl Rehearsal<'_> {
    /// Step 3; returns whether A is the active generation after it.
    pub(super) fn round_trip(&mut self, baton: &PrivateBaton, a_snap: Snap) -> bool {
        let t = self.timeout();
        let av = a_snap.taken.version;
        self.report.step(
            "snapshot A",
            Outcome::Pass,
            format!(
                "schema {av}, {} (dry run)",
                crate::text::size(a_snap.taken.size)
            ),
            &[("schema", av.into()), ("bytes", a_snap.taken.size.into())],
        );
        if self.args.no_downgrade {
            self.report.step(
                "state round trip",
                Outcome::Skip,
                "--no-downgrade: B's state is not compared with A's (that needs B → A)",
                &[],
            );
            return true;
        }
        if !self.upgrade(baton, &self.b.clone(), "A → B, no load") {
            return true;
        }
        match baton.snapshot(None, t) {
            Ok(s) => self.report.step(
                "B's state",
                Outcome::Pass,
                format!(
                    "restored: schema {}, {}",
                    s.taken.version,
                    crate::text::size(s.taken.size)
                ),
                &[
                    ("schema", s.taken.version.into()),
                    ("bytes", s.taken.size.into()),
                ],
            ),
            Err(e) => self
                .report
                .step("B's state", Outcome::Fail, why_not(&e), &[]),
        };
        let down = match baton.snapshot(Some(av), t) {
            Ok(s) => {
                let drops = if s.taken.dropped.is_empty() {
                    "declares no drops".to_string()
                } else {
                    format!("declared drops: {}", s.taken.dropped.join(", "))
                };
                self.report.step(
                    &format!("B writes schema {av}"),
                    Outcome::Pass,
                    format!("{}; {drops}", crate::text::size(s.taken.size)),
                    &[
                        ("bytes", s.taken.size.into()),
                        ("dropped", s.taken.dropped.clone().into()),
                    ],
                );
                Some(s)
            }
            Err(e) => {
                self.report.step(
                    &format!("B writes schema {av}"),
                    Outcome::Fail,
                    format!("B refuses its down-migration: {}", why_not(&e)),
                    &[],
                );
                None
            }
        };
        if let Some(down) = &down {
            self.compare(
                "state check: B kept A's state",
                &a_snap,
                down,
                &down.taken.dropped,
            );
        }
        let back = self.upgrade(baton, &self.a.clone(), "B → A, no load");
        if !back {
            return false;
        }
        match baton.snapshot(None, t) {
            Ok(a2) => {
                let dropped = down.map(|d| d.taken.dropped).unwrap_or_default();
                self.compare(
                    "state check: A → B → A gives A's state back",
                    &a_snap,
                    &a2,
                    &dropped,
                );
            }
            Err(e) => {
                self.report.step(
                    "state check: A → B → A",
                    Outcome::Fail,
                    format!("{e:#}"),
                    &[],
                );
            }
        }
        true
    }

    fn compare(&mut self, name: &str, before: &Snap, after: &Snap, declared: &[String]) {
        let mut rules = diff::Rules {
            dropped: self.args.dropped.clone(),
            unordered: self.args.unordered.clone(),
        };
        rules.dropped.extend(declared.iter().cloned());
        let listed = if rules.dropped.is_empty() {
            String::new()
        } else {
            format!(" (left out: {})", rules.dropped.join(", "))
        };
        let verdict = match &self.args.compare {
            Some(cmd) => external_compare(cmd, &self.dir, before, after),
            None => match (&before.json, &after.json) {
                (Some(b), Some(a)) => diff::first_difference(b, a, &rules).map(|d| d.to_string()),
                _ if before.bytes == after.bytes => None,
                _ => Some(
                    "the snapshots are not JSON and their bytes differ (give --compare CMD)".into(),
                ),
            },
        };
        match verdict {
            None => self.report.step(
                name,
                Outcome::Pass,
                format!("equal{listed}"),
                &[("dropped", rules.dropped.into())],
            ),
            Some(d) => self.report.step(
                name,
                Outcome::Fail,
                format!("first difference: {d}"),
                &[("difference", d.clone().into())],
            ),
        };
    }
}

/// A refused snapshot's reason, without the socket path and wrapping that precede it.
fn why_not(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    match s.split_once("cannot take a snapshot: ") {
        Some((_, why)) => why.to_string(),
        None => s,
    }
}

/// `--compare CMD`: `CMD BEFORE AFTER`, exit 0 when they hold the same state; else the
/// first line of its output is the difference.
fn external_compare(cmd: &str, dir: &Path, before: &Snap, after: &Snap) -> Option<String> {
    let (b, a) = (dir.join("before.json"), dir.join("after.json"));
    if let Err(e) =
        std::fs::write(&b, &before.bytes).and_then(|()| std::fs::write(&a, &after.bytes))
    {
        return Some(format!("cannot write the snapshots for --compare: {e}"));
    }
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{cmd} \"$1\" \"$2\""))
        .arg("sh")
        .arg(&b)
        .arg(&a);
    crate::sys::die_with_parent(&mut command, nix::sys::signal::Signal::SIGKILL);
    let out = command.output();
    match out {
        Ok(o) if o.status.success() => None,
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            Some(format!(
                "{cmd}: {}: {}",
                o.status,
                text.lines().next().unwrap_or("")
            ))
        }
        Err(e) => Some(format!("cannot run --compare {cmd:?}: {e}")),
    }
}
