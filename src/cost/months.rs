//! A monthly amount prorated over a time range, calendar month by calendar month (UTC).
//!
//! Each millisecond of a month of `d` days costs `monthly / (d × 86,400,000)`, so a
//! whole calendar month costs exactly `monthly` whatever its length, and a range is the
//! exact sum of its parts in every month it touches. That sum is a rational number: it
//! is computed exactly (over the common denominator of all month lengths, in `i128`)
//! and rounded once, half up, to a whole minor unit.
//!
//! Rounding once (rather than per month) keeps a range of whole months exact and
//! makes the result independent of how many months the range spans. The price: two
//! adjacent ranges may cost one minor unit more or less than their union.

use std::ops::Range;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

const DAY_MS: i128 = 86_400_000;
/// The least common multiple of 28, 29, 30 and 31: every month's length in days divides
/// it, so `LCM_DAYS × DAY_MS` is a denominator every month's per-ms rate shares.
const LCM_DAYS: i128 = 377_580;

/// `monthly` (minor units per calendar month) over `range` (ms since the Unix epoch,
/// end exclusive), rounded half up to a minor unit. An empty or reversed range costs 0.
///
/// Exact for `0 <= monthly <= MAX_MONTHLY_COST_MINOR` (one month's numerator is below
/// 2^40 × 2^32 × 2^14, and jiff's years −9999 to 9999, which the range is clamped to,
/// hold fewer than 2^18 months); beyond that bound the arithmetic saturates rather
/// than overflow.
pub fn prorate(monthly: i64, range: Range<i64>) -> i64 {
    let start = range.start.max(Timestamp::MIN.as_millisecond());
    let end = range.end.min(Timestamp::MAX.as_millisecond());
    if end <= start || monthly <= 0 {
        return 0;
    }
    let mut numerator: i128 = 0;
    let mut month = month_of(start);
    let mut month_start = start_ms(month);
    while month_start < end {
        let next = month.checked_add(1.month()).ok();
        let next_start = next.map_or(i64::MAX, start_ms);
        let overlap = i128::from(end.min(next_start) - start.max(month_start));
        let days = i128::from(month.days_in_month());
        let part = i128::from(monthly)
            .saturating_mul(overlap)
            .saturating_mul(LCM_DAYS / days);
        numerator = numerator.saturating_add(part);
        match next {
            Some(next) => (month, month_start) = (next, next_start),
            None => break,
        }
    }
    let denominator = LCM_DAYS * DAY_MS;
    // Half up: floor((2n + d) / 2d), every term non-negative.
    let rounded = numerator.saturating_mul(2).saturating_add(denominator) / (2 * denominator);
    i64::try_from(rounded).unwrap_or(i64::MAX)
}

/// The first day of the UTC month holding `ms`.
fn month_of(ms: i64) -> Date {
    let at = Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MIN);
    TimeZone::UTC.to_datetime(at).date().first_of_month()
}

/// Midnight UTC of `day`, in ms since the epoch; clamped to jiff's range (the first
/// and last months it holds start or end outside it).
fn start_ms(day: Date) -> i64 {
    let outside = if day.year() < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    };
    TimeZone::UTC
        .to_timestamp(day.to_datetime(jiff::civil::Time::midnight()))
        .unwrap_or(outside)
        .as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(date: &str) -> i64 {
        let day: Date = date.parse().unwrap();
        start_ms(day)
    }

    /// A whole calendar month costs exactly the monthly amount, February as July;
    /// a year of months twelve times it.
    #[test]
    fn whole_months_cost_the_monthly_amount() {
        assert_eq!(prorate(1000, ms("2026-02-01")..ms("2026-03-01")), 1000);
        assert_eq!(prorate(1000, ms("2024-02-01")..ms("2024-03-01")), 1000);
        assert_eq!(prorate(1000, ms("2026-07-01")..ms("2026-08-01")), 1000);
        assert_eq!(
            prorate(999_999, ms("2026-01-01")..ms("2027-01-01")),
            11_999_988
        );
    }

    /// Part of a month costs its share of that month's length, rounded half up;
    /// a range across two months adds its share of each.
    #[test]
    fn parts_of_months_are_prorated() {
        // 10 of 31 days of 3100: 1000 exactly.
        assert_eq!(prorate(3100, ms("2026-01-01")..ms("2026-01-11")), 1000);
        // 1 of 30 days of 1000 = 33.33 → 33; 2 days = 66.67 → 67.
        assert_eq!(prorate(1000, ms("2026-04-01")..ms("2026-04-02")), 33);
        assert_eq!(prorate(1000, ms("2026-04-01")..ms("2026-04-03")), 67);
        // Half a unit rounds up: 1 of 28 days of 14 = 0.5 → 1.
        assert_eq!(prorate(14, ms("2026-02-01")..ms("2026-02-02")), 1);
        // The last day of January (1/31 of 3100 = 100) and the first of February
        // (1/28 of 3100 = 110.71): 210.71, rounded once.
        assert_eq!(prorate(3100, ms("2026-01-31")..ms("2026-02-02")), 211);
    }

    /// Empty, reversed and zero-cost ranges cost nothing; extreme ranges do not panic.
    #[test]
    fn degenerate_ranges_cost_nothing() {
        assert_eq!(prorate(1000, 5..5), 0);
        let (start, end) = (10, 5);
        assert_eq!(prorate(1000, start..end), 0);
        assert_eq!(prorate(0, 0..ms("2027-01-01")), 0);
        assert!(prorate(1, i64::MIN..i64::MAX) > 0);
        assert!(prorate(i64::MAX, i64::MIN..i64::MAX) > 0);
    }
}
