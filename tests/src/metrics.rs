//! Scraping baton's `/metrics` and reading it with a real Prometheus parser (the
//! Python client's strict OpenMetrics parser, in the venv `scripts/install-test-deps`
//! makes).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use crate::harness::fixture;

/// One sample.
#[derive(Debug, Clone, Deserialize)]
pub struct Sample {
    /// Its name (`baton_upgrades_total`, `..._bucket`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One family.
#[derive(Debug, Clone, Deserialize)]
pub struct Family {
    /// Its name.
    pub name: String,
    /// counter, gauge, histogram, info, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Its samples.
    pub samples: Vec<Sample>,
}

/// Parsed metrics.
#[derive(Debug, Clone)]
pub struct Scrape(pub Vec<Family>);

impl Scrape {
    /// The family named `name`.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.0.iter().find(|f| f.name == name)
    }

    /// The value of sample `name` with exactly `labels` (0 when absent).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map_or(0.0, |s| s.value)
    }
}

/// The venv's python, or why there is none.
pub fn venv_python() -> Result<PathBuf, String> {
    let py = crate::venv::venv_tool("python")?;
    let ok = Command::new(&py)
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(py)
    } else {
        Err(format!(
            "{} has no prometheus_client (run scripts/install-test-deps)",
            py.display()
        ))
    }
}

/// `GET /metrics` at `addr`: status and body.
pub fn scrape_text(addr: SocketAddr) -> (u16, String, Option<String>) {
    let r = crate::http::http_get(addr, "/metrics", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
    let ctype = r.header("content-type").map(str::to_owned);
    (r.status, r.body, ctype)
}

/// Parses OpenMetrics `text` with the Python parser; panics (with the text) if it
/// is malformed.
pub fn parse(python: &PathBuf, text: &str) -> Scrape {
    let mut child = Command::new(python)
        .arg(fixture("parse_openmetrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    child
        .stdin
        .take()
        .map(|mut i| i.write_all(text.as_bytes()))
        .transpose()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the metrics: {}\n--- text\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Scrape(serde_json::from_slice(&out.stdout).unwrap())
}
