//! The configuration as leasing sees it: an immutable snapshot, replaced whenever the
//! store's version changes, with token secrets opened once at load. Leasing and
//! authentication read only the snapshot, so they go on when the database is away.
//!
//! A snapshot is built whole at start and when the master keys change
//! ([`Snapshot::build`]); after that each new version is a patched copy of the one
//! before (`patch.rs`: only changed tokens are opened again, and a change of tenants
//! or keys only recomputes what those touch), which must equal a full build.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use secrecy::SecretString;

use crate::crypto::KeyRing;
use crate::domain::{
    ApiKeyRecord, CapacityReport, Id, Pool, Tenant, Tier, TokenOwner, TokenRecord, Upstream,
    drawn_guarantee,
};
use crate::store::StoredConfig;
use crate::store::counters::list_digest;

/// A token with its secret opened (or the reason it could not be).
#[derive(Clone)]
pub struct LiveToken {
    pub record: TokenRecord,
    pub secret: Result<SecretString, String>,
}

impl LiveToken {
    /// Opens `record`'s secret with `ring`; a token that does not open is reported in
    /// the log (without secrets) and kept out of every route.
    pub(super) fn open(record: TokenRecord, ring: &KeyRing) -> Self {
        let secret = ring
            .open(record.id.as_str(), &record.key_id, &record.sealed_secret)
            .map_err(|e| e.to_string());
        if let Err(reason) = &secret {
            tracing::error!(token_id = %record.id, %reason, "token cannot be opened; it will not be leased");
        }
        LiveToken { record, secret }
    }

    /// Leasable: enabled and opened.
    fn usable(&self) -> bool {
        !self.record.disabled && self.secret.is_ok()
    }
}

/// What one tenant may use on one upstream.
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Default, Clone)]
pub struct Snapshot {
    pub version: i64,
    /// The version of the last change that can move quotas: API key changes leave it,
    /// so creating keys costs no quota recompute.
    pub quota_version: i64,
    pub upstreams: HashMap<Id, Upstream>,
    pub tokens: HashMap<Id, LiveToken>,
    pub pools: HashMap<Id, Pool>,
    pub tiers: HashMap<Id, Tier>,
    /// Tenants, keys and routes are shared (`Arc`) with the snapshots patched from this
    /// one, so a patch copies pointers, not every tenant and key.
    pub tenants: HashMap<Id, Arc<Tenant>>,
    pub api_keys: HashMap<String, Arc<ApiKeyRecord>>,
    /// Each key's tenant scope as a set, built once here (`Snapshot::scope`).
    pub(super) key_scopes: HashMap<String, Arc<HashSet<Id>>>,
    /// Per tenant: one route per upstream it can reach, ordered by upstream id.
    pub routes: HashMap<Id, Arc<[Route]>>,
    /// Per pool: usable capacity and the guarantees drawn from it.
    pub pool_reports: HashMap<Id, CapacityReport>,
    /// The token lists routes are made of, shared with later patched snapshots while
    /// no token, pool or upstream changes.
    pub(super) index: Arc<TokenIndex>,
    /// Per pool: the exact sum of the guarantees its tenants draw (reports cap it).
    pub(super) drawn: HashMap<Id, u64>,
}

/// A pool's usable tokens on one upstream, sorted, and their `list_digest`.
type SharedList = (Arc<[Id]>, Arc<str>);

/// The tokens, grouped as routes and pool reports need them.
#[derive(Default)]
pub(super) struct TokenIndex {
    /// Usable tokens per (pool, upstream), sorted, with their digest.
    pooled: HashMap<(Id, Id), SharedList>,
    /// Usable tokens per (tenant, upstream), sorted.
    dedicated: HashMap<(Id, Id), Vec<Id>>,
    /// Upstreams with at least one usable token, sorted.
    upstreams: Vec<Id>,
    /// Enabled tokens (opened or not) per owner and upstream: what pool reports count.
    enabled: HashMap<(TokenOwner, Id), u64>,
}

