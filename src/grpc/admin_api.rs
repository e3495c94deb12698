//! AdminService: CRUD over the configuration store, each write followed by a snapshot
//! refresh on this replica (read-your-writes for leasing) and a `ConfigChanged` event
//! (plus a `TokenStateChanged` when a token is disabled or enabled).

use tonic::{Request, Response, Status};

use super::admin_store::{Read, loaded_one, loaded_page, loaded_shared_page, write_by};
use super::auth::caller;
use super::convert::*;
use super::pb::{self, admin_service_server::AdminService};
use crate::auth::{Caller, generate_api_key, parse_api_key_id, reveal};
use crate::domain::{Id, InvalidField};
use crate::error::ServiceError;
use crate::events::{Change, EventBus, Resource};
use crate::lease::{Leaser, LiveConfig, publish_admin_toggle};
use crate::store::counters::Space;
use crate::store::{Kind, StoreError};

/// Default and largest page sizes of List calls.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// The AdminService implementation.
#[derive(Clone)]
pub struct AdminApi {
    pub leaser: Leaser,
    pub events: EventBus,
    /// Plans and applies tenant moves between pools (`rebalance_api.rs`).
    pub rebalancer: crate::lease::Rebalancer,
    /// How long one admin call waits for the configuration database (`admin_store.rs`).
    pub database_timeout: std::time::Duration,
    /// The currency of tokens' monthly costs (`cost.currency`), for GetCostReport.
    pub currency: String,
}

/// Checks the caller is an admin.
pub(super) fn admin<T>(request: &Request<T>) -> Result<Caller, Status> {
    let caller = caller(request)?;
    caller.require_admin()?;
    Ok(caller)
}

pub(super) fn parse_id(field: &str, value: &str) -> Result<Id, Status> {
    Id::parse(field, value).map_err(|e| ServiceError::from(e).into())
}

/// Page bounds from a List request: `(after, limit)`.
pub(super) fn page(size: u32, token: &str) -> Result<(Option<String>, u32), Status> {
    let limit = if size == 0 {
        DEFAULT_PAGE
    } else {
        size.min(MAX_PAGE)
    };
    let after = match token {
        "" => None,
        t if t.len() <= 128 && t.chars().all(|c| c.is_ascii_graphic()) => Some(t.to_owned()),
        _ => {
            return Err(ServiceError::from(InvalidField::new(
                "page_token",
                "is not a token from a previous page",
            ))
            .into());
        }
    };
    Ok((after, limit))
}

impl AdminApi {
    fn config(&self) -> &LiveConfig {
        &self.leaser.config
    }

