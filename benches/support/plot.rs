//! PNG charts for the benchmark report: grouped bars with min–max whiskers (medians over
//! runs), lines over N, and CDFs. Text is drawn with DejaVu Sans through ab_glyph, so no
//! system font library is linked (Debian's fonts-dejavu-core provides the file).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

pub const AGENT: RGBColor = RGBColor(214, 96, 77);
pub const AGENT_LIGHT: RGBColor = RGBColor(244, 165, 130);
pub const BRIDGE: RGBColor = RGBColor(33, 102, 172);
pub const BRIDGE_LIGHT: RGBColor = RGBColor(146, 197, 222);
pub const GREY: RGBColor = RGBColor(120, 120, 120);

const FONT: &str = "sans-serif";
const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let bytes = FONT_FILES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .unwrap_or_else(|| {
                panic!("no DejaVuSans.ttf in {FONT_FILES:?}: apt-get install fonts-dejavu-core")
            });
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_err() {
            panic!("DejaVuSans.ttf is not a usable font");
        }
    });
}

/// One bar: median with a whisker from min to max.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl From<crate::support::Summary> for Bar {
    fn from(s: crate::support::Summary) -> Bar {
        Bar {
            median: s.median,
            min: s.min,
            max: s.max,
        }
    }
}

pub struct Series {
    pub name: String,
    pub color: RGBColor,
    /// One entry per group (bars) or per x (lines).
    pub values: Vec<Option<Bar>>,
}

pub struct BarPanel {
    pub title: String,
    pub y_label: String,
    pub log_y: bool,
    pub groups: Vec<String>,
    pub series: Vec<Series>,
    /// Horizontal reference lines (value, label), e.g. a target.
    pub refs: Vec<(f64, String)>,
}

fn y_range(values: impl Iterator<Item = f64>, refs: &[(f64, String)], log: bool) -> (f64, f64) {
    let all: Vec<f64> = values
        .chain(refs.iter().map(|r| r.0))
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    let hi = all.iter().copied().fold(f64::MIN, f64::max);
    let lo = all.iter().copied().fold(f64::MAX, f64::min);
    if all.is_empty() {
        return (if log { 0.1 } else { 0.0 }, 1.0);
    }
    if log {
        let lo = 10f64.powf(lo.log10().floor());
        let hi = 10f64.powf((hi * 1.5).log10().ceil());
        (lo, hi)
    } else {
        (0.0, hi * 1.15)
    }
}

