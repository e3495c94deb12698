//! BaseLinker's "blocked until" time: `YYYY-MM-DD HH:MM:SS` in a local time zone the
//! API never names — most likely Europe/Warsaw (+01:00 in winter, +02:00 in summer),
//! the default [`BlockZone`]. A fixed UTC offset can be configured instead.
//!
//! The calendar and the zone rules are jiff's, with the tz database compiled in (the
//! Docker image has no `/usr/share/zoneinfo`). A local time is ambiguous once a year
//! (the autumn hour that repeats) and impossible once (the spring hour that is skipped):
//! both are read as the *later* instant, so a quarantine read from one never ends
//! early. The client crate (`tokenlease-client`, `baselinker` module) reads these times
//! by the same rules.

use std::fmt;
use std::str::FromStr;

use jiff::civil::DateTime;
use jiff::tz::{Disambiguation, Offset, TimeZone};

/// The zone "blocked until" times are written and read in: an IANA zone name from the
/// tz database (default `Europe/Warsaw`) or a fixed offset (`+01:00`, `-05:30`, `Z`).
/// Built by `parse`, so an unknown zone cannot exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockZone {
    /// As configured, for display.
    name: String,
    zone: TimeZone,
}

/// Why a zone was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid time zone '{0}': expected an IANA name such as Europe/Warsaw, or a fixed \
     offset +HH:MM / -HH:MM within ±18:00, or Z"
)]
pub struct InvalidZone(pub String);

impl BlockZone {
    /// BaseLinker's zone, as far as anyone knows.
    pub const BASELINKER_DEFAULT: &'static str = "Europe/Warsaw";

    /// UTC, as a fixed offset.
    pub fn utc() -> Self {
        Self {
            name: "Z".into(),
            zone: TimeZone::UTC,
        }
    }

    /// Parses an IANA zone name or a fixed offset (`+HH:MM`, `-HH:MM`, `Z`).
    pub fn parse(text: &str) -> Result<Self, InvalidZone> {
        let invalid = || InvalidZone(text.to_owned());
        let is_offset = text.starts_with(['+', '-']) || text.eq_ignore_ascii_case("z");
        let zone = if is_offset {
            fixed_offset(text).ok_or_else(invalid)?
        } else if text.is_empty() {
            return Err(invalid());
        } else {
            TimeZone::get(text).map_err(|_| invalid())?
        };
        Ok(Self {
            name: text.to_owned(),
            zone,
        })
    }
}

impl Default for BlockZone {
    fn default() -> Self {
        Self::parse(Self::BASELINKER_DEFAULT).expect("the bundled tz database has Europe/Warsaw")
    }
}