    /// One admin write, bounded by the database timeout.
    pub(super) async fn write<T>(
        &self,
        write: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, ServiceError> {
        write_by(tokio::time::Instant::now() + self.database_timeout, write).await
    }

    /// One admin read, bounded by the database timeout; answered from the loaded
    /// configuration when the database is away.
    async fn read<T>(
        &self,
        stored: impl Future<Output = Result<T, StoreError>>,
        loaded: impl FnOnce(&crate::lease::Snapshot) -> Result<T, StoreError>,
    ) -> Result<Read<T>, ServiceError> {
        super::admin_store::read(self.database_timeout, self.config(), stored, loaded).await
    }

    /// After a successful write: refresh this replica's snapshot and tell watchers.
    async fn written(&self, resource: Resource, id: &str, change: Change, version: i64) {
        let timeout = self.database_timeout;
        (self.leaser)
            .follow_write(&self.events, timeout, resource, id, change, version)
            .await;
    }

    fn seal(&self, input: TokenInput) -> crate::domain::TokenRecord {
        let mut record = input.record;
        if let Some(secret) = input.secret {
            let (key_id, sealed) = self.config().ring().seal(record.id.as_str(), &secret);
            record.key_id = key_id;
            record.sealed_secret = sealed;
        }
        record
    }

    /// When the pool of a token's `owner` owes its tenants more than its enabled tokens
    /// serve (a token was just disabled), says so: quotas then fall back to what is
    /// left, as when a breaker opens.
    fn pool_shortfall(&self, owner: &crate::domain::TokenOwner) -> Option<String> {
        let crate::domain::TokenOwner::Pool(pool) = owner else {
            return None;
        };
        let report = *self.config().current().pool_reports.get(pool)?;
        (report.guaranteed_per_window > report.capacity_per_window).then(|| {
            format!(
                "pool '{pool}' now serves {} requests per window with its enabled tokens but \
                 guarantees {}: tenants get less than their guarantees until a token is \
                 enabled or added",
                report.capacity_per_window, report.guaranteed_per_window
            )
        })
    }

    fn pool_proto(&self, pool: &crate::domain::Pool) -> pb::Pool {
        let report = self
            .config()
            .current()
            .pool_reports
            .get(&pool.id)
            .copied()
            .unwrap_or_default();
        pool_to_proto(pool, report)
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_upstream(
        &self,
        r: Request<pb::CreateUpstreamRequest>,
    ) -> Reply<pb::CreateUpstreamResponse> {
        admin(&r)?;
        let value = upstream_from_proto(r.into_inner().upstream).map_err(ServiceError::from)?;
        let (stored, version) = self
            .write(self.config().store().create_upstream(value))
            .await?;
        // Nothing was ever granted on a new upstream: its counters start complete.
        (self.leaser.counters)
            .mark_created(Space::upstream(&stored.id))
            .await;
        self.written(
            Resource::Upstream,
            stored.id.as_str(),
            Change::Created,
            version,
        )
        .await;
        Ok(Response::new(pb::CreateUpstreamResponse {
            upstream: Some(upstream_to_proto(&stored)),
        }))
    }

    async fn get_upstream(
        &self,
        r: Request<pb::GetUpstreamRequest>,
    ) -> Reply<pb::GetUpstreamResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let read = self
            .read(self.config().store().get_upstream(&id), |s| {
                loaded_one(s.upstreams.get(&id), Kind::Upstream, id.as_str())
            })
            .await?;
        Ok(read.respond(|stored| pb::GetUpstreamResponse {
            upstream: Some(upstream_to_proto(&stored)),
        }))
    }

    async fn list_upstreams(
        &self,
        r: Request<pb::ListUpstreamsRequest>,
    ) -> Reply<pb::ListUpstreamsResponse> {
        admin(&r)?;
        let (after, limit) = page(r.get_ref().page_size, &r.get_ref().page_token)?;
        let read = self
            .read(
                self.config()
                    .store()
                    .list_upstreams(after.as_deref(), limit + 1),
                |s| Ok(loaded_page(&s.upstreams, after.as_deref(), limit + 1)),
            )
            .await?;
        Ok(read.respond_page(
            limit,
            |u| u.id.to_string(),
            |rows, next_page_token| pb::ListUpstreamsResponse {
                upstreams: rows.iter().map(upstream_to_proto).collect(),
                next_page_token,
            },
        ))
    }

    async fn update_upstream(
        &self,
        r: Request<pb::UpdateUpstreamRequest>,
    ) -> Reply<pb::UpdateUpstreamResponse> {
        admin(&r)?;
        // One bound for the read a field mask needs and the write.
        let deadline = tokio::time::Instant::now() + self.database_timeout;
        let upstream = self.upstream_to_write(deadline, r.into_inner()).await?;
        let value = upstream_from_proto(upstream).map_err(ServiceError::from)?;
        let store = self.config().store();
        let (stored, version) = write_by(deadline, store.update_upstream(value)).await?;
        self.written(
            Resource::Upstream,
            stored.id.as_str(),
            Change::Updated,
            version,
        )
        .await;
        Ok(Response::new(pb::UpdateUpstreamResponse {
            upstream: Some(upstream_to_proto(&stored)),
        }))
    }

    async fn delete_upstream(
        &self,
        r: Request<pb::DeleteUpstreamRequest>,
    ) -> Reply<pb::DeleteUpstreamResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let version = self
            .write(self.config().store().delete_upstream(&id))
            .await?;
        self.written(Resource::Upstream, id.as_str(), Change::Deleted, version)
            .await;
        Ok(Response::new(pb::DeleteUpstreamResponse {}))
    }

