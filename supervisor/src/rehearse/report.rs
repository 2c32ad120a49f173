//! A rehearsal's report: one row per step, as a table or one JSON object.

use std::time::Duration;

use serde::Serialize;

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It did what it should.
    Pass,
    /// It did not; the rehearsal fails.
    Fail,
    /// It did not run, for the reason given.
    Skip,
}

/// One step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What it is ("A → B under load").
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Its figures, or why it failed or was skipped, in one line.
    pub detail: String,
    /// The same figures, exact (for `--json`).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub figures: serde_json::Map<String, serde_json::Value>,
}

/// Every step so far.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// What was rehearsed.
    pub from: String,
    /// Into what.
    pub to: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Every step passed (or was skipped).
    pub passed: bool,
    /// Where the private baton's log was kept (`--keep`, or a failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
}

impl Report {
    /// Adds a step; `figures` as `(key, value)` pairs.
    pub fn step(
        &mut self,
        name: &str,
        outcome: Outcome,
        detail: impl Into<String>,
        figures: &[(&str, serde_json::Value)],
    ) -> Outcome {
        let detail = detail.into();
        if !matches!(outcome, Outcome::Skip) {
            tracing::info!(step = name, ?outcome, detail, "rehearse");
        }
        self.steps.push(Step {
            name: name.to_owned(),
            outcome,
            detail,
            figures: figures
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        });
        outcome
    }

    /// Whether a step failed so far.
    pub fn failed(&self) -> bool {
        self.steps.iter().any(|s| s.outcome == Outcome::Fail)
    }

    /// The table people read.
    pub fn text(&self) -> String {
        let width = self
            .steps
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = format!("baton rehearse: {} → {}\n", self.from, self.to);
        out.push_str(&format!("    {:width$}  RESULT  DETAIL\n", "STEP"));
        for (i, s) in self.steps.iter().enumerate() {
            let result = match s.outcome {
                Outcome::Pass => "pass",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            let pad = width - s.name.chars().count();
            out.push_str(&format!(
                "{:>2}  {}{}  {result:6}  {}\n",
                i + 1,
                s.name,
                " ".repeat(pad),
                s.detail
            ));
        }
        let (failed, total) = (
            self.steps
                .iter()
                .filter(|s| s.outcome == Outcome::Fail)
                .count(),
            self.steps.len(),
        );
        if failed == 0 {
            out.push_str(&format!("passed: {total} steps, none failed\n"));
        } else {
            out.push_str(&format!("FAILED: {failed} of {total} steps\n"));
        }
        if let Some(k) = &self.kept {
            out.push_str(&format!("the private baton's files are kept in {k}\n"));
        }
        out
    }
}

/// `1.2 s`, `35 ms`.
pub fn took(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_says_what_failed() {
        let mut r = Report {
            from: "a".into(),
            to: "b".into(),
            ..Report::default()
        };
        r.step("A starts", Outcome::Pass, "ready in 3 ms", &[]);
        r.step("state check", Outcome::Fail, "/state/x is missing", &[]);
        let t = r.text();
        assert!(
            t.contains(" 1  A starts     pass    ready in 3 ms\n"),
            "{t}"
        );
        assert!(
            t.contains(" 2  state check  FAIL    /state/x is missing\n"),
            "{t}"
        );
        assert!(t.ends_with("FAILED: 1 of 2 steps\n"), "{t}");
        assert!(r.failed());
    }
}
