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
//!
//! What a pool's tenants guarantee is not summed per check but kept as a running total
//! (`pool_guarantees`, migration 0006): a tenant write adds or removes that tenant's
//! guarantee ([`count_tenant`]), a tier update recounts the pools of its tenants
//! ([`recount`]). Why the total stays exact with concurrent writers, on either
//! database: every write first bumps the version row, so writes run one at a time and
//! each moves the totals the one before committed; a write that rolls back takes its
//! moves with it. A writer that does not keep the totals (a replica that predates
//! them) leaves `config_meta.guarantees_version` behind the version, and the next write
//! recounts every pool ([`recount_all`]) before it moves anything. `sql_tests` compares
//! every total with a fresh sum after every write.

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
    let guaranteed: Option<i64> =
        sqlx::query_scalar("SELECT guaranteed FROM pool_guarantees WHERE pool_id = $1")
            .bind(pool_id.to_owned())
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_error)?;
    let guaranteed = guaranteed.unwrap_or(0);
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

/// A tenant's guarantee as its pool's total counts it: the override, or its tier's.
const TENANT_GUARANTEE: &str = "COALESCE(t.guaranteed_override, r.guaranteed_per_window)";

/// Whether a tenant joins or leaves its pool's total.
#[derive(Debug, Clone, Copy)]
pub(super) enum Sign {
    Add,
    Remove,
}

/// Adds (or removes) tenant `id`'s guarantee, as stored now, to (from) the total of its
/// pool; a tenant without a pool, or not stored, changes nothing.
pub(super) async fn count_tenant(
    conn: &mut AnyConnection,
    id: &str,
    sign: Sign,
) -> Result<(), StoreError> {
    let sign: i64 = match sign {
        Sign::Add => 1,
        Sign::Remove => -1,
    };
    // The WHERE clause is also what SQLite needs to parse an upsert from a SELECT.
    let sql = format!(
        "INSERT INTO pool_guarantees (pool_id, guaranteed) \
         SELECT t.pool_id, $2 * {TENANT_GUARANTEE} FROM tenants t \
         JOIN tiers r ON r.id = t.tier_id WHERE t.id = $1 AND t.pool_id IS NOT NULL \
         ON CONFLICT (pool_id) DO UPDATE \
         SET guaranteed = pool_guarantees.guaranteed + excluded.guaranteed"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(id.to_owned())
        .bind(sign)
        .execute(conn)
        .await
        .map_err(map_error)?;
    Ok(())
}

/// Sets the totals of `pools` to a fresh sum of their tenants' guarantees.
pub(super) async fn recount(conn: &mut AnyConnection, pools: &[String]) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO pool_guarantees (pool_id, guaranteed) VALUES ($1, \
         (SELECT CAST(COALESCE(SUM({TENANT_GUARANTEE}), 0) AS BIGINT) FROM tenants t \
         JOIN tiers r ON r.id = t.tier_id WHERE t.pool_id = $1)) \
         ON CONFLICT (pool_id) DO UPDATE SET guaranteed = excluded.guaranteed"
    );
    for pool in pools {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(pool.clone())
            .execute(&mut *conn)
            .await
            .map_err(map_error)?;
    }
    Ok(())
}

/// Recounts every pool's total, and marks the totals kept by the write `version`.
pub(super) async fn recount_all(conn: &mut AnyConnection, version: i64) -> Result<(), StoreError> {
    tracing::info!(
        version,
        "recounting the guarantee totals of every pool: the last write did not keep them"
    );
    sqlx::query("DELETE FROM pool_guarantees")
        .execute(&mut *conn)
        .await
        .map_err(map_error)?;
    let sql = format!(
        "INSERT INTO pool_guarantees (pool_id, guaranteed) \
         SELECT t.pool_id, CAST(SUM({TENANT_GUARANTEE}) AS BIGINT) FROM tenants t \
         JOIN tiers r ON r.id = t.tier_id WHERE t.pool_id IS NOT NULL GROUP BY t.pool_id"
    );
    sqlx::query(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map_err(map_error)?;
    sqlx::query("UPDATE config_meta SET guarantees_version = $1 WHERE singleton = 1")
        .bind(version)
        .execute(&mut *conn)
        .await
        .map_err(map_error)?;
    Ok(())
}

/// Tests only: every pool's total as stored, and as a fresh sum would make it (pools
/// whose tenants guarantee nothing are left out of both).
#[cfg(test)]
pub(super) async fn totals_and_sums(
    conn: &mut AnyConnection,
) -> (
    std::collections::BTreeMap<String, i64>,
    std::collections::BTreeMap<String, i64>,
) {
    let stored: Vec<(String, i64)> =
        sqlx::query_as("SELECT pool_id, guaranteed FROM pool_guarantees WHERE guaranteed <> 0")
            .fetch_all(&mut *conn)
            .await
            .expect("reading the guarantee totals");
    let sql = format!(
        "SELECT t.pool_id, CAST(SUM({TENANT_GUARANTEE}) AS BIGINT) FROM tenants t \
         JOIN tiers r ON r.id = t.tier_id WHERE t.pool_id IS NOT NULL GROUP BY t.pool_id"
    );
    let summed: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .expect("summing the guarantees");
    let summed = summed.into_iter().filter(|(_, g)| *g != 0).collect();
    (stored.into_iter().collect(), summed)
}
