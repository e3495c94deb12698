//! The usage read-out: slots held now per tenant and per token, from the counters.

use std::time::Duration;

use super::Leaser;
use super::Snapshot;
use crate::domain::{Id, TokenState, Upstream};
use crate::error::ServiceError;
use crate::store::counters::DemandCount;

/// One tenant on one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantUsage {
    pub tenant_id: Id,
    pub upstream_id: Id,
    pub used: u32,
    pub limit: u32,
    pub guaranteed: u32,
    pub window: Duration,
    /// Asked for and found at quota over the last window (all replicas).
    pub demand: DemandCount,
    /// Callers waiting on this replica.
    pub waiting: u32,
}

impl TenantUsage {
    pub fn requests_per_minute(&self) -> f64 {
        self.used as f64 * 60.0 / self.window.as_secs_f64()
    }

    pub fn utilization(&self) -> f64 {
        if self.limit == 0 {
            0.0
        } else {
            self.used as f64 / self.limit as f64
        }
    }

    /// The share of the slots held that is above the guarantee.
    pub fn borrowed_share(&self) -> f64 {
        if self.used == 0 {
            0.0
        } else {
            self.used.saturating_sub(self.guaranteed) as f64 / self.used as f64
        }
    }
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
    /// Breaker or quarantine state, and when it ends.
    pub state: TokenState,
    pub state_until_ms: Option<i64>,
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
        let mut upstreams: Vec<&Upstream> = snapshot.upstreams.values().collect();
        upstreams.sort_by(|a, b| a.id.cmp(&b.id));
        for upstream in upstreams {
            let tenants: Vec<Id> = sorted(
                snapshot
                    .routes
                    .iter()
                    .filter(|(id, routes)| {
                        tenant.is_none_or(|t| t == *id)
                            && routes.iter().any(|r| r.upstream_id == upstream.id)
                    })
                    .map(|(id, _)| id.clone()),
            );
            let tokens: Vec<Id> = sorted(
                snapshot
                    .tokens
                    .values()
                    .filter(|t| {
                        t.record.upstream_id == upstream.id
                            && token.is_none_or(|id| id == &t.record.id)
                    })
                    .map(|t| t.record.id.clone()),
            );
            usage
                .tenants
                .extend(self.tenant_usage(&snapshot, upstream, tenants).await?);
            usage
                .tokens
                .extend(self.token_usage(&snapshot, upstream, tokens).await?);
        }
        Ok(usage)
    }

    async fn tenant_usage(
        &self,
        snapshot: &Snapshot,
        upstream: &Upstream,
        tenants: Vec<Id>,
    ) -> Result<Vec<TenantUsage>, ServiceError> {
        let used = self
            .counters
            .usage(&upstream.id, upstream.window, &tenants, &[])
            .await?
            .tenants;
        let (_, demand) = self
            .counters
            .demand(&upstream.id, upstream.window, &tenants)
            .await?;
        Ok(tenants
            .into_iter()
            .zip(used.into_iter().zip(demand))
            .map(|(id, (used, demand))| {
                let tenant = &snapshot.tenants[&id];
                let guaranteed = snapshot
                    .tiers
                    .get(&tenant.tier_id)
                    .map_or(0, |tier| tenant.guaranteed(tier));
                TenantUsage {
                    limit: self.allocator.quota(snapshot, &id, &upstream.id),
                    waiting: self.lines.depth(&id) as u32,
                    tenant_id: id,
                    upstream_id: upstream.id.clone(),
                    used,
                    guaranteed,
                    window: upstream.window,
                    demand,
                }
            })
            .collect())
    }

    async fn token_usage(
        &self,
        snapshot: &Snapshot,
        upstream: &Upstream,
        tokens: Vec<Id>,
    ) -> Result<Vec<TokenUsage>, ServiceError> {
        let used = self
            .counters
            .usage(&upstream.id, upstream.window, &[], &tokens)
            .await?
            .tokens;
        let status = self.counters.token_status(&upstream.id, &tokens).await?;
        Ok(tokens
            .into_iter()
            .zip(used)
            .map(|(id, used)| {
                let health = status.tokens.iter().find(|s| s.token_id == id);
                let disabled = snapshot.tokens[&id].record.disabled;
                TokenUsage {
                    state: if disabled {
                        TokenState::Disabled
                    } else {
                        health.map_or(TokenState::Active, |h| h.state)
                    },
                    state_until_ms: health.and_then(|h| h.until_ms),
                    token_id: id,
                    upstream_id: upstream.id.clone(),
                    used,
                    usable: upstream.usable_per_window(),
                    disabled,
                    window: upstream.window,
                }
            })
            .collect())
    }
}

fn sorted(ids: impl Iterator<Item = Id>) -> Vec<Id> {
    let mut ids: Vec<Id> = ids.collect();
    ids.sort();
    ids
}
