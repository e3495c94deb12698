//! The configuration store over sqlx's `Any` driver: Postgres or a SQLite file.
//!
//! One implementation serves both databases: the SQL is portable (`$N` placeholders,
//! BIGINT/DOUBLE PRECISION/TEXT/BYTEA columns, `ON CONFLICT DO NOTHING`) and the same
//! migrations in `migrations/` run on both. The few differences are chosen here, in one
//! place each: the connection URL and pool size ([`ConfigStore::connect`]), the order of
//! ids (`rows::in_byte_order`) and the snapshot isolation of [`ConfigStore::load`].
//!
//! # Writes
//! Every admin write is one transaction (`tx::Write`) that
//! 1. bumps `config_meta.version` first: the row lock serialises all admin writes across
//!    replicas, so the cross-object checks below cannot suffer write skew;
//! 2. checks that every referenced object exists (NOT_FOUND naming the request field);
//! 3. writes (a taken id is ALREADY_EXISTS; a missing one NOT_FOUND);
//! 4. checks the rules of [`crate::domain::check_guarantees`] on the pools the write
//!    can affect (`guarantees`: a few queries per pool over its tokens and a running
//!    total of its tenants' guarantees, not a read of the whole configuration): a
//!    violation rolls everything back and is FAILED_PRECONDITION;
//! 5. records what it changed in the change log (`changes`), commits and returns the
//!    new version with the object as stored.
//!
//! Callers validate each object's own rules (`Tier::validate` …) before calling; the
//! store enforces the rules that span objects.
//!
//! # Layout
//! - `rows`: column lists, row decoding and the reads shared by every kind.
//! - `tx`: the write transaction, reference checks and the mapping of database errors.
//! - `guarantees`: the cross-object rules on the pools one write affects.
//! - `changes`: the change log replicas patch their snapshot from.
//! - `history`: usage history rows (`crate::history`), each replica its own;
//!   `grants`: the grants per tenant and token written beside them (for cost).
//! - `config`: upstreams, pools and tiers; `tenancy`: tenants and tokens; `keys`: API keys.

mod changes;
mod config;
mod grants;
mod guarantees;
mod history;
mod keys;
mod rebalance;
mod rows;
mod spaces;
mod tenancy;
mod tx;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::any::AnyPoolOptions;

use crate::clock::system_now_ms;
use crate::domain::{ApiKeyRecord, ConfigView, Id, Pool, Tenant, Tier, TokenRecord, Upstream};

use super::StoreError;
pub use changes::{Changes, ConfigDelta};
pub use grants::GrantTotal;
pub use rebalance::{MoveHistory, MoveOrder};
pub use spaces::TokenMover;
use tx::Write;

/// Connections a SQLite store opens. SQLite has one writer at a time anyway; a few
/// connections let reads (WAL mode) run beside a write.
const SQLITE_MAX_CONNECTIONS: u32 = 4;
/// Connections a Postgres store opens per replica.
const POSTGRES_MAX_CONNECTIONS: u32 = 10;
/// How long a SQLite writer waits for another writer's lock before giving up
/// (UNAVAILABLE). Admin writes are short, so waiting is better than failing.
const SQLITE_BUSY_TIMEOUT_MS: u64 = 15_000;
/// How long a call waits for a pooled connection, including (re)connecting: when the
/// database is gone, admin calls fail with UNAVAILABLE after this long.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The backend a connection URL names, or `None` for any other scheme.
    fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else {
            None
        }
    }
}

/// What [`ConfigStore::reseal_tokens`] calls for each token: the new key id and sealed
/// secret, `None` to leave the token as it is, or an error that undoes everything.
type Reseal<'a> = dyn Fn(&TokenRecord) -> Result<Option<(String, Vec<u8>)>, crate::crypto::CryptoError>
    + Sync
    + 'a;

