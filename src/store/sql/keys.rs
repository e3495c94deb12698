//! API keys: the key row (never the secret, only its hash) and its tenant scope in
//! `api_key_tenants`.

use std::collections::HashMap;

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use crate::clock::system_now_ms;
use crate::domain::{ApiKeyRecord, ApiKeyRole, Id, InvalidField};
use crate::store::{Kind, StoreError};

use super::rows::{self, API_KEYS, TENANTS};
use super::tx::{Write, ensure_found, map_error, write_error};
use super::{Backend, ConfigStore, changes};

/// Which keys' scopes [`scopes`] reads.
enum Keys<'a> {
    All,
    /// Ids in `first..=last`.
    Range(&'a str, &'a str),
    /// Keys the change log names after this version.
    ChangedSince(i64),
}

/// The tenant scopes of `keys`, each sorted by tenant id.
async fn scopes(
    conn: &mut AnyConnection,
    backend: Backend,
    keys: Keys<'_>,
) -> Result<HashMap<String, Vec<Id>>, StoreError> {
    let key = rows::in_byte_order(backend, "api_key_id");
    let tenant = rows::in_byte_order(backend, "tenant_id");
    let filter = match keys {
        Keys::All => String::new(),
        Keys::Range(..) => format!("WHERE {key} >= $1 AND {key} <= $2"),
        Keys::ChangedSince(_) => {
            format!(
                "WHERE api_key_id {}",
                changes::changed_filter(Kind::ApiKey).0
            )
        }
    };
    let sql =
        format!("SELECT api_key_id, tenant_id FROM api_key_tenants {filter} ORDER BY {tenant}");
    let mut query = sqlx::query(AssertSqlSafe(sql));
    match keys {
        Keys::All => {}
        Keys::Range(first, last) => query = query.bind(first.to_owned()).bind(last.to_owned()),
        Keys::ChangedSince(from) => {
            query = query
                .bind(changes::changed_filter(Kind::ApiKey).1)
                .bind(from)
        }
    }
    let found = query.fetch_all(conn).await.map_err(map_error)?;
    let mut scopes: HashMap<String, Vec<Id>> = HashMap::new();
    for row in &found {
        let key_id: String = row.try_get("api_key_id").map_err(map_error)?;
        let tenant_id: String = row.try_get("tenant_id").map_err(map_error)?;
        scopes
            .entry(key_id)
            .or_default()
            .push(Id::from_trusted(tenant_id));
    }
    Ok(scopes)
}

/// Fills in the scope of `keys`, which are in id byte order.
async fn with_scopes(
    conn: &mut AnyConnection,
    backend: Backend,
    mut keys: Vec<ApiKeyRecord>,
) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let (Some(first), Some(last)) = (keys.first(), keys.last()) else {
        return Ok(keys);
    };
    let mut scopes = scopes(conn, backend, Keys::Range(&first.id, &last.id)).await?;
    for key in &mut keys {
        key.tenant_ids = scopes.remove(&key.id).unwrap_or_default();
    }
    Ok(keys)
}

pub(super) async fn get(
    conn: &mut AnyConnection,
    backend: Backend,
    id: &str,
) -> Result<ApiKeyRecord, StoreError> {
    let key = rows::get(conn, &API_KEYS, id).await?;
    let mut keys = with_scopes(conn, backend, vec![key]).await?;
    Ok(keys.remove(0))
}

pub(super) async fn page(
    conn: &mut AnyConnection,
    backend: Backend,
    after: &str,
    limit: u32,
) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let keys = rows::page(conn, &API_KEYS, backend, after, limit).await?;
    with_scopes(conn, backend, keys).await
}

pub(super) async fn all(
    conn: &mut AnyConnection,
    backend: Backend,
) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let mut keys = rows::all(conn, &API_KEYS, backend).await?;
    let mut scopes = scopes(conn, backend, Keys::All).await?;
    for key in &mut keys {
        key.tenant_ids = scopes.remove(&key.id).unwrap_or_default();
    }
    Ok(keys)
}

/// The keys the change log names after version `from`, with their scopes (a key named
/// but not found was deleted).
pub(super) async fn changed_since(
    conn: &mut AnyConnection,
    backend: Backend,
    from: i64,
) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let (filter, kind) = changes::changed_filter(Kind::ApiKey);
    let sql = format!(
        "SELECT {} FROM api_keys WHERE id {filter}",
        API_KEYS.columns
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(kind)
        .bind(from)
        .fetch_all(&mut *conn)
        .await
        .map_err(map_error)?;
    let mut keys = found
        .iter()
        .map(API_KEYS.decode)
        .collect::<Result<Vec<_>, _>>()?;
    let mut scopes = scopes(conn, backend, Keys::ChangedSince(from)).await?;
    for key in &mut keys {
        key.tenant_ids = scopes.remove(&key.id).unwrap_or_default();
    }
    Ok(keys)
}

pub(super) async fn count_admins(conn: &mut AnyConnection) -> Result<u64, StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE role = 'admin'")
        .fetch_one(conn)
        .await
        .map_err(map_error)?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Tenants of a scope inserted per statement: one bind parameter each, far below
