//! Writes of upstream profiles, pools and tiers.

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection, AssertSqlSafe, SqlSafeStr};

use crate::clock::system_now_ms;
use crate::domain::{Id, Pool, Tier, Upstream};
use crate::store::{Kind, StoreError};

use super::ConfigStore;
use super::rows::{POOLS, TIERS, UPSTREAMS, join_lines, to_millis};
use super::tx::{Write, ensure_found, in_use, write_error};

type AnyQuery<'q> = Query<'q, Any, AnyArguments>;

const INSERT_UPSTREAM: &str = "INSERT INTO upstreams (id, display_name, limit_per_window, \
    window_ms, safety_margin, block_duration_ms, rate_limit_error_codes, update_time_ms, \
    max_block_ms, create_time_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
const UPDATE_UPSTREAM: &str = "UPDATE upstreams SET display_name = $2, limit_per_window = $3, \
    window_ms = $4, safety_margin = $5, block_duration_ms = $6, rate_limit_error_codes = $7, \
    update_time_ms = $8, max_block_ms = $9 WHERE id = $1";

/// Binds `$1` to `$9` of the upstream statements (`$10`, the create time, is insert only).
fn bind_upstream<'q>(sql: impl SqlSafeStr, v: &Upstream) -> AnyQuery<'q> {
    sqlx::query(sql)
        .bind(v.id.as_str().to_owned())
        .bind(v.display_name.clone())
        .bind(i64::from(v.limit_per_window))
        .bind(to_millis(v.window))
        .bind(v.safety_margin)
        .bind(to_millis(v.block_duration))
        .bind(join_lines(&v.rate_limit_error_codes))
        .bind(v.update_time_ms)
        .bind(v.max_block.map_or(0, to_millis))
}

pub(super) async fn create_upstream(
    store: &ConfigStore,
    mut v: Upstream,
) -> Result<(Upstream, i64), StoreError> {
    let now = system_now_ms();
    (v.create_time_ms, v.update_time_ms) = (now, now);
    let mut write = Write::begin(store).await?;
    bind_upstream(INSERT_UPSTREAM, &v)
        .bind(v.create_time_ms)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Upstream, v.id.as_str()))?;
    write.changed(Kind::Upstream, v.id.as_str());
    write.finish_returning(&UPSTREAMS, v.id.as_str()).await
}

/// Seeding: inserts the profile unless its id exists.
pub(super) async fn insert_upstream_if_missing(
    conn: &mut AnyConnection,
    v: &Upstream,
) -> Result<(), StoreError> {
    let sql = format!("{INSERT_UPSTREAM} ON CONFLICT (id) DO NOTHING");
    bind_upstream(AssertSqlSafe(sql), v)
        .bind(v.create_time_ms)
        .execute(conn)
        .await
        .map_err(write_error(Kind::Upstream, v.id.as_str()))
        .map(|_| ())
}

pub(super) async fn update_upstream(
    store: &ConfigStore,
    mut v: Upstream,
) -> Result<(Upstream, i64), StoreError> {
    v.update_time_ms = system_now_ms();
    let mut write = Write::begin(store).await?;
    let done = bind_upstream(UPDATE_UPSTREAM, &v)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Upstream, v.id.as_str()))?;
    ensure_found(done.rows_affected(), Kind::Upstream, v.id.as_str())?;
    write.changed(Kind::Upstream, v.id.as_str());
    // Its limit and margin set the capacity of every pool of it.
    write.affects_pools_of_upstream(v.id.as_str()).await?;
    write.finish_returning(&UPSTREAMS, v.id.as_str()).await
}

/// Refused while tokens or pools use the upstream.
pub(super) async fn delete_upstream(store: &ConfigStore, id: &Id) -> Result<i64, StoreError> {
    let id = id.as_str();
    let mut write = Write::begin(store).await?;
    let tokens = write.ids_where("tokens", "upstream_id", id).await?;
    if !tokens.is_empty() {
        let advice = "delete them first";
        return Err(in_use(
            Kind::Upstream,
            id,
            "is used by",
            ("token", "tokens"),
            &tokens,
            advice,
        ));
    }
    let pools = write.ids_where("pools", "upstream_id", id).await?;
    if !pools.is_empty() {
        let advice = "delete them first";
        return Err(in_use(
            Kind::Upstream,
            id,
            "is used by",
            ("pool", "pools"),
            &pools,
            advice,
        ));
    }
    write.delete_row(&UPSTREAMS, id).await?;
    write.changed(Kind::Upstream, id);
    write.finish().await
}

const INSERT_POOL: &str = "INSERT INTO pools (id, upstream_id, display_name, update_time_ms, \
    create_time_ms) VALUES ($1, $2, $3, $4, $5)";
const UPDATE_POOL: &str =
    "UPDATE pools SET upstream_id = $2, display_name = $3, update_time_ms = $4 WHERE id = $1";

fn bind_pool<'q>(sql: &'static str, v: &Pool) -> AnyQuery<'q> {
    sqlx::query(sql)
        .bind(v.id.as_str().to_owned())
        .bind(v.upstream_id.as_str().to_owned())
        .bind(v.display_name.clone())
        .bind(v.update_time_ms)
}

