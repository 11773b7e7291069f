//! SVG charts of runs and sweeps (plotters).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::report::RunResult;
use crate::sweep::{SweepResult, SweepStep};

/// A named series of a sweep chart: how to read its value off a step, and its colour.
type StepSeries = (&'static str, fn(&SweepStep) -> f64, RGBColor);

const SIZE: (u32, u32) = (960, 540);

fn err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// Percentile `p` (0..100) on a "nines" axis: 90 → 1, 99 → 2, 99.9 → 3.
fn nines(p: f64) -> f64 {
    -(1.0 - p / 100.0).max(1e-9).log10()
}

/// Charts of one run in `dir`: throughput over time and the latency percentile curve. Returns
/// the files written.
pub fn plot_run(r: &RunResult, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();

    let tput = dir.join(format!("{stem}-throughput.svg"));
    {
        let root = SVGBackend::new(&tput, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let per = &r.throughput.per_second_tx;
        let ymax = per.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "throughput ({} loop, mean {:.0} tx/s)",
                    r.config.mode(),
                    r.throughput.tx_per_s
                ),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..(per.len().max(1) as f64), 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("second of the measured window")
            .y_desc("tx/s")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                per.iter()
                    .enumerate()
                    .map(|(i, n)| (i as f64 + 0.5, *n as f64)),
                &BLUE,
            ))
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    written.push(tput);

    let lat = dir.join(format!("{stem}-latency.svg"));
    {
        let root = SVGBackend::new(&lat, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let ymax = r
            .latency_ms
            .values()
            .map(|l| l.max)
            .fold(0.0, f64::max)
            .max(0.001)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("latency by percentile", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..5.0, 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("ms")
            .x_label_formatter(&|x| {
                let p = 100.0 * (1.0 - 10f64.powf(-x));
                format!("{p:.3}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            })
            .draw()
            .map_err(err)?;
        for (i, (level, l)) in r.latency_ms.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    l.curve
                        .iter()
                        .filter(|[p, _]| *p < 100.0)
                        .map(|[p, ms]| (nines(*p), *ms)),
                    color,
                ))
                .map_err(err)?
                .label(format!("submit → {level}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    written.push(lat);
    Ok(written)
}

/// The throughput-versus-latency chart of a sweep in `dir`.
pub fn plot_sweep(s: &SweepResult, dir: &Path, stem: &str) -> Result<Vec<PathBuf>, String> {
    let path = dir.join(format!("{stem}-sweep.svg"));
    {
        let root = SVGBackend::new(&path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let xmax = s
            .steps
            .iter()
            .map(|t| t.achieved_tx_per_s.max(t.offered_tx_per_s))
            .fold(1.0, f64::max)
            * 1.1;
        let ymax = s
            .steps
            .iter()
            .map(|t| t.p99_ms)
            .fold(s.sweep.p99_max_ms, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                match s.sustainable_peak_tx_per_s {
                    Some(p) => format!("latency vs throughput (sustainable peak {p:.0} tx/s)"),
                    None => "latency vs throughput (no step held)".to_string(),
                },
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("achieved tx/s")
            .y_desc("ms")
            .draw()
            .map_err(err)?;
        let series: [StepSeries; 2] = [("p50", |t| t.p50_ms, BLUE), ("p99", |t| t.p99_ms, RED)];
        for (name, f, color) in series {
            let pts: Vec<(f64, f64)> = s
                .steps
                .iter()
                .map(|t| (t.achieved_tx_per_s, f(t)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, s.sweep.p99_max_ms), (xmax, s.sweep.p99_max_ms)],
                BLACK.mix(0.5),
            ))
            .map_err(err)?
            .label("p99 bound")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(vec![path])
}

/// Charts for a result file (`baton-perf run` or `sweep` output) in `dir`, named after the file.
pub fn plot_file(file: &Path, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let stem = file
        .file_stem()
        .map_or("result".into(), |s| s.to_string_lossy().into_owned());
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if value.get("steps").is_some() {
        let s: SweepResult =
            serde_json::from_value(value).map_err(|e| format!("{}: {e}", file.display()))?;
        plot_sweep(&s, dir, &stem)
    } else {
        let r: RunResult =
            serde_json::from_value(value).map_err(|e| format!("{}: {e}", file.display()))?;
        plot_run(&r, dir, &stem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{judge, SweepConfig};

    #[test]
    fn charts_of_a_run_and_a_sweep_are_svg_files_with_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let r = crate::report::sample_result(1_000.0, 4.0, 0);
        let run_file = dir.path().join("run.json");
        std::fs::write(&run_file, serde_json::to_string(&r).unwrap()).unwrap();
        let files = plot_file(&run_file, &dir.path().join("charts")).unwrap();
        assert_eq!(files.len(), 2);
        for f in &files {
            let svg = std::fs::read_to_string(f).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("<polyline"),
                "{}",
                f.display()
            );
        }
        assert!(std::fs::read_to_string(&files[0]).unwrap().contains("tx/s"));

        let cfg = SweepConfig {
            start_tx_per_s: 500.0,
            factor: 2.0,
            steps_max: 3,
            p99_max_ms: 5.0,
            error_ratio_max: 0.0,
            achieved_min_ratio: 0.95,
        };
        let steps = vec![
            judge(&cfg, 500.0, &crate::report::sample_result(500.0, 1.0, 0)),
            judge(
                &cfg,
                1_000.0,
                &crate::report::sample_result(1_000.0, 9.0, 0),
            ),
        ];
        let s = SweepResult {
            tool: String::new(),
            sweep: cfg,
            run: r.config.clone(),
            machine: r.machine.clone(),
            sustainable_peak_tx_per_s: crate::sweep::peak(&steps),
            steps,
            stopped: "p99".into(),
        };
        let sweep_file = dir.path().join("sweep.json");
        std::fs::write(&sweep_file, serde_json::to_string(&s).unwrap()).unwrap();
        let files = plot_file(&sweep_file, dir.path()).unwrap();
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.contains("sustainable peak 500 tx/s"), "{svg}");
        assert!(plot_file(&dir.path().join("missing.json"), dir.path()).is_err());
    }
}