    async fn create_token(
        &self,
        r: Request<pb::CreateTokenRequest>,
    ) -> Reply<pb::CreateTokenResponse> {
        admin(&r)?;
        let input = token_from_proto(r.into_inner().token, true).map_err(ServiceError::from)?;
        let (stored, version) = self
            .write(self.config().store().create_token(self.seal(input)))
            .await?;
        self.written(
            Resource::Token,
            stored.id.as_str(),
            Change::Created,
            version,
        )
        .await;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_to_proto(&stored)),
        }))
    }

    async fn get_token(&self, r: Request<pb::GetTokenRequest>) -> Reply<pb::GetTokenResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let read = self
            .read(self.config().store().get_token(&id), |s| {
                loaded_one(
                    s.tokens.get(&id).map(|t| &t.record),
                    Kind::Token,
                    id.as_str(),
                )
            })
            .await?;
        Ok(read.respond(|stored| pb::GetTokenResponse {
            token: Some(token_to_proto(&stored)),
        }))
    }

    async fn list_tokens(
        &self,
        r: Request<pb::ListTokensRequest>,
    ) -> Reply<pb::ListTokensResponse> {
        admin(&r)?;
        let (after, limit) = page(r.get_ref().page_size, &r.get_ref().page_token)?;
        let read = self
            .read(
                self.config()
                    .store()
                    .list_tokens(after.as_deref(), limit + 1),
                |s| {
                    Ok(loaded_page(
                        &s.tokens
                            .iter()
                            .map(|(id, t)| (id, t.record.clone()))
                            .collect(),
                        after.as_deref(),
                        limit + 1,
                    ))
                },
            )
            .await?;
        Ok(read.respond_page(
            limit,
            |t| t.id.to_string(),
            |rows, next_page_token| pb::ListTokensResponse {
                tokens: rows.iter().map(token_to_proto).collect(),
                next_page_token,
            },
        ))
    }

    async fn update_token(
        &self,
        r: Request<pb::UpdateTokenRequest>,
    ) -> Reply<pb::UpdateTokenResponse> {
        admin(&r)?;
        // One bound for the reads (a field mask's, the old state) and the write.
        let deadline = tokio::time::Instant::now() + self.database_timeout;
        let token = self.token_to_write(deadline, r.into_inner()).await?;
        let input = token_from_proto(token, false).map_err(ServiceError::from)?;
        let store = self.config().store();
        let old = write_by(deadline, store.get_token(&input.record.id)).await;
        let was_disabled = old.ok().map(|t| t.disabled);
        let (stored, version) = write_by(deadline, store.update_token(self.seal(input))).await?;
        self.written(
            Resource::Token,
            stored.id.as_str(),
            Change::Updated,
            version,
        )
        .await;
        let shortfall = self.pool_shortfall(&stored.owner);
        if was_disabled.is_some_and(|was| was != stored.disabled) {
            if let Some(shortfall) = &shortfall {
                tracing::warn!(token_id = %stored.id, "{shortfall}");
            }
            publish_admin_toggle(&self.events, &stored.id, stored.disabled, shortfall.clone());
        }
        Ok(Response::new(pb::UpdateTokenResponse {
            token: Some(token_to_proto(&stored)),
            capacity_warning: shortfall.unwrap_or_default(),
        }))
    }

    async fn delete_token(
        &self,
        r: Request<pb::DeleteTokenRequest>,
    ) -> Reply<pb::DeleteTokenResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let version = self.write(self.config().store().delete_token(&id)).await?;
        self.written(Resource::Token, id.as_str(), Change::Deleted, version)
            .await;
        Ok(Response::new(pb::DeleteTokenResponse {}))
    }

    async fn create_pool(
        &self,
        r: Request<pb::CreatePoolRequest>,
    ) -> Reply<pb::CreatePoolResponse> {
        admin(&r)?;
        let value = pool_from_proto(r.into_inner().pool).map_err(ServiceError::from)?;
        let (stored, version) = self.write(self.config().store().create_pool(value)).await?;
        // A new pool's counters space (`counters::Space`) holds nothing yet.
        let space = Space::new(&stored.upstream_id, Some(&stored.id));
        self.leaser.counters.mark_created(space).await;
        self.written(Resource::Pool, stored.id.as_str(), Change::Created, version)
            .await;
        Ok(Response::new(pb::CreatePoolResponse {
            pool: Some(self.pool_proto(&stored)),
        }))
    }

    async fn get_pool(&self, r: Request<pb::GetPoolRequest>) -> Reply<pb::GetPoolResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let read = self
            .read(self.config().store().get_pool(&id), |s| {
                loaded_one(s.pools.get(&id), Kind::Pool, id.as_str())
            })
            .await?;
        Ok(read.respond(|stored| pb::GetPoolResponse {
            pool: Some(self.pool_proto(&stored)),
        }))
    }

    async fn list_pools(&self, r: Request<pb::ListPoolsRequest>) -> Reply<pb::ListPoolsResponse> {
        admin(&r)?;
        let (after, limit) = page(r.get_ref().page_size, &r.get_ref().page_token)?;
        let read = self
            .read(
                self.config()
                    .store()
                    .list_pools(after.as_deref(), limit + 1),
                |s| Ok(loaded_page(&s.pools, after.as_deref(), limit + 1)),
            )
            .await?;
        Ok(read.respond_page(
            limit,
            |p| p.id.to_string(),
            |rows, next_page_token| pb::ListPoolsResponse {
                pools: rows.iter().map(|p| self.pool_proto(p)).collect(),
                next_page_token,
            },
        ))
    }

    async fn update_pool(
        &self,
        r: Request<pb::UpdatePoolRequest>,
    ) -> Reply<pb::UpdatePoolResponse> {
        admin(&r)?;
        let deadline = tokio::time::Instant::now() + self.database_timeout;
        let pool = self.pool_to_write(deadline, r.into_inner()).await?;
        let value = pool_from_proto(pool).map_err(ServiceError::from)?;
        let store = self.config().store();
        let (stored, version) = write_by(deadline, store.update_pool(value)).await?;
        self.written(Resource::Pool, stored.id.as_str(), Change::Updated, version)
            .await;
        Ok(Response::new(pb::UpdatePoolResponse {
            pool: Some(self.pool_proto(&stored)),
        }))
    }

    async fn delete_pool(
        &self,
        r: Request<pb::DeletePoolRequest>,
    ) -> Reply<pb::DeletePoolResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let version = self.write(self.config().store().delete_pool(&id)).await?;
        self.written(Resource::Pool, id.as_str(), Change::Deleted, version)
            .await;
        Ok(Response::new(pb::DeletePoolResponse {}))
    }

    async fn create_tier(
        &self,
        r: Request<pb::CreateTierRequest>,
    ) -> Reply<pb::CreateTierResponse> {
        admin(&r)?;
        let value = tier_from_proto(r.into_inner().tier).map_err(ServiceError::from)?;
        let (stored, version) = self.write(self.config().store().create_tier(value)).await?;
        self.written(Resource::Tier, stored.id.as_str(), Change::Created, version)
            .await;
        Ok(Response::new(pb::CreateTierResponse {
            tier: Some(tier_to_proto(&stored)),
        }))
    }

    async fn get_tier(&self, r: Request<pb::GetTierRequest>) -> Reply<pb::GetTierResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let read = self
            .read(self.config().store().get_tier(&id), |s| {
                loaded_one(s.tiers.get(&id), Kind::Tier, id.as_str())
            })
            .await?;
        Ok(read.respond(|stored| pb::GetTierResponse {
            tier: Some(tier_to_proto(&stored)),
        }))
    }

    async fn list_tiers(&self, r: Request<pb::ListTiersRequest>) -> Reply<pb::ListTiersResponse> {
        admin(&r)?;
        let (after, limit) = page(r.get_ref().page_size, &r.get_ref().page_token)?;
        let read = self
            .read(
                self.config()
                    .store()
                    .list_tiers(after.as_deref(), limit + 1),
                |s| Ok(loaded_page(&s.tiers, after.as_deref(), limit + 1)),
            )
            .await?;
        Ok(read.respond_page(
            limit,
            |t| t.id.to_string(),
            |rows, next_page_token| pb::ListTiersResponse {
                tiers: rows.iter().map(tier_to_proto).collect(),
                next_page_token,
            },
        ))
    }

    async fn update_tier(
        &self,
        r: Request<pb::UpdateTierRequest>,
    ) -> Reply<pb::UpdateTierResponse> {
        admin(&r)?;
        let deadline = tokio::time::Instant::now() + self.database_timeout;
        let tier = self.tier_to_write(deadline, r.into_inner()).await?;
        let value = tier_from_proto(tier).map_err(ServiceError::from)?;
        let store = self.config().store();
        let (stored, version) = write_by(deadline, store.update_tier(value)).await?;
        self.written(Resource::Tier, stored.id.as_str(), Change::Updated, version)
            .await;
        Ok(Response::new(pb::UpdateTierResponse {
            tier: Some(tier_to_proto(&stored)),
        }))
    }

    async fn delete_tier(
        &self,
        r: Request<pb::DeleteTierRequest>,
    ) -> Reply<pb::DeleteTierResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let version = self.write(self.config().store().delete_tier(&id)).await?;
        self.written(Resource::Tier, id.as_str(), Change::Deleted, version)
            .await;
        Ok(Response::new(pb::DeleteTierResponse {}))
    }

    async fn create_tenant(
        &self,
        r: Request<pb::CreateTenantRequest>,
    ) -> Reply<pb::CreateTenantResponse> {
        admin(&r)?;
        let value = tenant_from_proto(r.into_inner().tenant).map_err(ServiceError::from)?;
        let (stored, version) = self
            .write(self.config().store().create_tenant(value))
            .await?;
        self.written(
            Resource::Tenant,
            stored.id.as_str(),
            Change::Created,
            version,
        )
        .await;
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(tenant_to_proto(&stored, &self.config().current())),
        }))
    }

    async fn get_tenant(&self, r: Request<pb::GetTenantRequest>) -> Reply<pb::GetTenantResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let read = self
            .read(self.config().store().get_tenant(&id), |s| {
                loaded_one(s.tenants.get(&id).map(|t| &**t), Kind::Tenant, id.as_str())
            })
            .await?;
        Ok(read.respond(|stored| pb::GetTenantResponse {
            tenant: Some(tenant_to_proto(&stored, &self.config().current())),
        }))
    }

    async fn list_tenants(
        &self,
        r: Request<pb::ListTenantsRequest>,
    ) -> Reply<pb::ListTenantsResponse> {
        admin(&r)?;
        let (after, limit) = page(r.get_ref().page_size, &r.get_ref().page_token)?;
        let read = self
            .read(
                self.config()
                    .store()
                    .list_tenants(after.as_deref(), limit + 1),
                |s| Ok(loaded_shared_page(&s.tenants, after.as_deref(), limit + 1)),
            )
            .await?;
        let snapshot = self.config().current();
        Ok(read.respond_page(
            limit,
            |t| t.id.to_string(),
            |rows, next_page_token| pb::ListTenantsResponse {
                tenants: rows.iter().map(|t| tenant_to_proto(t, &snapshot)).collect(),
                next_page_token,
            },
        ))
    }

    async fn update_tenant(
        &self,
        r: Request<pb::UpdateTenantRequest>,
    ) -> Reply<pb::UpdateTenantResponse> {
        admin(&r)?;
        let deadline = tokio::time::Instant::now() + self.database_timeout;
        let tenant = self.tenant_to_write(deadline, r.into_inner()).await?;
        let value = tenant_from_proto(tenant).map_err(ServiceError::from)?;
        let store = self.config().store();
        let (stored, version) = write_by(deadline, store.update_tenant(value)).await?;
        self.written(
            Resource::Tenant,
            stored.id.as_str(),
            Change::Updated,
            version,
        )
        .await;
        Ok(Response::new(pb::UpdateTenantResponse {
            tenant: Some(tenant_to_proto(&stored, &self.config().current())),
        }))
    }

    async fn delete_tenant(
        &self,
        r: Request<pb::DeleteTenantRequest>,
    ) -> Reply<pb::DeleteTenantResponse> {
        admin(&r)?;
        let id = parse_id("id", &r.get_ref().id)?;
        let version = self.write(self.config().store().delete_tenant(&id)).await?;
        self.written(Resource::Tenant, id.as_str(), Change::Deleted, version)
            .await;
        Ok(Response::new(pb::DeleteTenantResponse {}))
    }

    async fn create_api_key(
        &self,
        r: Request<pb::CreateApiKeyRequest>,
    ) -> Reply<pb::CreateApiKeyResponse> {
        admin(&r)?;
        let mut record = api_key_from_proto(r.into_inner().api_key).map_err(ServiceError::from)?;
        let new = generate_api_key();
        record.id = new.id.clone();
        record.secret_hash = new.secret_hash;
        let (stored, version) = self
            .write(self.config().store().create_api_key(record))
            .await?;
        self.written(Resource::ApiKey, &stored.id, Change::Created, version)
            .await;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(api_key_to_proto(&stored)),
            secret: reveal(&new.full_key).to_owned(),
        }))
    }

    async fn get_api_key(&self, r: Request<pb::GetApiKeyRequest>) -> Reply<pb::GetApiKeyResponse> {
        admin(&r)?;
        let id = parse_api_key_id("id", &r.get_ref().id).map_err(ServiceError::from)?;
        let id = id.as_str();
        let read = self
            .read(self.config().store().get_api_key(id), |s| {
                loaded_one(s.api_keys.get(id).map(|k| &**k), Kind::ApiKey, id)
            })
            .await?;
        Ok(read.respond(|stored| pb::GetApiKeyResponse {
            api_key: Some(api_key_to_proto(&stored)),
        }))
    }

    async fn list_api_keys(
        &self,
        r: Request<pb::ListApiKeysRequest>,
    ) -> Reply<pb::ListApiKeysResponse> {
        admin(&r)?;
        let (after, limit) = page(r.get_ref().page_size, &r.get_ref().page_token)?;
        let read = self
            .read(
                self.config()
                    .store()
                    .list_api_keys(after.as_deref(), limit + 1),
                |s| Ok(loaded_shared_page(&s.api_keys, after.as_deref(), limit + 1)),
            )
            .await?;
        Ok(read.respond_page(
            limit,
            |k| k.id.clone(),
            |rows, next_page_token| pb::ListApiKeysResponse {
                api_keys: rows.iter().map(api_key_to_proto).collect(),
                next_page_token,
            },
        ))
    }

    async fn update_api_key(
        &self,
        r: Request<pb::UpdateApiKeyRequest>,
    ) -> Reply<pb::UpdateApiKeyResponse> {
        admin(&r)?;
        let deadline = tokio::time::Instant::now() + self.database_timeout;
        let input = self.api_key_to_write(deadline, r.into_inner()).await?;
        let id = input.as_ref().map(|k| k.id.as_str()).unwrap_or_default();
        let id = parse_api_key_id("api_key.id", id).map_err(ServiceError::from)?;
        let mut record = api_key_from_proto(input).map_err(ServiceError::from)?;
        record.id = id;
        let store = self.config().store();
        let (stored, version) = write_by(deadline, store.update_api_key(record)).await?;
        self.written(Resource::ApiKey, &stored.id, Change::Updated, version)
            .await;
        Ok(Response::new(pb::UpdateApiKeyResponse {
            api_key: Some(api_key_to_proto(&stored)),
        }))
    }

    async fn delete_api_key(
        &self,
        r: Request<pb::DeleteApiKeyRequest>,
    ) -> Reply<pb::DeleteApiKeyResponse> {
        let me = admin(&r)?;
        let id = parse_api_key_id("id", &r.get_ref().id).map_err(ServiceError::from)?;
        if id == me.key_id {
            return Err(Status::failed_precondition(
                "id: an API key cannot revoke itself; use another admin key",
            ));
        }
        let version = self
            .write(self.config().store().delete_api_key(&id))
            .await?;
        self.written(Resource::ApiKey, &id, Change::Deleted, version)
            .await;
        Ok(Response::new(pb::DeleteApiKeyResponse {}))
    }

    async fn reset_token_health(
        &self,
        r: Request<pb::ResetTokenHealthRequest>,
    ) -> Reply<pb::ResetTokenHealthResponse> {
        admin(&r)?;
        let id = parse_id("token_id", &r.get_ref().token_id)?;
        let snapshot = self.config().current();
        let Some(token) = snapshot.tokens.get(&id) else {
            return Err(
                ServiceError::NotFound(format!("token_id: token '{id}' does not exist")).into(),
            );
        };
        let leaser = &self.leaser;
        let space = Space::new(&token.record.upstream_id, snapshot.token_space_pool(&id));
        let previous = (leaser.health).reset(&leaser.counters, space, &id).await?;
        Ok(Response::new(pb::ResetTokenHealthResponse {
            previous_state: super::convert::token_state_to_proto(previous) as i32,
        }))
    }

    async fn get_usage(&self, r: Request<pb::GetUsageRequest>) -> Reply<pb::GetUsageResponse> {
        admin(&r)?;
        let req = r.into_inner();
        let tenant = Id::parse_optional("tenant_id", &req.tenant_id).map_err(ServiceError::from)?;
        let token = Id::parse_optional("token_id", &req.token_id).map_err(ServiceError::from)?;
        let usage = self.leaser.usage(tenant.as_ref(), token.as_ref()).await?;
        Ok(Response::new(super::lease_api::usage_to_proto(usage)))
    }

    async fn get_usage_history(
        &self,
        r: Request<pb::GetUsageHistoryRequest>,
    ) -> Reply<pb::GetUsageHistoryResponse> {
        self.usage_history(r).await
    }

    async fn get_cost_report(
        &self,
        r: Request<pb::GetCostReportRequest>,
    ) -> Reply<pb::GetCostReportResponse> {
        self.cost_report(r).await
    }

    async fn plan_rebalance(
        &self,
        r: Request<pb::PlanRebalanceRequest>,
    ) -> Reply<pb::PlanRebalanceResponse> {
        self.plan(r).await
    }

    async fn apply_rebalance(
        &self,
        r: Request<pb::ApplyRebalanceRequest>,
    ) -> Reply<pb::ApplyRebalanceResponse> {
        self.apply(r).await
    }

    async fn list_tenant_moves(
        &self,
        r: Request<pb::ListTenantMovesRequest>,
    ) -> Reply<pb::ListTenantMovesResponse> {
        self.moves(r).await
    }
}