pub(super) async fn create_pool(
    store: &ConfigStore,
    mut v: Pool,
) -> Result<(Pool, i64), StoreError> {
    let now = system_now_ms();
    (v.create_time_ms, v.update_time_ms) = (now, now);
    let mut write = Write::begin(store).await?;
    write
        .require(&UPSTREAMS, v.upstream_id.as_str(), "pool.upstream_id")
        .await?;
    bind_pool(INSERT_POOL, &v)
        .bind(v.create_time_ms)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Pool, v.id.as_str()))?;
    write.changed(Kind::Pool, v.id.as_str());
    write.affects_pool(v.id.as_str());
    write.finish_returning(&POOLS, v.id.as_str()).await
}

/// Moving a pool to another upstream is refused by the guarantee check while it holds
/// tokens of the old one.
pub(super) async fn update_pool(
    store: &ConfigStore,
    mut v: Pool,
) -> Result<(Pool, i64), StoreError> {
    v.update_time_ms = system_now_ms();
    let mut write = Write::begin(store).await?;
    write
        .require(&UPSTREAMS, v.upstream_id.as_str(), "pool.upstream_id")
        .await?;
    let done = bind_pool(UPDATE_POOL, &v)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Pool, v.id.as_str()))?;
    ensure_found(done.rows_affected(), Kind::Pool, v.id.as_str())?;
    write.changed(Kind::Pool, v.id.as_str());
    write.affects_pool(v.id.as_str());
    write.finish_returning(&POOLS, v.id.as_str()).await
}

/// Refused while the pool holds tokens or serves tenants.
pub(super) async fn delete_pool(store: &ConfigStore, id: &Id) -> Result<i64, StoreError> {
    let id = id.as_str();
    let mut write = Write::begin(store).await?;
    let tokens = write.ids_where("tokens", "pool_id", id).await?;
    if !tokens.is_empty() {
        let advice = "move them to another pool or delete them first";
        return Err(in_use(
            Kind::Pool,
            id,
            "holds",
            ("token", "tokens"),
            &tokens,
            advice,
        ));
    }
    let tenants = write.ids_where("tenants", "pool_id", id).await?;
    if !tenants.is_empty() {
        let advice = "move them to another pool first";
        return Err(in_use(
            Kind::Pool,
            id,
            "serves",
            ("tenant", "tenants"),
            &tenants,
            advice,
        ));
    }
    write.delete_row(&POOLS, id).await?;
    write.changed(Kind::Pool, id);
    write.finish().await
}

const INSERT_TIER: &str = "INSERT INTO tiers (id, display_name, guaranteed_per_window, \
    burst_per_window, shared_access, weight, update_time_ms, create_time_ms) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const UPDATE_TIER: &str = "UPDATE tiers SET display_name = $2, guaranteed_per_window = $3, \
    burst_per_window = $4, shared_access = $5, weight = $6, update_time_ms = $7 WHERE id = $1";

fn bind_tier<'q>(sql: impl SqlSafeStr, v: &Tier) -> AnyQuery<'q> {
    sqlx::query(sql)
        .bind(v.id.as_str().to_owned())
        .bind(v.display_name.clone())
        .bind(i64::from(v.guaranteed_per_window))
        .bind(i64::from(v.burst_per_window))
        .bind(v.shared_access.as_str())
        .bind(v.weight)
        .bind(v.update_time_ms)
}

pub(super) async fn create_tier(
    store: &ConfigStore,
    mut v: Tier,
) -> Result<(Tier, i64), StoreError> {
    let now = system_now_ms();
    (v.create_time_ms, v.update_time_ms) = (now, now);
    let mut write = Write::begin(store).await?;
    bind_tier(INSERT_TIER, &v)
        .bind(v.create_time_ms)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Tier, v.id.as_str()))?;
    write.changed(Kind::Tier, v.id.as_str());
    write.finish_returning(&TIERS, v.id.as_str()).await
}

/// Seeding: inserts the tier unless its id exists.
pub(super) async fn insert_tier_if_missing(
    conn: &mut AnyConnection,
    v: &Tier,
) -> Result<(), StoreError> {
    let sql = format!("{INSERT_TIER} ON CONFLICT (id) DO NOTHING");
    bind_tier(AssertSqlSafe(sql), v)
        .bind(v.create_time_ms)
        .execute(conn)
        .await
        .map_err(write_error(Kind::Tier, v.id.as_str()))
        .map(|_| ())
}

/// Raising guarantees is refused by the guarantee check when a pool would owe more
/// than 80 % of its capacity.
pub(super) async fn update_tier(
    store: &ConfigStore,
    mut v: Tier,
) -> Result<(Tier, i64), StoreError> {
    v.update_time_ms = system_now_ms();
    let mut write = Write::begin(store).await?;
    let done = bind_tier(UPDATE_TIER, &v)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Tier, v.id.as_str()))?;
    ensure_found(done.rows_affected(), Kind::Tier, v.id.as_str())?;
    write.changed(Kind::Tier, v.id.as_str());
    write.affects_pools_of_tier(v.id.as_str()).await?;
    write.finish_returning(&TIERS, v.id.as_str()).await
}

/// Refused while tenants are on the tier.
pub(super) async fn delete_tier(store: &ConfigStore, id: &Id) -> Result<i64, StoreError> {
    let id = id.as_str();
    let mut write = Write::begin(store).await?;
    let tenants = write.ids_where("tenants", "tier_id", id).await?;
    if !tenants.is_empty() {
        let advice = "move them to another tier first";
        return Err(in_use(
            Kind::Tier,
            id,
            "is used by",
            ("tenant", "tenants"),
            &tenants,
            advice,
        ));
    }
    write.delete_row(&TIERS, id).await?;
    write.changed(Kind::Tier, id);
    write.finish().await
}