/// Everything leasing needs, read in one transaction.
#[derive(Debug, Clone, Default)]
pub struct StoredConfig {
    /// Bumped by every admin write; replicas reload when it changes.
    pub version: i64,
    pub view: ConfigView,
    pub api_keys: Vec<ApiKeyRecord>,
}

/// The configuration store. Cheap to clone (a connection pool handle).
#[derive(Clone)]
pub struct ConfigStore {
    pool: sqlx::AnyPool,
    backend: Backend,
    /// Set once at start-up (`set_token_mover`), shared by every clone.
    mover: Arc<OnceLock<spaces::TokenMover>>,
}

impl std::fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigStore")
            .field("backend", &self.backend)
            .field("mover", &self.mover.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Adds `mode=rwc` (create the file if missing) to a SQLite URL that sets no mode.
/// sqlx-sqlite 0.9 accepts only `mode`, `cache`, `immutable` and `vfs` in the URL;
/// foreign keys are on by default and the busy timeout is set after connecting.
fn sqlite_url_creating_file(url: &str) -> String {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    if query.split('&').any(|pair| pair.starts_with("mode=")) {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

impl ConfigStore {
    /// Connects to `postgres://…` or `sqlite://path` (the file is created if missing).
    ///
    /// SQLite: `sqlite://relative/path.db`, `sqlite:///absolute/path.db` or
    /// `sqlite::memory:` (one connection, gone when the store is dropped); the file is
    /// switched to WAL mode, foreign keys are enforced and a writer waits up to 15 s for
    /// another writer.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let Some(backend) = Backend::of_url(url) else {
            return Err(StoreError::Internal(anyhow::anyhow!(
                "the database URL must start with postgres://, postgresql:// or sqlite:"
            )));
        };
        let options = AnyPoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
        let pool = match backend {
            Backend::Postgres => options
                .max_connections(POSTGRES_MAX_CONNECTIONS)
                .connect(url)
                .await
                .map_err(tx::map_error)?,
            Backend::Sqlite => Self::connect_sqlite(options, url).await?,
        };
        Ok(Self {
            pool,
            backend,
            mover: Arc::default(),
        })
    }

    async fn connect_sqlite(
        options: AnyPoolOptions,
        url: &str,
    ) -> Result<sqlx::AnyPool, StoreError> {
        // The `Any` driver parses the URL again for every connection, and each parse of
        // `:memory:` names a new database: an in-memory store keeps one connection open.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = if in_memory {
            options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            options.max_connections(SQLITE_MAX_CONNECTIONS)
        };
        let pool = options
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    let pragma = format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}");
                    sqlx::raw_sql(sqlx::AssertSqlSafe(pragma))
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            })
            .connect(&sqlite_url_creating_file(url))
            .await
            .map_err(tx::map_error)?;
        // WAL lets readers (lease replicas reloading) run beside a writer. It is a
        // property of the file, so setting it once is enough; an in-memory database
        // answers "memory" and stays as it is.
        sqlx::raw_sql("PRAGMA journal_mode = WAL")
            .execute(&pool)
            .await
            .map_err(tx::map_error)?;
        Ok(pool)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Installs what hands a token's lease counters over to its new space when a
    /// write moves it (`counters::Counters::prepare_moves`); called once at start-up.
    /// A write that moves tokens calls it after its checks, just before it commits,
    /// and fails UNAVAILABLE if it fails. Without one, moves need no handover (the
    /// counters are in process and keyed by upstream).
    pub fn set_token_mover(&self, mover: TokenMover) {
        let _ = self.mover.set(mover);
    }

    /// Applies the migrations in `migrations/` (embedded at build time by
    /// `sqlx::migrate!`, which runs against the `Any` pool in sqlx 0.9). Safe when
    /// several replicas start at once: sqlx takes an advisory lock on Postgres.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!()
            .run(&self.pool)
            .await
            .map_err(|err| match err {
                sqlx::migrate::MigrateError::Execute(err) => tx::map_error(err),
                other => StoreError::Internal(anyhow::Error::new(other).context("migrating")),
            })
    }

    /// On first start only: the default tiers and the BaseLinker profile. Idempotent,
    /// and safe when two replicas start at once: the `config_meta` row lock is taken
    /// first, and an id that already exists is left as it is.
    /// Seeds the default tiers and upstream once; returns the upstream it created, if
    /// this call seeded (its lease counters are then fresh: `Counters::mark_fresh`).
    pub async fn seed_defaults(&self) -> Result<Option<Id>, StoreError> {
        let mut write = Write::begin(self).await?;
        if write.seeded().await? {
            return Ok(None); // dropping the transaction undoes the version bump
        }
        let now = system_now_ms();
        for tier in Tier::seed_defaults(now) {
            config::insert_tier_if_missing(write.conn(), &tier).await?;
            write.changed(super::Kind::Tier, tier.id.as_str());
        }
        let upstream = Upstream::baselinker(now);
        config::insert_upstream_if_missing(write.conn(), &upstream).await?;
        write.changed(super::Kind::Upstream, upstream.id.as_str());
        write.mark_seeded().await?;
        write.commit_unchecked().await?;
        Ok(Some(upstream.id))
    }

    pub async fn version(&self) -> Result<i64, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        rows::version(&mut conn).await
    }

    /// A read-only transaction that sees one snapshot: on Postgres REPEATABLE READ (READ
    /// COMMITTED would give each statement its own snapshot); a SQLite read transaction
    /// sees one snapshot already.
    async fn snapshot_read(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(tx::map_error)?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await
                .map_err(tx::map_error)?;
        }
        Ok(tx)
    }

    /// Everything, from one snapshot (`snapshot_read`).
    pub async fn load(&self) -> Result<StoredConfig, StoreError> {
        let mut tx = self.snapshot_read().await?;
        let version = rows::version(&mut tx).await?;
        let view = rows::read_view(&mut tx, self.backend).await?;
        let api_keys = keys::all(&mut tx, self.backend).await?;
        tx.commit().await.map_err(tx::map_error)?;
        Ok(StoredConfig {
            version,
            view,
            api_keys,
        })
    }

    /// What changed since `version`, read from the change log in one snapshot as
    /// [`ConfigStore::load`] reads; `None` when the log does not cover every version
    /// since (then load everything).
    pub async fn changes_since(&self, version: i64) -> Result<Option<ConfigDelta>, StoreError> {
        let mut tx = self.snapshot_read().await?;
        let now = rows::version(&mut tx).await?;
        let delta = changes::read(&mut tx, self.backend, version, now).await?;
        tx.commit().await.map_err(tx::map_error)?;
        Ok(delta)
    }

    pub async fn create_upstream(&self, v: Upstream) -> Result<(Upstream, i64), StoreError> {
        config::create_upstream(self, v).await
    }
    pub async fn get_upstream(&self, id: &Id) -> Result<Upstream, StoreError> {
        self.get(&rows::UPSTREAMS, id.as_str()).await
    }
    pub async fn list_upstreams(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Upstream>, StoreError> {
        self.list(&rows::UPSTREAMS, after, limit).await
    }
    pub async fn update_upstream(&self, v: Upstream) -> Result<(Upstream, i64), StoreError> {
        config::update_upstream(self, v).await
    }
    pub async fn delete_upstream(&self, id: &Id) -> Result<i64, StoreError> {
        config::delete_upstream(self, id).await
    }

    pub async fn create_token(&self, v: TokenRecord) -> Result<(TokenRecord, i64), StoreError> {
        tenancy::create_token(self, v).await
    }
    pub async fn get_token(&self, id: &Id) -> Result<TokenRecord, StoreError> {
        self.get(&rows::TOKENS, id.as_str()).await
    }
    pub async fn list_tokens(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        self.list(&rows::TOKENS, after, limit).await
    }
    /// An empty `sealed_secret` keeps the stored secret and key id.
    pub async fn update_token(&self, v: TokenRecord) -> Result<(TokenRecord, i64), StoreError> {
        tenancy::update_token(self, v).await
    }
    pub async fn delete_token(&self, id: &Id) -> Result<i64, StoreError> {
        tenancy::delete_token(self, id).await
    }
    /// Re-seals every token in one transaction: `Ok(Some((key_id, sealed)))` replaces a
    /// token's secret, `Ok(None)` leaves it, and an `Err` rolls everything back (its
    /// message is kept). Returns how many tokens changed; the version is bumped only if
    /// some did.
    pub async fn reseal_tokens(&self, reseal: &Reseal<'_>) -> Result<usize, StoreError> {
        tenancy::reseal_tokens(self, reseal).await
    }

    pub async fn create_pool(&self, v: Pool) -> Result<(Pool, i64), StoreError> {
        config::create_pool(self, v).await
    }
    pub async fn get_pool(&self, id: &Id) -> Result<Pool, StoreError> {
        self.get(&rows::POOLS, id.as_str()).await
    }
    pub async fn list_pools(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Pool>, StoreError> {
        self.list(&rows::POOLS, after, limit).await
    }
    pub async fn update_pool(&self, v: Pool) -> Result<(Pool, i64), StoreError> {
        config::update_pool(self, v).await
    }
    pub async fn delete_pool(&self, id: &Id) -> Result<i64, StoreError> {
        config::delete_pool(self, id).await
    }

    pub async fn create_tier(&self, v: Tier) -> Result<(Tier, i64), StoreError> {
        config::create_tier(self, v).await
    }
    pub async fn get_tier(&self, id: &Id) -> Result<Tier, StoreError> {
        self.get(&rows::TIERS, id.as_str()).await
    }
    pub async fn list_tiers(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Tier>, StoreError> {
        self.list(&rows::TIERS, after, limit).await
    }
    pub async fn update_tier(&self, v: Tier) -> Result<(Tier, i64), StoreError> {
        config::update_tier(self, v).await
    }
    pub async fn delete_tier(&self, id: &Id) -> Result<i64, StoreError> {
        config::delete_tier(self, id).await
    }

    pub async fn create_tenant(&self, v: Tenant) -> Result<(Tenant, i64), StoreError> {
        tenancy::create_tenant(self, v).await
    }
    pub async fn get_tenant(&self, id: &Id) -> Result<Tenant, StoreError> {
        self.get(&rows::TENANTS, id.as_str()).await
    }
    pub async fn list_tenants(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Tenant>, StoreError> {
        self.list(&rows::TENANTS, after, limit).await
    }
    pub async fn update_tenant(&self, v: Tenant) -> Result<(Tenant, i64), StoreError> {
        tenancy::update_tenant(self, v).await
    }
    /// Refused while the tenant has dedicated tokens, or while it is the only tenant of
    /// a worker API key; otherwise it is also removed from every API key's scope.
    pub async fn delete_tenant(&self, id: &Id) -> Result<i64, StoreError> {
        tenancy::delete_tenant(self, id).await
    }

    /// The stored tenant scope is sorted and without duplicates.
    pub async fn create_api_key(&self, v: ApiKeyRecord) -> Result<(ApiKeyRecord, i64), StoreError> {
        keys::create(self, v).await
    }
    pub async fn get_api_key(&self, id: &str) -> Result<ApiKeyRecord, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        keys::get(&mut conn, self.backend, id).await
    }
    pub async fn list_api_keys(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        keys::page(&mut conn, self.backend, after.unwrap_or(""), limit).await
    }
    /// Replaces name and tenant scope only.
    pub async fn update_api_key(&self, v: ApiKeyRecord) -> Result<(ApiKeyRecord, i64), StoreError> {
        keys::update(self, v).await
    }
    pub async fn delete_api_key(&self, id: &str) -> Result<i64, StoreError> {
        keys::delete(self, id).await
    }
    /// Records that `replica` holds master keys `key_ids` now, and forgets replicas not
    /// heard of since `forget_before_ms`.
    pub async fn announce_keys(
        &self,
        replica: &str,
        key_ids: &[&str],
        forget_before_ms: i64,
    ) -> Result<(), StoreError> {
        let mut ids: Vec<&str> = key_ids.to_vec();
        ids.sort_unstable();
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        sqlx::query(
            "INSERT INTO replica_keys (replica_id, key_ids, seen_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (replica_id) DO UPDATE SET key_ids = excluded.key_ids, seen_ms = excluded.seen_ms",
        )
        .bind(replica.to_owned())
        .bind(ids.join(","))
        .bind(system_now_ms())
        .execute(&mut *conn)
        .await
        .map_err(tx::map_error)?;
        sqlx::query("DELETE FROM replica_keys WHERE seen_ms < $1")
            .bind(forget_before_ms)
            .execute(&mut *conn)
            .await
            .map_err(tx::map_error)?;
        Ok(())
    }

    /// Forgets `replica`'s master keys record (it stops).
    pub async fn forget_replica_keys(&self, replica: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        sqlx::query("DELETE FROM replica_keys WHERE replica_id = $1")
            .bind(replica.to_owned())
            .execute(&mut *conn)
            .await
            .map_err(tx::map_error)?;
        Ok(())
    }

    /// The replicas heard of since `since_ms`, each with the master key ids it holds.
    pub async fn key_holders(
        &self,
        since_ms: i64,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT replica_id, key_ids FROM replica_keys WHERE seen_ms >= $1 ORDER BY replica_id",
        )
        .bind(since_ms)
        .fetch_all(&mut *conn)
        .await
        .map_err(tx::map_error)?;
        Ok(rows
            .into_iter()
            .map(|(replica, ids)| (replica, ids.split(',').map(str::to_owned).collect()))
            .collect())
    }

    /// Moves a tenant between two pools of one upstream and records the move
    /// (`tenant_moves`): the record, the tenant as stored, and the version.
    pub async fn move_tenant(
        &self,
        order: &MoveOrder,
    ) -> Result<(crate::domain::TenantMove, Tenant, i64), StoreError> {
        rebalance::move_tenant(self, order).await
    }

    /// Recorded moves, newest first (see `rebalance::list`).
    pub async fn list_tenant_moves(
        &self,
        upstream_id: Option<&Id>,
        tenant_id: Option<&Id>,
        before_version: Option<i64>,
        limit: u32,
    ) -> Result<Vec<crate::domain::TenantMove>, StoreError> {
        rebalance::list(self, upstream_id, tenant_id, before_version, limit).await
    }

    /// The latest move of an upstream and each of its tenants' last move.
    pub async fn move_history(&self, upstream_id: &Id) -> Result<MoveHistory, StoreError> {
        rebalance::history(self, upstream_id).await
    }

    /// How many admin keys exist (for the bootstrap path).
    pub async fn count_admin_keys(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        keys::count_admins(&mut conn).await
    }

    /// One object by id, or NOT_FOUND naming `<kind>.id`.
    async fn get<T>(&self, table: &rows::Table<T>, id: &str) -> Result<T, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        rows::get(&mut conn, table, id).await
    }

    /// A page of objects in id order, starting after `after`.
    async fn list<T>(
        &self,
        table: &rows::Table<T>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<T>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(tx::map_error)?;
        rows::page(&mut conn, table, self.backend, after.unwrap_or(""), limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite URL gets `mode=rwc` unless it chose a mode itself.
    #[test]
    fn sqlite_urls_create_the_file() {
        assert_eq!(
            sqlite_url_creating_file("sqlite://a.db"),
            "sqlite://a.db?mode=rwc"
        );
        assert_eq!(
            sqlite_url_creating_file("sqlite://a.db?cache=shared"),
            "sqlite://a.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            sqlite_url_creating_file("sqlite://a.db?mode=ro"),
            "sqlite://a.db?mode=ro"
        );
        assert_eq!(Backend::of_url("postgresql://x/y"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("mysql://x/y"), None);
    }
}