impl TokenIndex {
    fn build(tokens: &HashMap<Id, LiveToken>) -> Self {
        let mut usable: Vec<&LiveToken> = tokens.values().filter(|t| t.usable()).collect();
        usable.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        type Lists = HashMap<(Id, Id), Vec<Id>>;
        let (mut pooled, mut dedicated): (Lists, Lists) = Default::default();
        for token in &usable {
            let record = &token.record;
            let (lists, owner) = match &record.owner {
                TokenOwner::Pool(pool) => (&mut pooled, pool),
                TokenOwner::Dedicated(tenant) => (&mut dedicated, tenant),
            };
            lists
                .entry((owner.clone(), record.upstream_id.clone()))
                .or_default()
                .push(record.id.clone());
        }
        let mut upstreams: Vec<Id> = usable
            .iter()
            .map(|t| t.record.upstream_id.clone())
            .collect();
        upstreams.sort();
        upstreams.dedup();
        let mut enabled: HashMap<(TokenOwner, Id), u64> = HashMap::new();
        for token in tokens.values().filter(|t| !t.record.disabled) {
            let key = (token.record.owner.clone(), token.record.upstream_id.clone());
            *enabled.entry(key).or_default() += 1;
        }
        let pooled = pooled
            .into_iter()
            .map(|(key, list)| {
                let digest: Arc<str> = list_digest(&list).into();
                (key, (list.into(), digest))
            })
            .collect();
        Self {
            pooled,
            dedicated,
            upstreams,
            enabled,
        }
    }
}

impl Snapshot {
    /// Builds a snapshot, opening every token's secret with `ring`. A token that does
    /// not open is kept out of every route and reported in the log (without secrets).
    pub fn build(stored: StoredConfig, ring: &KeyRing) -> Arc<Snapshot> {
        let view = stored.view;
        let keyed = |id: &Id| id.clone();
        let mut snapshot = Snapshot {
            version: stored.version,
            quota_version: stored.version,
            upstreams: view
                .upstreams
                .into_iter()
                .map(|u| (keyed(&u.id), u))
                .collect(),
            tokens: view
                .tokens
                .into_iter()
                .map(|record| (record.id.clone(), LiveToken::open(record, ring)))
                .collect(),
            pools: view.pools.into_iter().map(|p| (keyed(&p.id), p)).collect(),
            tiers: view.tiers.into_iter().map(|t| (keyed(&t.id), t)).collect(),
            tenants: view
                .tenants
                .into_iter()
                .map(|t| (keyed(&t.id), Arc::new(t)))
                .collect(),
            api_keys: stored
                .api_keys
                .into_iter()
                .map(|k| (k.id.clone(), Arc::new(k)))
                .collect(),
            ..Snapshot::default()
        };
        snapshot.key_scopes = snapshot
            .api_keys
            .values()
            .map(|k| (k.id.clone(), crate::auth::scope_of(k)))
            .collect();
        snapshot.rebuild_derived();
        Arc::new(snapshot)
    }

    /// Recomputes the token index, every route and every pool report: O(tokens +
    /// tenants), a pool's token list built once and shared by its tenants (`Arc`).
    pub(super) fn rebuild_derived(&mut self) {
        self.index = Arc::new(TokenIndex::build(&self.tokens));
        self.routes = self
            .tenants
            .values()
            .map(|t| (t.id.clone(), self.routes_of(t)))
            .collect();
        self.drawn = HashMap::new();
        for tenant in self.tenants.values() {
            if let Some((pool, drawn)) = self.drawn_by(tenant) {
                *self.drawn.entry(pool.clone()).or_default() += drawn;
            }
        }
        self.pool_reports = HashMap::new();
        let pools: Vec<Id> = self.pools.keys().cloned().collect();
        for pool in pools {
            self.update_report(&pool);
        }
    }

