//! The replica's history in memory until the flusher writes it.
//!
//! Each replica keeps the *cumulative* tally of every (bucket, subject) it has seen,
//! and the flusher upserts those whole rows under the replica's own id. So a flush is
//! idempotent (a failed or repeated write rewrites the same values: nothing is counted
//! twice), replicas never write the same row (no contention, every grant counted
//! once), and a bucket leaves memory only after it closed and its last value was
//! written. A restart loses what was recorded since the last flush.
//!
//! A std `Mutex` (not a tokio one): it is held only for a hash-map update, never across
//! an `.await`, so the lease path pays O(1) and never waits on I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::ledger::ReleaseOutcome;

use super::grants::GrantCounts;
use super::tally::{DENIAL_REASONS, HistoryRow, Subject, Tally, bucket_start};

/// How an AcquireLease call ended, as history counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// Granted (the token's side is [`Recorder::record_grant`]).
    Granted,
    /// One of [`DENIAL_REASONS`].
    Denied { reason: &'static str },
    /// An error after the call was authorised.
    Failed,
}

struct Entry {
    tally: Tally,
    /// Changed since it was last written.
    dirty: bool,
}

/// Which lease was granted, for [`Recorder::record_grant`].
#[derive(Debug, Clone, Copy)]
pub struct GrantOf<'a> {
    pub tenant_id: &'a str,
    pub token_id: &'a str,
    /// The token's pool; None for a token dedicated to the tenant.
    pub pool_id: Option<&'a str>,
    pub upstream_id: &'a str,
}

/// Cheap to clone; every clone records into the same memory.
#[derive(Clone)]
pub struct Recorder {
    bucket_ms: i64,
    entries: Arc<Mutex<HashMap<(i64, Subject), Entry>>>,
    /// Grants per tenant and token, for cost allocation.
    pub grants: GrantCounts,
}

impl Recorder {
    /// A recorder of `bucket_ms` buckets (at least 1).
    pub fn new(bucket_ms: i64) -> Self {
        Self {
            bucket_ms: bucket_ms.max(1),
            entries: Arc::default(),
            grants: GrantCounts::new(bucket_ms),
        }
    }

    pub fn bucket_ms(&self) -> i64 {
        self.bucket_ms
    }

    fn update(&self, now_ms: i64, subject: Subject, change: impl FnOnce(&mut Tally)) {
        let key = (bucket_start(now_ms, self.bucket_ms), subject);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(key).or_insert_with(|| Entry {
            tally: Tally::default(),
            dirty: true,
        });
        change(&mut entry.tally);
        entry.dirty = true;
    }

    /// An AcquireLease call of `tenant_id` answered at `now_ms` after `waited_ms`.
    pub fn record_acquire(&self, now_ms: i64, tenant_id: &str, waited_ms: u64, how: Acquired) {
        self.update(now_ms, Subject::tenant(tenant_id), |t| {
            t.asked += 1;
            match how {
                Acquired::Granted => t.granted += 1,
                Acquired::Denied { reason } => {
                    if let Some(i) = DENIAL_REASONS.iter().position(|r| *r == reason) {
                        t.denied[i] += 1;
                    }
                }
                Acquired::Failed => t.failed += 1,
            }
            t.waits.record(waited_ms);
        });
    }

    /// A lease of `tenant_id` granted on `token_id` of `upstream_id` at `now_ms`:
    /// counted for the token, for the tenant's grants on the token's pool (`grants`;
    /// `pool_id` None for a dedicated token), and as borrowed for both when it went
    /// beyond the tenant's guarantee. The call itself is counted for the tenant when it
    /// is answered (`record_acquire`).
    pub fn record_grant(&self, now_ms: i64, grant: GrantOf<'_>, borrowed: bool) {
        let GrantOf {
            tenant_id,
            token_id,
            pool_id,
            upstream_id,
        } = grant;
        let subject = Subject::token(token_id, upstream_id);
        self.update(now_ms, subject, |t| {
            t.asked += 1;
            t.granted += 1;
            t.borrowed += u64::from(borrowed);
        });
        if let Some(pool_id) = pool_id {
            self.grants.add(now_ms, tenant_id, pool_id, upstream_id);
        }
        if borrowed {
            let tenant = Subject::tenant(tenant_id);
            self.update(now_ms, tenant, |t| t.borrowed += 1);
        }
    }

    /// A lease of `tenant_id` on `token_id` released (the first time) at `now_ms`.
    pub fn record_release(
        &self,
        now_ms: i64,
        tenant_id: &str,
        token_id: &str,
        upstream_id: &str,
        how: ReleaseOutcome,
    ) {
        let count = |t: &mut Tally| match how {
            ReleaseOutcome::Success => t.succeeded += 1,
            ReleaseOutcome::UpstreamError => t.upstream_errors += 1,
            ReleaseOutcome::UpstreamRateLimited => t.rate_limited += 1,
            ReleaseOutcome::NotUsed => t.not_used += 1,
        };
        self.update(now_ms, Subject::tenant(tenant_id), count);
        self.update(now_ms, Subject::token(token_id, upstream_id), count);
    }

