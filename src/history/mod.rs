//! Usage history: per tenant and per token, in time buckets (`history.bucket_ms`,
//! hourly by default), what was asked, granted, denied (per reason), how long callers
//! waited (p50/p99), how leases were released (upstream errors, rate-limit reports) and
//! the share of grants borrowed beyond the tenant's guarantee.
//!
//! - `tally`: the counts of one bucket and subject, merged across replicas and buckets
//!   (pure).
//! - `recorder`: the replica's counts in memory, fed by the lease use cases.
//! - `grants`: leases granted per tenant *and* token (for `crate::cost`), kept and
//!   written beside the tallies, in their own table.
//! - `flusher`: writes them to the configuration store every `history.flush_ms`
//!   (each replica its own rows: no contention, nothing counted twice), and deletes
//!   rows older than `history.retention_days`.
//! - `forecaster`: recomputes the pools' capacity forecast gauge from the stored
//!   history every `history.forecast_interval_ms` (`crate::forecast` does the maths).
//! - [`read`]: the `GetUsageHistory` use case: a range, summed over replicas, rolled
//!   up into coarser buckets if asked, paged.

mod flusher;
mod forecaster;
mod grants;
mod recorder;
mod tally;

pub use flusher::{Flusher, HistorySettings};
pub use forecaster::{ForecastSettings, Forecaster, gauge_value};
pub use grants::{GrantCounts, GrantRow};
pub use recorder::{Acquired, GrantOf, Recorder};
pub use tally::{
    DENIAL_REASONS, HistoryRow, Subject, SubjectKind, Tally, WAIT_BOUNDS_MS, WaitHistogram,
    bucket_start, roll_up,
};

use crate::domain::InvalidField;
use crate::error::ServiceError;
use crate::store::ConfigStore;

/// How many stored buckets one read may span (per subject): hourly buckets, 416 days.
pub const MAX_BUCKETS_PER_READ: i64 = 10_000;
/// Rows per page when the request names no page size, and at most.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1_000;

/// Which subjects a read covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// `None`: every tenant; `Some(ids)`: these only (empty: no tenant).
    pub tenants: Option<Vec<String>>,
    /// `None`: every token; `Some(ids)`: these only (empty: no token).
    pub tokens: Option<Vec<String>>,
    /// Only tokens of this upstream (tenants are counted across their upstreams).
    pub upstream_id: Option<String>,
}

/// A validated GetUsageHistory.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub start_ms: i64,
    pub end_ms: i64,
    /// The bucket of the answer: a multiple of the stored bucket.
    pub bucket_ms: i64,
    pub selection: Selection,
    pub page_size: usize,
    /// Where the previous page ended (see [`PageCursor`]).
    pub after: Option<PageCursor>,
}

/// The last row of a page: the next page starts after it. As text:
/// `<bucket start ms>/<kind>/<subject id>/<upstream id>` (ids never hold a `/`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageCursor {
    pub bucket_start_ms: i64,
    pub subject: Subject,
}

impl PageCursor {
    pub fn to_token(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.bucket_start_ms,
            self.subject.kind.as_str(),
            self.subject.id,
            self.subject.upstream_id
        )
    }

    pub fn parse(token: &str) -> Result<Self, InvalidField> {
        let bad = || InvalidField::new("page_token", "is not a token from a previous page");
        let mut parts = token.split('/');
        let (Some(start), Some(kind), Some(id), Some(upstream), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        Ok(Self {
            bucket_start_ms: start.parse().map_err(|_| bad())?,
            subject: Subject {
                kind: SubjectKind::parse(kind).ok_or_else(bad)?,
                id: id.to_owned(),
                upstream_id: upstream.to_owned(),
            },
        })
    }
}

/// Checks a read's range and bucket against the stored bucket `stored_ms`: the range
/// is required, non-empty, and spans at most [`MAX_BUCKETS_PER_READ`] stored buckets;
/// the bucket is a multiple of the stored one. Returns the range widened to whole
/// answer buckets.
pub fn check_range(
    start_ms: i64,
    end_ms: i64,
    bucket_ms: i64,
    stored_ms: i64,
) -> Result<(i64, i64), InvalidField> {
    if bucket_ms <= 0 || bucket_ms % stored_ms != 0 {
        return Err(InvalidField::new(
            "bucket",
            format!("must be a positive multiple of the stored bucket ({stored_ms} ms)"),
        ));
    }
    if end_ms <= start_ms {
        return Err(InvalidField::new("end_time", "must be after start_time"));
    }
    let start = bucket_start(start_ms, bucket_ms);
    let end = bucket_start(end_ms - 1, bucket_ms).saturating_add(bucket_ms);
    if (end - start) / stored_ms > MAX_BUCKETS_PER_READ {
        return Err(InvalidField::new(
            "end_time",
            format!(
                "the range spans more than {MAX_BUCKETS_PER_READ} stored buckets of {stored_ms} ms; \
                 ask for a shorter one"
            ),
        ));
    }
    Ok((start, end))
}

