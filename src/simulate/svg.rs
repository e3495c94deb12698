//! The chart, as a hand-written SVG: granted rate per tenant over time (requests per
//! real minute) above, utilization per token (% of the upstream limit) below. One
//! `<polyline class="tenant">` per tenant and one `<polyline class="token">` per token.

use std::fmt::Write;

use super::run::RunResult;

const WIDTH: f64 = 960.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const GAP: f64 = 70.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Series<'a> {
    name: &'a str,
    /// One value per window.
    values: Vec<f64>,
}

/// What one panel shows besides its series.
struct Panel<'a> {
    /// Vertical offset.
    top: f64,
    title: &'a str,
    /// The y axis' label.
    unit: &'a str,
    /// The class of its polylines.
    class: &'a str,
    /// A dashed horizontal line: (value, label).
    reference: Option<(f64, &'a str)>,
}

/// Draws one panel.
fn panel(out: &mut String, p: &Panel, series: &[Series], result: &RunResult) {
    let Panel {
        top,
        title,
        unit,
        class,
        reference,
    } = *p;
    let plot_w = WIDTH - LEFT - RIGHT;
    let windows = result.windows.max(1) as f64;
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .chain(reference.map(|r| r.0))
        .fold(0.0_f64, f64::max);
    let y_max = nice_ceiling(max.max(1.0));
    let bottom = top + PANEL_H;
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        top - 12.0,
        escape(title)
    );
    // Axes, grid and tick labels.
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#000"/><line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#000"/>"##,
        LEFT + plot_w
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let y = bottom - PANEL_H * f64::from(i) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{v:.0}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0
        );
    }
    let minutes = windows * result.window_secs / 60.0;
    for i in 0..=result.windows {
        let x = LEFT + plot_w * f64::from(i) / windows;
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{:.1}</text>"#,
            bottom + 16.0,
            minutes * f64::from(i) / windows
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">time (real minutes)</text><text x="16" y="{:.1}" font-size="12" transform="rotate(-90 16 {:.1})" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        bottom + 34.0,
        top + PANEL_H / 2.0,
        top + PANEL_H / 2.0,
        escape(unit)
    );
    if let Some((value, label)) = reference {
        let y = bottom - PANEL_H * (value / y_max).min(1.0);
        let _ = writeln!(
            out,
            r##"<line class="reference" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#555" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#555">{}</text>"##,
            LEFT + plot_w,
            LEFT + plot_w - 4.0,
            y - 4.0,
            escape(label)
        );
    }
    // One point per window, at the window's middle.
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .map(|(w, v)| {
                let x = LEFT + plot_w * (w as f64 + 0.5) / windows;
                let y = bottom - PANEL_H * (v / y_max).min(1.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline class="{class}" data-name="{}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            escape(s.name),
            points.join(" ")
        );
        let ly = top + 10.0 + 18.0 * i as f64;
        let lx = LEFT + plot_w + 16.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(s.name)
        );
    }
}

/// 1, 2, 5 × 10^n at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * magnitude >= v {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

/// The whole chart.
pub fn chart(result: &RunResult, title: &str) -> String {
    let per_min = 60.0 / result.window_secs;
    let tenants: Vec<Series> = result
        .tenants
        .iter()
        .map(|t| Series {
            name: &t.id,
            values: t
                .granted_per_window
                .iter()
                .map(|g| *g as f64 * per_min)
                .collect(),
        })
        .collect();
    let tokens: Vec<Series> = result
        .tokens
        .iter()
        .map(|t| Series {
            name: &t.id,
            values: t
                .accepted_per_window
                .iter()
                .map(|a| 100.0 * *a as f64 / f64::from(result.limit.max(1)))
                .collect(),
        })
        .collect();
    let height = TOP + 2.0 * PANEL_H + GAP + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="#fff"/>
<title>{}</title>"##,
        escape(title)
    );
    let heading = format!("{title}: granted rate per tenant");
    let rates = Panel {
        top: TOP,
        title: &heading,
        unit: "granted requests / minute",
        class: "tenant",
        reference: None,
    };
    panel(&mut out, &rates, &tenants, result);
    let utilization = Panel {
        top: TOP + PANEL_H + GAP,
        title: "utilization per token",
        unit: "% of the upstream limit",
        class: "token",
        reference: Some((
            100.0 * f64::from(result.usable) / f64::from(result.limit.max(1)),
            "usable (limit minus margin)",
        )),
    };
    panel(&mut out, &utilization, &tokens, result);
    out.push_str("</svg>\n");
    out
}
