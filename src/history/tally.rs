//! What one time bucket holds about one subject (a tenant, or a token of an upstream),
//! and how tallies merge: across replicas (each writes its own rows) and across stored
//! buckets (a read may ask for coarser ones). Pure: no I/O, no clock.
//!
//! Waits are kept as a fixed log-scale histogram rather than a list or a quantile
//! sketch: merging is adding counts, so p50/p99 of any set of buckets and replicas is
//! exact up to the histogram's resolution (a percentile is reported as the upper bound
//! of the histogram bucket that holds it).

use std::collections::BTreeMap;

/// Upper bounds (inclusive, in ms) of the wait histogram's buckets. The last one covers
/// every longer wait: `lease.max_wait_ms` is at most 600,000.
pub const WAIT_BOUNDS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 60_000, 600_000,
];

/// Why an acquire was denied, as history counts it (the service's denial reasons).
/// The order is the order of [`Tally::denied`].
pub const DENIAL_REASONS: [&str; 5] = [
    "tenant_quota",
    "no_token_capacity",
    "no_usable_token",
    "wait_timeout",
    "counters_recovering",
];

/// What a tally is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectKind {
    Tenant,
    Token,
}

impl SubjectKind {
    /// How the store names the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Token => "token",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "tenant" => Some(Self::Tenant),
            "token" => Some(Self::Token),
            _ => None,
        }
    }
}

/// A tenant (all its upstreams together: `upstream_id` is empty) or a token (with the
/// upstream it serves).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subject {
    pub kind: SubjectKind,
    pub id: String,
    pub upstream_id: String,
}

impl Subject {
    pub fn tenant(id: &str) -> Self {
        Self {
            kind: SubjectKind::Tenant,
            id: id.to_owned(),
            upstream_id: String::new(),
        }
    }

    pub fn token(id: &str, upstream_id: &str) -> Self {
        Self {
            kind: SubjectKind::Token,
            id: id.to_owned(),
            upstream_id: upstream_id.to_owned(),
        }
    }
}

/// Waits counted per [`WAIT_BOUNDS_MS`] bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitHistogram {
    pub counts: [u64; WAIT_BOUNDS_MS.len()],
}

impl WaitHistogram {
    pub fn record(&mut self, wait_ms: u64) {
        let index = WAIT_BOUNDS_MS
            .iter()
            .position(|bound| wait_ms <= *bound)
            .unwrap_or(WAIT_BOUNDS_MS.len() - 1);
        self.counts[index] += 1;
    }

    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound (ms) of the bucket holding the `percent`-th percentile (nearest
    /// rank); `None` without waits.
    pub fn percentile(&self, percent: u64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (total * percent).div_ceil(100).max(1);
        let mut seen = 0;
        for (count, bound) in self.counts.iter().zip(WAIT_BOUNDS_MS) {
            seen += count;
            if seen >= rank {
                return Some(bound);
            }
        }
        WAIT_BOUNDS_MS.last().copied()
    }

    /// Comma-separated counts, as the store keeps them.
    pub fn to_text(&self) -> String {
        let counts: Vec<String> = self.counts.iter().map(u64::to_string).collect();
        counts.join(",")
    }

    /// The inverse of [`WaitHistogram::to_text`]; `None` if malformed. Fewer counts
    /// than buckets are read as zeros for the rest (a future histogram may grow).
    pub fn from_text(text: &str) -> Option<Self> {
        let mut histogram = Self::default();
        if text.is_empty() {
            return Some(histogram);
        }
        for (index, part) in text.split(',').enumerate() {
            *histogram.counts.get_mut(index)? = part.parse().ok()?;
        }
        Some(histogram)
    }
}

/// One bucket's counts for one subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// AcquireLease calls answered (granted, denied, or refused for want of room to wait
    /// or a store that could not answer: `failed`).
    pub asked: u64,
    pub granted: u64,
    /// Denials per [`DENIAL_REASONS`].
    pub denied: [u64; DENIAL_REASONS.len()],
    /// Calls answered with an error after they were authorised (queue full, counters
    /// unavailable, replica shutting down).
    pub failed: u64,
    /// How long answered calls took (waiting in the queue included), tenants only.
    pub waits: WaitHistogram,
    /// Grants beyond the tenant's guarantee (in the window of the grant).
    pub borrowed: u64,
    /// Releases by outcome.
    pub succeeded: u64,
    pub upstream_errors: u64,
    pub rate_limited: u64,
    pub not_used: u64,
}

impl Tally {
    pub fn merge(&mut self, other: &Self) {
        self.asked += other.asked;
        self.granted += other.granted;
        for (mine, theirs) in self.denied.iter_mut().zip(other.denied) {
            *mine += theirs;
        }
        self.failed += other.failed;
        self.waits.merge(&other.waits);
        self.borrowed += other.borrowed;
        self.succeeded += other.succeeded;
        self.upstream_errors += other.upstream_errors;
        self.rate_limited += other.rate_limited;
        self.not_used += other.not_used;
    }

    pub fn denied_total(&self) -> u64 {
        self.denied.iter().sum()
    }

    /// Borrowed grants as a share of the grants, 0 to 1 (0 without grants).
    pub fn borrowed_share(&self) -> f64 {
        if self.granted == 0 {
            0.0
        } else {
            self.borrowed as f64 / self.granted as f64
        }
    }
}

/// One row of history: a bucket's tally for a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub bucket_start_ms: i64,
    pub subject: Subject,
    pub tally: Tally,
}

