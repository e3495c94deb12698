//! Rebalancing's writes and its audit trail: a tenant moved from one pool to another
//! is one write of its own (checked by the 80 % rule like any other) that also records
//! a `tenant_moves` row under the write's version.

use std::collections::HashMap;

use sqlx::Row;

use crate::clock::system_now_ms;
use crate::domain::{Id, InvalidField, MoveMode, Tenant, TenantMove};
use crate::store::{Kind, StoreError};

use super::ConfigStore;
use super::guarantees::Sign;
use super::rows::{self, POOLS, TENANTS};
use super::tx::{Write, map_error};

/// A move to make.
#[derive(Debug, Clone)]
pub struct MoveOrder {
    pub tenant_id: Id,
    pub from_pool_id: Id,
    pub to_pool_id: Id,
    /// Why, for people.
    pub reason: String,
    pub mode: MoveMode,
    /// The admin key's id, or `replica <id>`.
    pub actor: String,
    /// Refuse the move when a move of the same upstream was recorded after this
    /// version: someone else (another replica's automatic run) rebalanced since the plan
    /// was made, so it may no longer hold. `None` skips the check.
    pub unless_moved_after: Option<i64>,
}

/// What rebalancing needs to know of past moves of one upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveHistory {
    /// The version of the latest move (0 when there was none).
    pub last_version: i64,
    /// Per tenant, when it was last moved (Unix ms).
    pub moved_at_ms: HashMap<Id, i64>,
}

const COLUMNS: &str = "version, upstream_id, tenant_id, from_pool_id, to_pool_id, reason, \
    mode, actor, move_time_ms";

fn precondition(field: &str, reason: String) -> StoreError {
    StoreError::FailedPrecondition(InvalidField::new(field, reason))
}

/// Moves the tenant and records the move; FAILED_PRECONDITION when the tenant is no
/// longer in `from_pool_id`, the pools serve different upstreams, another move came
/// first (`unless_moved_after`), or the receiving pool's guarantees would pass 80 %.
pub(super) async fn move_tenant(
    store: &ConfigStore,
    order: &MoveOrder,
) -> Result<(TenantMove, Tenant, i64), StoreError> {
    let now = system_now_ms();
    let mut write = Write::begin(store).await?;
    let tenant_id = order.tenant_id.as_str();
    let tenant = rows::find(write.conn(), &TENANTS, tenant_id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: Kind::Tenant,
            id: tenant_id.to_owned(),
            field: "move.tenant_id".into(),
        })?;
    if tenant.pool_id.as_ref() != Some(&order.from_pool_id) {
        let now_in = tenant
            .pool_id
            .as_ref()
            .map_or("no pool".to_owned(), |p| format!("pool '{p}'"));
        let reason = format!(
            "tenant '{tenant_id}' is in {now_in} now, not in pool '{}': the plan is out of \
             date; plan again",
            order.from_pool_id
        );
        return Err(precondition("move.from_pool_id", reason));
    }
    let upstream_id = pools_of_one_upstream(&mut write, order).await?;
    if let Some(seen) = order.unless_moved_after {
        let last = last_version(&mut write, upstream_id.as_str()).await?;
        if last > seen {
            let reason = format!(
                "tenants of upstream '{upstream_id}' were moved since this plan was made \
                 (move {last}); plan again"
            );
            return Err(precondition("move", reason));
        }
    }
    write.affects_pool(order.from_pool_id.as_str());
    write.affects_pool(order.to_pool_id.as_str());
    // The pools' guarantee totals: out of the one it leaves, into the one it joins.
    write.count_tenant(tenant_id, Sign::Remove).await?;
    // Its dedicated tokens' lease counters follow it to the new pool's space.
    write.watch_tenant_tokens(tenant_id).await?;
    sqlx::query("UPDATE tenants SET pool_id = $2, update_time_ms = $3 WHERE id = $1")
        .bind(tenant_id)
        .bind(order.to_pool_id.as_str())
        .bind(now)
        .execute(write.conn())
        .await
        .map_err(map_error)?;
    write.count_tenant(tenant_id, Sign::Add).await?;
    let record = TenantMove {
        version: write.version(),
        upstream_id,
        tenant_id: order.tenant_id.clone(),
        from_pool_id: order.from_pool_id.clone(),
        to_pool_id: order.to_pool_id.clone(),
        reason: order.reason.clone(),
        mode: order.mode,
        actor: order.actor.clone(),
        move_time_ms: now,
    };
    insert(&mut write, &record).await?;
    write.changed(Kind::Tenant, tenant_id);
    let (tenant, version) = write.finish_returning(&TENANTS, tenant_id).await?;
    Ok((record, tenant, version))
}

