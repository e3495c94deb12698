//! BaseLinker's "blocked until" time: `YYYY-MM-DD HH:MM:SS` in a local time zone the
//! API never names — most likely Europe/Warsaw (+01:00 in winter, +02:00 in summer),
//! the default [`BlockZone`]. A fixed UTC offset can be configured instead.
//!
//! The zone and its reading rules are the client crate's (`tokenlease-client`,
//! `baselinker` module), so that the service's emulator writes these times exactly as
//! workers read them: the calendar and the zone rules are jiff's, with the tz database
//! compiled in, and a local time that is ambiguous (the autumn hour that repeats) or
//! impossible (the spring hour that is skipped) is read as the *later* instant, so a
//! quarantine read from one never ends early. Here they are adapted to the service's
//! Unix milliseconds.

use std::time::{Duration, UNIX_EPOCH};

pub use tokenlease_client::baselinker::{BlockZone, InvalidZone};

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS` in `zone`, sub-second part dropped.
pub fn format_local_datetime(unix_ms: i64, zone: &BlockZone) -> String {
    let whole_seconds = Duration::from_secs(unix_ms.div_euclid(1000).unsigned_abs());
    let at = if unix_ms >= 0 {
        UNIX_EPOCH.checked_add(whole_seconds)
    } else {
        UNIX_EPOCH.checked_sub(whole_seconds)
    };
    at.map(|at| zone.format(at)).unwrap_or_default()
}

/// Parses exactly `YYYY-MM-DD HH:MM:SS` read in `zone`, into Unix milliseconds.
/// Refuses impossible dates (2023-02-29, 24:00:00); a repeated or skipped local time
/// gives the later instant.
pub fn parse_local_datetime(text: &str, zone: &BlockZone) -> Option<i64> {
    let at = zone.parse_local(text)?;
    Some(match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).ok()?,
        Err(before) => -i64::try_from(before.duration().as_millis()).ok()?,
    })
}

/// UTC, as a fixed offset.
#[cfg(test)]
pub(crate) fn utc() -> BlockZone {
    BlockZone::parse("Z").expect("Z is a valid zone")
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
        assert_eq!(format_local_datetime(ms, &utc()), "2022-05-03 15:15:34");
        assert_eq!(
            format_local_datetime(ms, &zone("+02:00")),
            "2022-05-03 17:15:34"
        );
        assert_eq!(format_local_datetime(-1000, &utc()), "1969-12-31 23:59:59");
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
            assert_eq!(parse_local_datetime(text, &utc()), None, "{text}");
        }
        assert!(parse_local_datetime("2024-02-29 00:00:00", &utc()).is_some());
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
