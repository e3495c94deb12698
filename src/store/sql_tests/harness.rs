//! A fresh, migrated database per test on each backend, and the objects tests build.
//!
//! - SQLite: a new file in a temporary directory, removed with it.
//! - Postgres: a new database `tl_test_<random>` on the server named by
//!   `TOKENLEASE_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//!   dropped `WITH (FORCE)` when the test ends, pass or fail. Tests therefore run in
//!   parallel and leave nothing behind. No server is a test failure, never a skip.

use std::time::Duration;

use sqlx::{AnyConnection, Connection, Executor};

use crate::domain::{
    ApiKeyRecord, ApiKeyRole, Id, Pool, SharedAccess, Tenant, Tier, TokenOwner, TokenRecord,
    Upstream,
};
use crate::store::{ConfigStore, StoreError};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("TOKENLEASE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into())
}

/// What to remove when the test ends.
enum Scratch {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres { database: String },
}

/// A migrated store on a database of its own.
pub struct TestDb {
    pub store: ConfigStore,
    /// The store's URL, for raw reads that bypass the store.
    pub url: String,
    scratch: Scratch,
}

impl TestDb {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        // The file does not exist yet: connect must create it.
        let url = format!("sqlite://{}", dir.path().join("config.db").display());
        Self::open(url, Scratch::Sqlite(dir)).await
    }

    pub async fn postgres() -> Self {
        let admin = admin_url();
        let mut conn = connect_admin(&admin).await;
        let database = format!("tl_test_{}", uuid::Uuid::new_v4().simple());
        conn.execute(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{database}\""
        )))
        .await
        .unwrap_or_else(|e| panic!("creating test database {database}: {e}"));
        let (base, _) = admin
            .rsplit_once('/')
            .expect("the admin URL names a database");
        let url = format!("{base}/{database}");
        Self::open(url, Scratch::Postgres { database }).await
    }

    async fn open(url: String, scratch: Scratch) -> Self {
        let store = ConfigStore::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting the store: {e}"));
        store.migrate().await.expect("migrating a fresh database");
        Self {
            store,
            url,
            scratch,
        }
    }

    /// A connection of its own, outside the store, for raw checks.
    pub async fn raw(&self) -> AnyConnection {
        AnyConnection::connect(&self.url)
            .await
            .expect("opening a raw connection")
    }
}

async fn connect_admin(admin: &str) -> sqlx::PgConnection {
    match sqlx::PgConnection::connect(admin).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "the store tests need Postgres and could not connect to {admin}: {e}. \
             Start Postgres (trust auth for user postgres on 127.0.0.1:5432) or set \
             TOKENLEASE_TEST_POSTGRES_URL to a server where databases may be created."
        ),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Scratch::Postgres { database } = &self.scratch else {
            return; // the temporary directory removes itself
        };
        let database = database.clone();
        // Drop cannot await: drop the database from a thread with its own runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a runtime");
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin_url()).await?;
                let sql = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                conn.execute(sqlx::AssertSqlSafe(sql)).await.map(|_| ())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop a test database: {dropped:?}");
        }
    }
}

/// Runs each named test body (an `async fn(&TestDb)` in a test module, whose `///`
/// line says what it proves) once per backend, as `sqlite::<name>` and
/// `postgres::<name>`. A body left out of the list is dead code, which clippy refuses.
macro_rules! store_tests {
    ($($module:ident::$name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[doc = concat!("[`super::", stringify!($module), "::", stringify!($name), "`] on a SQLite file.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDb::sqlite().await;
                    super::$module::$name(&db).await;
                }
            )*
        }

        mod postgres {
            $(
                #[doc = concat!("[`super::", stringify!($module), "::", stringify!($name), "`] on Postgres.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDb::postgres().await;
                    super::$module::$name(&db).await;
                }
            )*
        }
    };
}
pub(super) use store_tests;

pub fn id(value: &str) -> Id {
    Id::parse("test", value).expect("test ids are valid")
}

pub fn upstream(upstream_id: &str) -> Upstream {
    Upstream {
        id: id(upstream_id),
        display_name: format!("Upstream {upstream_id}"),
        limit_per_window: 60,
        window: Duration::from_secs(30),
        safety_margin: 0.1,
        block_duration: Duration::from_millis(1500),
        max_block: None,
        rate_limit_error_codes: vec!["SLOW_DOWN".into(), "E429".into()],
        create_time_ms: 0,
        update_time_ms: 0,
    }
}