    /// The rows changed since they were last written, for the flusher to upsert.
    pub fn pending(&self) -> Vec<HistoryRow> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .filter(|(_, entry)| entry.dirty)
            .map(|((start, subject), entry)| HistoryRow {
                bucket_start_ms: *start,
                subject: subject.clone(),
                tally: entry.tally.clone(),
            })
            .collect()
    }

    /// After `rows` (from [`Recorder::pending`]) were written: a row still equal to
    /// what was written is clean, and clean rows of buckets closed by `now_ms` are
    /// forgotten (nothing more will be recorded into them).
    pub fn written(&self, rows: &[HistoryRow], now_ms: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            let key = (row.bucket_start_ms, row.subject.clone());
            if let Some(entry) = entries.get_mut(&key)
                && entry.tally == row.tally
            {
                entry.dirty = false;
            }
        }
        let open = bucket_start(now_ms, self.bucket_ms);
        entries.retain(|(start, _), entry| entry.dirty || *start >= open);
    }

    /// Rows held in memory (for tests and the flusher's log).
    pub fn held(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    /// A grant as the lease path records it: the token's side, then the call's.
    fn grant(recorder: &Recorder, now_ms: i64, borrowed: bool) {
        let grant = GrantOf {
            tenant_id: "acme",
            token_id: "t1",
            pool_id: Some("shared"),
            upstream_id: "bl",
        };
        recorder.record_grant(now_ms, grant, borrowed);
        recorder.record_acquire(now_ms, "acme", 0, Acquired::Granted);
    }

    /// A grant counts for the tenant and for its token; a denial for the tenant only,
    /// under its reason; releases for both.
    #[test]
    fn acquires_and_releases_count_per_subject() {
        let recorder = Recorder::new(HOUR);
        grant(&recorder, 10, true);
        recorder.record_acquire(
            20,
            "acme",
            3,
            Acquired::Denied {
                reason: "tenant_quota",
            },
        );
        recorder.record_release(30, "acme", "t1", "bl", ReleaseOutcome::UpstreamRateLimited);
        let mut rows = recorder.pending();
        rows.sort_by(|a, b| a.subject.cmp(&b.subject));
        assert_eq!(rows.len(), 2);
        let (tenant, token) = (&rows[0].tally, &rows[1].tally);
        assert_eq!((tenant.asked, tenant.granted, tenant.denied[0]), (2, 1, 1));
        assert_eq!((tenant.rate_limited, tenant.waits.total()), (1, 2));
        assert_eq!((tenant.borrowed, token.borrowed), (1, 1));
        assert_eq!(
            (token.asked, token.granted, token.denied_total()),
            (1, 1, 0)
        );
        assert_eq!(token.rate_limited, 1);
    }

    /// Written rows are not pending again until they change; a closed bucket is
    /// forgotten once written, an open one is kept (it keeps its cumulative value).
    #[test]
    fn written_rows_are_clean_and_closed_buckets_leave() {
        let recorder = Recorder::new(HOUR);
        grant(&recorder, 10, false);
        let rows = recorder.pending();
        recorder.written(&rows, 20);
        assert!(recorder.pending().is_empty());
        assert_eq!(recorder.held(), 2);

        grant(&recorder, 30, false);
        let pending = recorder.pending();
        assert_eq!(pending.len(), 2, "both rows changed");
        assert!(pending.iter().all(|r| r.tally.granted == 2), "cumulative");

        // A change between the read and the write keeps the row pending.
        grant(&recorder, 40, false);
        recorder.written(&pending, HOUR + 1);
        let again = recorder.pending();
        assert_eq!(again.len(), 2);
        assert_eq!(recorder.held(), 2, "dirty rows of a closed bucket stay");
        recorder.written(&again, HOUR + 1);
        assert_eq!(recorder.held(), 0);
    }

    /// Records land in the bucket of their own instant.
    #[test]
    fn records_land_in_their_bucket() {
        let recorder = Recorder::new(HOUR);
        recorder.record_acquire(HOUR - 1, "acme", 0, Acquired::Failed);
        recorder.record_acquire(HOUR, "acme", 0, Acquired::Failed);
        let mut starts: Vec<i64> = recorder
            .pending()
            .iter()
            .map(|r| r.bucket_start_ms)
            .collect();
        starts.sort_unstable();
        assert_eq!(starts, vec![0, HOUR]);
    }
}
