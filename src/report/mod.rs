//! `tokenlease report`: per tenant usage, trend and peak hours over a range, each
//! pool's capacity forecast (`crate::forecast`), as a table and an SVG chart.
//!
//! - [`Report::build`]: pure, from the configuration, the history rows and `now`.
//! - [`load`]: reads both from the configuration store (the one I/O step).
//! - `cost`: each tenant's cost over the range and the pools' unused part
//!   (`crate::cost`, as GetCostReport allocates it).
//! - `table`: the text table; `chart`: the SVG (the drawing pieces of
//!   `simulate::svg`).
//!
//! Counts: `asked` is every AcquireLease answered, `granted` the leases granted,
//! `denied` the rest (denials of every reason and calls that failed).

pub mod chart;
pub mod cost;
pub mod table;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;

use crate::domain::ConfigView;
use crate::forecast::{self, DAY_MS, Forecast, PoolDemand, trend::Line};
use crate::history::{HistoryRow, Selection, SubjectKind, roll_up};
use crate::store::ConfigStore;

/// Default range: the last 7 days.
pub const DEFAULT_DAYS: i64 = 7;

/// One tenant's line.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLine {
    pub id: String,
    /// Its shared pool, if any.
    pub pool: Option<String>,
    pub asked: u64,
    pub granted: u64,
    pub denied: u64,
    /// The least-squares trend of its daily asked, per week, as a share of its mean
    /// day (0.1 = +10 % a week); `None` with fewer than two whole days.
    pub trend_per_week: Option<f64>,
    /// Hours of the day (UTC) when it asks at least 80 % of its busiest hour, summed
    /// over the range; empty if it asked nothing.
    pub peak_hours: Vec<u32>,
    /// Asked and granted per bucket of [`Report::buckets`].
    pub asked_per_bucket: Vec<u64>,
    pub granted_per_bucket: Vec<u64>,
    /// Its cost over the range, minor units (`Report::add_cost`).
    pub cost_minor: Option<i64>,
}

impl TenantLine {
    /// granted / asked; `None` when nothing was asked.
    pub fn share(&self) -> Option<f64> {
        (self.asked > 0).then(|| self.granted as f64 / self.asked as f64)
    }
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    pub from_ms: i64,
    pub to_ms: i64,
    pub now_ms: i64,
    pub bucket_ms: i64,
    /// Start of every bucket of the range, in order.
    pub buckets: Vec<i64>,
    /// Every configured tenant, and any other tenant the history names (deleted
    /// since), by id.
    pub tenants: Vec<TenantLine>,
    /// Every shared pool with its demand and forecast, by id.
    pub pools: Vec<(PoolDemand, Forecast)>,
    /// The range's cost, once added (`Report::add_cost`).
    pub cost: Option<cost::ReportCost>,
}

impl Report {
    /// Builds the report of `from_ms..to_ms` (whole buckets) from `view` and history
    /// `rows` (any replicas and stored buckets; they are summed).
    pub fn build(
        view: &ConfigView,
        rows: Vec<HistoryRow>,
        range: (i64, i64),
        bucket_ms: i64,
        now_ms: i64,
    ) -> Report {
        let (from_ms, to_ms) = range;
        let rows = roll_up(rows, bucket_ms);
        let buckets: Vec<i64> = (from_ms..to_ms).step_by(bucket_ms as usize).collect();
        let pools: Vec<(PoolDemand, Forecast)> =
            forecast::pool_demands(view, rows.clone(), bucket_ms)
                .into_iter()
                .map(|p| {
                    // As of the range's end: a report of a past month forecasts
                    // from that month's end.
                    let f = forecast::forecast(&p, from_ms, to_ms, to_ms.min(now_ms));
                    (p, f)
                })
                .collect();
        let mut ids: BTreeSet<String> = view.tenants.iter().map(|t| t.id.to_string()).collect();
        ids.extend(
            (rows.iter())
                .filter(|r| r.subject.kind == SubjectKind::Tenant)
                .map(|r| r.subject.id.clone()),
        );
        let tenants = ids
            .into_iter()
            .map(|id| {
                let pool = (view.tenants.iter())
                    .find(|t| t.id.as_str() == id)
                    .and_then(|t| t.pool_id.as_ref().map(|p| p.to_string()));
                tenant_line(id, pool, &rows, &buckets, to_ms.min(now_ms))
            })
            .collect();
        Report {
            from_ms,
            to_ms,
            now_ms,
            bucket_ms,
            buckets,
            tenants,
            pools,
            cost: None,
        }
    }
}