/// A pool of BaseLinker tokens.
pub fn pool(pool_id: &str) -> Pool {
    Pool {
        id: id(pool_id),
        upstream_id: id("baselinker"),
        display_name: format!("Pool {pool_id}"),
        create_time_ms: 0,
        update_time_ms: 0,
    }
}

pub fn tier(tier_id: &str, guaranteed: u32, burst: u32) -> Tier {
    Tier {
        id: id(tier_id),
        display_name: format!("Tier {tier_id}"),
        guaranteed_per_window: guaranteed,
        burst_per_window: burst,
        shared_access: SharedAccess::Normal,
        weight: 1.5,
        create_time_ms: 0,
        update_time_ms: 0,
    }
}

pub fn tenant(tenant_id: &str, tier_id: &str, pool_id: Option<&str>) -> Tenant {
    Tenant {
        id: id(tenant_id),
        display_name: format!("Tenant {tenant_id}"),
        tier_id: id(tier_id),
        pool_id: pool_id.map(id),
        weight_override: None,
        guaranteed_override: None,
        burst_override: None,
        create_time_ms: 0,
        update_time_ms: 0,
    }
}

/// Bytes no text column would keep intact: a zero, high bytes, then the id.
pub fn sealed_for(token_id: &str) -> Vec<u8> {
    let mut sealed = vec![0x00, 0xff, 0x80, 0x0a, 0x00];
    sealed.extend_from_slice(token_id.as_bytes());
    sealed
}

/// A BaseLinker token owned by `owner`, sealed (pretend) under key `k1`.
pub fn token(token_id: &str, owner: TokenOwner) -> TokenRecord {
    TokenRecord {
        id: id(token_id),
        upstream_id: id("baselinker"),
        display_name: format!("Token {token_id}"),
        owner,
        disabled: false,
        key_id: "k1".into(),
        sealed_secret: sealed_for(token_id),
        monthly_cost_minor: 0,
        create_time_ms: 0,
        update_time_ms: 0,
    }
}

pub fn in_pool(pool_id: &str) -> TokenOwner {
    TokenOwner::Pool(id(pool_id))
}

pub fn dedicated_to(tenant_id: &str) -> TokenOwner {
    TokenOwner::Dedicated(id(tenant_id))
}

pub fn api_key(key_id: &str, role: ApiKeyRole, tenant_ids: &[&str]) -> ApiKeyRecord {
    ApiKeyRecord {
        id: key_id.into(),
        display_name: format!("Key {key_id}"),
        role,
        tenant_ids: tenant_ids.iter().map(|t| id(t)).collect(),
        secret_hash: vec![0xde, 0xad, 0x00, 0xbe, 0xef],
        create_time_ms: 0,
    }
}

/// Seeds the defaults, then adds pool `shared` holding `tokens` BaseLinker tokens
/// (`tok1`…): 95 usable requests per window each, of which guarantees may take 80 %.
pub async fn seeded_pool(store: &ConfigStore, tokens: usize) {
    store.seed_defaults().await.expect("seeding");
    store
        .create_pool(pool("shared"))
        .await
        .expect("creating pool");
    for i in 1..=tokens {
        let t = token(&format!("tok{i}"), in_pool("shared"));
        store.create_token(t).await.expect("creating token");
    }
}

/// The NOT_FOUND parts of `result`, or a panic showing what came instead.
pub fn not_found<T: std::fmt::Debug>(result: Result<T, StoreError>) -> (String, String) {
    match result {
        Err(StoreError::NotFound { id, field, .. }) => (id, field),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

/// The FAILED_PRECONDITION field and reason of `result`, or a panic.
pub fn precondition<T: std::fmt::Debug>(result: Result<T, StoreError>) -> (String, String) {
    match result {
        Err(StoreError::FailedPrecondition(e)) => (e.field, e.reason),
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
}

/// Whether `result` is ALREADY_EXISTS for `expected_id`.
pub fn already_exists<T: std::fmt::Debug>(result: Result<T, StoreError>, expected_id: &str) {
    match result {
        Err(StoreError::AlreadyExists { id, .. }) if id == expected_id => {}
        other => panic!("expected AlreadyExists for {expected_id}, got {other:?}"),
    }
}
