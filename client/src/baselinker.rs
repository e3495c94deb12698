//! The BaseLinker adapter: its answers as an [`Outcome`], and the time
//! in its "token blocked until" message.
//!
//! BaseLinker answers HTTP 200 with a JSON envelope: `"status": "SUCCESS"`, or
//! `"status": "ERROR"` with `error_code` and `error_message`. A token over its limit
//! gets `ERROR_BLOCKED_TOKEN` "Query limit exceeded, token blocked until
//! YYYY-MM-DD HH:MM:SS", a local time of a zone the API never names: most likely
//! Europe/Warsaw (+01:00 in winter, +02:00 in summer), the default [`BlockZone`]; a
//! fixed offset can be configured instead.
//!
//! A local time is ambiguous once a year (the autumn hour that repeats) and impossible
//! once (the spring hour that is skipped): both are read as the *later* instant, so a
//! quarantine is never lifted early — at worst an hour late, once a year.
//!
//! No HTTP client is included: call BaseLinker with the one you use, then sort the
//! answer with [`Reply::from_http`].
//!
//! ```
//! use tokenlease_client::baselinker::{BlockZone, Reply};
//! use tokenlease_client::{Outcome, ReportOutcome};
//!
//! let body = br#"{"status":"ERROR","error_code":"ERROR_BLOCKED_TOKEN",
//!     "error_message":"Query limit exceeded, token blocked until 2026-07-01 12:00:00"}"#;
//! let reply = Reply::from_http(200, body, &BlockZone::default());
//! let Outcome::RateLimited { blocked_until: Some(until) } = reply.outcome() else { panic!() };
//! // 12:00 in Warsaw in July is 10:00 UTC.
//! assert_eq!(until.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_782_900_000);
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::civil::DateTime;
use jiff::tz::{Disambiguation, Offset, TimeZone};

use crate::call::ReportOutcome;
use crate::lease::Outcome;

/// The error code BaseLinker answers when a token is over its limit.
pub const ERROR_BLOCKED_TOKEN: &str = "ERROR_BLOCKED_TOKEN";
/// What older accounts answered instead of [`ERROR_BLOCKED_TOKEN`]; treated the same.
pub const ERROR_USER_ACCOUNT_BLOCKED: &str = "ERROR_USER_ACCOUNT_BLOCKED";
/// The error code of a token BaseLinker does not know.
pub const ERROR_BAD_TOKEN: &str = "ERROR_BAD_TOKEN";

/// The zone "blocked until" times are read in: an IANA zone (default `Europe/Warsaw`,
/// from the tz database compiled into this crate) or a fixed offset (`+01:00`).
///
/// ```
/// use tokenlease_client::baselinker::BlockZone;
///
/// let warsaw: BlockZone = "Europe/Warsaw".parse().unwrap();
/// let fixed: BlockZone = "+01:00".parse().unwrap();
/// assert_eq!(warsaw, BlockZone::default());
/// assert_eq!(fixed.to_string(), "+01:00");
/// assert!("Mars/Olympus".parse::<BlockZone>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockZone {
    /// What was configured, for display.
    name: String,
    zone: TimeZone,
}

/// Why a zone was refused.
///
/// ```
/// use tokenlease_client::baselinker::BlockZone;
///
/// let error = "+25:00".parse::<BlockZone>().unwrap_err();
/// assert!(error.to_string().contains("+25:00"));
/// ```
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid time zone '{0}': expected an IANA name such as Europe/Warsaw, or a fixed \
     offset +HH:MM / -HH:MM within ±18:00, or Z"
)]
pub struct InvalidZone(pub String);

impl BlockZone {
    /// BaseLinker's zone, as far as anyone knows.
    pub const DEFAULT_NAME: &'static str = "Europe/Warsaw";

    /// Parses an IANA zone name or a fixed offset (`+HH:MM`, `-HH:MM`, `Z`).
    ///
    /// ```
    /// use tokenlease_client::baselinker::BlockZone;
    ///
    /// assert!(BlockZone::parse("America/New_York").is_ok());
    /// assert!(BlockZone::parse("-05:30").is_ok());
    /// ```
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

    /// The local time `at` shows in this zone, as BaseLinker writes it
    /// (`YYYY-MM-DD HH:MM:SS`, sub-second part dropped).
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// use tokenlease_client::baselinker::BlockZone;
    ///
    /// let winter = UNIX_EPOCH + Duration::from_secs(1_767_268_800); // 2026-01-01 12:00 UTC
    /// assert_eq!(BlockZone::default().format(winter), "2026-01-01 13:00:00");
    /// ```
    pub fn format(&self, at: SystemTime) -> String {
        let Ok(timestamp) = jiff::Timestamp::try_from(at) else {
            return String::new();
        };
        timestamp
            .to_zoned_datetime(self.zone.clone())
            .strftime("%Y-%m-%d %H:%M:%S")
            .to_string()
    }

