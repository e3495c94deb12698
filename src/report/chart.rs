//! The report's chart, drawn with `simulate::svg`'s pieces so it reads like simulate's.
//! Above: what each tenant asked per minute over the range (solid; granted dotted),
//! with each pool's capacity (dashed, red). Below: each pool's daily peak (points
//! joined) and the forecast's trend through them, carried on past the history to the
//! day after the pool fills (or a week), against the same capacity: where the dashed
//! line meets the red one is the day the pool needs another token.
//! Elements: `<polyline class="tenant">` per tenant group with `class="granted"`
//! beside it; `<polyline class="pool">` per pool with `class="trend"` beside it; each
//! with `data-name`; `<line class="reference">` per pool capacity, in both panels.

use crate::forecast::DAY_MS;
use crate::simulate::svg::{
    GAP, PANEL_H, Panel, Reference, Series, TOP, XAxis, document_start, group, panel,
};

use super::Report;

/// Requests per minute from a count over `ms`.
fn per_minute(count: f64, ms: i64) -> f64 {
    count * 60_000.0 / ms.max(1) as f64
}

/// Days shown after the history when no pool fills, and at most.
const AHEAD_DAYS: i64 = 7;
const MAX_AHEAD_DAYS: i64 = 45;

/// The forecast's days: the whole UTC days of the range up to now (their count is
/// the second value), then the days ahead up to the day after the last pool fills
/// (so the trend is seen crossing its capacity), or a week if none does.
fn days(report: &Report) -> (Vec<i64>, usize) {
    let first =
        report.from_ms.div_euclid(DAY_MS) + i64::from(report.from_ms.rem_euclid(DAY_MS) != 0);
    let as_of = report.to_ms.min(report.now_ms);
    let end = as_of.div_euclid(DAY_MS).max(first);
    let last_fill = (report.pools.iter())
        .filter_map(|(_, f)| f.days_until_full)
        .map(|d| (as_of as f64 / DAY_MS as f64 + d).floor() as i64 + 2)
        .max();
    let until = last_fill
        .map_or(end + AHEAD_DAYS, |d| d.max(end + 1))
        .min(end + MAX_AHEAD_DAYS);
    ((first..until).collect(), (end - first) as usize)
}

/// Ticks at day starts ("11-05"), thinned to at most 15.
fn day_ticks(starts: &[i64], slot_ms: i64, first_ms: i64) -> Vec<(f64, String)> {
    let step = (starts.len() / 15).max(1);
    (starts.iter().step_by(step))
        .map(|start| {
            let at = (start - first_ms) as f64 / slot_ms as f64;
            let label = super::table::utc(*start);
            (at, label.get(5..10).unwrap_or(&label).to_owned())
        })
        .collect()
}

fn capacity_lines(report: &Report) -> Vec<Reference> {
    (report.pools.iter())
        .map(|(pool, f)| {
            let value = per_minute(f64::from(f.capacity_per_window), pool.window_ms);
            let label = format!("pool {}: {} token(s) = {value:.0}/min", pool.pool, f.tokens);
            (value, label, "#c00", false)
        })
        .collect()
}

fn tenant_series(report: &Report) -> Vec<Series> {
    let rate = |counts: &[u64]| -> Vec<f64> {
        counts
            .iter()
            .map(|c| per_minute(*c as f64, report.bucket_ms))
            .collect()
    };
    let span = (report.buckets.len() as i64 * report.bucket_ms).max(1);
    let tenants = report.tenants.iter().map(|t| Series {
        names: vec![t.id.clone()],
        summary: format!(
            "{:.0}/min, {}",
            per_minute(t.asked as f64, span),
            t.share().map_or("none asked".to_owned(), |s| format!(
                "{:.0} % granted",
                100.0 * s
            ))
        ),
        values: rate(&t.asked_per_bucket),
        companions: vec![("granted", "2 3", rate(&t.granted_per_bucket))],
    });
    group(tenants.collect())
}

/// Each pool's daily peaks over the first `history` days, its trend over all.
fn pool_series(report: &Report, days: &[i64], history: usize) -> Vec<Series> {
    let series = report.pools.iter().map(|(pool, f)| {
        let peaks = pool.daily_peaks(report.from_ms, report.to_ms.min(report.now_ms));
        let peak_of = |day: i64| {
            let p = peaks.iter().find(|p| p.day == day).map_or(0.0, |p| p.peak);
            per_minute(p, pool.window_ms)
        };
        let trend = |day: i64| {
            f.trend.map_or(0.0, |l| {
                per_minute(l.at(day as f64 + 0.5).max(0.0), pool.window_ms)
            })
        };
        Series {
            names: vec![pool.pool.clone()],
            summary: f.short_summary(),
            values: days.iter().take(history).map(|d| peak_of(*d)).collect(),
            companions: vec![("trend", "6 4", days.iter().map(|d| trend(*d)).collect())],
        }
    });
    series.collect()
}

/// The whole chart.
pub fn chart(report: &Report, title: &str) -> String {
    let mut out = document_start(title, 2);
    let day_starts: Vec<i64> = (report.buckets.iter().copied())
        .filter(|b| b.rem_euclid(DAY_MS) == 0)
        .collect();
    let usage_axis = XAxis {
        points: report.buckets.len(),
        ticks: day_ticks(&day_starts, report.bucket_ms, report.from_ms),
        caption: "day (UTC)".to_owned(),
    };
    let heading =
        format!("{title}: asked per tenant (solid), granted (dotted), pool capacity (dashed)");
    let usage = Panel {
        top: TOP,
        title: &heading,
        unit: "requests / minute",
        class: "tenant",
        markers: false,
        references: capacity_lines(report),
    };
    panel(&mut out, &usage, &tenant_series(report), &usage_axis);
    let (days, history) = days(report);
    let starts: Vec<i64> = days.iter().map(|d| d * DAY_MS).collect();
    let forecast_axis = XAxis {
        points: days.len(),
        ticks: day_ticks(&starts, DAY_MS, starts.first().copied().unwrap_or(0)),
        caption: format!("day (UTC): {history} whole day(s) of history (points), the trend beyond"),
    };
    let forecast = Panel {
        top: TOP + PANEL_H + GAP,
        title: "forecast: each pool's daily peak (points), its trend (dashed), capacity (red)",
        unit: "requests / minute",
        class: "pool",
        markers: true,
        references: capacity_lines(report),
    };
    panel(
        &mut out,
        &forecast,
        &pool_series(report, &days, history),
        &forecast_axis,
    );
    out.push_str("</svg>\n");
    out
}
