//! Leases granted per tenant on each shared pool's tokens, per bucket: what cost
//! allocation (`crate::cost`) shares a pool's cost by. The tenant tally counts every
//! grant (dedicated tokens' too) under the tenant alone; this says which pool the
//! grants came from (a tenant moved mid-bucket counts in both). Rows per bucket grow
//! with tenants, not with tenants × tokens.
//!
//! Kept in memory and flushed exactly like the tallies (see `recorder`): cumulative
//! per-replica rows, upserted whole, forgotten once their bucket closed and their last
//! value was written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::tally::bucket_start;

/// Leases granted to a tenant on a token in one bucket (one replica's, or summed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub bucket_start_ms: i64,
    pub tenant_id: String,
    pub pool_id: String,
    /// The pool's upstream when the grant was counted.
    pub upstream_id: String,
    pub granted: u64,
}

/// (bucket start, tenant, pool): the store's key of a row, per replica.
type Key = (i64, String, String);

struct Entry {
    upstream_id: String,
    granted: u64,
    dirty: bool,
}

/// The replica's grant counts; cheap to clone, every clone counts into the same memory.
#[derive(Clone)]
pub struct GrantCounts {
    bucket_ms: i64,
    entries: Arc<Mutex<HashMap<Key, Entry>>>,
}

impl GrantCounts {
    pub fn new(bucket_ms: i64) -> Self {
        Self {
            bucket_ms: bucket_ms.max(1),
            entries: Arc::default(),
        }
    }

    /// A lease of `tenant_id` granted on a token of `pool_id` (of `upstream_id`) at
    /// `now_ms`.
    pub fn add(&self, now_ms: i64, tenant_id: &str, pool_id: &str, upstream_id: &str) {
        let key = (
            bucket_start(now_ms, self.bucket_ms),
            tenant_id.to_owned(),
            pool_id.to_owned(),
        );
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.entry(key).or_insert_with(|| Entry {
            upstream_id: String::new(),
            granted: 0,
            dirty: true,
        });
        upstream_id.clone_into(&mut entry.upstream_id);
        entry.granted += 1;
        entry.dirty = true;
    }

    /// The rows changed since they were last written, with their cumulative counts.
    pub fn pending(&self) -> Vec<GrantRow> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .filter(|(_, entry)| entry.dirty)
            .map(|((start, tenant, pool), entry)| GrantRow {
                bucket_start_ms: *start,
                tenant_id: tenant.clone(),
                pool_id: pool.clone(),
                upstream_id: entry.upstream_id.clone(),
                granted: entry.granted,
            })
            .collect()
    }

    /// After `rows` (from [`GrantCounts::pending`]) were written: a row still equal to
    /// what was written is clean; clean rows of buckets closed by `now_ms` are forgotten.
    pub fn written(&self, rows: &[GrantRow], now_ms: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            let key = (
                row.bucket_start_ms,
                row.tenant_id.clone(),
                row.pool_id.clone(),
            );
            if let Some(entry) = entries.get_mut(&key)
                && entry.granted == row.granted
            {
                entry.dirty = false;
            }
        }
        let open = bucket_start(now_ms, self.bucket_ms);
        entries.retain(|(start, _, _), entry| entry.dirty || *start >= open);
    }

    /// Rows held in memory.
    pub fn held(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    /// Grants count per (bucket, tenant, pool), cumulatively; written rows stop being
    /// pending until they change; closed buckets leave once written.
    #[test]
    fn grants_count_per_tenant_pool_and_bucket() {
        let counts = GrantCounts::new(HOUR);
        counts.add(10, "acme", "shared", "bl");
        counts.add(20, "acme", "shared", "bl");
        counts.add(30, "beta", "shared", "bl");
        counts.add(HOUR, "acme", "shared", "bl");
        let mut rows = counts.pending();
        rows.sort_by_key(|r| (r.bucket_start_ms, r.tenant_id.clone()));
        let summary: Vec<(i64, &str, u64)> = rows
            .iter()
            .map(|r| (r.bucket_start_ms, r.tenant_id.as_str(), r.granted))
            .collect();
        assert_eq!(
            summary,
            vec![(0, "acme", 2), (0, "beta", 1), (HOUR, "acme", 1)]
        );

        counts.add(HOUR + 1, "acme", "shared", "bl");
        counts.written(&rows, HOUR + 2);
        let again = counts.pending();
        assert_eq!(again.len(), 1, "only the row changed since the read");
        assert_eq!(again[0].granted, 2, "cumulative");
        assert_eq!(counts.held(), 1, "the closed bucket's clean rows left");
        counts.written(&again, 2 * HOUR);
        assert_eq!(counts.held(), 0);
    }
}
