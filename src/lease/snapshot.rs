//! The configuration as leasing sees it: an immutable snapshot, rebuilt whenever the
//! store's version changes, with token secrets opened once at load. Leasing and
//! authentication read only the snapshot, so they go on when the database is away.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use secrecy::SecretString;

use crate::crypto::KeyRing;
use crate::domain::{
    ApiKeyRecord, CapacityReport, Id, Pool, Tenant, Tier, TokenOwner, TokenRecord, Upstream,
};
use crate::store::StoredConfig;
use crate::store::counters::list_digest;

/// A token with its secret opened (or the reason it could not be).
pub struct LiveToken {
    pub record: TokenRecord,
    pub secret: Result<SecretString, String>,
}

/// What one tenant may use on one upstream.
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream_id: Id,
    /// Enabled, openable tokens dedicated to the tenant.
    pub dedicated: Vec<Id>,
    /// Enabled, openable tokens of the tenant's pool, by id: one list per pool and
    /// upstream, shared by the pool's tenants.
    pub pooled: Arc<[Id]>,
    /// `counters::list_digest(&pooled)`, computed once with the list.
    pub pooled_digest: Arc<str>,
}

/// An immutable view of the configuration.
#[derive(Default)]
pub struct Snapshot {
    pub version: i64,
    pub upstreams: HashMap<Id, Upstream>,
    pub tokens: HashMap<Id, LiveToken>,
    pub pools: HashMap<Id, Pool>,
    pub tiers: HashMap<Id, Tier>,
    pub tenants: HashMap<Id, Tenant>,
    pub api_keys: HashMap<String, ApiKeyRecord>,
    /// Each key's tenant scope as a set, built once here (`Snapshot::scope`).
    key_scopes: HashMap<String, Arc<HashSet<Id>>>,
    /// Per tenant: one route per upstream it can reach, ordered by upstream id.
    pub routes: HashMap<Id, Vec<Route>>,
    /// Per pool: usable capacity and the guarantees drawn from it.
    pub pool_reports: HashMap<Id, CapacityReport>,
}

impl Snapshot {
    /// Builds a snapshot, opening every token's secret with `ring`. A token that does
    /// not open is kept out of every route and reported in the log (without secrets).
    pub fn build(stored: StoredConfig, ring: &KeyRing) -> Arc<Snapshot> {
        let view = stored.view;
        let pool_reports = view.pool_reports();
        let tokens: HashMap<Id, LiveToken> = view
            .tokens
            .into_iter()
            .map(|record| {
                let secret = ring
                    .open(record.id.as_str(), &record.key_id, &record.sealed_secret)
                    .map_err(|e| e.to_string());
                if let Err(reason) = &secret {
                    tracing::error!(token_id = %record.id, %reason, "token cannot be opened; it will not be leased");
                }
                (record.id.clone(), LiveToken { record, secret })
            })
            .collect();
        let mut snapshot = Snapshot {
            version: stored.version,
            upstreams: view
                .upstreams
                .into_iter()
                .map(|u| (u.id.clone(), u))
                .collect(),
            pools: view.pools.into_iter().map(|p| (p.id.clone(), p)).collect(),
            tiers: view.tiers.into_iter().map(|t| (t.id.clone(), t)).collect(),
            tenants: view
                .tenants
                .into_iter()
                .map(|t| (t.id.clone(), t))
                .collect(),
            api_keys: stored
                .api_keys
                .into_iter()
                .map(|k| (k.id.clone(), k))
                .collect(),
            tokens,
            key_scopes: HashMap::new(),
            routes: HashMap::new(),
            pool_reports,
        };
        snapshot.routes = snapshot.compute_routes();
        snapshot.key_scopes = snapshot
            .api_keys
            .values()
            .map(|k| (k.id.clone(), crate::auth::scope_of(k)))
            .collect();
        Arc::new(snapshot)
    }

    /// `record`'s tenant scope: this snapshot's set when the record is this snapshot's
    /// own (the same object, checked without comparing the lists), else built now.
    pub fn scope(&self, record: &ApiKeyRecord) -> Arc<HashSet<Id>> {
        let own = self
            .api_keys
            .get(&record.id)
            .is_some_and(|mine| std::ptr::eq(mine, record));
        match self.key_scopes.get(&record.id) {
            Some(scope) if own => scope.clone(),
            _ => crate::auth::scope_of(record),
        }
    }

    /// Every tenant's routes. A pool's token list per upstream is built once and shared
    /// by all its tenants (`Arc`): the work and the memory grow with tenants plus
    /// tokens, not with their product.
    fn compute_routes(&self) -> HashMap<Id, Vec<Route>> {
        let mut usable: Vec<&LiveToken> = self
            .tokens
            .values()
            .filter(|t| !t.record.disabled && t.secret.is_ok())
            .collect();
        usable.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        type Lists<'a> = HashMap<(&'a Id, &'a Id), Vec<Id>>;
        let (mut pooled, mut dedicated): (Lists, Lists) = Default::default();
        for token in &usable {
            let record = &token.record;
            let (lists, owner) = match &record.owner {
                TokenOwner::Pool(pool) => (&mut pooled, pool),
                TokenOwner::Dedicated(tenant) => (&mut dedicated, tenant),
            };
            lists
                .entry((owner, &record.upstream_id))
                .or_default()
                .push(record.id.clone());
        }
        type Shared = (Arc<[Id]>, Arc<str>);
        let pooled: HashMap<(&Id, &Id), Shared> = pooled
            .into_iter()
            .map(|(k, v)| {
                let digest: Arc<str> = list_digest(&v).into();
                (k, (v.into(), digest))
            })
            .collect();
        let upstreams: Vec<&Id> = {
            let mut ids: Vec<&Id> = usable.iter().map(|t| &t.record.upstream_id).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        let mut routes = HashMap::new();
        for tenant in self.tenants.values() {
            let pool = tenant
                .pool_id
                .as_ref()
                .filter(|p| self.pools.contains_key(*p));
            let list: Vec<Route> = upstreams
                .iter()
                .filter_map(|&upstream| {
                    let (pooled, pooled_digest) = pool
                        .and_then(|p| pooled.get(&(p, upstream)).cloned())
                        .unwrap_or_else(|| (Arc::from([]), Arc::from("")));
                    let dedicated = dedicated
                        .get(&(&tenant.id, upstream))
                        .cloned()
                        .unwrap_or_default();
                    (!pooled.is_empty() || !dedicated.is_empty()).then(|| Route {
                        upstream_id: upstream.clone(),
                        dedicated,
                        pooled,
                        pooled_digest,
                    })
                })
                .collect();
            routes.insert(tenant.id.clone(), list);
        }
        routes
    }

    /// The tenant's quota per window: guaranteed + burst, from its tier and overrides.
    pub fn tenant_limit(&self, tenant: &Tenant) -> u32 {
        self.tiers
            .get(&tenant.tier_id)
            .map(|tier| tenant.guaranteed(tier).saturating_add(tenant.burst(tier)))
            .unwrap_or(0)
    }
}
