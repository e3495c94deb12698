//! The usage read-out: slots held now per tenant and per token, from the counters.

use std::time::Duration;

use super::Leaser;
use crate::domain::Id;
use crate::error::ServiceError;

/// One tenant on one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantUsage {
    pub tenant_id: Id,
    pub upstream_id: Id,
    pub used: u32,
    pub limit: u32,
    pub window: Duration,
}

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenUsage {
    pub token_id: Id,
    pub upstream_id: Id,
    pub used: u32,
    pub usable: u32,
    pub disabled: bool,
    pub window: Duration,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub tenants: Vec<TenantUsage>,
    pub tokens: Vec<TokenUsage>,
}

impl Leaser {
    /// Usage of every upstream, optionally only one tenant and/or one token.
    pub async fn usage(
        &self,
        tenant: Option<&Id>,
        token: Option<&Id>,
    ) -> Result<Usage, ServiceError> {
        let snapshot = self.config.current();
        if let Some(t) = tenant.filter(|t| !snapshot.tenants.contains_key(*t)) {
            return Err(ServiceError::NotFound(format!(
                "tenant_id: tenant '{t}' does not exist"
            )));
        }
        if let Some(t) = token.filter(|t| !snapshot.tokens.contains_key(*t)) {
            return Err(ServiceError::NotFound(format!(
                "token_id: token '{t}' does not exist"
            )));
        }
        let mut usage = Usage::default();
        let mut upstreams: Vec<_> = snapshot.upstreams.values().collect();
        upstreams.sort_by(|a, b| a.id.cmp(&b.id));
        for upstream in upstreams {
            let mut tenants: Vec<&Id> = snapshot
                .routes
                .iter()
                .filter(|(id, routes)| {
                    tenant.is_none_or(|t| t == *id)
                        && routes.iter().any(|r| r.upstream_id == upstream.id)
                })
                .map(|(id, _)| id)
                .collect();
            tenants.sort();
            let mut tokens: Vec<&Id> = snapshot
                .tokens
                .values()
                .filter(|t| {
                    t.record.upstream_id == upstream.id && token.is_none_or(|id| id == &t.record.id)
                })
                .map(|t| &t.record.id)
                .collect();
            tokens.sort();
            let tenant_ids: Vec<Id> = tenants.iter().map(|t| (*t).clone()).collect();
            let token_ids: Vec<Id> = tokens.iter().map(|t| (*t).clone()).collect();
            let counts = self
                .counters
                .usage(&upstream.id, upstream.window, &tenant_ids, &token_ids)
                .await?;
            for (id, used) in tenant_ids.into_iter().zip(counts.tenants) {
                let limit = snapshot.tenant_limit(&snapshot.tenants[&id]);
                usage.tenants.push(TenantUsage {
                    tenant_id: id,
                    upstream_id: upstream.id.clone(),
                    used,
                    limit,
                    window: upstream.window,
                });
            }
            for (id, used) in token_ids.into_iter().zip(counts.tokens) {
                let disabled = snapshot.tokens[&id].record.disabled;
                let usable = upstream.usable_per_window();
                usage.tokens.push(TokenUsage {
                    token_id: id,
                    upstream_id: upstream.id.clone(),
                    used,
                    usable,
                    disabled,
                    window: upstream.window,
                });
            }
        }
        Ok(usage)
    }
}
