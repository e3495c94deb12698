//! Reading: which columns each kind has, how a row becomes a domain object, and the
//! reads every kind shares (one by id, a page in id order, all of them).

use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use crate::domain::{
    ApiKeyRecord, ApiKeyRole, ConfigView, Id, Pool, SharedAccess, Tenant, Tier, TokenOwner,
    TokenRecord, Upstream,
};
use crate::store::{Kind, StoreError};

use super::Backend;
use super::tx::map_error;

/// One kind of object: its table, its columns and how to decode a row of them.
pub(super) struct Table<T> {
    pub kind: Kind,
    pub name: &'static str,
    pub columns: &'static str,
    pub decode: fn(&AnyRow) -> Result<T, StoreError>,
}

pub(super) const UPSTREAMS: Table<Upstream> = Table {
    kind: Kind::Upstream,
    name: "upstreams",
    columns: "id, display_name, limit_per_window, window_ms, safety_margin, \
              block_duration_ms, rate_limit_error_codes, create_time_ms, update_time_ms, \
              max_block_ms",
    decode: upstream,
};

pub(super) const TOKENS: Table<TokenRecord> = Table {
    kind: Kind::Token,
    name: "tokens",
    columns: "id, upstream_id, display_name, pool_id, dedicated_tenant_id, disabled, key_id, \
              sealed_secret, create_time_ms, update_time_ms, monthly_cost_minor",
    decode: token,
};

pub(super) const POOLS: Table<Pool> = Table {
    kind: Kind::Pool,
    name: "pools",
    columns: "id, upstream_id, display_name, create_time_ms, update_time_ms",
    decode: pool,
};

pub(super) const TIERS: Table<Tier> = Table {
    kind: Kind::Tier,
    name: "tiers",
    columns: "id, display_name, guaranteed_per_window, burst_per_window, shared_access, weight, \
              create_time_ms, update_time_ms",
    decode: tier,
};

pub(super) const TENANTS: Table<Tenant> = Table {
    kind: Kind::Tenant,
    name: "tenants",
    columns: "id, display_name, tier_id, pool_id, weight_override, guaranteed_override, \
              burst_override, create_time_ms, update_time_ms",
    decode: tenant,
};

/// API keys without their tenant scope, which `keys` reads from `api_key_tenants`.
pub(super) const API_KEYS: Table<ApiKeyRecord> = Table {
    kind: Kind::ApiKey,
    name: "api_keys",
    columns: "id, display_name, role, secret_hash, create_time_ms",
    decode: api_key,
};

/// `column` as an expression that sorts by bytes on both backends. Ids are ASCII, but a
/// Postgres database with a linguistic collation (en_US) would sort `a-b` after `ab`.
pub(super) fn in_byte_order(backend: Backend, column: &str) -> String {
    match backend {
        Backend::Postgres => format!("{column} COLLATE \"C\""),
        Backend::Sqlite => column.to_owned(),
    }
}

pub(super) async fn version(conn: &mut AnyConnection) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT version FROM config_meta WHERE singleton = 1")
        .fetch_one(conn)
        .await
        .map_err(map_error)
}

/// The object with this id, if any.
pub(super) async fn find<T>(
    conn: &mut AnyConnection,
    table: &Table<T>,
    id: &str,
) -> Result<Option<T>, StoreError> {
    let sql = format!("SELECT {} FROM {} WHERE id = $1", table.columns, table.name);
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(map_error)?;
    row.as_ref().map(table.decode).transpose()
}

/// The object with this id, or NOT_FOUND naming `<kind>.id`.
pub(super) async fn get<T>(
    conn: &mut AnyConnection,
    table: &Table<T>,
    id: &str,
) -> Result<T, StoreError> {
    find(conn, table, id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: table.kind,
            id: id.to_owned(),
            field: format!("{}.id", table.kind.field_prefix()),
        })
}