/// Both pools exist and serve one upstream: that upstream's id.
async fn pools_of_one_upstream(write: &mut Write, order: &MoveOrder) -> Result<Id, StoreError> {
    if order.from_pool_id == order.to_pool_id {
        let reason = format!("is the pool tenant '{}' is in already", order.tenant_id);
        return Err(precondition("move.to_pool_id", reason));
    }
    let mut get = async |id: &Id, field: &str| {
        rows::find(write.conn(), &POOLS, id.as_str())
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: Kind::Pool,
                id: id.as_str().to_owned(),
                field: field.to_owned(),
            })
    };
    let from = get(&order.from_pool_id, "move.from_pool_id").await?;
    let to = get(&order.to_pool_id, "move.to_pool_id").await?;
    if from.upstream_id != to.upstream_id {
        let reason = format!(
            "pool '{}' serves upstream '{}', pool '{}' serves '{}': a tenant moves only \
             between pools of one upstream",
            to.id, to.upstream_id, from.id, from.upstream_id
        );
        return Err(precondition("move.to_pool_id", reason));
    }
    Ok(from.upstream_id)
}

async fn last_version(write: &mut Write, upstream_id: &str) -> Result<i64, StoreError> {
    let last: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM tenant_moves WHERE upstream_id = $1")
            .bind(upstream_id)
            .fetch_one(write.conn())
            .await
            .map_err(map_error)?;
    Ok(last.unwrap_or(0))
}

async fn insert(write: &mut Write, m: &TenantMove) -> Result<(), StoreError> {
    let sql =
        format!("INSERT INTO tenant_moves ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(m.version)
        .bind(m.upstream_id.as_str())
        .bind(m.tenant_id.as_str())
        .bind(m.from_pool_id.as_str())
        .bind(m.to_pool_id.as_str())
        .bind(m.reason.as_str())
        .bind(m.mode.as_str())
        .bind(m.actor.as_str())
        .bind(m.move_time_ms)
        .execute(write.conn())
        .await
        .map_err(map_error)?;
    Ok(())
}

/// Recorded moves, newest first: of one upstream and/or one tenant when given, older
/// than version `before` when given, at most `limit`.
pub(super) async fn list(
    store: &ConfigStore,
    upstream_id: Option<&Id>,
    tenant_id: Option<&Id>,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<TenantMove>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM tenant_moves \
         WHERE ($1 = '' OR upstream_id = $1) AND ($2 = '' OR tenant_id = $2) AND version < $3 \
         ORDER BY version DESC LIMIT $4"
    );
    let mut conn = store.pool.acquire().await.map_err(map_error)?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(upstream_id.map_or("", Id::as_str))
        .bind(tenant_id.map_or("", Id::as_str))
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await
        .map_err(map_error)?;
    rows.iter().map(decode).collect()
}

/// The latest move of `upstream_id` and when each of its tenants last moved.
pub(super) async fn history(
    store: &ConfigStore,
    upstream_id: &Id,
) -> Result<MoveHistory, StoreError> {
    let mut conn = store.pool.acquire().await.map_err(map_error)?;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, MAX(move_time_ms), MAX(version) FROM tenant_moves \
         WHERE upstream_id = $1 GROUP BY tenant_id",
    )
    .bind(upstream_id.as_str())
    .fetch_all(&mut *conn)
    .await
    .map_err(map_error)?;
    let mut history = MoveHistory::default();
    for (tenant, at, version) in rows {
        history.last_version = history.last_version.max(version);
        history.moved_at_ms.insert(Id::from_trusted(tenant), at);
    }
    Ok(history)
}

fn decode(row: &sqlx::any::AnyRow) -> Result<TenantMove, StoreError> {
    let text = |name: &str| -> Result<String, StoreError> {
        row.try_get::<String, _>(name).map_err(map_error)
    };
    let mode = text("mode")?;
    Ok(TenantMove {
        version: row.try_get("version").map_err(map_error)?,
        upstream_id: Id::from_trusted(text("upstream_id")?),
        tenant_id: Id::from_trusted(text("tenant_id")?),
        from_pool_id: Id::from_trusted(text("from_pool_id")?),
        to_pool_id: Id::from_trusted(text("to_pool_id")?),
        reason: text("reason")?,
        mode: MoveMode::from_name(&mode).ok_or_else(|| {
            StoreError::Internal(anyhow::anyhow!(
                "unknown move mode {mode:?} in tenant_moves"
            ))
        })?,
        actor: text("actor")?,
        move_time_ms: row.try_get("move_time_ms").map_err(map_error)?,
    })
}