fn tenant_line(
    id: String,
    pool: Option<String>,
    rows: &[HistoryRow],
    buckets: &[i64],
    until_ms: i64,
) -> TenantLine {
    let index: BTreeMap<i64, usize> = buckets.iter().enumerate().map(|(i, b)| (*b, i)).collect();
    let mut asked_per_bucket = vec![0; buckets.len()];
    let mut granted_per_bucket = vec![0; buckets.len()];
    for row in rows
        .iter()
        .filter(|r| r.subject.kind == SubjectKind::Tenant && r.subject.id == id)
    {
        if let Some(i) = index.get(&row.bucket_start_ms) {
            asked_per_bucket[*i] += row.tally.asked;
            granted_per_bucket[*i] += row.tally.granted;
        }
    }
    let asked: u64 = asked_per_bucket.iter().sum();
    let granted: u64 = granted_per_bucket.iter().sum();
    let series: Vec<(i64, u64)> = buckets
        .iter()
        .copied()
        .zip(asked_per_bucket.iter().copied())
        .collect();
    TenantLine {
        id,
        pool,
        asked,
        granted,
        denied: asked.saturating_sub(granted),
        trend_per_week: weekly_trend(&series, until_ms),
        peak_hours: peak_hours(&series),
        asked_per_bucket,
        granted_per_bucket,
        cost_minor: None,
    }
}

/// The least-squares slope of daily totals over the whole days before `until_ms`,
/// times 7, over the mean day.
fn weekly_trend(series: &[(i64, u64)], until_ms: i64) -> Option<f64> {
    let first = series.first()?.0;
    let first_day = first.div_euclid(DAY_MS) + i64::from(first.rem_euclid(DAY_MS) != 0);
    let mut days: BTreeMap<i64, f64> = (first_day..until_ms.div_euclid(DAY_MS))
        .map(|d| (d, 0.0))
        .collect();
    for (start, asked) in series {
        if let Some(total) = days.get_mut(&start.div_euclid(DAY_MS)) {
            *total += *asked as f64;
        }
    }
    if days.len() < 2 {
        return None;
    }
    let points: Vec<(f64, f64)> = days.iter().map(|(d, v)| (*d as f64, *v)).collect();
    let mean = points.iter().map(|p| p.1).sum::<f64>() / points.len() as f64;
    let line = Line::fit(&points)?;
    (mean > 0.0).then(|| line.slope * 7.0 / mean)
}

/// Hours of the day (UTC) asking at least 80 % of the busiest one, summed over days.
/// A bucket longer than an hour counts for the hour it starts in.
fn peak_hours(series: &[(i64, u64)]) -> Vec<u32> {
    let mut by_hour = [0u64; 24];
    for (start, asked) in series {
        let hour = start.rem_euclid(DAY_MS) / 3_600_000;
        by_hour[hour as usize] += asked;
    }
    let busiest = by_hour.iter().copied().max().unwrap_or(0);
    if busiest == 0 {
        return vec![];
    }
    (0..24u32)
        .filter(|h| by_hour[*h as usize] * 10 >= busiest * 8)
        .collect()
}

/// Reads the configuration, the history and the grants per tenant and token of
/// `from_ms..to_ms` from `store` and builds the report with its cost in `currency`
/// (the range is checked and widened to whole buckets as GetUsageHistory does).
pub async fn load(
    store: &ConfigStore,
    (from_ms, to_ms): (i64, i64),
    bucket_ms: i64,
    now_ms: i64,
    currency: &str,
) -> anyhow::Result<Report> {
    let range = check_cli_range(from_ms, to_ms, bucket_ms)?;
    let config = store
        .load()
        .await
        .context("cannot read the configuration")?;
    let tenants_only = Selection {
        tenants: None,
        tokens: Some(vec![]),
        upstream_id: None,
    };
    let rows = store
        .read_history(range.0, range.1, &tenants_only)
        .await
        .context("cannot read the usage history")?;
    let grants = store
        .read_grants(range.0, range.1, None)
        .await
        .context("cannot read the grants per tenant and pool")?;
    let granted: Vec<crate::cost::Granted> = (grants.into_iter())
        .map(|g| crate::cost::Granted {
            tenant_id: g.tenant_id,
            pool_id: g.pool_id,
            granted: g.granted,
        })
        .collect();
    let mut report = Report::build(&config.view, rows, range, bucket_ms, now_ms);
    report.add_cost(&config.view, &granted, currency);
    Ok(report)
}