/// The start of the `bucket_ms` bucket holding `at_ms` (buckets are aligned on the
/// Unix epoch, so any multiple of a stored bucket is made of whole stored buckets).
pub fn bucket_start(at_ms: i64, bucket_ms: i64) -> i64 {
    at_ms.div_euclid(bucket_ms) * bucket_ms
}

/// Sums rows into `bucket_ms` buckets (a multiple of the stored bucket): rows of
/// several replicas, and several stored buckets, for the same subject become one.
/// Ordered by bucket start, then subject.
pub fn roll_up(rows: impl IntoIterator<Item = HistoryRow>, bucket_ms: i64) -> Vec<HistoryRow> {
    let mut merged: BTreeMap<(i64, Subject), Tally> = BTreeMap::new();
    for row in rows {
        let start = bucket_start(row.bucket_start_ms, bucket_ms);
        merged
            .entry((start, row.subject))
            .or_default()
            .merge(&row.tally);
    }
    merged
        .into_iter()
        .map(|((bucket_start_ms, subject), tally)| HistoryRow {
            bucket_start_ms,
            subject,
            tally,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits(values: &[u64]) -> WaitHistogram {
        let mut histogram = WaitHistogram::default();
        for value in values {
            histogram.record(*value);
        }
        histogram
    }

    /// A percentile is the upper bound of the bucket holding its rank; bounds are
    /// inclusive and longer waits land in the last bucket.
    #[test]
    fn percentiles_report_bucket_upper_bounds() {
        assert_eq!(WaitHistogram::default().percentile(50), None);
        let mut values = vec![0; 98];
        values.extend([3_000, 700_000]);
        let histogram = waits(&values);
        assert_eq!(histogram.percentile(50), Some(1));
        assert_eq!(histogram.percentile(99), Some(5_000));
        assert_eq!(histogram.percentile(100), Some(600_000));
        assert_eq!(waits(&[2]).percentile(50), Some(2));
        assert_eq!(waits(&[3]).percentile(50), Some(5));
    }

    /// Merging histograms of two replicas gives the percentiles of all their waits.
    #[test]
    fn merged_histograms_give_the_percentiles_of_the_union() {
        let mut a = waits(&[1; 60]);
        let b = waits(&[150; 40]);
        a.merge(&b);
        assert_eq!(a.total(), 100);
        assert_eq!(a.percentile(50), Some(1));
        assert_eq!(a.percentile(61), Some(200));
        assert_eq!(a, WaitHistogram::from_text(&a.to_text()).unwrap());
        assert_eq!(WaitHistogram::from_text("1,x"), None);
        assert_eq!(WaitHistogram::from_text(&"1,".repeat(16).to_string()), None);
        assert_eq!(WaitHistogram::from_text("").unwrap().total(), 0);
    }

    /// Buckets are epoch-aligned, including before the epoch; the end is exclusive.
    #[test]
    fn bucket_boundaries() {
        let hour = 3_600_000;
        assert_eq!(bucket_start(0, hour), 0);
        assert_eq!(bucket_start(hour - 1, hour), 0);
        assert_eq!(bucket_start(hour, hour), hour);
        assert_eq!(bucket_start(-1, hour), -hour);
    }

    /// A roll-up sums every replica's rows of the stored buckets inside each coarse
    /// bucket, subject by subject, and keeps subjects apart.
    #[test]
    fn roll_up_sums_replicas_and_buckets_per_subject() {
        let hour = 3_600_000;
        let row = |start: i64, subject: Subject, granted: u64| HistoryRow {
            bucket_start_ms: start,
            subject,
            tally: Tally {
                asked: granted,
                granted,
                ..Tally::default()
            },
        };
        let rows = vec![
            row(0, Subject::tenant("acme"), 1),
            row(0, Subject::tenant("acme"), 2), // another replica
            row(hour, Subject::tenant("acme"), 4),
            row(hour, Subject::token("t1", "bl"), 8),
            row(2 * hour, Subject::tenant("acme"), 16),
        ];
        let rolled = roll_up(rows.clone(), 2 * hour);
        let summary: Vec<(i64, &str, u64)> = rolled
            .iter()
            .map(|r| (r.bucket_start_ms, r.subject.id.as_str(), r.tally.granted))
            .collect();
        assert_eq!(
            summary,
            vec![(0, "acme", 7), (0, "t1", 8), (2 * hour, "acme", 16)]
        );
        assert_eq!(roll_up(rows, hour).len(), 4);
    }

    /// Merging adds every counter, the denials per reason included.
    #[test]
    fn merge_adds_every_counter() {
        let mut a = Tally {
            asked: 3,
            granted: 1,
            denied: [1, 0, 0, 1, 0],
            borrowed: 1,
            ..Tally::default()
        };
        let b = Tally {
            asked: 2,
            granted: 2,
            denied: [0, 0, 0, 0, 0],
            failed: 0,
            borrowed: 0,
            succeeded: 1,
            upstream_errors: 1,
            rate_limited: 0,
            not_used: 0,
            waits: waits(&[1, 1]),
        };
        a.merge(&b);
        assert_eq!((a.asked, a.granted, a.denied_total()), (5, 3, 2));
        assert_eq!((a.succeeded, a.upstream_errors, a.waits.total()), (1, 1, 2));
        assert!((a.borrowed_share() - 1.0 / 3.0).abs() < 1e-9);
    }
}
