//! `soak`: many upgrades under load (stateless, hello-http): 0 failed requests, and
//! baton's fd count, RSS and upgrade time flat. "Flat" is the least-squares slope per
//! 100 upgrades, so a leak of one fd or a few KiB per upgrade shows however noisy the
//! single figures are.

use crate::Bins;
use crate::report::{Row, Target};
use crate::swap::{self, Sample};

const SCENARIO: &str = "soak";

/// Runs the scenario: `swap-under-load`'s run, with trends.
pub async fn run(bins: &Bins, opts: &swap::Opts) -> anyhow::Result<Row> {
    let (mut row, samples) = swap::run_sampled(bins, opts, SCENARIO).await?;
    let slope = |f: fn(&Sample) -> f64| slope_per_100(&samples.iter().map(f).collect::<Vec<_>>());
    let first = samples.first().map(|s| s.fds).unwrap_or(0.0);
    let last = samples.last().map(|s| s.fds).unwrap_or(0.0);
    row.set("fds_first", first)
        .set("fds_last", last)
        .set_ms("fds_slope_per_100", slope(|s| s.fds))
        // Below one fd per 100 upgrades: no per-upgrade leak.
        .target("fds_slope_per_100", Target::Le(1.0))
        .set_ms("rss_kb_slope_per_100", slope(|s| s.rss_kb))
        // Below 64 KiB per 100 upgrades: nothing kept per upgrade beyond noise.
        .target("rss_kb_slope_per_100", Target::Le(64.0))
        .set_ms("upgrade_ms_slope_per_100", slope(|s| s.upgrade_ms));
    Ok(row)
}

/// Least-squares slope of `ys` against 0, 1, 2, ..., times 100.
pub fn slope_per_100(ys: &[f64]) -> f64 {
    let ys: Vec<(f64, f64)> = ys
        .iter()
        .enumerate()
        .filter(|(_, y)| y.is_finite())
        .map(|(i, y)| (i as f64, *y))
        .collect();
    let n = ys.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = ys.iter().map(|p| p.0).sum::<f64>() / n;
    let my = ys.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = ys.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = ys.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { 100.0 * sxy / sxx }
}

#[cfg(test)]
mod tests {
    use super::slope_per_100;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<f64> = (0..50).map(|i| 10.0 + 0.5 * i as f64).collect();
        assert!((slope_per_100(&line) - 50.0).abs() < 1e-9);
        let flat = [7.0, 8.0, 7.0, 8.0, 7.0, 8.0];
        assert!(slope_per_100(&flat).abs() < 20.0);
        assert_eq!(slope_per_100(&[1.0]), 0.0);
    }
}