/// Up to `limit` objects with ids after `after` (keyset paging), in id byte order.
pub(super) async fn page<T>(
    conn: &mut AnyConnection,
    table: &Table<T>,
    backend: Backend,
    after: &str,
    limit: u32,
) -> Result<Vec<T>, StoreError> {
    let id = in_byte_order(backend, "id");
    let sql = format!(
        "SELECT {} FROM {} WHERE {id} > $1 ORDER BY {id} LIMIT $2",
        table.columns, table.name
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await
        .map_err(map_error)?;
    rows.iter().map(table.decode).collect()
}

/// Every object of a kind, in id byte order.
pub(super) async fn all<T>(
    conn: &mut AnyConnection,
    table: &Table<T>,
    backend: Backend,
) -> Result<Vec<T>, StoreError> {
    let id = in_byte_order(backend, "id");
    let sql = format!("SELECT {} FROM {} ORDER BY {id}", table.columns, table.name);
    let rows = sqlx::query(AssertSqlSafe(sql))
        .fetch_all(conn)
        .await
        .map_err(map_error)?;
    rows.iter().map(table.decode).collect()
}

/// The whole configuration the guarantee rules and leasing look at.
pub(super) async fn read_view(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<ConfigView, StoreError> {
    Ok(ConfigView {
        upstreams: all(conn, &UPSTREAMS, backend).await?,
        tokens: all(conn, &TOKENS, backend).await?,
        pools: all(conn, &POOLS, backend).await?,
        tiers: all(conn, &TIERS, backend).await?,
        tenants: all(conn, &TENANTS, backend).await?,
    })
}

/// A stored value that the store itself could never have written.
fn corrupt(column: &str) -> StoreError {
    StoreError::Internal(anyhow::anyhow!(
        "the stored value of column '{column}' is out of range"
    ))
}

fn text(row: &AnyRow, column: &str) -> Result<String, StoreError> {
    row.try_get(column).map_err(map_error)
}

fn id(row: &AnyRow, column: &str) -> Result<Id, StoreError> {
    text(row, column).map(Id::from_trusted)
}

fn optional_id(row: &AnyRow, column: &str) -> Result<Option<Id>, StoreError> {
    let value: Option<String> = row.try_get(column).map_err(map_error)?;
    Ok(value.map(Id::from_trusted))
}

pub(super) fn int(row: &AnyRow, column: &str) -> Result<i64, StoreError> {
    row.try_get(column).map_err(map_error)
}

fn count(row: &AnyRow, column: &str) -> Result<u32, StoreError> {
    u32::try_from(int(row, column)?).map_err(|_| corrupt(column))
}

fn optional_count(row: &AnyRow, column: &str) -> Result<Option<u32>, StoreError> {
    let value: Option<i64> = row.try_get(column).map_err(map_error)?;
    value
        .map(|v| u32::try_from(v).map_err(|_| corrupt(column)))
        .transpose()
}

fn float(row: &AnyRow, column: &str) -> Result<f64, StoreError> {
    row.try_get(column).map_err(map_error)
}

fn optional_float(row: &AnyRow, column: &str) -> Result<Option<f64>, StoreError> {
    row.try_get(column).map_err(map_error)
}

fn millis(row: &AnyRow, column: &str) -> Result<Duration, StoreError> {
    let ms = u64::try_from(int(row, column)?).map_err(|_| corrupt(column))?;
    Ok(Duration::from_millis(ms))
}

fn bytes(row: &AnyRow, column: &str) -> Result<Vec<u8>, StoreError> {
    row.try_get(column).map_err(map_error)
}

/// A duration as stored: whole milliseconds.
pub(super) fn to_millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Error codes as stored: one per line (a code holds no control characters).
pub(super) fn join_lines(values: &[String]) -> String {
    values.join("\n")
}

fn split_lines(joined: &str) -> Vec<String> {
    joined
        .split('\n')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn upstream(row: &AnyRow) -> Result<Upstream, StoreError> {
    Ok(Upstream {
        id: id(row, "id")?,
        display_name: text(row, "display_name")?,
        limit_per_window: count(row, "limit_per_window")?,
        window: millis(row, "window_ms")?,
        safety_margin: float(row, "safety_margin")?,
        block_duration: millis(row, "block_duration_ms")?,
        max_block: Some(millis(row, "max_block_ms")?).filter(|d| !d.is_zero()),
        rate_limit_error_codes: split_lines(&text(row, "rate_limit_error_codes")?),
        create_time_ms: int(row, "create_time_ms")?,
        update_time_ms: int(row, "update_time_ms")?,
    })
}

fn token(row: &AnyRow) -> Result<TokenRecord, StoreError> {
    let owner = match (
        optional_id(row, "pool_id")?,
        optional_id(row, "dedicated_tenant_id")?,
    ) {
        (Some(pool), None) => TokenOwner::Pool(pool),
        (None, Some(tenant)) => TokenOwner::Dedicated(tenant),
        _ => return Err(corrupt("pool_id")),
    };
    Ok(TokenRecord {
        id: id(row, "id")?,
        upstream_id: id(row, "upstream_id")?,
        display_name: text(row, "display_name")?,
        owner,
        disabled: int(row, "disabled")? != 0,
        key_id: text(row, "key_id")?,
        sealed_secret: bytes(row, "sealed_secret")?,
        monthly_cost_minor: int(row, "monthly_cost_minor")?,
        create_time_ms: int(row, "create_time_ms")?,
        update_time_ms: int(row, "update_time_ms")?,
    })
}

fn pool(row: &AnyRow) -> Result<Pool, StoreError> {
    Ok(Pool {
        id: id(row, "id")?,
        upstream_id: id(row, "upstream_id")?,
        display_name: text(row, "display_name")?,
        create_time_ms: int(row, "create_time_ms")?,
        update_time_ms: int(row, "update_time_ms")?,
    })
}

fn tier(row: &AnyRow) -> Result<Tier, StoreError> {
    let access = text(row, "shared_access")?;
    Ok(Tier {
        id: id(row, "id")?,
        display_name: text(row, "display_name")?,
        guaranteed_per_window: count(row, "guaranteed_per_window")?,
        burst_per_window: count(row, "burst_per_window")?,
        shared_access: SharedAccess::parse(&access).ok_or_else(|| corrupt("shared_access"))?,
        weight: float(row, "weight")?,
        create_time_ms: int(row, "create_time_ms")?,
        update_time_ms: int(row, "update_time_ms")?,
    })
}

fn tenant(row: &AnyRow) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        id: id(row, "id")?,
        display_name: text(row, "display_name")?,
        tier_id: id(row, "tier_id")?,
        pool_id: optional_id(row, "pool_id")?,
        weight_override: optional_float(row, "weight_override")?,
        guaranteed_override: optional_count(row, "guaranteed_override")?,
        burst_override: optional_count(row, "burst_override")?,
        create_time_ms: int(row, "create_time_ms")?,
        update_time_ms: int(row, "update_time_ms")?,
    })
}

fn api_key(row: &AnyRow) -> Result<ApiKeyRecord, StoreError> {
    let role = text(row, "role")?;
    Ok(ApiKeyRecord {
        id: text(row, "id")?,
        display_name: text(row, "display_name")?,
        role: ApiKeyRole::parse(&role).ok_or_else(|| corrupt("role"))?,
        tenant_ids: Vec::new(),
        secret_hash: bytes(row, "secret_hash")?,
        create_time_ms: int(row, "create_time_ms")?,
    })
}