    /// Reads exactly `YYYY-MM-DD HH:MM:SS` in this zone; `None` when it is not such a
    /// time. A repeated or skipped local time is read as the later instant.
    ///
    /// ```
    /// use std::time::UNIX_EPOCH;
    /// use tokenlease_client::baselinker::BlockZone;
    ///
    /// let summer = BlockZone::default().parse_local("2026-07-01 12:00:00").unwrap();
    /// assert_eq!(summer.duration_since(UNIX_EPOCH).unwrap().as_secs(), 1_782_900_000);
    /// assert_eq!(BlockZone::default().parse_local("2026-02-30 12:00:00"), None);
    /// ```
    pub fn parse_local(&self, text: &str) -> Option<SystemTime> {
        let valid_shape = text.len() == 19
            && text.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                10 => b == b' ',
                13 | 16 => b == b':',
                _ => b.is_ascii_digit(),
            });
        if !valid_shape {
            return None;
        }
        let civil: DateTime = text.replace(' ', "T").parse().ok()?;
        let instant = self
            .zone
            .to_ambiguous_timestamp(civil)
            .disambiguate(Disambiguation::Later)
            .ok()?;
        let seconds = instant.as_second();
        if seconds >= 0 {
            Some(UNIX_EPOCH + Duration::from_secs(seconds.unsigned_abs()))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(seconds.unsigned_abs()))
        }
    }

    /// The time in a "blocked until" message (its last 19 characters), if it has one.
    ///
    /// ```
    /// use tokenlease_client::baselinker::BlockZone;
    ///
    /// let zone = BlockZone::default();
    /// let message = "Query limit exceeded, token blocked until 2026-01-15 10:00:00";
    /// assert!(zone.blocked_until(message).is_some());
    /// assert_eq!(zone.blocked_until("Query limit exceeded"), None);
    /// ```
    pub fn blocked_until(&self, message: &str) -> Option<SystemTime> {
        let start = message.len().checked_sub(19)?;
        self.parse_local(message.get(start..)?)
    }
}

impl Default for BlockZone {
    fn default() -> Self {
        Self::parse(Self::DEFAULT_NAME).expect("the bundled tz database has Europe/Warsaw")
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
    let digits = |s: &[u8]| -> Option<i32> {
        let text = std::str::from_utf8(s).ok()?;
        text.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| text.parse().ok())?
    };
    let (hours, minutes) = (digits(&b[1..3])?, digits(&b[4..6])?);
    if minutes >= 60 || hours * 60 + minutes > 18 * 60 {
        return None;
    }
    let offset = Offset::from_seconds(sign * (hours * 3600 + minutes * 60)).ok()?;
    Some(TimeZone::fixed(offset))
}

/// What BaseLinker said to one call, sorted for the lease's outcome.
///
/// ```
/// use tokenlease_client::baselinker::{BlockZone, Reply};
/// use tokenlease_client::{Outcome, ReportOutcome};
///
/// let ok = Reply::from_http(200, br#"{"status":"SUCCESS","orders":[]}"#, &BlockZone::default());
/// assert_eq!(ok.outcome(), Outcome::Success);
/// assert_eq!(Reply::from_http(502, b"<html>", &BlockZone::default()).outcome(), Outcome::UpstreamError);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `"status": "SUCCESS"`: the whole JSON answer.
    Success(serde_json::Value),
    /// The token is blocked (`ERROR_BLOCKED_TOKEN` or `ERROR_USER_ACCOUNT_BLOCKED`):
    /// reported as rate-limited until `until`.
    Blocked {
        /// When the block ends, if the message carried a readable time.
        until: Option<SystemTime>,
        /// The message as received.
        message: String,
    },
    /// Any other `"status": "ERROR"`: the upstream answered, the request was at fault
    /// (reported as a success, so that one worker's bad parameters do not open the
    /// token's breaker for everybody) — except `ERROR_BAD_TOKEN`, an upstream error.
    Error {
        /// `error_code`.
        code: String,
        /// `error_message`.
        message: String,
    },
    /// No usable answer: an HTTP status other than 200, or a body that is not the JSON
    /// envelope (a gateway's error page). Reported as an upstream error.
    Failure {
        /// The HTTP status.
        http_status: u16,
    },
}