/// SQLite's 32,766 and Postgres's 65,535.
const SCOPE_BATCH: usize = 500;

/// Checks that every tenant exists (NOT_FOUND naming `api_key.tenant_ids`, the first
/// missing one in `tenant_ids` order) and stores the scope of key `id`, a batch of
/// tenants per statement.
async fn insert_scope(write: &mut Write, id: &str, tenant_ids: &[Id]) -> Result<(), StoreError> {
    for batch in tenant_ids.chunks(SCOPE_BATCH) {
        let placeholders: Vec<String> = (2..batch.len() + 2).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO api_key_tenants (api_key_id, tenant_id) SELECT CAST($1 AS TEXT), id \
             FROM tenants WHERE id IN ({})",
            placeholders.join(", ")
        );
        let mut insert = sqlx::query(AssertSqlSafe(sql)).bind(id.to_owned());
        for tenant_id in batch {
            insert = insert.bind(tenant_id.as_str().to_owned());
        }
        let done = insert
            .execute(write.conn())
            .await
            .map_err(write_error(Kind::ApiKey, id))?;
        if done.rows_affected() < batch.len() as u64 {
            for tenant_id in batch {
                write
                    .require(&TENANTS, tenant_id.as_str(), "api_key.tenant_ids")
                    .await?;
            }
        }
    }
    Ok(())
}

/// Commits and returns the key as stored.
async fn finish_returning(mut write: Write, id: &str) -> Result<(ApiKeyRecord, i64), StoreError> {
    let backend = write.backend();
    let stored = get(write.conn(), backend, id).await?;
    let version = write.finish().await?;
    Ok((stored, version))
}

/// The scope as stored: sorted, each tenant once.
fn normalise(tenant_ids: &mut Vec<Id>) {
    tenant_ids.sort();
    tenant_ids.dedup();
}

pub(super) async fn create(
    store: &ConfigStore,
    mut v: ApiKeyRecord,
) -> Result<(ApiKeyRecord, i64), StoreError> {
    v.create_time_ms = system_now_ms();
    normalise(&mut v.tenant_ids);
    let mut write = Write::begin(store).await?;
    sqlx::query(
        "INSERT INTO api_keys (id, display_name, role, secret_hash, create_time_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(v.id.clone())
    .bind(v.display_name.clone())
    .bind(v.role.as_str())
    .bind(v.secret_hash.clone())
    .bind(v.create_time_ms)
    .execute(write.conn())
    .await
    .map_err(write_error(Kind::ApiKey, &v.id))?;
    insert_scope(&mut write, &v.id, &v.tenant_ids).await?;
    write.changed(Kind::ApiKey, &v.id);
    finish_returning(write, &v.id).await
}

/// Replaces the name and the tenant scope; the role and the secret hash never change.
pub(super) async fn update(
    store: &ConfigStore,
    mut v: ApiKeyRecord,
) -> Result<(ApiKeyRecord, i64), StoreError> {
    normalise(&mut v.tenant_ids);
    let mut write = Write::begin(store).await?;
    // The key keeps its role: check the new scope against the stored one, not the
    // role the request happened to carry.
    let role: Option<String> = sqlx::query_scalar("SELECT role FROM api_keys WHERE id = $1")
        .bind(v.id.clone())
        .fetch_optional(write.conn())
        .await
        .map_err(write_error(Kind::ApiKey, &v.id))?;
    let role = role.and_then(|r| ApiKeyRole::parse(&r));
    ensure_found(u64::from(role.is_some()), Kind::ApiKey, &v.id)?;
    let stored = role.expect("checked above");
    if v.role != stored {
        return Err(StoreError::FailedPrecondition(InvalidField::new(
            "api_key.role",
            format!(
                "a key keeps its role (this one is {}); create a new key for another role",
                stored.as_str()
            ),
        )));
    }
    v.validate().map_err(StoreError::FailedPrecondition)?;
    let done = sqlx::query("UPDATE api_keys SET display_name = $2 WHERE id = $1")
        .bind(v.id.clone())
        .bind(v.display_name.clone())
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::ApiKey, &v.id))?;
    ensure_found(done.rows_affected(), Kind::ApiKey, &v.id)?;
    sqlx::query("DELETE FROM api_key_tenants WHERE api_key_id = $1")
        .bind(v.id.clone())
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::ApiKey, &v.id))?;
    insert_scope(&mut write, &v.id, &v.tenant_ids).await?;
    write.changed(Kind::ApiKey, &v.id);
    finish_returning(write, &v.id).await
}

pub(super) async fn delete(store: &ConfigStore, id: &str) -> Result<i64, StoreError> {
    let mut write = Write::begin(store).await?;
    sqlx::query("DELETE FROM api_key_tenants WHERE api_key_id = $1")
        .bind(id.to_owned())
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::ApiKey, id))?;
    write.delete_row(&API_KEYS, id).await?;
    write.changed(Kind::ApiKey, id);
    write.finish().await
}
