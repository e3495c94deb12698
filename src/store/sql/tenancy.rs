//! Writes of tenants and tokens, and re-sealing of token secrets.

use sqlx::Any;
use sqlx::any::AnyArguments;
use sqlx::query::Query;

use crate::clock::system_now_ms;
use crate::domain::{Id, Tenant, TokenOwner, TokenRecord};
use crate::store::{Kind, StoreError};

use super::guarantees::Sign;
use super::rows::{self, POOLS, TENANTS, TIERS, TOKENS, UPSTREAMS};
use super::tx::{Write, ensure_found, in_use, write_error};
use super::{ConfigStore, Reseal};

type AnyQuery<'q> = Query<'q, Any, AnyArguments>;

const INSERT_TENANT: &str = "INSERT INTO tenants (id, display_name, tier_id, pool_id, \
    weight_override, guaranteed_override, burst_override, update_time_ms, create_time_ms) \
    VALUES ($1, $2, $3, $4, CAST($5 AS DOUBLE PRECISION), $6, $7, $8, $9)";
const UPDATE_TENANT: &str = "UPDATE tenants SET display_name = $2, tier_id = $3, pool_id = $4, \
    weight_override = CAST($5 AS DOUBLE PRECISION), guaranteed_override = $6, burst_override = $7, update_time_ms = $8 \
    WHERE id = $1";

/// Binds `$1` to `$8` of the tenant statements (`$9`, the create time, is insert only).
///
/// `$5`, the weight, is bound as text and cast in the SQL. Bound as an `Option<f64>`,
/// sqlx 0.9's `Any` driver declares a null one as a 4-byte float (its null mapping
/// swaps `Real` and `Double`), Postgres keeps the parameter types of the statement a
/// connection first prepared, and a weight bound after a null on that connection was
/// refused ("incorrect binary data format in bind parameter 5", an INTERNAL error).
/// Text has one type whether null or not; Rust prints an `f64` so that it parses back
/// to the same value.
fn bind_tenant<'q>(sql: &'static str, v: &Tenant) -> AnyQuery<'q> {
    sqlx::query(sql)
        .bind(v.id.as_str().to_owned())
        .bind(v.display_name.clone())
        .bind(v.tier_id.as_str().to_owned())
        .bind(v.pool_id.as_ref().map(|id| id.as_str().to_owned()))
        .bind(v.weight_override.map(|w| w.to_string()))
        .bind(v.guaranteed_override.map(i64::from))
        .bind(v.burst_override.map(i64::from))
        .bind(v.update_time_ms)
}

/// NOT_FOUND unless the tenant's tier and pool exist.
async fn require_tenant_refs(write: &mut Write, v: &Tenant) -> Result<(), StoreError> {
    write
        .require(&TIERS, v.tier_id.as_str(), "tenant.tier_id")
        .await?;
    if let Some(pool_id) = &v.pool_id {
        write
            .require(&POOLS, pool_id.as_str(), "tenant.pool_id")
            .await?;
    }
    Ok(())
}

pub(super) async fn create_tenant(
    store: &ConfigStore,
    mut v: Tenant,
) -> Result<(Tenant, i64), StoreError> {
    let now = system_now_ms();
    (v.create_time_ms, v.update_time_ms) = (now, now);
    let mut write = Write::begin(store).await?;
    require_tenant_refs(&mut write, &v).await?;
    bind_tenant(INSERT_TENANT, &v)
        .bind(v.create_time_ms)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Tenant, v.id.as_str()))?;
    write.count_tenant(v.id.as_str(), Sign::Add).await?;
    write.changed(Kind::Tenant, v.id.as_str());
    if let Some(pool) = &v.pool_id {
        write.affects_pool(pool.as_str());
    }
    write.finish_returning(&TENANTS, v.id.as_str()).await
}