/// The range widened to whole buckets, as GetUsageHistory checks it, with the
/// command line's words: `--to` after `--from`, and not too many buckets.
pub fn check_cli_range(from_ms: i64, to_ms: i64, bucket_ms: i64) -> anyhow::Result<(i64, i64)> {
    anyhow::ensure!(
        to_ms > from_ms,
        "--to ({} UTC) must be after --from ({} UTC)",
        table::utc(to_ms),
        table::utc(from_ms)
    );
    crate::history::check_range(from_ms, to_ms, bucket_ms, bucket_ms)
        .map_err(|e| anyhow::anyhow!("invalid --from/--to: {}", e.reason))
}

/// A `--from`/`--to` value: RFC 3339 (`2026-11-01T12:00:00Z`) or a UTC date
/// (`2026-11-01`, its midnight), as Unix ms.
pub fn parse_time(flag: &str, value: &str) -> anyhow::Result<i64> {
    if let Ok(at) = value.parse::<jiff::Timestamp>() {
        return Ok(at.as_millisecond());
    }
    if let Ok(date) = value.parse::<jiff::civil::Date>()
        && let Ok(at) = jiff::tz::Offset::UTC.to_timestamp(date.at(0, 0, 0, 0))
    {
        return Ok(at.as_millisecond());
    }
    anyhow::bail!(
        "invalid {flag} {value:?}: give a UTC date (2026-11-01) or an RFC 3339 time \
         (2026-11-01T12:00:00Z)"
    )
}

/// What `tokenlease report` prints: the table, then each pool's cross-check when asked.
pub async fn cross_checks(report: &Report) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    for (pool, f) in &report.pools {
        let check = forecast::cross_check::cross_check(pool, f).await?;
        let _ = match check {
            None => writeln!(out, "cross-check {}: no history to plan on", pool.pool),
            Some(c) => writeln!(
                out,
                "cross-check {}: the forecast's rule says {} token(s), simulate --plan on the \
                 busiest hour scaled to that demand says {}{}",
                pool.pool,
                c.forecast_tokens,
                c.plan_tokens
                    .map_or("none up to 20".to_owned(), |k| k.to_string()),
                if c.agrees() {
                    " (agree)"
                } else {
                    " (DISAGREE)"
                }
            ),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    /// Times are UTC dates or RFC 3339; anything else, a reversed range or one of too
    /// many buckets is refused naming the flag and what to give instead.
    #[test]
    fn command_line_times_and_ranges() {
        let day = parse_time("--from", "2026-11-01").unwrap();
        assert_eq!(day % DAY_MS, 0);
        assert_eq!(
            parse_time("--to", "2026-11-01T12:00:00Z").unwrap(),
            day + 12 * HOUR
        );
        let error = parse_time("--to", "yesterday").unwrap_err().to_string();
        assert!(
            error.contains("--to") && error.contains("2026-11-01"),
            "{error}"
        );
        let error = check_cli_range(day, day, HOUR).unwrap_err().to_string();
        assert!(
            error.contains("--to") && error.contains("--from"),
            "{error}"
        );
        assert_eq!(
            check_cli_range(day + 1, day + HOUR, HOUR).unwrap(),
            (day, day + HOUR)
        );
        let error = check_cli_range(day, day + 500 * DAY_MS, HOUR)
            .unwrap_err()
            .to_string();
        assert!(error.contains("shorter"), "{error}");
    }

    /// Peak hours are those at 80 % of the busiest or more; a tenant that asked
    /// nothing has none, and its weekly trend is unknown.
    #[test]
    fn peak_hours_and_trend() {
        let series: Vec<(i64, u64)> = (0..48)
            .map(|h| {
                (
                    h * HOUR,
                    if h % 24 == 9 {
                        100
                    } else if h % 24 == 10 {
                        85
                    } else {
                        10
                    },
                )
            })
            .collect();
        assert_eq!(peak_hours(&series), vec![9, 10]);
        assert_eq!(peak_hours(&[(0, 0)]), Vec::<u32>::new());
        // Two equal days: flat. A second day twice the first: +7 × (slope 1 / mean 1.5).
        assert_eq!(weekly_trend(&series, 2 * DAY_MS), Some(0.0));
        let growing: Vec<(i64, u64)> = vec![(0, 10), (DAY_MS, 20)];
        let trend = weekly_trend(&growing, 2 * DAY_MS).unwrap();
        assert!((trend - 7.0 * 10.0 / 15.0).abs() < 1e-9, "{trend}");
        assert_eq!(weekly_trend(&[(0, 0), (DAY_MS, 0)], 2 * DAY_MS), None);
        assert_eq!(weekly_trend(&growing, DAY_MS), None, "one whole day only");
    }
}
