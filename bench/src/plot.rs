//! `--plot DIR`: SVG timelines of a run (plotters): requests/s and p99 latency per
//! 100 ms, with every upgrade shaded, so a zero-failure swap shows at a glance.

use std::path::Path;

use baton_tests::load::Slot;
use plotters::prelude::*;

/// One upgrade on the timeline, in seconds since the load started.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// When it was asked for.
    pub from: f64,
    /// When its outcome came.
    pub to: f64,
}

/// Writes `DIR/<name>.svg`: requests/s (top) and p99 latency (bottom) per slot,
/// failed requests in red, upgrades shaded.
///
/// # Errors
/// The file cannot be written.
pub fn timeline(
    dir: &Path,
    name: &str,
    title: &str,
    slots: &[Slot],
    spans: &[Span],
) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.svg"));
    draw(&path, title, slots, spans)?;
    Ok(path)
}

fn draw(path: &Path, title: &str, slots: &[Slot], spans: &[Span]) -> anyhow::Result<()> {
    // The last slot is cut short by the end of the run: it would show as a false dip.
    let slots = &slots[..slots.len().saturating_sub(1)];
    let root = SVGBackend::new(path, (1100, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(300);
    let secs = slots.last().map_or(1.0, |s| s.t_ms as f64 / 1000.0 + 0.1);
    let slot_s = 0.1;
    let rps: Vec<(f64, f64)> = slots
        .iter()
        .map(|s| (s.t_ms as f64 / 1000.0, s.requests as f64 / slot_s))
        .collect();
    let failed: Vec<(f64, f64)> = slots
        .iter()
        .filter(|s| s.failed > 0)
        .map(|s| (s.t_ms as f64 / 1000.0, s.failed as f64 / slot_s))
        .collect();
    let p99: Vec<(f64, f64)> = slots
        .iter()
        .filter(|s| s.requests > 0)
        .map(|s| (s.t_ms as f64 / 1000.0, s.p99_us as f64 / 1000.0))
        .collect();
    let max_rps = rps.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let max_p99 = p99.iter().map(|p| p.1).fold(0.1, f64::max) * 1.15;
    let shade = RGBColor(255, 200, 80).mix(0.35).filled();
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("{e}");

    let mut c = ChartBuilder::on(&top)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..secs, 0.0..max_rps)
        .map_err(err)?;
    c.configure_mesh()
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("requests/s (per 100 ms)")
        .x_desc("s")
        .draw()
        .map_err(err)?;
    c.draw_series(
        spans
            .iter()
            .map(|s| Rectangle::new([(s.from, 0.0), (s.to.max(s.from + 0.02), max_rps)], shade)),
    )
    .map_err(err)?
    .label("upgrade")
    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], shade));
    c.draw_series(LineSeries::new(rps, BLUE.stroke_width(1)))
        .map_err(err)?
        .label("requests/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLUE));
    c.draw_series(failed.iter().map(|p| Circle::new(*p, 3, RED.filled())))
        .map_err(err)?
        .label(format!(
            "failed ({})",
            slots.iter().map(|s| s.failed).sum::<u64>()
        ))
        .legend(|(x, y)| Circle::new((x + 7, y), 3, RED.filled()));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;

    let mut c = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..secs, 0.0..max_p99)
        .map_err(err)?;
    c.configure_mesh()
        .y_desc("p99 latency, ms")
        .x_desc("seconds since the load started")
        .draw()
        .map_err(err)?;
    c.draw_series(
        spans
            .iter()
            .map(|s| Rectangle::new([(s.from, 0.0), (s.to.max(s.from + 0.02), max_p99)], shade)),
    )
    .map_err(err)?;
    c.draw_series(LineSeries::new(p99, BLACK.stroke_width(1)))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// One line of [`by_size`]: a label and its (state MiB, gap ms) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Writes `DIR/<name>.svg`: the accept gap (log scale) against the state size, one line
/// per way of handing the state over.
///
/// # Errors
/// The file cannot be written.
pub fn by_size(
    dir: &Path,
    name: &str,
    title: &str,
    series: &[Series],
) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.svg"));
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow::anyhow!("{e}");
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let max_mb = points().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let max_ms = points().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let min_ms = points()
        .map(|p| p.1)
        .fold(f64::MAX, f64::min)
        .clamp(0.1, 1.0)
        / 2.0;
    let root = SVGBackend::new(&path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_mb, (min_ms..max_ms).log_scale())
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("state, MiB")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("accept gap p50, ms (log)")
        .y_label_formatter(&|v| format!("{v}"))
        .draw()
        .map_err(err)?;
    let colours = [RED, BLUE, RGBColor(0, 150, 0), MAGENTA];
    for (i, (label, pts)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        c.draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], colour));
        c.draw_series(pts.iter().map(|p| Circle::new(*p, 4, colour.filled())))
            .map_err(err)?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    drop(c);
    drop(root);
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_size_draws_every_series_with_its_label() {
        let dir = std::env::temp_dir().join(format!("baton-plot-size-{}", std::process::id()));
        let series = vec![
            (
                "one-shot".to_owned(),
                vec![(100.0, 300.0), (1000.0, 4000.0)],
            ),
            ("pre-copy".to_owned(), vec![(100.0, 8.0), (1000.0, 3.0)]),
        ];
        let path = by_size(&dir, "gap", "Accept gap", &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for want in ["Accept gap", "one-shot", "pre-copy", "state, MiB"] {
            assert!(svg.contains(want), "{want} missing");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn draws_the_title_the_lines_and_the_upgrades() {
        let dir = std::env::temp_dir().join(format!("baton-plot-{}", std::process::id()));
        let slots: Vec<Slot> = (0..50)
            .map(|i| Slot {
                t_ms: i * 100,
                requests: 2000,
                failed: u64::from(i == 20),
                p99_us: 1500,
            })
            .collect();
        let spans = [
            Span {
                from: 1.0,
                to: 1.02,
            },
            Span {
                from: 3.0,
                to: 3.05,
            },
        ];
        let path = timeline(&dir, "t", "a test run, 1 failed", &slots, &spans).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.contains("a test run, 1 failed"));
        assert!(svg.contains("failed (1)"), "the legend counts failures");
        assert!(svg.matches("<polyline").count() >= 2, "rps and p99 lines");
        // Two shaded upgrades in each panel, plus the legend's swatch.
        assert!(
            svg.matches("fill=\"#FFC850\"").count() >= 4,
            "the shaded upgrades"
        );
    }
}
