//! The report as text: a row per tenant, then a row per pool with its forecast.

use std::fmt::Write;

use super::Report;

/// `ms` as `YYYY-MM-DD HH:MM` UTC.
pub fn utc(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(at) => jiff::tz::Offset::UTC
            .to_datetime(at)
            .strftime("%Y-%m-%d %H:%M")
            .to_string(),
        Err(_) => ms.to_string(),
    }
}

/// Hours as ranges: [13, 14, 15, 20] → "13:00-16:00, 20:00-21:00".
pub fn hour_ranges(hours: &[u32]) -> String {
    let mut ranges: Vec<(u32, u32)> = vec![];
    for h in hours {
        match ranges.last_mut() {
            Some((_, end)) if *end == *h => *end = h + 1,
            _ => ranges.push((*h, h + 1)),
        }
    }
    if ranges.is_empty() {
        return "-".to_owned();
    }
    let text: Vec<String> = ranges
        .iter()
        .map(|(from, to)| format!("{from:02}:00-{to:02}:00"))
        .collect();
    text.join(", ")
}

fn percent(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{:+.1}%", 100.0 * v))
}

/// The tenant table and the pool forecasts.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "usage {} to {} UTC, buckets of {} min",
        utc(report.from_ms),
        utc(report.to_ms),
        report.bucket_ms / 60_000
    );
    let _ = writeln!(out);
    let name_w = (report.tenants.iter().map(|t| t.id.len()))
        .chain([6])
        .max()
        .unwrap_or(6);
    let pool_w = (report.tenants.iter())
        .map(|t| t.pool.as_deref().map_or(1, str::len))
        .chain([4])
        .max()
        .unwrap_or(4);
    let _ = writeln!(
        out,
        "{:<name_w$}  {:<pool_w$}  {:>10}  {:>10}  {:>9}  {:>6}  {:>10}  peak hours (UTC)",
        "tenant", "pool", "asked", "granted", "denied", "share", "trend/week"
    );
    for t in &report.tenants {
        let _ = writeln!(
            out,
            "{:<name_w$}  {:<pool_w$}  {:>10}  {:>10}  {:>9}  {:>6}  {:>10}  {}",
            t.id,
            t.pool.as_deref().unwrap_or("-"),
            t.asked,
            t.granted,
            t.denied,
            t.share()
                .map_or("-".to_owned(), |s| format!("{:.1}%", 100.0 * s)),
            percent(t.trend_per_week),
            hour_ranges(&t.peak_hours)
        );
    }
    let _ = writeln!(
        out,
        "(asked: AcquireLease calls answered; denied: every denial and failed call; \
         trend: least-squares slope of the daily asked, per week, of the mean day; \
         peak hours: hours with at least 80 % of the busiest one's asked)"
    );
    let _ = writeln!(out);
    pools(&mut out, report);
    out
}

fn pools(out: &mut String, report: &Report) {
    let _ = writeln!(
        out,
        "capacity forecast as of {} UTC",
        utc(report.to_ms.min(report.now_ms))
    );
    let pool_w = (report.pools.iter().map(|(p, _)| p.pool.len()))
        .chain([4])
        .max()
        .unwrap_or(4);
    let _ = writeln!(
        out,
        "{:<pool_w$}  {:>6}  {:>8}  {:>10}  {:>8}  {:>9}  forecast",
        "pool", "tokens", "capacity", "guaranteed", "peak now", "trend/day"
    );
    for (pool, f) in &report.pools {
        let number = |v: Option<f64>, sign: bool| match v {
            Some(v) if sign => format!("{v:+.1}"),
            Some(v) => format!("{v:.1}"),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<pool_w$}  {:>6}  {:>8}  {:>10}  {:>8}  {:>9}  {}",
            pool.pool,
            f.tokens,
            f.capacity_per_window,
            f.guaranteed_per_window,
            number(f.peak_now, false),
            number(f.trend.map(|l| l.slope), true),
            f.summary()
        );
    }
    let _ = writeln!(
        out,
        "(requests per upstream window; peak now: the trend of the daily peak hour's demand, \
         each tenant capped at its guarantee + burst, less its own tokens; full: when that \
         trend passes the capacity, tokens × usable per token)"
    );
}
