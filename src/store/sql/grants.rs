//! Leases granted per tenant and pool (`usage_grants`, see
//! `migrations/0008_cost.sql` and `crate::history::GrantCounts`): each replica upserts
//! its own cumulative rows; a read sums every replica and bucket of a range per tenant
//! and pool, in SQL, for cost allocation.

use sqlx::Row;

use crate::history::GrantRow;
use crate::store::StoreError;

use super::ConfigStore;
use super::tx::map_error;

const UPSERT: &str = "INSERT INTO usage_grants (replica_id, bucket_start_ms, tenant_id, \
    pool_id, upstream_id, granted, written_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (replica_id, bucket_start_ms, tenant_id, pool_id) DO UPDATE SET \
    upstream_id = excluded.upstream_id, granted = excluded.granted, \
    written_ms = excluded.written_ms";

/// Leases granted to a tenant on a pool's tokens over a range, every replica summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTotal {
    pub tenant_id: String,
    pub pool_id: String,
    pub granted: u64,
}

impl ConfigStore {
    /// Upserts `replica`'s grant rows (their whole cumulative counts) in one
    /// transaction.
    pub async fn write_grants(
        &self,
        replica: &str,
        rows: &[GrantRow],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(map_error)?;
        for row in rows {
            sqlx::query(UPSERT)
                .bind(replica.to_owned())
                .bind(row.bucket_start_ms)
                .bind(row.tenant_id.clone())
                .bind(row.pool_id.clone())
                .bind(row.upstream_id.clone())
                .bind(i64::try_from(row.granted).unwrap_or(i64::MAX))
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(map_error)?;
        }
        tx.commit().await.map_err(map_error)
    }

    /// Leases granted per tenant and pool in the buckets starting in
    /// `from_ms..to_ms`, summed over replicas and buckets; ordered by tenant, then
    /// pool. With `pools`, only those pools (empty: none).
    pub async fn read_grants(
        &self,
        from_ms: i64,
        to_ms: i64,
        pools: Option<&[String]>,
    ) -> Result<Vec<GrantTotal>, StoreError> {
        let filter = match pools {
            Some([]) => return Ok(Vec::new()),
            Some(ids) => {
                let marks: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 3)).collect();
                format!(" AND pool_id IN ({})", marks.join(", "))
            }
            None => String::new(),
        };
        let sql = format!(
            "SELECT tenant_id, pool_id, CAST(SUM(granted) AS BIGINT) AS granted \
             FROM usage_grants WHERE bucket_start_ms >= $1 AND bucket_start_ms < $2{filter} \
             GROUP BY tenant_id, pool_id ORDER BY tenant_id, pool_id"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(from_ms)
            .bind(to_ms);
        for id in pools.unwrap_or_default() {
            query = query.bind(id.clone());
        }
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        let found = query.fetch_all(&mut *conn).await.map_err(map_error)?;
        found
            .iter()
            .map(|row| {
                let granted: i64 = row.try_get("granted").map_err(map_error)?;
                Ok(GrantTotal {
                    tenant_id: row.try_get("tenant_id").map_err(map_error)?,
                    pool_id: row.try_get("pool_id").map_err(map_error)?,
                    granted: granted.max(0) as u64,
                })
            })
            .collect()
    }
}
