//! The chart, as a hand-written SVG, meant to be read in five seconds. Above, the rate
//! each tenant was granted over time (requests per simulated minute: the upstream's
//! clock, which `time_scale` compresses), with what it asked for (dotted) in its colour,
//! and one dashed line per distinct guarantee, naming its tenants. Below, each token's calls per window as a share of
//! its usable capacity (100 % = the limit minus the margin, as GetUsage and the metrics
//! count it), with the usable line and the upstream's limit, above which the upstream
//! would block.
//!
//! Series that coincide (three quiet tenants granted the same) are drawn once and named
//! together in the legend ("a, b, c"), rather than hiding under each other; token points
//! carry markers, so a token running exactly at 100 % stays visible on the usable line.
//! Elements: `<polyline class="tenant">` per tenant group with its `class="demand"`
//! beside it, `<polyline class="token">` per token group, each with `data-name` listing
//! its members; `<line class="reference">` for guarantees, usable and limit.
//!
//! Hand-written rather than drawn with a plotting crate (plotters): the chart is a few
//! lines, polylines and labels; as text it is tested element by element, and it adds
//! no dependency (plotters' SVG text needs a font stack to measure labels).
//!
//! The drawing pieces (series grouped when they coincide, panels with reference lines,
//! the legend) are shared with `tokenlease report`'s chart (`crate::report::chart`):
//! a panel's x axis is an [`XAxis`] of points and labelled ticks.

use std::fmt::Write;

use super::run::RunResult;

pub(crate) const WIDTH: f64 = 1000.0;
pub(crate) const PANEL_H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 250.0;
pub(crate) const TOP: f64 = 46.0;
pub(crate) const GAP: f64 = 80.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of the chart, for one or several members whose values coincide.
pub(crate) struct Series {
    pub names: Vec<String>,
    /// What the legend says after the names (the same for every member).
    pub summary: String,
    /// One value per point of the x axis (here: per window).
    pub values: Vec<f64>,
    /// Companion lines in the same colour: (class, dash pattern, values).
    pub companions: Vec<(&'static str, &'static str, Vec<f64>)>,
}

impl Series {
    fn label(&self) -> String {
        self.names.join(", ")
    }

    fn legend(&self) -> String {
        format!("{}: {}", self.label(), self.summary)
    }

    fn all_values(&self) -> impl Iterator<Item = f64> + '_ {
        self.values
            .iter()
            .chain(self.companions.iter().flat_map(|c| c.2.iter()))
            .copied()
    }
}

/// Merges series whose values (and companions) are equal, keeping the first's place.
pub(crate) fn group(series: Vec<Series>) -> Vec<Series> {
    let mut groups: Vec<Series> = vec![];
    for s in series {
        let same = |g: &&mut Series| {
            g.values == s.values
                && g.companions.len() == s.companions.len()
                && g.companions
                    .iter()
                    .zip(&s.companions)
                    .all(|(a, b)| a.2 == b.2)
        };
        match groups.iter_mut().find(|g| same(g)) {
            Some(g) => g.names.extend(s.names),
            None => groups.push(s),
        }
    }
    groups
}

/// A horizontal reference line: value, label, colour, and whether the label goes
/// below the line (so that two close lines keep their labels apart).
pub(crate) type Reference = (f64, String, &'static str, bool);

/// What one panel shows besides its series.
pub(crate) struct Panel<'a> {
    /// Vertical offset.
    pub top: f64,
    pub title: &'a str,
    /// The y axis' label.
    pub unit: &'a str,
    /// The class of its series' polylines.
    pub class: &'a str,
    /// Points get markers (tokens: a series on a reference line stays visible).
    pub markers: bool,
    pub references: Vec<Reference>,
}

/// A panel's x axis: `points` values, each drawn in the middle of its slot; `ticks`
/// label slot boundaries (0 = the left edge, `points` = the right one).
pub(crate) struct XAxis {
    pub points: usize,
    pub ticks: Vec<(f64, String)>,
    pub caption: String,
}

/// Geometry shared by a panel's elements.
struct Frame {
    top: f64,
    plot_w: f64,
    windows: f64,
    y_max: f64,
}

