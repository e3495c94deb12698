//! Usage history rows (`usage_history`, see `migrations/0007_usage_history.sql` and
//! `crate::history`): each replica upserts its own cumulative rows; reads return every
//! replica's rows of a time range, for `history::roll_up` to sum.

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::history::{HistoryRow, Selection, Subject, SubjectKind, Tally, WaitHistogram};
use crate::store::StoreError;

use super::ConfigStore;
use super::tx::map_error;

const COUNT_COLUMNS: [&str; 13] = [
    "asked",
    "granted",
    "denied_tenant_quota",
    "denied_no_token_capacity",
    "denied_no_usable_token",
    "denied_wait_timeout",
    "denied_counters_recovering",
    "failed",
    "borrowed",
    "succeeded",
    "upstream_errors",
    "rate_limited",
    "not_used",
];

/// The counts of a tally in [`COUNT_COLUMNS`] order.
fn counts(t: &Tally) -> [u64; 13] {
    let d = t.denied;
    [
        t.asked,
        t.granted,
        d[0],
        d[1],
        d[2],
        d[3],
        d[4],
        t.failed,
        t.borrowed,
        t.succeeded,
        t.upstream_errors,
        t.rate_limited,
        t.not_used,
    ]
}

fn decode(row: &AnyRow) -> Result<HistoryRow, StoreError> {
    let get = |column: &str| -> Result<u64, StoreError> {
        let value: i64 = row.try_get(column).map_err(map_error)?;
        Ok(value.max(0) as u64)
    };
    let kind: String = row.try_get("subject_kind").map_err(map_error)?;
    let kind = SubjectKind::parse(&kind).ok_or_else(|| {
        StoreError::Internal(anyhow::anyhow!(
            "usage_history: unknown subject kind {kind:?}"
        ))
    })?;
    let waits: String = row.try_get("waits").map_err(map_error)?;
    let waits = WaitHistogram::from_text(&waits).ok_or_else(|| {
        StoreError::Internal(anyhow::anyhow!("usage_history: malformed waits {waits:?}"))
    })?;
    Ok(HistoryRow {
        bucket_start_ms: row.try_get("bucket_start_ms").map_err(map_error)?,
        subject: Subject {
            kind,
            id: row.try_get("subject_id").map_err(map_error)?,
            upstream_id: row.try_get("upstream_id").map_err(map_error)?,
        },
        tally: Tally {
            asked: get("asked")?,
            granted: get("granted")?,
            denied: [
                get("denied_tenant_quota")?,
                get("denied_no_token_capacity")?,
                get("denied_no_usable_token")?,
                get("denied_wait_timeout")?,
                get("denied_counters_recovering")?,
            ],
            failed: get("failed")?,
            borrowed: get("borrowed")?,
            succeeded: get("succeeded")?,
            upstream_errors: get("upstream_errors")?,
            rate_limited: get("rate_limited")?,
            not_used: get("not_used")?,
            waits,
        },
    })
}

/// The SQL condition selecting one kind's subjects, its placeholders numbered from
/// `next`; its values are pushed to `binds`.
fn kind_condition(
    kind: SubjectKind,
    ids: &Option<Vec<String>>,
    upstream: Option<&str>,
    next: &mut usize,
    binds: &mut Vec<String>,
) -> Option<String> {
    let mut parts = vec![format!("subject_kind = '{}'", kind.as_str())];
    match ids {
        Some(ids) if ids.is_empty() => return None,
        Some(ids) => {
            let marks: Vec<String> = ids
                .iter()
                .map(|id| {
                    binds.push(id.clone());
                    *next += 1;
                    format!("${}", *next - 1)
                })
                .collect();
            parts.push(format!("subject_id IN ({})", marks.join(", ")));
        }
        None => {}
    }
    if let Some(upstream) = upstream {
        binds.push(upstream.to_owned());
        parts.push(format!("upstream_id = ${next}"));
        *next += 1;
    }
    Some(format!("({})", parts.join(" AND ")))
}

impl ConfigStore {
    /// Upserts `replica`'s rows (their whole cumulative values) in one transaction.
    pub async fn write_history(
        &self,
        replica: &str,
        rows: &[HistoryRow],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let marks: Vec<String> = (0..COUNT_COLUMNS.len())
            .map(|i| format!("${}", i + 6))
            .collect();
        let updates: Vec<String> = COUNT_COLUMNS
            .iter()
            .chain(&["waits", "written_ms"])
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        let n = COUNT_COLUMNS.len();
        let sql = format!(
            "INSERT INTO usage_history (replica_id, bucket_start_ms, subject_kind, subject_id, \
             upstream_id, {}, waits, written_ms) VALUES ($1, $2, $3, $4, $5, {}, ${}, ${}) \
             ON CONFLICT (replica_id, bucket_start_ms, subject_kind, subject_id, upstream_id) \
             DO UPDATE SET {}",
            COUNT_COLUMNS.join(", "),
            marks.join(", "),
            n + 6,
            n + 7,
            updates.join(", ")
        );
        let mut tx = self.pool.begin().await.map_err(map_error)?;
        for row in rows {
            let mut query = sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(replica.to_owned())
                .bind(row.bucket_start_ms)
                .bind(row.subject.kind.as_str())
                .bind(row.subject.id.clone())
                .bind(row.subject.upstream_id.clone());
            for count in counts(&row.tally) {
                query = query.bind(i64::try_from(count).unwrap_or(i64::MAX));
            }
            query
                .bind(row.tally.waits.to_text())
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(map_error)?;
        }
        tx.commit().await.map_err(map_error)
    }

    /// Deletes every replica's rows of buckets that started before `before_ms`, the
    /// tallies and the grants per tenant and token; returns how many rows went.
    pub async fn prune_history(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        let mut deleted = 0;
        for table in ["usage_history", "usage_grants"] {
            let sql = format!("DELETE FROM {table} WHERE bucket_start_ms < $1");
            let done = sqlx::query(AssertSqlSafe(sql))
                .bind(before_ms)
                .execute(&mut *conn)
                .await
                .map_err(map_error)?;
            deleted += done.rows_affected();
        }
        Ok(deleted)
    }

    /// Every replica's rows of the buckets starting in `from_ms..to_ms` for the
    /// subjects `selection` names, unsummed (see `history::roll_up`).
    pub async fn read_history(
        &self,
        from_ms: i64,
        to_ms: i64,
        selection: &Selection,
    ) -> Result<Vec<HistoryRow>, StoreError> {
        let mut binds = Vec::new();
        let mut next = 3;
        let tenants = kind_condition(
            SubjectKind::Tenant,
            &selection.tenants,
            None,
            &mut next,
            &mut binds,
        );
        let tokens = kind_condition(
            SubjectKind::Token,
            &selection.tokens,
            selection.upstream_id.as_deref(),
            &mut next,
            &mut binds,
        );
        let conditions: Vec<String> = tenants.into_iter().chain(tokens).collect();
        if conditions.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT bucket_start_ms, subject_kind, subject_id, upstream_id, {}, waits \
             FROM usage_history WHERE bucket_start_ms >= $1 AND bucket_start_ms < $2 AND ({})",
            COUNT_COLUMNS.join(", "),
            conditions.join(" OR ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(from_ms).bind(to_ms);
        for value in binds {
            query = query.bind(value);
        }
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        let found = query.fetch_all(&mut *conn).await.map_err(map_error)?;
        found.iter().map(decode).collect()
    }
}
