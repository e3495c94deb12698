//! Capacity forecast: from the usage history, when each shared pool will be asked for
//! more than its tokens can serve, and how many tokens it will then need. Pure: the
//! history and the configuration come in as values, `now` is a parameter.
//!
//! # The model (kept simple enough to check by hand)
//! 1. **Demand a pool's tokens must serve**, per stored bucket (hourly by default), in
//!    requests per upstream window: for each tenant of the pool, what it asked
//!    (granted + denied: `asked` in the history) spread evenly over the bucket's windows,
//!    capped at its quota ceiling (guarantee + burst: more is refused by its tier
//!    whatever the tokens), minus the capacity of its own dedicated tokens on the pool's
//!    upstream (served there first, as the 80 % rule counts it); summed over tenants.
//! 2. **Daily peak**: the busiest bucket of each whole UTC day of the range, from the
//!    first day anything was asked; a day with no row counts as 0 (nobody asked).
//!    The partial current day is left out: its peak may not have happened yet.
//! 3. **Trend**: the least-squares line through (middle of day, daily peak)
//!    ([`trend::Line`]); a single day gives a flat line.
//! 4. **Full** when the line rises above the pool's usable capacity (tokens ×
//!    usable per token, the limit minus the safety margin), within
//!    [`HORIZON_DAYS`]; `days_until_full` is when it crosses (0: already above).
//! 5. **Tokens needed then**: enough for the line's highest value on the day it
//!    crosses (its end) and for the 80 % rule on the guarantees the pool's tenants draw
//!    from it (`simulate::plan::lower_bound`'s rule); at least 1.
//!
//! Limits, said plainly: an hourly bucket averages the hour, so a pool that peaks in
//! a few minutes looks calmer than it is (a finer `history.bucket_ms` helps); `asked`
//! counts retries of denied calls, so a pool already short of tokens over-states its
//! demand (the forecast then errs towards one token more); a straight line over a week
//! extrapolated three months is a planning hint, not a promise.
//!
//! - `demand`: the pools' demand from the configuration and the history rows.
//! - `trend`: the least-squares line.
//! - `cross_check`: the same question asked of `simulate::plan` on the observed demand.

pub mod cross_check;
mod demand;
pub mod trend;

#[cfg(test)]
mod tests;

pub use demand::{DayPeak, PoolDemand, TenantDemand, pool_demands};

use crate::domain::MAX_GUARANTEED_SHARE;
use trend::Line;

/// One day, in ms.
pub const DAY_MS: i64 = 86_400_000;
/// How far ahead a forecast looks: beyond, a pool is "no token needed".
pub const HORIZON_DAYS: f64 = 90.0;

/// What the forecast says about one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub pool: String,
    /// Tokens in the pool now (disabled ones included: what it is provisioned with).
    pub tokens: u32,
    /// Requests per window the tokens serve (tokens × usable per token).
    pub capacity_per_window: u32,
    /// Guarantees the pool's tenants draw from it, per window.
    pub guaranteed_per_window: u64,
    /// Whole days of history the trend was fitted on.
    pub days_fitted: usize,
    /// The trend (x in days since the Unix epoch); `None` without a whole day of history.
    pub trend: Option<Line>,
    /// What the trend says the daily peak is now, per window.
    pub peak_now: Option<f64>,
    /// Days from `now` until the trend rises above the capacity (0: it already is);
    /// `None`: not within [`HORIZON_DAYS`], or no history.
    pub days_until_full: Option<f64>,
    /// The UTC day it does.
    pub date: Option<jiff::civil::Date>,
    /// The trend's peak at the end of that day, per window.
    pub peak_then: Option<f64>,
    /// Tokens the pool needs on that day.
    pub tokens_needed_then: Option<u32>,
}

impl Forecast {
    /// One line for people: "no token needed", or when and how many.
    pub fn summary(&self) -> String {
        match (self.days_until_full, self.date, self.tokens_needed_then) {
            _ if self.trend.is_none() => {
                "not enough history (no whole day in the range)".to_owned()
            }
            (Some(days), Some(date), Some(needed)) if days <= 0.0 => format!(
                "above capacity now ({date}): needs {needed} token(s), has {}",
                self.tokens
            ),
            (Some(days), Some(date), Some(needed)) => format!(
                "full in {days:.1} days ({date}): needs {needed} token(s) then, has {}",
                self.tokens
            ),
            _ => format!("no token needed within {HORIZON_DAYS:.0} days"),
        }
    }
}

impl Forecast {
    /// A few words for a chart's legend.
    pub fn short_summary(&self) -> String {
        match (self.trend, self.date, self.tokens_needed_then) {
            (None, _, _) => "no whole day of history yet".to_owned(),
            (Some(_), Some(date), Some(needed)) => format!("{needed} tokens by {date}"),
            _ => "no token needed".to_owned(),
        }
    }
}

/// Tokens of `usable` requests per window that serve `per_window` and keep the pool's
/// drawn guarantees within 80 % of its capacity; at least 1.
pub fn tokens_for(per_window: f64, guaranteed: u64, usable: u32) -> u32 {
    let usable = f64::from(usable.max(1));
    // A hair below whole numbers: 190.0000001 / 95 is 2 tokens, not 3.
    let tokens = |need: f64| (need / usable - 1e-9).ceil().max(0.0) as u32;
    let by_guarantees = tokens(guaranteed as f64 / MAX_GUARANTEED_SHARE);
    tokens(per_window).max(by_guarantees).max(1)
}

/// The forecast of one pool from its history in `from_ms..to_ms` (whole UTC days
/// only, none after `now_ms`).
pub fn forecast(pool: &PoolDemand, from_ms: i64, to_ms: i64, now_ms: i64) -> Forecast {
    let peaks = pool.daily_peaks(from_ms, to_ms.min(now_ms));
    let points: Vec<(f64, f64)> = peaks.iter().map(|p| (p.day as f64 + 0.5, p.peak)).collect();
    let trend = Line::fit(&points);
    let capacity = pool.capacity_per_window();
    let guaranteed = pool.drawn_guarantees();
    let mut answer = Forecast {
        pool: pool.pool.clone(),
        tokens: pool.tokens,
        capacity_per_window: capacity,
        guaranteed_per_window: guaranteed,
        days_fitted: peaks.len(),
        trend,
        peak_now: None,
        days_until_full: None,
        date: None,
        peak_then: None,
        tokens_needed_then: None,
    };
    let Some(line) = trend else {
        return answer;
    };
    let now = now_ms as f64 / DAY_MS as f64;
    answer.peak_now = Some(line.at(now).max(0.0));
    let Some(crossing) = line.crosses_above(f64::from(capacity), now) else {
        return answer;
    };
    if crossing - now > HORIZON_DAYS {
        return answer;
    }
    let day = crossing.floor();
    let peak_then = line.at(day + 1.0).max(line.at(crossing));
    answer.days_until_full = Some(crossing - now);
    answer.date = date_of_day(day as i64);
    answer.peak_then = Some(peak_then);
    answer.tokens_needed_then = Some(tokens_for(peak_then, guaranteed, pool.usable_per_token));
    answer
}

/// The UTC date of day `day` since the Unix epoch.
pub fn date_of_day(day: i64) -> Option<jiff::civil::Date> {
    let at = jiff::Timestamp::from_millisecond(day.checked_mul(DAY_MS)?).ok()?;
    Some(jiff::tz::Offset::UTC.to_datetime(at).date())
}
