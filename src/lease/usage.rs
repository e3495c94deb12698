//! The usage read-out: slots held now per tenant and per token, from the counters.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Leaser;
use super::Snapshot;
use crate::domain::{Id, TokenState, Upstream};
use crate::error::ServiceError;
use crate::store::counters::{DemandCount, Space};

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
        for upstream in by_id(&snapshot) {
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
            let tokens = tokens_of(&snapshot, upstream, token);
            usage
                .tenants
                .extend(self.tenant_usage(&snapshot, upstream, tenants).await?);
            usage
                .tokens
                .extend(self.token_usage(&snapshot, upstream, tokens).await?);
        }
        Ok(usage)
    }

    /// Usage of every token of every upstream, and nothing of the tenants: what the
    /// metrics' token gauges read every `metrics.refresh_ms` (reading every tenant's
    /// window and demand too held Redis ~10 ms at 1,000 tenants, for readings unused).
    pub async fn tokens_usage(&self) -> Result<Vec<TokenUsage>, ServiceError> {
        let snapshot = self.config.current();
        let mut usage = Vec::new();
        for upstream in by_id(&snapshot) {
            let tokens = tokens_of(&snapshot, upstream, None);
            usage.extend(self.token_usage(&snapshot, upstream, tokens).await?);
        }
        Ok(usage)
    }

    async fn tenant_usage(
        &self,
        snapshot: &Snapshot,
        upstream: &Upstream,
        tenants: Vec<Id>,
    ) -> Result<Vec<TenantUsage>, ServiceError> {
        let (mut used, mut demand) = (Vec::new(), Vec::new());
        for (pool, members) in by_space(&tenants, |t| snapshot.space_pool(t, &upstream.id)) {
            let ids = pick(&tenants, &members);
            let space = Space::new(&upstream.id, pool.as_ref());
            let counts = self
                .counters
                .usage(space, upstream.window, &ids, &[])
                .await?;
            used.push((members.clone(), counts.tenants));
            let (_, asked) = self.counters.demand(space, upstream.window, &ids).await?;
            demand.push((members, asked));
        }
        let (used, demand) = (in_order(used), in_order(demand));
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
        let (mut used, mut status) = (Vec::new(), Vec::new());
        for (pool, members) in by_space(&tokens, |t| snapshot.token_space_pool(t)) {
            let ids = pick(&tokens, &members);
            let space = Space::new(&upstream.id, pool.as_ref());
            let counts = self
                .counters
                .usage(space, upstream.window, &[], &ids)
                .await?;
            used.push((members.clone(), counts.tokens));
            let report = self.counters.token_status(space, &ids).await?;
            status.push((members, report.tokens));
        }
        let (used, status) = (in_order(used), in_order(status));
        Ok(tokens
            .into_iter()
            .zip(used)
            .map(|(id, used)| {
                let health = status.iter().find(|s| s.token_id == id);
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

/// The positions of `ids` grouped by counters space (`counters::Space`; `pool_of`
/// names each id's pool), so that each space is read in one call.
pub(super) fn by_space<'a>(
    ids: &'a [Id],
    pool_of: impl Fn(&'a Id) -> Option<&'a Id>,
) -> BTreeMap<Option<Id>, Vec<usize>> {
    let mut groups: BTreeMap<Option<Id>, Vec<usize>> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        groups.entry(pool_of(id).cloned()).or_default().push(i);
    }
    groups
}

/// The ids at `positions`.
pub(super) fn pick(ids: &[Id], positions: &[usize]) -> Vec<Id> {
    positions.iter().map(|&i| ids[i].clone()).collect()
}

/// Answers read group by group (`by_space`) put back in the order of the ids.
pub(super) fn in_order<R>(groups: Vec<(Vec<usize>, Vec<R>)>) -> Vec<R> {
    let mut answers: Vec<(usize, R)> = groups
        .into_iter()
        .flat_map(|(positions, answers)| positions.into_iter().zip(answers))
        .collect();
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, r)| r).collect()
}

fn sorted(ids: impl Iterator<Item = Id>) -> Vec<Id> {
    let mut ids: Vec<Id> = ids.collect();
    ids.sort();
    ids
}

/// The snapshot's upstreams, by id.
fn by_id(snapshot: &Snapshot) -> Vec<&Upstream> {
    let mut upstreams: Vec<&Upstream> = snapshot.upstreams.values().collect();
    upstreams.sort_by(|a, b| a.id.cmp(&b.id));
    upstreams
}

/// The tokens of `upstream` (only `token`, when given), by id.
fn tokens_of(snapshot: &Snapshot, upstream: &Upstream, token: Option<&Id>) -> Vec<Id> {
    sorted(
        snapshot
            .tokens
            .values()
            .filter(|t| {
                t.record.upstream_id == upstream.id && token.is_none_or(|id| id == &t.record.id)
            })
            .map(|t| t.record.id.clone()),
    )
}
