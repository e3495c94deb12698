//! The object each Update RPC writes: the request's own (no `update_mask`, an empty
//! one, or `*`), or the stored object with the mask's fields copied from the request
//! (see `field_mask`). Either way the result is then parsed and validated as a full
//! update, so a masked update can break no rule a full one cannot.

use tokio::time::Instant;

use super::admin_api::AdminApi;
use super::admin_store::write_by;
use super::convert::*;
use super::field_mask::{self, Update};
use super::pb;
use crate::auth::parse_api_key_id;
use crate::domain::{Id, InvalidField};
use crate::error::ServiceError;

/// The object to write; `None` only when the request has none (parsing says so).
type ToWrite<P> = Result<Option<P>, ServiceError>;

impl AdminApi {
    pub(super) async fn upstream_to_write(
        &self,
        deadline: Instant,
        req: pb::UpdateUpstreamRequest,
    ) -> ToWrite<pb::Upstream> {
        let resource = &field_mask::UPSTREAM;
        let Update::Merge(paths) = resource.update(req.update_mask)? else {
            return Ok(req.upstream);
        };
        let request = required("upstream", req.upstream)?;
        let id = Id::parse("upstream.id", &request.id)?;
        let stored = write_by(deadline, self.store().get_upstream(&id)).await?;
        Ok(Some(resource.merge(
            upstream_to_proto(&stored),
            &request,
            &paths,
        )))
    }

    /// The stored object never carries the secret, so the merged one has a secret only
    /// when the mask names it; naming it with an empty one is refused (a token's secret
    /// cannot be cleared), without echoing anything of it.
    pub(super) async fn token_to_write(
        &self,
        deadline: Instant,
        req: pb::UpdateTokenRequest,
    ) -> ToWrite<pb::Token> {
        let resource = &field_mask::TOKEN;
        let Update::Merge(paths) = resource.update(req.update_mask)? else {
            return Ok(req.token);
        };
        let request = required("token", req.token)?;
        if paths.iter().any(|p| p == "secret") && request.secret.is_empty() {
            return Err(InvalidField::new(
                "token.secret",
                "is named in update_mask but empty: a token's secret cannot be cleared \
                 (leave \"secret\" out of the mask to keep the stored one)",
            )
            .into());
        }
        let id = Id::parse("token.id", &request.id)?;
        let stored = write_by(deadline, self.store().get_token(&id)).await?;
        Ok(Some(resource.merge(
            token_to_proto(&stored),
            &request,
            &paths,
        )))
    }

    pub(super) async fn pool_to_write(
        &self,
        deadline: Instant,
        req: pb::UpdatePoolRequest,
    ) -> ToWrite<pb::Pool> {
        let resource = &field_mask::POOL;
        let Update::Merge(paths) = resource.update(req.update_mask)? else {
            return Ok(req.pool);
        };
        let request = required("pool", req.pool)?;
        let id = Id::parse("pool.id", &request.id)?;
        let stored = write_by(deadline, self.store().get_pool(&id)).await?;
        let stored = pool_to_proto(&stored, Default::default());
        Ok(Some(resource.merge(stored, &request, &paths)))
    }

    pub(super) async fn tier_to_write(
        &self,
        deadline: Instant,
        req: pb::UpdateTierRequest,
    ) -> ToWrite<pb::Tier> {
        let resource = &field_mask::TIER;
        let Update::Merge(paths) = resource.update(req.update_mask)? else {
            return Ok(req.tier);
        };
        let request = required("tier", req.tier)?;
        let id = Id::parse("tier.id", &request.id)?;
        let stored = write_by(deadline, self.store().get_tier(&id)).await?;
        Ok(Some(resource.merge(
            tier_to_proto(&stored),
            &request,
            &paths,
        )))
    }

    pub(super) async fn tenant_to_write(
        &self,
        deadline: Instant,
        req: pb::UpdateTenantRequest,
    ) -> ToWrite<pb::Tenant> {
        let resource = &field_mask::TENANT;
        let Update::Merge(paths) = resource.update(req.update_mask)? else {
            return Ok(req.tenant);
        };
        let request = required("tenant", req.tenant)?;
        let id = Id::parse("tenant.id", &request.id)?;
        let stored = write_by(deadline, self.store().get_tenant(&id)).await?;
        let stored = tenant_to_proto(&stored, &self.leaser.config.current());
        Ok(Some(resource.merge(stored, &request, &paths)))
    }

    pub(super) async fn api_key_to_write(
        &self,
        deadline: Instant,
        req: pb::UpdateApiKeyRequest,
    ) -> ToWrite<pb::ApiKey> {
        let resource = &field_mask::API_KEY;
        let Update::Merge(paths) = resource.update(req.update_mask)? else {
            return Ok(req.api_key);
        };
        let request = required("api_key", req.api_key)?;
        let id = parse_api_key_id("api_key.id", &request.id)?;
        let stored = write_by(deadline, self.store().get_api_key(&id)).await?;
        Ok(Some(resource.merge(
            api_key_to_proto(&stored),
            &request,
            &paths,
        )))
    }

    fn store(&self) -> &crate::store::ConfigStore {
        self.leaser.config.store()
    }
}