impl Frame {
    fn bottom(&self) -> f64 {
        self.top + PANEL_H
    }

    fn y(&self, v: f64) -> f64 {
        self.bottom() - PANEL_H * (v / self.y_max).clamp(0.0, 1.0)
    }

    /// One point per window, at the window's middle.
    fn points(&self, values: &[f64]) -> Vec<(f64, f64)> {
        (values.iter().enumerate())
            .map(|(w, v)| {
                (
                    LEFT + self.plot_w * (w as f64 + 0.5) / self.windows,
                    self.y(*v),
                )
            })
            .collect()
    }
}

fn polyline(out: &mut String, class: &str, name: &str, style: &str, points: &[(f64, f64)]) {
    let points: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = writeln!(
        out,
        r#"<polyline class="{class}" data-name="{}" fill="none" {style} points="{}"/>"#,
        escape(name),
        points.join(" ")
    );
}

/// Title, axes, grid, tick labels and axis labels.
fn axes(out: &mut String, p: &Panel, f: &Frame, x_axis: &XAxis) {
    let (top, bottom) = (f.top, f.bottom());
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        top - 14.0,
        escape(p.title)
    );
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#000"/><line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#000"/>"##,
        LEFT + f.plot_w
    );
    for i in 0..=4 {
        let v = f.y_max * f64::from(i) / 4.0;
        let y = bottom - PANEL_H * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{v:.0}</text>"##,
            LEFT + f.plot_w,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for (at, label) in &x_axis.ticks {
        let x = LEFT + f.plot_w * at / f.windows;
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            bottom + 16.0,
            escape(label)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text><text x="16" y="{:.1}" font-size="12" transform="rotate(-90 16 {:.1})" text-anchor="middle">{}</text>"#,
        LEFT + f.plot_w / 2.0,
        bottom + 34.0,
        escape(&x_axis.caption),
        top + PANEL_H / 2.0,
        top + PANEL_H / 2.0,
        escape(p.unit)
    );
}