pub(super) async fn update_tenant(
    store: &ConfigStore,
    mut v: Tenant,
) -> Result<(Tenant, i64), StoreError> {
    v.update_time_ms = system_now_ms();
    let mut write = Write::begin(store).await?;
    require_tenant_refs(&mut write, &v).await?;
    // The pool it leaves (its dedicated tokens no longer cover a guarantee there) and
    // the pool it joins.
    write.affects_pool_of_tenant(v.id.as_str()).await?;
    // Its dedicated tokens' lease counters follow its pool's space.
    write.watch_tenant_tokens(v.id.as_str()).await?;
    write.count_tenant(v.id.as_str(), Sign::Remove).await?;
    let done = bind_tenant(UPDATE_TENANT, &v)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Tenant, v.id.as_str()))?;
    ensure_found(done.rows_affected(), Kind::Tenant, v.id.as_str())?;
    write.count_tenant(v.id.as_str(), Sign::Add).await?;
    write.changed(Kind::Tenant, v.id.as_str());
    if let Some(pool) = &v.pool_id {
        write.affects_pool(pool.as_str());
    }
    write.finish_returning(&TENANTS, v.id.as_str()).await
}

/// Refused while the tenant has dedicated tokens, or is the only tenant of a worker
/// key (such a key would be left able to act for nobody). Otherwise the tenant also
/// leaves every other key's scope, so re-creating the id later grants no old key.
pub(super) async fn delete_tenant(store: &ConfigStore, id: &Id) -> Result<i64, StoreError> {
    let id = id.as_str();
    let mut write = Write::begin(store).await?;
    let tokens = write.ids_where("tokens", "dedicated_tenant_id", id).await?;
    if !tokens.is_empty() {
        let users = ("dedicated token", "dedicated tokens");
        let advice = "delete them or move them to a pool first";
        return Err(in_use(Kind::Tenant, id, "has", users, &tokens, advice));
    }
    let order = rows::in_byte_order(write.backend(), "s.api_key_id");
    let sole_scope = format!(
        "SELECT s.api_key_id FROM api_key_tenants s WHERE s.tenant_id = $1 AND NOT EXISTS \
         (SELECT 1 FROM api_key_tenants o WHERE o.api_key_id = s.api_key_id \
         AND o.tenant_id <> s.tenant_id) ORDER BY {order}"
    );
    let keys = write.ids(sole_scope, id).await?;
    if !keys.is_empty() {
        let users = ("worker API key", "worker API keys");
        let advice = "delete those keys or give them another tenant first";
        return Err(in_use(
            Kind::Tenant,
            id,
            "is the only tenant of",
            users,
            &keys,
            advice,
        ));
    }
    // The keys it leaves change too. Its pool only loses a guarantee: nothing to check.
    let scoped = write
        .ids(
            "SELECT api_key_id FROM api_key_tenants WHERE tenant_id = $1".into(),
            id,
        )
        .await?;
    for key in &scoped {
        write.changed(Kind::ApiKey, key);
    }
    sqlx::query("DELETE FROM api_key_tenants WHERE tenant_id = $1")
        .bind(id)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Tenant, id))?;
    write.count_tenant(id, Sign::Remove).await?;
    write.delete_row(&TENANTS, id).await?;
    write.changed(Kind::Tenant, id);
    write.finish().await
}

const INSERT_TOKEN: &str = "INSERT INTO tokens (id, upstream_id, display_name, pool_id, \
    dedicated_tenant_id, disabled, update_time_ms, monthly_cost_minor, key_id, sealed_secret, \
    create_time_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
const UPDATE_TOKEN_KEEPING_SECRET: &str = "UPDATE tokens SET upstream_id = $2, \
    display_name = $3, pool_id = $4, dedicated_tenant_id = $5, disabled = $6, \
    update_time_ms = $7, monthly_cost_minor = $8 WHERE id = $1";
const UPDATE_TOKEN: &str = "UPDATE tokens SET upstream_id = $2, display_name = $3, \
    pool_id = $4, dedicated_tenant_id = $5, disabled = $6, update_time_ms = $7, \
    monthly_cost_minor = $8, key_id = $9, sealed_secret = $10 WHERE id = $1";

/// Binds `$1` to `$8` of the token statements: everything but the secret.
fn bind_token<'q>(sql: &'static str, v: &TokenRecord) -> AnyQuery<'q> {
    let (pool_id, tenant_id) = match &v.owner {
        TokenOwner::Pool(pool) => (Some(pool.as_str().to_owned()), None),
        TokenOwner::Dedicated(tenant) => (None, Some(tenant.as_str().to_owned())),
    };
    sqlx::query(sql)
        .bind(v.id.as_str().to_owned())
        .bind(v.upstream_id.as_str().to_owned())
        .bind(v.display_name.clone())
        .bind(pool_id)
        .bind(tenant_id)
        .bind(i64::from(v.disabled))
        .bind(v.update_time_ms)
        .bind(v.monthly_cost_minor)
}