/// One page of history and the token of the next (empty on the last page).
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub rows: Vec<HistoryRow>,
    pub next_page_token: String,
}

/// Reads a range (checked by [`check_range`]), sums replicas and stored buckets into
/// the query's buckets, and returns the page after `query.after`.
///
/// Every page re-reads the range and rolls it up: simple and exact, at the cost of
/// reading the whole range per page (bounded by [`MAX_BUCKETS_PER_READ`]).
pub async fn read(store: &ConfigStore, query: &HistoryQuery) -> Result<HistoryPage, ServiceError> {
    // A next page starts in the bucket its cursor is in: the buckets before it, all on
    // earlier pages, are not read again.
    let from_ms = query
        .after
        .as_ref()
        .map_or(query.start_ms, |c| c.bucket_start_ms.max(query.start_ms));
    let rows = store
        .read_history(from_ms, query.end_ms, &query.selection)
        .await?;
    Ok(page(roll_up(rows, query.bucket_ms), query))
}

/// The page of `rolled` (sorted by bucket, then subject) after the query's cursor.
fn page(rolled: Vec<HistoryRow>, query: &HistoryQuery) -> HistoryPage {
    let after = |row: &HistoryRow| match &query.after {
        None => true,
        Some(cursor) => {
            (row.bucket_start_ms, &row.subject) > (cursor.bucket_start_ms, &cursor.subject)
        }
    };
    let mut rows: Vec<HistoryRow> = rolled
        .into_iter()
        .filter(after)
        .take(query.page_size + 1)
        .collect();
    let mut next_page_token = String::new();
    if rows.len() > query.page_size {
        rows.truncate(query.page_size);
        if let Some(last) = rows.last() {
            next_page_token = PageCursor {
                bucket_start_ms: last.bucket_start_ms,
                subject: last.subject.clone(),
            }
            .to_token();
        }
    }
    HistoryPage {
        rows,
        next_page_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    /// Ranges widen to whole buckets; an empty or reversed range, a bucket that is not
    /// a multiple of the stored one and a range of too many buckets are refused, each
    /// naming its field.
    #[test]
    fn ranges_are_checked_and_widened() {
        assert_eq!(check_range(10, HOUR + 10, HOUR, HOUR), Ok((0, 2 * HOUR)));
        assert_eq!(check_range(0, HOUR, HOUR, HOUR), Ok((0, HOUR)));
        let field = |r: Result<(i64, i64), InvalidField>| r.unwrap_err().field;
        assert_eq!(field(check_range(5, 5, HOUR, HOUR)), "end_time");
        assert_eq!(field(check_range(0, HOUR, HOUR / 2, HOUR)), "bucket");
        assert_eq!(field(check_range(0, HOUR, 0, HOUR)), "bucket");
        let too_long = (MAX_BUCKETS_PER_READ + 1) * HOUR;
        assert_eq!(field(check_range(0, too_long, HOUR, HOUR)), "end_time");
        assert!(check_range(0, too_long - HOUR, HOUR, HOUR).is_ok());
    }

    /// Pages follow each other without a gap or a repeat, and the last has no token.
    #[test]
    fn pages_cover_every_row_once() {
        let rows: Vec<HistoryRow> = (0..5)
            .flat_map(|b| {
                ["a", "b"].map(|t| HistoryRow {
                    bucket_start_ms: b * HOUR,
                    subject: Subject::tenant(t),
                    tally: Tally::default(),
                })
            })
            .collect();
        let mut query = HistoryQuery {
            start_ms: 0,
            end_ms: 5 * HOUR,
            bucket_ms: HOUR,
            selection: Selection::default(),
            page_size: 3,
            after: None,
        };
        let mut seen = Vec::new();
        loop {
            let page = page(rows.clone(), &query);
            seen.extend(page.rows);
            if page.next_page_token.is_empty() {
                break;
            }
            query.after = Some(PageCursor::parse(&page.next_page_token).unwrap());
        }
        assert_eq!(seen, rows);
        assert!(PageCursor::parse("1/tenant/a").is_err());
        assert!(PageCursor::parse("x/tenant/a/").is_err());
        assert!(PageCursor::parse("1/pool/a/").is_err());
    }
}
