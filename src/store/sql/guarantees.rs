//! The cross-object rules ([`crate::domain::check_guarantees`]) checked on the pools one
//! write can affect, with a few aggregate queries each, instead of on the whole
//! configuration: a write then costs the same with 10 tenants or 10,000.
//!
//! Why checking only those pools is enough: every committed configuration passed the
//! check (each write is checked in its transaction, and writes are serialised by the
//! version row), and a pool's verdict depends only on its own rows — its upstream, its
//! tokens, its tenants, their tiers and their dedicated tokens of that upstream. A write
//! that changes none of those leaves the pool's verdict as it was: passing. So the full
//! check fails exactly when one of the affected pools fails, and since the checks run
//! in the same order (token upstreams first, then pools in id order), with the same
//! message. Each write names what it touches (`Write::affects_*`); `sql_tests` runs
//! both checks after every write and asserts they agree.

use std::collections::BTreeSet;

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use crate::domain::{
    CapacityReport, Id, check_pool_report, drawn_guarantee, token_of_another_upstream,
};
use crate::store::StoreError;

use super::Backend;
use super::rows::{self, POOLS, UPSTREAMS};
use super::tx::map_error;

/// Checks the token-upstream rule, then the 80 % rule, on `pools` (ids that no longer
/// exist are skipped): FAILED_PRECONDITION with the full check's message.
pub(super) async fn check_pools(
    conn: &mut AnyConnection,
    backend: Backend,
    pools: &BTreeSet<String>,
) -> Result<(), StoreError> {
    let mut found = Vec::with_capacity(pools.len());
    for pool_id in pools {
        let Some(pool) = rows::find(conn, &POOLS, pool_id).await? else {
            continue;
        };
        let Some(upstream) = rows::find(conn, &UPSTREAMS, pool.upstream_id.as_str()).await? else {
            continue;
        };
        found.push((pool, upstream));
    }
    // The full check reports the token with the smallest id first.
    let mut stray: Option<(Id, Id, Id, Id)> = None;
    let order = rows::in_byte_order(backend, "id");
    let sql = format!(
        "SELECT id, upstream_id FROM tokens WHERE pool_id = $1 AND upstream_id <> $2 \
         ORDER BY {order} LIMIT 1"
    );
    for (pool, _) in &found {
        let row = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(pool.id.as_str().to_owned())
            .bind(pool.upstream_id.as_str().to_owned())
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_error)?;
        if let Some(row) = row {
            let token = Id::from_trusted(row.try_get::<String, _>("id").map_err(map_error)?);
            let upstream =
                Id::from_trusted(row.try_get::<String, _>("upstream_id").map_err(map_error)?);
            if stray.as_ref().is_none_or(|(first, ..)| token < *first) {
                stray = Some((token, upstream, pool.id.clone(), pool.upstream_id.clone()));
            }
        }
    }
    if let Some((token, upstream, pool, pool_upstream)) = stray {
        return Err(StoreError::FailedPrecondition(token_of_another_upstream(
            &token,
            &upstream,
            &pool,
            &pool_upstream,
        )));
    }
    for (pool, upstream) in &found {
        let report = provisioned_report(conn, pool.id.as_str(), upstream).await?;
        check_pool_report(&pool.id, report).map_err(StoreError::FailedPrecondition)?;
    }
    Ok(())
}

/// One pool's capacity (disabled tokens included) and the guarantees drawn from it, as
/// [`crate::domain::ConfigView::provisioned_reports`] computes them.
async fn provisioned_report(
    conn: &mut AnyConnection,
    pool_id: &str,
    upstream: &crate::domain::Upstream,
) -> Result<CapacityReport, StoreError> {
    let tokens: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE pool_id = $1 AND upstream_id = $2")
            .bind(pool_id.to_owned())
            .bind(upstream.id.as_str().to_owned())
            .fetch_one(&mut *conn)
            .await
            .map_err(map_error)?;
    // Every tenant of the pool draws its whole guarantee…
    let guaranteed: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(COALESCE(t.guaranteed_override, r.guaranteed_per_window)), 0) \
         AS BIGINT) FROM tenants t JOIN tiers r ON r.id = t.tier_id WHERE t.pool_id = $1",
    )
    .bind(pool_id.to_owned())
    .fetch_one(&mut *conn)
    .await
    .map_err(map_error)?;
    // …except what the few with dedicated tokens of the pool's upstream cover themselves.
    let covered = sqlx::query(
        "SELECT COALESCE(t.guaranteed_override, r.guaranteed_per_window) AS guaranteed, \
         COUNT(*) AS dedicated FROM tokens d JOIN tenants t ON t.id = d.dedicated_tenant_id \
         JOIN tiers r ON r.id = t.tier_id WHERE t.pool_id = $1 AND d.upstream_id = $2 \
         GROUP BY t.id, t.guaranteed_override, r.guaranteed_per_window",
    )
    .bind(pool_id.to_owned())
    .bind(upstream.id.as_str().to_owned())
    .fetch_all(&mut *conn)
    .await
    .map_err(map_error)?;
    let mut drawn = u64::try_from(guaranteed).unwrap_or(0);
    for row in &covered {
        let guaranteed = rows::int(row, "guaranteed")?;
        let dedicated = rows::int(row, "dedicated")?;
        let guaranteed = u32::try_from(guaranteed).unwrap_or(u32::MAX);
        drawn = drawn
            .saturating_sub(guaranteed as u64)
            .saturating_add(drawn_guarantee(
                guaranteed,
                u64::try_from(dedicated).unwrap_or(0),
                upstream,
            ));
    }
    let capacity = u64::try_from(tokens).unwrap_or(0) * upstream.usable_per_window() as u64;
    Ok(CapacityReport::saturating(capacity, drawn))
}