/// NOT_FOUND unless the token's upstream and owner exist.
async fn require_token_refs(write: &mut Write, v: &TokenRecord) -> Result<(), StoreError> {
    write
        .require(&UPSTREAMS, v.upstream_id.as_str(), "token.upstream_id")
        .await?;
    match &v.owner {
        TokenOwner::Pool(pool) => write.require(&POOLS, pool.as_str(), "token.pool_id").await,
        TokenOwner::Dedicated(tenant) => {
            let field = "token.dedicated_tenant_id";
            write.require(&TENANTS, tenant.as_str(), field).await
        }
    }
}

pub(super) async fn create_token(
    store: &ConfigStore,
    mut v: TokenRecord,
) -> Result<(TokenRecord, i64), StoreError> {
    let now = system_now_ms();
    (v.create_time_ms, v.update_time_ms) = (now, now);
    let mut write = Write::begin(store).await?;
    require_token_refs(&mut write, &v).await?;
    bind_token(INSERT_TOKEN, &v)
        .bind(v.key_id.clone())
        .bind(v.sealed_secret.clone())
        .bind(v.create_time_ms)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Token, v.id.as_str()))?;
    write.changed(Kind::Token, v.id.as_str());
    write.affects_owner(&v.owner).await?;
    write.finish_returning(&TOKENS, v.id.as_str()).await
}

/// An empty `sealed_secret` keeps the stored secret and key id.
pub(super) async fn update_token(
    store: &ConfigStore,
    mut v: TokenRecord,
) -> Result<(TokenRecord, i64), StoreError> {
    v.update_time_ms = system_now_ms();
    let mut write = Write::begin(store).await?;
    require_token_refs(&mut write, &v).await?;
    // The pool it counted for before (it may leave it) and the one it counts for now.
    write.affects_stored_token(v.id.as_str()).await?;
    // A new owner may move its lease counters to another space.
    write.watch_token(v.id.as_str()).await?;
    let query = if v.sealed_secret.is_empty() {
        bind_token(UPDATE_TOKEN_KEEPING_SECRET, &v)
    } else {
        bind_token(UPDATE_TOKEN, &v)
            .bind(v.key_id.clone())
            .bind(v.sealed_secret.clone())
    };
    let done = query
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Token, v.id.as_str()))?;
    ensure_found(done.rows_affected(), Kind::Token, v.id.as_str())?;
    write.changed(Kind::Token, v.id.as_str());
    write.affects_owner(&v.owner).await?;
    write.finish_returning(&TOKENS, v.id.as_str()).await
}

/// Refused by the guarantee check when the pool would owe more than 80 % of what is left.
pub(super) async fn delete_token(store: &ConfigStore, id: &Id) -> Result<i64, StoreError> {
    let mut write = Write::begin(store).await?;
    write.affects_stored_token(id.as_str()).await?;
    write.delete_row(&TOKENS, id.as_str()).await?;
    write.changed(Kind::Token, id.as_str());
    write.finish().await
}

/// See [`ConfigStore::reseal_tokens`].
pub(super) async fn reseal_tokens(
    store: &ConfigStore,
    reseal: &Reseal<'_>,
) -> Result<usize, StoreError> {
    let mut write = Write::begin(store).await?;
    let backend = write.backend();
    let tokens = rows::all(write.conn(), &TOKENS, backend).await?;
    let mut changes = Vec::new();
    for token in &tokens {
        // An error drops `write`: nothing is changed and the version stays.
        if let Some((key_id, sealed)) = reseal(token).map_err(|e| StoreError::Internal(e.into()))? {
            changes.push((token.id.as_str(), key_id, sealed));
        }
    }
    if changes.is_empty() {
        return Ok(0);
    }
    let now = system_now_ms();
    for (id, key_id, sealed) in &changes {
        sqlx::query(
            "UPDATE tokens SET key_id = $2, sealed_secret = $3, update_time_ms = $4 WHERE id = $1",
        )
        .bind(*id)
        .bind(key_id.clone())
        .bind(sealed.clone())
        .bind(now)
        .execute(write.conn())
        .await
        .map_err(write_error(Kind::Token, id))?;
        write.changed(Kind::Token, id);
    }
    write.commit_unchecked().await?;
    Ok(changes.len())
}
