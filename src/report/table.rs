//! The report as text: a row per tenant, then a row per pool with its forecast.

use std::fmt::Write;

use super::Report;
use super::cost::amount;

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
    tenants(&mut out, report);
    let _ = writeln!(out);
    pools(&mut out, report);
    out
}

/// The cost column's heading and a tenant's cell; empty without cost.
fn cost_cell(report: &Report, minor: Option<i64>) -> String {
    match (&report.cost, minor) {
        (None, _) => String::new(),
        (Some(_), Some(minor)) => format!("  {:>11}", amount(minor)),
        (Some(_), None) => format!("  {:>11}", "-"),
    }
}

fn tenants(out: &mut String, report: &Report) {
    let name_w = (report.tenants.iter().map(|t| t.id.len()))
        .chain([6])
        .max()
        .unwrap_or(6);
    let pool_w = (report.tenants.iter())
        .map(|t| t.pool.as_deref().map_or(1, str::len))
        .chain([4])
        .max()
        .unwrap_or(4);
    let cost_heading = (report.cost.as_ref()).map_or(String::new(), |c| {
        format!("  {:>11}", format!("cost {}", c.currency))
    });
    let _ = writeln!(
        out,
        "{:<name_w$}  {:<pool_w$}  {:>10}  {:>10}  {:>9}  {:>6}{cost_heading}  {:>10}  peak hours (UTC)",
        "tenant", "pool", "asked", "granted", "denied", "share", "trend/week"
    );
    for t in &report.tenants {
        let share = t
            .share()
            .map_or("-".to_owned(), |s| format!("{:.1}%", 100.0 * s));
        let _ = writeln!(
            out,
            "{:<name_w$}  {:<pool_w$}  {:>10}  {:>10}  {:>9}  {:>6}{}  {:>10}  {}",
            t.id,
            t.pool.as_deref().unwrap_or("-"),
            t.asked,
            t.granted,
            t.denied,
            share,
            cost_cell(report, t.cost_minor),
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
    if let Some(cost) = &report.cost {
        let _ = if cost.any_priced {
            let unused: i64 = cost.per_pool.values().map(|(_, unused)| unused).sum();
            writeln!(
                out,
                "(cost: the tokens' monthly cost prorated over the range, a pool token's \
                 shared by the grants on it, as GetCostReport; total {} {}, of which {} \
                 unused; amounts with the minor unit as 1/100)",
                amount(cost.total),
                cost.currency,
                amount(unused)
            )
        } else {
            writeln!(
                out,
                "(cost: no token has a monthly cost yet: set monthly_cost_minor with \
                 CreateToken or UpdateToken)"
            )
        };
    }
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
    // The pool's cost and unused part over the range, when the report has cost.
    let cost_cells = |pool: &str| match &report.cost {
        None => String::new(),
        Some(cost) => {
            let (total, unused) = cost.per_pool.get(pool).copied().unwrap_or((0, 0));
            format!("  {:>11}  {:>11}", amount(total), amount(unused))
        }
    };
    let cost_heading = (report.cost.as_ref()).map_or(String::new(), |c| {
        format!("  {:>11}  {:>11}", format!("cost {}", c.currency), "unused")
    });
    let _ = writeln!(
        out,
        "{:<pool_w$}  {:>6}  {:>8}  {:>10}{cost_heading}  {:>8}  {:>9}  forecast",
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
            "{:<pool_w$}  {:>6}  {:>8}  {:>10}{}  {:>8}  {:>9}  {}",
            pool.pool,
            f.tokens,
            f.capacity_per_window,
            f.guaranteed_per_window,
            cost_cells(&pool.pool),
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