impl fmt::Display for BlockZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for BlockZone {
    type Err = InvalidZone;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// `+HH:MM`, `-HH:MM` or `Z` as a fixed zone, within ±18:00.
fn fixed_offset(text: &str) -> Option<TimeZone> {
    if text.eq_ignore_ascii_case("z") {
        return Some(TimeZone::UTC);
    }
    let b = text.as_bytes();
    if b.len() != 6 || b[3] != b':' {
        return None;
    }
    let sign = match b[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (hours, minutes) = (two_digits(&b[1..3])?, two_digits(&b[4..6])?);
    if minutes >= 60 || hours * 60 + minutes > 18 * 60 {
        return None;
    }
    let offset = Offset::from_seconds(sign * (hours * 3600 + minutes * 60)).ok()?;
    Some(TimeZone::fixed(offset))
}

fn two_digits(bytes: &[u8]) -> Option<i32> {
    match bytes {
        [a @ b'0'..=b'9', b @ b'0'..=b'9'] => Some(i32::from(a - b'0') * 10 + i32::from(b - b'0')),
        _ => None,
    }
}

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS` in `zone`, sub-second part dropped.
pub fn format_local_datetime(unix_ms: i64, zone: &BlockZone) -> String {
    let Ok(instant) = jiff::Timestamp::from_millisecond(unix_ms.div_euclid(1000) * 1000) else {
        return String::new();
    };
    instant
        .to_zoned_datetime(zone.zone.clone())
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Parses exactly `YYYY-MM-DD HH:MM:SS` read in `zone`, into Unix milliseconds.
/// Refuses impossible dates (2023-02-29, 24:00:00); a repeated or skipped local time
/// gives the later instant.
pub fn parse_local_datetime(text: &str, zone: &BlockZone) -> Option<i64> {
    let b = text.as_bytes();
    let shape_ok = b.len() == 19
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b' ',
            13 | 16 => c == b':',
            _ => c.is_ascii_digit(),
        });
    if !shape_ok {
        return None;
    }
    let civil: DateTime = text.replacen(' ', "T", 1).parse().ok()?;
    let instant = zone
        .zone
        .to_ambiguous_timestamp(civil)
        .disambiguate(Disambiguation::Later)
        .ok()?;
    Some(instant.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(text: &str) -> BlockZone {
        text.parse().unwrap()
    }

    /// A known instant formats as the documented example, at UTC and at +02:00.
    #[test]
    fn formats_a_known_instant() {
        // 2022-05-03 15:15:34 UTC
        let ms = 1_651_590_934_000;
        assert_eq!(
            format_local_datetime(ms, &BlockZone::utc()),
            "2022-05-03 15:15:34"
        );
        assert_eq!(
            format_local_datetime(ms, &zone("+02:00")),
            "2022-05-03 17:15:34"
        );
        assert_eq!(
            format_local_datetime(-1000, &BlockZone::utc()),
            "1969-12-31 23:59:59"
        );
    }

    /// Formatting then parsing in the same zone gives back the instant (whole seconds),
    /// across leap days, year ends, negative offsets and named zones.
    #[test]
    fn format_and_parse_round_trip() {
        let zones = [
            "+01:00",
            "-05:30",
            "Z",
            "+14:00",
            "-12:00",
            "Europe/Warsaw",
            "America/New_York",
        ]
        .map(zone);
        let instants = [
            0,
            951_782_400_000,   // 2000-02-29
            1_709_164_799_000, // 2024-02-28 23:59:59
            1_735_689_599_000, // 2024-12-31 23:59:59
            4_102_444_800_000, // 2100-01-01
        ];
        for zone in &zones {
            for ms in instants {
                let text = format_local_datetime(ms, zone);
                assert_eq!(parse_local_datetime(&text, zone), Some(ms), "{text} {zone}");
            }
        }
    }

    /// Europe/Warsaw (the default) is +02:00 on a summer date and +01:00 on a winter
    /// one, writing and reading alike — a fixed +01:00 would be an hour off all summer.
    #[test]
    fn warsaw_is_plus_two_in_summer_and_plus_one_in_winter() {
        let warsaw = BlockZone::default();
        assert_eq!(warsaw.to_string(), "Europe/Warsaw");
        let summer_ms = 1_782_900_000_000; // 2026-07-01 10:00:00 UTC
        let winter_ms = 1_768_471_200_000; // 2026-01-15 10:00:00 UTC
        assert_eq!(
            format_local_datetime(summer_ms, &warsaw),
            "2026-07-01 12:00:00"
        );
        assert_eq!(
            format_local_datetime(winter_ms, &warsaw),
            "2026-01-15 11:00:00"
        );
        assert_eq!(
            parse_local_datetime("2026-07-01 12:00:00", &warsaw),
            Some(summer_ms)
        );
        assert_eq!(
            parse_local_datetime("2026-01-15 11:00:00", &warsaw),
            Some(winter_ms)
        );
        // The fixed offset, still available, is what it says all year.
        let fixed = zone("+01:00");
        assert_eq!(
            format_local_datetime(summer_ms, &fixed),
            "2026-07-01 11:00:00"
        );
    }

    /// The DST fold (2026-10-25, 02:00–03:00 happens twice) and gap (2026-03-29,
    /// 02:00–03:00 never happens) in Warsaw read as the later instant: a block end is
    /// never taken early. Both instants of the fold format to the same text.
    #[test]
    fn dst_fold_and_gap_read_as_the_later_instant() {
        let warsaw = BlockZone::default();
        let first_0230 = 1_792_888_200_000; // 00:30 UTC, 02:30 CEST
        let second_0230 = 1_792_891_800_000; // 01:30 UTC, 02:30 CET
        assert_eq!(
            format_local_datetime(first_0230, &warsaw),
            "2026-10-25 02:30:00"
        );
        assert_eq!(
            format_local_datetime(second_0230, &warsaw),
            "2026-10-25 02:30:00"
        );
        assert_eq!(
            parse_local_datetime("2026-10-25 02:30:00", &warsaw),
            Some(second_0230)
        );
        // In the gap: read at the offset before it (+01:00), i.e. 03:30 CEST.
        assert_eq!(
            parse_local_datetime("2026-03-29 02:30:00", &warsaw),
            Some(1_774_747_800_000)
        );
        assert_eq!(
            format_local_datetime(1_774_747_800_000, &warsaw),
            "2026-03-29 03:30:00"
        );
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
            assert_eq!(
                parse_local_datetime(text, &BlockZone::utc()),
                None,
                "{text}"
            );
        }
        assert!(parse_local_datetime("2024-02-29 00:00:00", &BlockZone::utc()).is_some());
    }

    /// Zones parse from IANA names and ±HH:MM offsets; unknown names and out-of-range
    /// offsets are refused.
    #[test]
    fn zones_parse_and_display() {
        assert_eq!(zone("-05:30").to_string(), "-05:30");
        assert_eq!(zone("Europe/Warsaw"), BlockZone::default());
        for bad in [
            "+19:00",
            "01:00",
            "+1:00",
            "+01:60",
            "+01-00",
            "",
            "Europe/Atlantis",
        ] {
            assert!(BlockZone::parse(bad).is_err(), "{bad}");
        }
    }
}
