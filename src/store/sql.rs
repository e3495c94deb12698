//! The configuration store over sqlx's `Any` driver: Postgres or a SQLite file.
//!
//! (skeleton: bodies to be written)

use crate::domain::{ApiKeyRecord, ConfigView, Id, Pool, Tenant, Tier, TokenRecord, Upstream};

use super::StoreError;

/// Which database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Everything leasing needs, read in one transaction.
#[derive(Debug, Clone, Default)]
pub struct StoredConfig {
    /// Bumped by every admin write; replicas reload when it changes.
    pub version: i64,
    pub view: ConfigView,
    pub api_keys: Vec<ApiKeyRecord>,
}

/// The configuration store. Cheap to clone (a connection pool handle).
#[derive(Clone, Debug)]
pub struct ConfigStore {
    pool: sqlx::AnyPool,
    backend: Backend,
}

#[allow(unused_variables)]
impl ConfigStore {
    /// Connects to `postgres://…` or `sqlite://path` (the file is created if missing).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        todo!()
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// Applies the migrations in `migrations/`.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        todo!()
    }
    /// On first start only: the default tiers and the BaseLinker profile.
    pub async fn seed_defaults(&self) -> Result<(), StoreError> {
        todo!()
    }
    pub async fn version(&self) -> Result<i64, StoreError> {
        todo!()
    }
    pub async fn load(&self) -> Result<StoredConfig, StoreError> {
        todo!()
    }

    pub async fn create_upstream(&self, v: Upstream) -> Result<(Upstream, i64), StoreError> {
        todo!()
    }
    pub async fn get_upstream(&self, id: &Id) -> Result<Upstream, StoreError> {
        todo!()
    }
    pub async fn list_upstreams(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Upstream>, StoreError> {
        todo!()
    }
    pub async fn update_upstream(&self, v: Upstream) -> Result<(Upstream, i64), StoreError> {
        todo!()
    }
    pub async fn delete_upstream(&self, id: &Id) -> Result<i64, StoreError> {
        todo!()
    }

    pub async fn create_token(&self, v: TokenRecord) -> Result<(TokenRecord, i64), StoreError> {
        todo!()
    }
    pub async fn get_token(&self, id: &Id) -> Result<TokenRecord, StoreError> {
        todo!()
    }
    pub async fn list_tokens(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        todo!()
    }
    pub async fn update_token(&self, v: TokenRecord) -> Result<(TokenRecord, i64), StoreError> {
        todo!()
    }
    pub async fn delete_token(&self, id: &Id) -> Result<i64, StoreError> {
        todo!()
    }
    pub async fn reseal_tokens(
        &self,
        reseal: &(
             dyn Fn(&TokenRecord) -> Result<Option<(String, Vec<u8>)>, crate::crypto::CryptoError>
                 + Sync
         ),
    ) -> Result<usize, StoreError> {
        todo!()
    }

    pub async fn create_pool(&self, v: Pool) -> Result<(Pool, i64), StoreError> {
        todo!()
    }
    pub async fn get_pool(&self, id: &Id) -> Result<Pool, StoreError> {
        todo!()
    }
    pub async fn list_pools(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Pool>, StoreError> {
        todo!()
    }
    pub async fn update_pool(&self, v: Pool) -> Result<(Pool, i64), StoreError> {
        todo!()
    }
    pub async fn delete_pool(&self, id: &Id) -> Result<i64, StoreError> {
        todo!()
    }

    pub async fn create_tier(&self, v: Tier) -> Result<(Tier, i64), StoreError> {
        todo!()
    }
    pub async fn get_tier(&self, id: &Id) -> Result<Tier, StoreError> {
        todo!()
    }
    pub async fn list_tiers(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Tier>, StoreError> {
        todo!()
    }
    pub async fn update_tier(&self, v: Tier) -> Result<(Tier, i64), StoreError> {
        todo!()
    }
    pub async fn delete_tier(&self, id: &Id) -> Result<i64, StoreError> {
        todo!()
    }

    pub async fn create_tenant(&self, v: Tenant) -> Result<(Tenant, i64), StoreError> {
        todo!()
    }
    pub async fn get_tenant(&self, id: &Id) -> Result<Tenant, StoreError> {
        todo!()
    }
    pub async fn list_tenants(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Tenant>, StoreError> {
        todo!()
    }
    pub async fn update_tenant(&self, v: Tenant) -> Result<(Tenant, i64), StoreError> {
        todo!()
    }
    pub async fn delete_tenant(&self, id: &Id) -> Result<i64, StoreError> {
        todo!()
    }

    pub async fn create_api_key(&self, v: ApiKeyRecord) -> Result<(ApiKeyRecord, i64), StoreError> {
        todo!()
    }
    pub async fn get_api_key(&self, id: &str) -> Result<ApiKeyRecord, StoreError> {
        todo!()
    }
    pub async fn list_api_keys(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        todo!()
    }
    /// Replaces name and tenant scope only.
    pub async fn update_api_key(&self, v: ApiKeyRecord) -> Result<(ApiKeyRecord, i64), StoreError> {
        todo!()
    }
    pub async fn delete_api_key(&self, id: &str) -> Result<i64, StoreError> {
        todo!()
    }
    /// How many admin keys exist (for the bootstrap path).
    pub async fn count_admin_keys(&self) -> Result<u64, StoreError> {
        todo!()
    }
}