/// Draws one panel: references first, so that series are drawn over them.
pub(crate) fn panel(out: &mut String, p: &Panel, series: &[Series], x_axis: &XAxis) {
    let max = (series.iter().flat_map(Series::all_values))
        .chain(p.references.iter().map(|r| r.0))
        .fold(0.0_f64, f64::max);
    let f = Frame {
        top: p.top,
        plot_w: WIDTH - LEFT - RIGHT,
        windows: x_axis.points.max(1) as f64,
        y_max: nice_ceiling(max.max(1.0) * 1.05),
    };
    axes(out, p, &f, x_axis);
    for (value, label, color, below) in &p.references {
        let y = f.y(*value);
        let text_y = if *below { y + 13.0 } else { y - 4.0 };
        let _ = writeln!(
            out,
            r#"<line class="reference" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="1" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="{color}">{}</text>"#,
            LEFT + f.plot_w,
            LEFT + f.plot_w - 4.0,
            text_y,
            escape(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let label = s.label();
        for (class, dash, values) in &s.companions {
            let style = format!(r#"stroke="{color}" stroke-width="1.2" stroke-dasharray="{dash}""#);
            polyline(out, class, &label, &style, &f.points(values));
        }
        let points = f.points(&s.values);
        let style = format!(r#"stroke="{color}" stroke-width="2.5""#);
        polyline(out, p.class, &label, &style, &points);
        if p.markers {
            for (x, y) in &points {
                let _ = writeln!(
                    out,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}" stroke="#fff"/>"##
                );
            }
        }
        legend_entry(out, f.top + 10.0 + 18.0 * i as f64, color, &s.legend());
    }
}

fn legend_entry(out: &mut String, y: f64, color: &str, label: &str) {
    let x = WIDTH - RIGHT + 16.0;
    let _ = writeln!(
        out,
        r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
        x + 20.0,
        x + 26.0,
        y + 4.0,
        escape(label)
    );
}

/// The first of 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^n at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if step * magnitude >= v {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn tenant_series(result: &RunResult) -> Vec<Series> {
    let per_min = 60.0 / result.window_secs;
    let rate = |counts: &[u64]| counts.iter().map(|c| *c as f64 * per_min).collect();
    let minutes = (f64::from(result.windows) * result.window_secs / 60.0).max(f64::MIN_POSITIVE);
    let tenants = result.tenants.iter().map(|t| Series {
        names: vec![t.id.clone()],
        summary: format!(
            "{:.0}/min of {:.0} asked",
            t.granted as f64 / minutes,
            t.asked as f64 / minutes
        ),
        values: rate(&t.granted_per_window),
        companions: vec![("demand", "2 3", rate(&t.asked_per_window))],
    });
    group(tenants.collect())
}

/// One dashed line per distinct guarantee, naming the tenants that have it (tenants of
/// one tier would otherwise draw the same line several times).
fn guarantee_lines(result: &RunResult) -> Vec<Reference> {
    let per_min = 60.0 / result.window_secs;
    let mut by_value: Vec<(u32, Vec<&str>)> = vec![];
    for t in result.tenants.iter().filter(|t| t.guaranteed > 0) {
        match by_value.iter_mut().find(|(g, _)| *g == t.guaranteed) {
            Some((_, names)) => names.push(&t.id),
            None => by_value.push((t.guaranteed, vec![&t.id])),
        }
    }
    (by_value.into_iter())
        .map(|(g, names)| {
            let value = f64::from(g) * per_min;
            let label = format!("guaranteed {value:.0}/min: {}", names.join(", "));
            (value, label, "#777", false)
        })
        .collect()
}

fn token_series(result: &RunResult) -> Vec<Series> {
    let usable = f64::from(result.usable.max(1));
    let within = |t: &super::run::TokenResult| t.accepted_per_window.iter().sum::<u64>() as f64;
    let capacity = usable * f64::from(result.windows.max(1));
    let tokens = result.tokens.iter().map(|t| Series {
        names: vec![t.id.clone()],
        summary: format!("{:.0} % avg", 100.0 * within(t) / capacity),
        values: (t.accepted_per_window.iter())
            .map(|a| 100.0 * *a as f64 / usable)
            .collect(),
        companions: vec![],
    });
    group(tokens.collect())
}

/// The SVG document's opening for a chart of `panels` panels, with its title.
pub(crate) fn document_start(title: &str, panels: usize) -> String {
    let height = TOP + panels as f64 * PANEL_H + (panels.max(1) - 1) as f64 * GAP + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="#fff"/>
<title>{}</title>"##,
        escape(title)
    );
    out
}

/// The run's time axis: a tick per window boundary in simulated minutes.
fn run_axis(result: &RunResult) -> XAxis {
    let windows = result.windows.max(1);
    let minutes = f64::from(windows) * result.window_secs / 60.0;
    XAxis {
        points: windows as usize,
        ticks: (0..=result.windows)
            .map(|i| {
                let at = f64::from(i);
                (at, format!("{:.1}", minutes * at / f64::from(windows)))
            })
            .collect(),
        caption: format!(
            "simulated minutes (the upstream's clock; the run took {:.0} s)",
            result.run_secs()
        ),
    }
}

/// The whole chart.
pub fn chart(result: &RunResult, title: &str) -> String {
    let mut out = document_start(title, 2);
    let x_axis = run_axis(result);
    let heading =
        format!("{title}: granted per tenant (solid), asked (dotted), guaranteed (dashed)");
    let rates = Panel {
        top: TOP,
        title: &heading,
        unit: "requests / simulated minute",
        class: "tenant",
        markers: false,
        references: guarantee_lines(result),
    };
    panel(&mut out, &rates, &tenant_series(result), &x_axis);
    let limit = 100.0 * f64::from(result.limit) / f64::from(result.usable.max(1));
    let utilization = Panel {
        top: TOP + PANEL_H + GAP,
        title: "calls per window, per token",
        unit: "% of usable capacity",
        class: "token",
        markers: true,
        references: vec![
            (
                100.0,
                format!("usable: {} per window = 100 %", result.usable),
                "#555",
                true,
            ),
            (
                limit,
                format!("upstream limit: {} ({limit:.0} %)", result.limit),
                "#c00",
                false,
            ),
        ],
    };
    panel(&mut out, &utilization, &token_series(result), &x_axis);
    out.push_str("</svg>\n");
    out
}
