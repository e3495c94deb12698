//! BaseLinker's "blocked until" time: `YYYY-MM-DD HH:MM:SS` in a local time zone the
//! API never names. We model that zone as a fixed UTC offset ([`UtcOffset`]); BaseLinker
//! most likely uses Europe/Warsaw local time (+01:00 in winter, +02:00 in summer), so the
//! default is +01:00 and callers who know better configure it.
//!
//! The calendar arithmetic is Howard Hinnant's `days_from_civil` / `civil_from_days`
//! (proleptic Gregorian), small enough not to warrant a date crate.

use std::fmt;
use std::str::FromStr;

/// A fixed offset from UTC, whole minutes, within ±18 h. Built by `parse` or
/// `from_minutes`, so an out-of-range offset cannot exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UtcOffset {
    /// East of UTC, in minutes.
    minutes: i32,
}

/// Why a UTC offset was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid UTC offset '{0}': expected +HH:MM or -HH:MM within ±18:00, or Z")]
pub struct InvalidUtcOffset(pub String);

impl UtcOffset {
    /// UTC itself.
    pub const UTC: Self = Self { minutes: 0 };
    /// +01:00: Warsaw winter time, our best guess at BaseLinker's zone.
    pub const BASELINKER_DEFAULT: Self = Self { minutes: 60 };

    /// An offset of `minutes` east of UTC.
    pub fn from_minutes(minutes: i32) -> Result<Self, InvalidUtcOffset> {
        if minutes.abs() > 18 * 60 {
            return Err(InvalidUtcOffset(format!("{minutes} minutes")));
        }
        Ok(Self { minutes })
    }

    /// Parses `+HH:MM`, `-HH:MM` or `Z`.
    pub fn parse(text: &str) -> Result<Self, InvalidUtcOffset> {
        let invalid = || InvalidUtcOffset(text.to_owned());
        if text == "Z" || text == "z" {
            return Ok(Self::UTC);
        }
        let bytes = text.as_bytes();
        if bytes.len() != 6 || bytes[3] != b':' {
            return Err(invalid());
        }
        let sign = match bytes[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return Err(invalid()),
        };
        let hours = two_digits(&bytes[1..3]).ok_or_else(invalid)?;
        let minutes = two_digits(&bytes[4..6]).ok_or_else(invalid)?;
        if minutes >= 60 {
            return Err(invalid());
        }
        Self::from_minutes(sign * (hours * 60 + minutes) as i32).map_err(|_| invalid())
    }

    /// East of UTC, in minutes.
    pub fn minutes(self) -> i32 {
        self.minutes
    }

    fn millis(self) -> i64 {
        i64::from(self.minutes) * 60_000
    }
}

impl Default for UtcOffset {
    fn default() -> Self {
        Self::BASELINKER_DEFAULT
    }
}

impl fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.minutes < 0 { '-' } else { '+' };
        let abs = self.minutes.unsigned_abs();
        write!(f, "{sign}{:02}:{:02}", abs / 60, abs % 60)
    }
}

impl FromStr for UtcOffset {
    type Err = InvalidUtcOffset;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS` at `offset`, sub-second part dropped.
pub fn format_local_datetime(unix_ms: i64, offset: UtcOffset) -> String {
    let local_secs = (unix_ms + offset.millis()).div_euclid(1000);
    let (year, month, day) = civil_from_days(local_secs.div_euclid(86_400));
    let second_of_day = local_secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Parses exactly `YYYY-MM-DD HH:MM:SS` read at `offset`, into Unix milliseconds.
/// Refuses impossible dates (2023-02-29, 24:00:00).
pub fn parse_local_datetime(text: &str, offset: UtcOffset) -> Option<i64> {
    let b = text.as_bytes();
    let separators_ok = b.len() == 19
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && b[16] == b':';
    if !separators_ok {
        return None;
    }
    let year = i64::from(two_digits(&b[0..2])? * 100 + two_digits(&b[2..4])?);
    let month = two_digits(&b[5..7])?;
    let day = two_digits(&b[8..10])?;
    let (hour, minute, second) = (
        two_digits(&b[11..13])?,
        two_digits(&b[14..16])?,
        two_digits(&b[17..19])?,
    );
    let valid = (1..=12).contains(&month)
        && day >= 1
        && day <= days_in_month(year, month)
        && hour < 24
        && minute < 60
        && second < 60;
    if !valid {
        return None;
    }
    let local_secs =
        days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some(local_secs * 1000 - offset.millis())
}

fn two_digits(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [a @ b'0'..=b'9', b @ b'0'..=b'9'] => Some(u32::from(a - b'0') * 10 + u32::from(b - b'0')),
        _ => None,
    }
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known instant formats as the documented example, at UTC and at +02:00.
    #[test]
    fn formats_a_known_instant() {
        // 2022-05-03 15:15:34 UTC
        let ms = 1_651_590_934_000;
        assert_eq!(
            format_local_datetime(ms, UtcOffset::UTC),
            "2022-05-03 15:15:34"
        );
        let warsaw_summer = UtcOffset::parse("+02:00").unwrap();
        assert_eq!(
            format_local_datetime(ms, warsaw_summer),
            "2022-05-03 17:15:34"
        );
        assert_eq!(
            format_local_datetime(-1000, UtcOffset::UTC),
            "1969-12-31 23:59:59"
        );
    }

    /// Formatting then parsing at the same offset gives back the instant (whole seconds),
    /// across leap days, year ends and negative offsets.
    #[test]
    fn format_and_parse_round_trip() {
        let offsets = ["+01:00", "-05:30", "Z", "+14:00", "-12:00"].map(|o| o.parse().unwrap());
        let instants = [
            0,
            951_782_400_000,   // 2000-02-29
            1_709_164_799_000, // 2024-02-28 23:59:59
            1_735_689_599_000, // 2024-12-31 23:59:59
            4_102_444_800_000, // 2100-01-01
        ];
        for offset in offsets {
            for ms in instants {
                let text = format_local_datetime(ms, offset);
                assert_eq!(
                    parse_local_datetime(&text, offset),
                    Some(ms),
                    "{text} {offset}"
                );
            }
        }
    }

    /// Impossible or malformed dates are refused rather than normalised.
    #[test]
    fn refuses_impossible_dates() {
        for text in [
            "2023-02-29 00:00:00",
            "2024-13-01 00:00:00",
            "2024-01-01 24:00:00",
            "2024-01-01T00:00:00",
            "2024-1-01 00:00:00",
            "",
        ] {
            assert_eq!(parse_local_datetime(text, UtcOffset::UTC), None, "{text}");
        }
        assert!(parse_local_datetime("2024-02-29 00:00:00", UtcOffset::UTC).is_some());
    }

    /// Offsets parse and display as +HH:MM, and out-of-range ones are refused.
    #[test]
    fn offsets_parse_and_display() {
        assert_eq!(UtcOffset::parse("-05:30").unwrap().minutes(), -330);
        assert_eq!(UtcOffset::parse("-05:30").unwrap().to_string(), "-05:30");
        assert_eq!(UtcOffset::default().to_string(), "+01:00");
        for bad in ["+19:00", "01:00", "+1:00", "+01:60", "+01-00"] {
            assert!(UtcOffset::parse(bad).is_err(), "{bad}");
        }
    }
}