fn label_formatter(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Panels of grouped bars side by side in one PNG.
pub fn bars(
    path: &Path,
    title: &str,
    panels: &[BarPanel],
    size: (u32, u32),
) -> Result<(), Box<dyn std::error::Error>> {
    register_font();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 26))?;
    let areas = root.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let n = panel.groups.len().max(1);
        let values = panel.series.iter().flat_map(|s| {
            s.values
                .iter()
                .flatten()
                .flat_map(|b| [b.median, b.max, b.min])
        });
        let (lo, hi) = y_range(values, &panel.refs, panel.log_y);
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&panel.title, (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64);
        let groups = panel.groups.clone();
        let x_fmt = move |x: &f64| {
            let twice = (x * 2.0).round();
            if (x * 2.0 - twice).abs() < 1e-6 && twice as i64 % 2 == 1 {
                groups
                    .get(((x - 0.5).round()) as usize)
                    .cloned()
                    .unwrap_or_default()
            } else {
                String::new()
            }
        };
        let k = panel.series.len().max(1) as f64;
        let width = 0.8 / k;
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(2 * n + 1)
                    .x_label_formatter(&x_fmt)
                    .y_desc(panel.y_label.as_str())
                    .y_label_formatter(&label_formatter)
                    .label_style((FONT, 15))
                    .axis_desc_style((FONT, 16))
                    .draw()?;
                for (j, s) in panel.series.iter().enumerate() {
                    let color = s.color;
                    let rects: Vec<_> = s
                        .values
                        .iter()
                        .enumerate()
                        .filter_map(|(i, b)| b.map(|b| (i, b)))
                        .map(|(i, b)| {
                            let x0 = i as f64 + 0.1 + j as f64 * width;
                            Rectangle::new(
                                [(x0, lo), (x0 + width * 0.92, b.median.max(lo))],
                                color.filled(),
                            )
                        })
                        .collect();
                    chart
                        .draw_series(rects)?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                        });
                    let whiskers: Vec<_> = s
                        .values
                        .iter()
                        .enumerate()
                        .filter_map(|(i, b)| b.map(|b| (i, b)))
                        .filter(|(_, b)| b.max > b.min)
                        .map(|(i, b)| {
                            let xc = i as f64 + 0.1 + j as f64 * width + width * 0.46;
                            PathElement::new(
                                vec![(xc, b.min.max(lo)), (xc, b.max.max(lo))],
                                BLACK.stroke_width(2),
                            )
                        })
                        .collect();
                    chart.draw_series(whiskers)?;
                    let labels: Vec<_> = s
                        .values
                        .iter()
                        .enumerate()
                        .filter_map(|(i, b)| b.map(|b| (i, b)))
                        .map(|(i, b)| {
                            let xc = i as f64 + 0.1 + j as f64 * width;
                            Text::new(
                                label_formatter(&b.median),
                                (xc, b.max.max(b.median).max(lo)),
                                (FONT, 12).into_font().color(&BLACK).pos(
                                    plotters::style::text_anchor::Pos::new(
                                        plotters::style::text_anchor::HPos::Left,
                                        plotters::style::text_anchor::VPos::Bottom,
                                    ),
                                ),
                            )
                        })
                        .collect();
                    chart.draw_series(labels)?;
                }
                for (value, label) in &panel.refs {
                    let v = *value;
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(0.0, v), (n as f64, v)],
                            GREY.stroke_width(2),
                        )))?
                        .label(label.as_str())
                        .legend(|(x, y)| {
                            PathElement::new(vec![(x, y), (x + 14, y)], GREY.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FONT, 14))
                    .draw()?;
            }};
        }
        if panel.log_y {
            draw!(builder.build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())?);
        } else {
            draw!(builder.build_cartesian_2d(0f64..n as f64, lo..hi)?);
        }
    }
    root.present()?;
    Ok(())
}

pub struct CdfPanel {
    pub title: String,
    pub x_label: String,
    pub log_x: bool,
    /// (name, color, values)
    pub series: Vec<(String, RGBColor, Vec<f64>)>,
}

/// Empirical CDFs, one panel each.
pub fn cdfs(
    path: &Path,
    title: &str,
    panels: &[CdfPanel],
    size: (u32, u32),
) -> Result<(), Box<dyn std::error::Error>> {
    register_font();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 26))?;
    let areas = root.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let all = panel.series.iter().flat_map(|s| s.2.iter().copied());
        let (lo, hi) = y_range(all, &[], panel.log_x);
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&panel.title, (FONT, 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(56);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(panel.x_label.as_str())
                    .y_desc("fraction of streams")
                    .x_label_formatter(&label_formatter)
                    .label_style((FONT, 15))
                    .axis_desc_style((FONT, 16))
                    .draw()?;
                for (name, color, values) in &panel.series {
                    let mut v: Vec<f64> = values
                        .iter()
                        .copied()
                        .filter(|x| x.is_finite())
                        .map(|x| x.max(lo))
                        .collect();
                    if v.is_empty() {
                        continue;
                    }
                    v.sort_by(|a, b| a.total_cmp(b));
                    let n = v.len() as f64;
                    let mut points = Vec::with_capacity(v.len() * 2);
                    for (i, x) in v.iter().enumerate() {
                        points.push((*x, i as f64 / n));
                        points.push((*x, (i + 1) as f64 / n));
                    }
                    let c = *color;
                    chart
                        .draw_series(LineSeries::new(points, c.stroke_width(3)))?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(3))
                        });
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FONT, 14))
                    .draw()?;
            }};
        }
        if panel.log_x {
            draw!(builder.build_cartesian_2d((lo..hi).log_scale(), 0f64..1.0)?);
        } else {
            draw!(builder.build_cartesian_2d(lo..hi, 0f64..1.0)?);
        }
    }
    root.present()?;
    Ok(())
}
