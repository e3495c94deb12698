//! AdminService.GetCostReport: the range and filters checked, the tokens taken from
//! the configuration this replica leases from, the grants per tenant and pool read
//! from the usage history, `crate::cost::allocate` on both, and the caller's view of it as
//! proto (a worker key: its tenants' lines only).

use std::collections::{HashMap, HashSet};

use tonic::{Request, Response, Status};

use super::admin_api::AdminApi;
use super::auth::caller;
use super::convert::timestamp;
use super::history_api::parse_timestamp;
use super::pb;
use crate::cost::{Allocation, CostOwner, Granted, TokenCost, allocate};
use crate::domain::Id;
use crate::error::ServiceError;
use crate::lease::Snapshot;

/// A checked GetCostReport: the range widened to whole stored buckets.
struct CostQuery {
    start_ms: i64,
    end_ms: i64,
    upstream_id: Option<Id>,
    pool_id: Option<Id>,
}

impl AdminApi {
    pub(super) async fn cost_report(
        &self,
        r: Request<pb::GetCostReportRequest>,
    ) -> Result<Response<pb::GetCostReportResponse>, Status> {
        let caller = caller(&r)?;
        let snapshot = self.leaser.config.current();
        let query = parse_query(r.into_inner(), self.leaser.history.bucket_ms(), &snapshot)?;
        let (tokens, upstreams) = token_costs(&snapshot, &query);
        let mut pools: Vec<String> = tokens
            .iter()
            .filter_map(|t| match &t.owner {
                CostOwner::Pool(pool) => Some(pool.clone()),
                CostOwner::Dedicated(_) => None,
            })
            .collect();
        pools.sort();
        pools.dedup();
        let filtered = query.upstream_id.is_some() || query.pool_id.is_some();
        let grants = self
            .leaser
            .config
            .store()
            .read_grants(query.start_ms, query.end_ms, filtered.then_some(&pools[..]))
            .await
            .map_err(ServiceError::from)?;
        let granted: Vec<Granted> = grants
            .into_iter()
            .map(|g| Granted {
                tenant_id: g.tenant_id,
                pool_id: g.pool_id,
                granted: g.granted,
            })
            .collect();
        let allocation = allocate(query.start_ms..query.end_ms, &tokens, &granted);
        let mut response = match caller.tenant_scope() {
            None => admin_view(allocation, &upstreams),
            Some(scope) => worker_view(allocation, &scope),
        };
        response.start_time = Some(timestamp(query.start_ms));
        response.end_time = Some(timestamp(query.end_ms));
        response.currency.clone_from(&self.currency);
        Ok(Response::new(response))
    }
}

/// Checks the range (as GetUsageHistory does, in stored buckets) and the filters
/// (well-formed, and naming an upstream or pool that exists).
fn parse_query(
    req: pb::GetCostReportRequest,
    stored_bucket_ms: i64,
    snapshot: &Snapshot,
) -> Result<CostQuery, ServiceError> {
    let start = parse_timestamp("start_time", req.start_time)?;
    let end = parse_timestamp("end_time", req.end_time)?;
    let (start_ms, end_ms) =
        crate::history::check_range(start, end, stored_bucket_ms, stored_bucket_ms)?;
    let upstream_id = Id::parse_optional("upstream_id", &req.upstream_id)?;
    let pool_id = Id::parse_optional("pool_id", &req.pool_id)?;
    if let Some(upstream) = &upstream_id
        && !snapshot.upstreams.contains_key(upstream)
    {
        return Err(ServiceError::NotFound(format!(
            "upstream_id: upstream '{upstream}' not found"
        )));
    }
    if let Some(pool) = &pool_id
        && !snapshot.pools.contains_key(pool)
    {
        return Err(ServiceError::NotFound(format!(
            "pool_id: pool '{pool}' not found"
        )));
    }
    Ok(CostQuery {
        start_ms,
        end_ms,
        upstream_id,
        pool_id,
    })
}

/// Each token's upstream, by token id.
type Upstreams = HashMap<String, String>;

/// The tokens the query selects, disabled ones included (they are paid for all the
/// same), ordered by id, with their upstream's usable rate; and their upstreams.
fn token_costs(snapshot: &Snapshot, query: &CostQuery) -> (Vec<TokenCost>, Upstreams) {
    let mut upstreams = Upstreams::new();
    let mut tokens: Vec<TokenCost> = snapshot
        .tokens
        .values()
        .map(|live| &live.record)
        .filter(|t| {
            query
                .upstream_id
                .as_ref()
                .is_none_or(|u| *u == t.upstream_id)
        })
        .filter(|t| match &query.pool_id {
            None => true,
            Some(pool) => t.owner.pool() == Some(pool),
        })
        .filter_map(|t| {
            let upstream = snapshot.upstreams.get(&t.upstream_id)?;
            upstreams.insert(t.id.to_string(), t.upstream_id.to_string());
            Some(TokenCost::of(t, upstream))
        })
        .collect();
    tokens.sort_by(|a, b| a.token_id.cmp(&b.token_id));
    (tokens, upstreams)
}

fn tenant_line(allocation: &Allocation, tenant_id: &str) -> pb::TenantCost {
    pb::TenantCost {
        tenant_id: tenant_id.to_owned(),
        cost_minor: allocation.per_tenant.get(tenant_id).copied().unwrap_or(0),
        granted: allocation
            .granted_per_tenant
            .get(tenant_id)
            .copied()
            .unwrap_or(0),
    }
}

/// Every line.
fn admin_view(allocation: Allocation, upstreams: &Upstreams) -> pb::GetCostReportResponse {
    let tenants = allocation
        .per_tenant
        .keys()
        .map(|t| tenant_line(&allocation, t))
        .collect();
    let pools = allocation
        .cost_per_pool
        .iter()
        .map(|(pool, cost)| pb::PoolCost {
            pool_id: pool.clone(),
            cost_minor: *cost,
            unused_cost_minor: allocation.unused_per_pool.get(pool).copied().unwrap_or(0),
        })
        .collect();
    let tokens = allocation
        .per_token
        .iter()
        .map(|line| pb::TokenCost {
            token_id: line.token_id.clone(),
            upstream_id: upstreams.get(&line.token_id).cloned().unwrap_or_default(),
            owner: Some(match &line.owner {
                CostOwner::Pool(p) => pb::token_cost::Owner::PoolId(p.clone()),
                CostOwner::Dedicated(d) => pb::token_cost::Owner::DedicatedTenantId(d.clone()),
            }),
            cost_minor: line.cost,
            capacity: line.capacity,
        })
        .collect();
    pb::GetCostReportResponse {
        tenants,
        pools,
        tokens,
        total_cost_minor: allocation.total,
        unused_cost_minor: allocation.unused_per_pool.values().sum(),
        ..Default::default()
    }
}

/// The lines of the worker's tenants only, and their sum as the total: no pool, no
/// token, nothing of other tenants.
fn worker_view(allocation: Allocation, scope: &[Id]) -> pb::GetCostReportResponse {
    let scope: HashSet<&str> = scope.iter().map(Id::as_str).collect();
    let tenants: Vec<pb::TenantCost> = allocation
        .per_tenant
        .keys()
        .filter(|t| scope.contains(t.as_str()))
        .map(|t| tenant_line(&allocation, t))
        .collect();
    pb::GetCostReportResponse {
        total_cost_minor: tenants.iter().map(|t| t.cost_minor).sum(),
        tenants,
        ..Default::default()
    }
}
