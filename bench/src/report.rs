//! One result row per scenario (per state size for `stateful`): JSON lines or a table.
//!
//! A row keeps its keys in insertion order, so the JSON line and the table list them in
//! the order the scenario chose (the documented keys first, extras after).

use std::fmt::Write as _;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// A target a figure is held to. Targets come from the issue and are never loosened here.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Must equal the value.
    Eq(f64),
    /// Must be at most the value.
    Le(f64),
    /// Must be at least the value.
    Ge(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::Eq(t) => v == t,
            Target::Le(t) => v <= t,
            Target::Ge(t) => v >= t,
        }
    }

    fn describe(self) -> String {
        match self {
            Target::Eq(t) => format!("= {}", fmt_num(t)),
            Target::Le(t) => format!("<= {}", fmt_num(t)),
            Target::Ge(t) => format!(">= {}", fmt_num(t)),
        }
    }
}

/// baton's RSS ceiling in every scenario: 10 MB.
pub const RSS_TARGET_KB: Target = Target::Le(10.0 * 1024.0);

/// The result of one scenario run.
#[derive(Debug, Clone)]
pub struct Row {
    scenario: &'static str,
    fields: Vec<(String, Value)>,
    targets: Vec<(String, Target)>,
    notes: Vec<String>,
    failed_to_run: bool,
}

impl Row {
    /// An empty row for `scenario`.
    pub fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            fields: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
            failed_to_run: false,
        }
    }

    /// A row that says why the scenario could not be measured; no figures are invented.
    pub fn skipped(scenario: &'static str, reason: impl Into<String>) -> Self {
        let mut row = Self::new(scenario);
        row.set("skipped", reason.into());
        row
    }

    /// A row for a scenario that broke (baton died, a wait ran out, ...).
    pub fn error(scenario: &'static str, error: &anyhow::Error) -> Self {
        let mut row = Self::new(scenario);
        row.set("error", format!("{error:#}"));
        row.failed_to_run = true;
        row
    }

    /// Whether the scenario itself broke (as opposed to missing a target).
    pub fn failed_to_run(&self) -> bool {
        self.failed_to_run
    }

    /// Sets `key` (replacing an earlier value, keeping its position).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key.to_owned(), value)),
        }
        self
    }

    /// Sets a millisecond (or other fractional) figure, rounded to microseconds so the
    /// JSON does not carry meaningless digits.
    pub fn set_ms(&mut self, key: &str, ms: f64) -> &mut Self {
        self.set(key, round3(ms))
    }

    /// Holds `key` to `target` in the table.
    pub fn target(&mut self, key: &str, target: Target) -> &mut Self {
        self.targets.push((key.to_owned(), target));
        self
    }

    /// A line of explanation printed under the table (not part of the JSON).
    pub fn note(&mut self, text: impl Into<String>) -> &mut Self {
        self.notes.push(text.into());
        self
    }

    /// Whether this row says the scenario was skipped.
    pub fn is_skipped(&self) -> bool {
        self.fields.iter().any(|(k, _)| k == "skipped")
    }

    /// A figure of the row.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A numeric figure of the row.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// The keys whose value misses its target.
    pub fn missed(&self) -> Vec<String> {
        self.targets
            .iter()
            .filter(|(k, t)| self.get_f64(k).is_some_and(|v| !t.met(v)))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// One JSON object on one line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Only non-string map keys can fail, and every key here is a string.
            format!(
                r#"{{"scenario":"{}","error":"cannot serialise: {e}"}}"#,
                self.scenario
            )
        })
    }

    /// A human-readable block: one line per figure, with its target and verdict.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.scenario);
        let width = self
            .fields
            .iter()
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(0)
            .max(8);
        for (key, value) in &self.fields {
            let shown = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.as_f64().map(fmt_num).unwrap_or_else(|| n.to_string()),
                other => other.to_string(),
            };
            let mut line = format!("  {key:<width$}  {shown:>12}");
            if let Some((_, t)) = self.targets.iter().find(|(k, _)| k == key) {
                let verdict = match value.as_f64() {
                    Some(v) if t.met(v) => "ok",
                    Some(_) => "MISSED",
                    None => "n/a",
                };
                let _ = write!(line, "   target {:<10} {verdict}", t.describe());
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.fields.len() + 1))?;
        map.serialize_entry("scenario", self.scenario)?;
        for (k, v) in &self.fields {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Rounds to three decimals (microseconds when the unit is ms).
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Nearest-rank percentile of `values` (`q` in 0..=1); 0 for an empty set.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
    }

    #[test]
    fn rows_keep_order_and_judge_targets() {
        let mut row = Row::new("swap-under-load");
        row.set("requests", 10u64)
            .set("failed", 1u64)
            .target("failed", Target::Eq(0.0))
            .set_ms("upgrade_ms_p50", 1.234_567)
            .set("requests", 12u64);
        assert_eq!(
            row.json_line(),
            r#"{"scenario":"swap-under-load","requests":12,"failed":1,"upgrade_ms_p50":1.235}"#
        );
        assert_eq!(row.missed(), vec!["failed".to_owned()]);
        let table = row.table();
        assert!(table.contains("MISSED"), "{table}");
        let ok = Row::skipped("migration", "not yet");
        assert!(ok.missed().is_empty());
        assert_eq!(
            ok.json_line(),
            r#"{"scenario":"migration","skipped":"not yet"}"#
        );
    }
}
