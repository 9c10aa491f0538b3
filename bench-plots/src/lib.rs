//! PNG charts of the benchmarks' figures, for `BENCHMARKS.md`: grouped bars (latency percentiles
//! per path) and lines on log-log axes (a cost against a size). The benchmarks call these at the
//! end of a full run; the charts go to [`plots_dir`].
//!
//! Text is drawn with plotters' pure-Rust rasterizer (ab_glyph) and Debian's DejaVu Sans
//! ([`FONT`], package `fonts-dejavu-core`, which `scripts/setup.sh` installs): no system font
//! library is linked.
use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use plotters::{
    coord::combinators::IntoLogRange,
    prelude::*,
    style::{FontStyle, register_font},
};

/// The font file the charts' text is drawn with.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const SIZE: (u32, u32) = (1000, 560);
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Where charts are written: `$KMESH_PLOTS_DIR`, else `target/plots` of the workspace.
pub fn plots_dir() -> PathBuf {
    std::env::var_os("KMESH_PLOTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest
                .parent()
                .unwrap_or(manifest)
                .join("target")
                .join("plots")
        })
}

/// One line of a [`log_log_lines`] chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One group of a [`grouped_bars`] chart: a value per measure.
pub struct BarGroup {
    pub name: String,
    pub values: Vec<f64>,
}

/// Registers the font once; the error names the package to install.
fn font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| {
                format!("the charts' font {FONT} (Debian package fonts-dejavu-core): {e}")
            })?;
            // Leaked once: plotters keeps registered fonts for the process's life.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT} is not a font plotters can read"))
        })
        .clone()
}

fn prepare(path: &Path) -> Result<(), String> {
    font()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

/// A chart of `series` as lines with points, both axes logarithmic, written to `path` (PNG).
pub fn log_log_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), String> {
    prepare(path)?;
    let points = || series.iter().flat_map(|s| s.points.iter());
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let xs: Vec<f64> = points().map(|p| p.0).filter(|v| positive(*v)).collect();
    let ys: Vec<f64> = points().map(|p| p.1).filter(|v| positive(*v)).collect();
    let (Some(x), Some(y)) = (range(&xs), range(&ys)) else {
        return Err(format!("{title}: no positive points to draw"));
    };
    let err = |e: DrawingAreaErrorKind<_>| format!("{}: {e}", path.display());
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (x.0 / 1.5..x.1 * 1.5).log_scale(),
            (y.0 / 1.5..y.1 * 1.5).log_scale(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| compact(*v))
        .y_label_formatter(&|v| compact(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let line: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| positive(p.0) && positive(p.1))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    legend(&mut chart).map_err(|e| format!("{}: {e}", path.display()))?;
    root.present().map_err(err)
}

/// Grouped bars on a logarithmic y axis: for each of `groups`, one bar per measure (`measures`
/// names them, in the legend), written to `path` (PNG).
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    measures: &[&str],
    groups: &[BarGroup],
) -> Result<(), String> {
    prepare(path)?;
    let values: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.values.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let Some(y) = range(&values) else {
        return Err(format!("{title}: no positive values to draw"));
    };
    let err = |e: DrawingAreaErrorKind<_>| format!("{}: {e}", path.display());
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let width = groups.len() as f64;
    let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..width, (y.0 / 2.0..y.1 * 2.0).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            // Name each group at its middle.
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-9 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .y_label_formatter(&|v| compact(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(err)?;
    let bar = 0.8 / measures.len().max(1) as f64;
    for (m, measure) in measures.iter().enumerate() {
        let color = PALETTE[m % PALETTE.len()];
        let bottom = y.0 / 2.0;
        let bars = groups.iter().enumerate().filter_map(move |(g, group)| {
            let v = *group.values.get(m)?;
            let left = g as f64 + 0.1 + m as f64 * bar;
            (v > 0.0)
                .then(|| Rectangle::new([(left, bottom), (left + bar * 0.9, v)], color.filled()))
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(*measure)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    legend(&mut chart).map_err(|e| format!("{}: {e}", path.display()))?;
    root.present().map_err(err)
}

/// The series' legend, in the upper left corner.
fn legend<'a, 'b: 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, CT>,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())
}

/// An axis label: `1k`, `100k`, `1M` for round thousands and millions, else at most two
/// significant decimals.
fn compact(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if v >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 && (v / 1e3).fract() == 0.0 {
        format!("{}k", v / 1e3)
    } else if v >= 10.0 {
        trim(format!("{v:.0}"))
    } else {
        trim(format!("{v:.2}"))
    }
}

fn range(values: &[f64]) -> Option<(f64, f64)> {
    let lo = values.iter().copied().reduce(f64::min)?;
    let hi = values.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kmesh-plots-{}-{name}", std::process::id()))
    }

    /// Both charts render to PNG files (the signature of PNG first) with the installed font.
    #[test]
    fn charts_are_png_files() {
        let lines = temp("lines.png");
        log_log_lines(
            &lines,
            "apply",
            "services",
            "ms",
            &[Series {
                name: "total".into(),
                points: vec![(1e3, 57.4), (1e4, 151.9), (1e5, 1299.3)],
            }],
        )
        .unwrap();
        let bars = temp("bars.png");
        grouped_bars(
            &bars,
            "latency",
            "µs",
            &["p50", "p99"],
            &[
                BarGroup {
                    name: "direct".into(),
                    values: vec![55.0, 2780.0],
                },
                BarGroup {
                    name: "mesh".into(),
                    values: vec![56.0, 3650.0],
                },
            ],
        )
        .unwrap();
        for path in [lines, bars] {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
                "{}",
                path.display()
            );
            assert!(bytes.len() > 5_000, "{} is nearly empty", path.display());
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn axis_labels_are_compact() {
        let labels: Vec<String> = [1e3, 1e4, 1e5, 1e6, 2.5e6, 150.0, 1.5, 0.25, 10.0]
            .into_iter()
            .map(compact)
            .collect();
        assert_eq!(
            labels,
            [
                "1k", "10k", "100k", "1M", "2500k", "150", "1.5", "0.25", "10"
            ]
        );
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let path = temp("empty.png");
        let e = log_log_lines(&path, "empty", "x", "y", &[]).unwrap_err();
        assert!(e.contains("no positive points"), "{e}");
    }
}