    /// `tenant`'s routes: per upstream with a usable token, its pool's shared list and
    /// its own dedicated tokens, when either is not empty.
    pub(super) fn routes_of(&self, tenant: &Tenant) -> Arc<[Route]> {
        let pool = tenant
            .pool_id
            .as_ref()
            .filter(|p| self.pools.contains_key(*p));
        let index = &self.index;
        index
            .upstreams
            .iter()
            .filter_map(|upstream| {
                let (pooled, pooled_digest) = pool
                    .and_then(|p| index.pooled.get(&(p.clone(), upstream.clone())).cloned())
                    .unwrap_or_else(|| (Arc::from([]), Arc::from("")));
                let dedicated = index
                    .dedicated
                    .get(&(tenant.id.clone(), upstream.clone()))
                    .cloned()
                    .unwrap_or_default();
                (!pooled.is_empty() || !dedicated.is_empty()).then(|| Route {
                    upstream_id: upstream.clone(),
                    dedicated,
                    pooled,
                    pooled_digest,
                })
            })
            .collect()
    }

    /// The pool `tenant` draws its guarantee from, and how much of it (the part its
    /// enabled dedicated tokens of the pool's upstream do not cover); `None` without a
    /// pool, or with a pool, upstream or tier that does not exist.
    pub(super) fn drawn_by<'t>(&self, tenant: &'t Tenant) -> Option<(&'t Id, u64)> {
        let pool_id = tenant.pool_id.as_ref()?;
        let upstream = self.upstreams.get(&self.pools.get(pool_id)?.upstream_id)?;
        let tier = self.tiers.get(&tenant.tier_id)?;
        let owner = TokenOwner::Dedicated(tenant.id.clone());
        let dedicated = self
            .index
            .enabled
            .get(&(owner, upstream.id.clone()))
            .copied()
            .unwrap_or(0);
        Some((
            pool_id,
            drawn_guarantee(tenant.guaranteed(tier), dedicated, upstream),
        ))
    }

    /// Sets pool `pool`'s report from its enabled tokens and `drawn`.
    pub(super) fn update_report(&mut self, pool: &Id) {
        let Some(upstream) = self
            .pools
            .get(pool)
            .and_then(|p| self.upstreams.get(&p.upstream_id))
        else {
            self.pool_reports.remove(pool);
            return;
        };
        let owner = TokenOwner::Pool(pool.clone());
        let tokens = self
            .index
            .enabled
            .get(&(owner, upstream.id.clone()))
            .copied()
            .unwrap_or(0);
        let capacity = tokens * upstream.usable_per_window() as u64;
        let drawn = self.drawn.get(pool).copied().unwrap_or(0);
        self.pool_reports
            .insert(pool.clone(), CapacityReport::saturating(capacity, drawn));
    }

    /// `record`'s tenant scope: this snapshot's set when the record is this snapshot's
    /// own (the same object, checked without comparing the lists), else built now.
    pub fn scope(&self, record: &ApiKeyRecord) -> Arc<HashSet<Id>> {
        let own = self
            .api_keys
            .get(&record.id)
            .is_some_and(|mine| std::ptr::eq(&**mine, record));
        match self.key_scopes.get(&record.id) {
            Some(scope) if own => scope.clone(),
            _ => crate::auth::scope_of(record),
        }
    }

    /// The pool whose counters space holds `tenant`'s counters on `upstream`
    /// (`counters::Space`): its pool when that pool serves `upstream`, else none (the
    /// upstream's own space). Its dedicated tokens of `upstream` live there too.
    pub fn space_pool(&self, tenant: &Id, upstream: &Id) -> Option<&Id> {
        let pool = self.tenants.get(tenant)?.pool_id.as_ref()?;
        (self.pools.get(pool)?.upstream_id == *upstream).then_some(pool)
    }

    /// The pool whose counters space holds `token`'s counters: its pool, or its
    /// tenant's (`space_pool`).
    pub fn token_space_pool(&self, token: &Id) -> Option<&Id> {
        let record = &self.tokens.get(token)?.record;
        match &record.owner {
            TokenOwner::Pool(pool) => Some(pool),
            TokenOwner::Dedicated(tenant) => self.space_pool(tenant, &record.upstream_id),
        }
    }

    /// The tenant's quota per window: guaranteed + burst, from its tier and overrides.
    pub fn tenant_limit(&self, tenant: &Tenant) -> u32 {
        self.tiers
            .get(&tenant.tier_id)
            .map(|tier| tenant.guaranteed(tier).saturating_add(tenant.burst(tier)))
            .unwrap_or(0)
    }
}