impl Reply {
    /// Sorts one HTTP answer (status and body) into a reply, reading "blocked until"
    /// times in `zone`.
    ///
    /// ```
    /// use tokenlease_client::baselinker::{BlockZone, Reply};
    ///
    /// let reply = Reply::from_http(
    ///     200,
    ///     br#"{"status":"ERROR","error_code":"ERROR_BAD_PARAMS","error_message":"no"}"#,
    ///     &BlockZone::default(),
    /// );
    /// assert!(matches!(reply, Reply::Error { .. }));
    /// ```
    pub fn from_http(http_status: u16, body: &[u8], zone: &BlockZone) -> Reply {
        if http_status != 200 {
            return Reply::Failure { http_status };
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Reply::Failure { http_status };
        };
        let text = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        match text("status") {
            "SUCCESS" => Reply::Success(value),
            "ERROR" => {
                let (code, message) = (
                    text("error_code").to_owned(),
                    text("error_message").to_owned(),
                );
                if code == ERROR_BLOCKED_TOKEN || code == ERROR_USER_ACCOUNT_BLOCKED {
                    let until = zone.blocked_until(&message);
                    return Reply::Blocked { until, message };
                }
                Reply::Error { code, message }
            }
            _ => Reply::Failure { http_status },
        }
    }
}

impl ReportOutcome for Reply {
    fn outcome(&self) -> Outcome {
        match self {
            Reply::Success(_) => Outcome::Success,
            Reply::Blocked { until, .. } => Outcome::RateLimited {
                blocked_until: *until,
            },
            Reply::Error { code, .. } if code == ERROR_BAD_TOKEN => Outcome::UpstreamError,
            Reply::Error { .. } => Outcome::Success,
            Reply::Failure { .. } => Outcome::UpstreamError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(at: SystemTime) -> i64 {
        at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    /// Warsaw is +02:00 in summer and +01:00 in winter, both ways.
    #[test]
    fn warsaw_summer_and_winter() {
        let zone = BlockZone::default();
        // 2026-07-01 10:00:00 UTC and 2026-01-15 10:00:00 UTC.
        let (summer, winter) = (1_782_900_000, 1_768_471_200);
        assert_eq!(
            unix(zone.parse_local("2026-07-01 12:00:00").unwrap()),
            summer
        );
        assert_eq!(
            unix(zone.parse_local("2026-01-15 11:00:00").unwrap()),
            winter
        );
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(zone.format(at(summer as u64)), "2026-07-01 12:00:00");
        assert_eq!(zone.format(at(winter as u64)), "2026-01-15 11:00:00");
    }

    /// The autumn hour that repeats and the spring hour that is skipped are read as the
    /// later instant: a quarantine never ends early.
    #[test]
    fn dst_fold_and_gap_read_late() {
        let zone = BlockZone::default();
        // 2026-10-25: 03:00 CEST → 02:00 CET; 02:30 happens at 00:30 and 01:30 UTC.
        let fold = unix(zone.parse_local("2026-10-25 02:30:00").unwrap());
        assert_eq!(fold, 1_792_891_800, "the second 02:30, 01:30 UTC");
        // 2026-03-29: 02:00 CET → 03:00 CEST; 02:30 never happens.
        let gap = unix(zone.parse_local("2026-03-29 02:30:00").unwrap());
        assert_eq!(
            gap, 1_774_747_800,
            "read at +01:00: 01:30 UTC, i.e. 03:30 CEST"
        );
    }

    /// Fixed offsets parse and bound; names must be in the tz database.
    #[test]
    fn zones_parse() {
        let fixed = BlockZone::parse("+01:00").unwrap();
        assert_eq!(
            unix(fixed.parse_local("2026-07-01 12:00:00").unwrap()),
            1_782_903_600
        );
        assert!(BlockZone::parse("Z").is_ok());
        for bad in ["+19:00", "01:00", "+1:00", "+01:60", "", "Europe/Nowhere"] {
            assert!(BlockZone::parse(bad).is_err(), "{bad}");
        }
    }

    /// Malformed or impossible times are refused rather than normalised.
    #[test]
    fn refuses_impossible_times() {
        let zone = BlockZone::default();
        for text in [
            "2023-02-29 00:00:00",
            "2024-01-01 24:00:00",
            "2024-01-01T00:00:00",
            "2024-1-01 00:00:00",
        ] {
            assert_eq!(zone.parse_local(text), None, "{text}");
        }
    }

    /// Every answer sorts into the outcome the lease is released with.
    #[test]
    fn replies_report_outcomes() {
        let zone = BlockZone::default();
        let blocked = Reply::from_http(
            200,
            br#"{"status":"ERROR","error_code":"ERROR_USER_ACCOUNT_BLOCKED","error_message":"blocked"}"#,
            &zone,
        );
        assert_eq!(
            blocked.outcome(),
            Outcome::RateLimited {
                blocked_until: None
            }
        );
        let bad_token = Reply::from_http(
            200,
            br#"{"status":"ERROR","error_code":"ERROR_BAD_TOKEN","error_message":"Invalid user token"}"#,
            &zone,
        );
        assert_eq!(bad_token.outcome(), Outcome::UpstreamError);
        assert_eq!(
            Reply::from_http(200, b"<html>", &zone).outcome(),
            Outcome::UpstreamError
        );
    }
}
