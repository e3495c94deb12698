//! Keeps every tenant's quota per window: its guarantee plus a weighted max-min fair
//! share of its pool's spare capacity, following recent demand (`quota::fair_share`).
//!
//! Demand is read from the counters (every replica's calls, counted in buckets of W/10)
//! over the last *completed* buckets, so replicas recomputing within the same bucket
//! get the same inputs and the same quotas. A pool's capacity counts only tokens in
//! service: not disabled, and not behind an open breaker or in quarantine (as far as
//! this replica knows: `health.rs`; every replica learns of those through events). The
//! allocation is recomputed whenever a bucket completes, the configuration changes or a
//! token goes out of or back into service. Each replica emits `QuotaChanged` to
//! its own watchers; since every replica computes the same quotas, each watcher sees
//! each change once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::live::LiveConfig;
use super::usage::{by_space, in_order, pick};
use super::{Snapshot, TokenHealth};
use crate::domain::{Id, SharedAccess, Upstream};
use crate::events::{EventBus, EventKind};
use crate::quota::{Claim, allocate};
use crate::store::counters::{CounterError, Counters, DemandCount, Space, bucket_ms};

/// Quotas per (tenant, upstream).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Quotas {
    pub by_tenant: HashMap<(Id, Id), u32>,
    /// What the quotas were computed from: the config version of the last change that
    /// can move quotas (`Snapshot::quota_version`), each upstream's bucket and the tokens
    /// out of service.
    inputs: (i64, Vec<(Id, i64)>, BTreeSet<Id>),
}

/// Cheap-clone handle on the current quotas.
#[derive(Clone)]
pub struct Allocator {
    config: LiveConfig,
    counters: Counters,
    events: EventBus,
    health: TokenHealth,
    sender: Arc<watch::Sender<Arc<Quotas>>>,
    /// One recompute at a time: concurrent admin writes then share one (the first
    /// computes for the newest snapshot, the others find their version covered)
    /// instead of each recomputing every tenant's quota. It guards the demand read in
    /// the current bucket too.
    refreshing: Arc<tokio::sync::Mutex<DemandCache>>,
}

/// The demand read per upstream (and window) in its current bucket. Demand counts only
/// *completed* buckets, and every count goes to the bucket in progress (by the
/// counters' own clock), so within one bucket a tenant's demand cannot change: a
/// recompute for a configuration change reads only the tenants it has not read in this
/// bucket (new ones), not every tenant of the upstream again (with Redis, one script
/// reading every tenant's hash: most of an admin write's time at 10,000 tenants).
#[derive(Default)]
struct DemandCache {
    by_upstream: HashMap<(Id, Duration), (i64, HashMap<Id, DemandCount>)>,
}

impl DemandCache {
    /// The demand of `tenants` on `upstream` and the bucket it was counted up to.
    async fn demand(
        &mut self,
        counters: &Counters,
        snapshot: &Snapshot,
        upstream: &Upstream,
        tenants: &[Id],
    ) -> Result<(i64, Vec<DemandCount>), CounterError> {
        let key = (upstream.id.clone(), upstream.window);
        let unread: Vec<Id> = match self.by_upstream.get(&key) {
            Some((_, read)) => tenants
                .iter()
                .filter(|t| !read.contains_key(*t))
                .cloned()
                .collect(),
            None => tenants.to_vec(),
        };
        let (bucket, counts) = read_demand(counters, snapshot, upstream, &unread).await?;
        let (cached_bucket, read) = self.by_upstream.entry(key).or_default();
        if *cached_bucket != bucket && unread.len() < tenants.len() {
            // A new bucket: every tenant's demand may have moved. Read them all.
            let (bucket, counts) = read_demand(counters, snapshot, upstream, tenants).await?;
            *cached_bucket = bucket;
            *read = tenants
                .iter()
                .cloned()
                .zip(counts.iter().copied())
                .collect();
            return Ok((bucket, counts));
        }
        if *cached_bucket != bucket {
            read.clear();
            *cached_bucket = bucket;
        }
        read.extend(unread.into_iter().zip(counts));
        let counts = tenants.iter().map(|t| read[t]).collect();
        Ok((bucket, counts))
    }
}

/// The demand of `tenants` of `upstream`, one read per counters space, and the newest
/// bucket those reads were counted up to.
async fn read_demand(
    counters: &Counters,
    snapshot: &Snapshot,
    upstream: &Upstream,
    tenants: &[Id],
) -> Result<(i64, Vec<DemandCount>), CounterError> {
    let (mut bucket, mut demand) = (i64::MIN, Vec::new());
    for (pool, members) in by_space(tenants, |t| snapshot.space_pool(t, &upstream.id)) {
        let space = Space::new(&upstream.id, pool.as_ref());
        let ids = pick(tenants, &members);
        let (at, counts) = counters.demand(space, upstream.window, &ids).await?;
        bucket = bucket.max(at);
        demand.push((members, counts));
    }
    if bucket == i64::MIN {
        // No tenant: the bucket is still the counters' current one.
        bucket = counters
            .demand(Space::upstream(&upstream.id), upstream.window, &[])
            .await?
            .0;
    }
    Ok((bucket, in_order(demand)))
}

impl Allocator {
    pub fn new(
        config: LiveConfig,
        counters: Counters,
        events: EventBus,
        health: TokenHealth,
    ) -> Self {
        let (sender, _) = watch::channel(Arc::new(Quotas::default()));
        Self {
            config,
            counters,
            events,
            health,
            sender: Arc::new(sender),
            refreshing: Arc::default(),
        }
    }

    /// The tenant's quota on `upstream`; its guarantee until the first allocation.
    pub fn quota(&self, snapshot: &Snapshot, tenant: &Id, upstream: &Id) -> u32 {
        if let Some(q) = self
            .sender
            .borrow()
            .by_tenant
            .get(&(tenant.clone(), upstream.clone()))
        {
            return *q;
        }
        let tenant = &snapshot.tenants[tenant];
        snapshot
            .tiers
            .get(&tenant.tier_id)
            .map_or(0, |tier| tenant.guaranteed(tier))
    }

    /// Sees every later change of the quotas (`changed()` wakes on the next one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Quotas>> {
        self.sender.subscribe()
    }

    pub fn current(&self) -> Arc<Quotas> {
        self.sender.borrow().clone()
    }

    /// `refresh` after a configuration change, unless the quotas already follow this
    /// configuration (a burst of admin writes shares one snapshot, and one allocation).
    pub async fn refresh_for_config(&self) -> Result<(), CounterError> {
        let covered = || self.current().inputs.0 >= self.config.current().quota_version;
        if covered() {
            return Ok(());
        }
        let mut demand = self.refreshing.lock().await;
        if covered() {
            return Ok(());
        }
        self.refresh_locked(&mut demand).await
    }

    /// Recomputes when a bucket completed or the configuration changed.
    #[tracing::instrument(name = "allocation", skip_all)]
    pub async fn refresh(&self) -> Result<(), CounterError> {
        let mut demand = self.refreshing.lock().await;
        self.refresh_locked(&mut demand).await
    }

    /// `refresh`, with `refreshing` held.
    async fn refresh_locked(&self, demand: &mut DemandCache) -> Result<(), CounterError> {
        let snapshot = self.config.current();
        let mut quotas = Quotas::default();
        quotas.inputs.2 = self.health.out_of_service();
        let mut upstreams: Vec<&Upstream> = snapshot.upstreams.values().collect();
        upstreams.sort_by(|a, b| a.id.cmp(&b.id));
        let previous = self.current();
        let mut unreadable = None;
        for upstream in upstreams {
            let allocated = self
                .allocate_upstream(
                    &snapshot,
                    upstream,
                    &quotas.inputs.2,
                    demand,
                    &mut quotas.by_tenant,
                )
                .await;
            let bucket = match allocated {
                Ok(bucket) => bucket,
                // Its counters cannot be read (on a Redis Cluster, the master holding its
                // slot may be down while the others serve): it keeps its last quotas, and
                // the other upstreams are still allocated.
                Err(error) => {
                    keep_quotas_of(&previous, &upstream.id, &mut quotas.by_tenant);
                    unreadable.get_or_insert(unreadable_error(&upstream.id, error));
                    -1
                }
            };
            quotas.inputs.1.push((upstream.id.clone(), bucket));
        }
        quotas.inputs.0 = snapshot.quota_version;
        if previous.inputs != quotas.inputs {
            self.announce_changes(&previous, &quotas);
            self.sender.send_replace(Arc::new(quotas));
        }
        unreadable.map_or(Ok(()), Err)
    }

    /// Allocates every pool of one upstream; returns the demand bucket used.
    async fn allocate_upstream(
        &self,
        snapshot: &Snapshot,
        upstream: &Upstream,
        out_of_service: &BTreeSet<Id>,
        demand: &mut DemandCache,
        out: &mut HashMap<(Id, Id), u32>,
    ) -> Result<i64, CounterError> {
        let tenants: Vec<Id> = sorted(
            snapshot
                .routes
                .iter()
                .filter(|(_, r)| r.iter().any(|r| r.upstream_id == upstream.id))
                .map(|(t, _)| t.clone()),
        );
        let (bucket, demand) = (demand)
            .demand(&self.counters, snapshot, upstream, &tenants)
            .await?;
        let demand: HashMap<&Id, u32> = tenants
            .iter()
            .zip(demand)
            .map(|(t, d)| (t, wanted(d)))
            .collect();
        let usable = upstream.usable_per_window();
        let mut by_pool: HashMap<Option<&Id>, Vec<&Id>> = HashMap::new();
        for tenant in &tenants {
            by_pool
                .entry(snapshot.tenants[tenant].pool_id.as_ref())
                .or_default()
                .push(tenant);
        }
        for (pool, members) in by_pool {
            let claims: Vec<Claim> = members
                .iter()
                .map(|t| claim(snapshot, t, &upstream.id, usable, demand[t]))
                .collect();
            let quotas = match pool {
                Some(pool) => {
                    let capacity = pool_capacity(snapshot, pool, upstream, out_of_service);
                    allocate(capacity, &claims)
                }
                // No pool: dedicated tokens only, up to guarantee + burst.
                None => claims
                    .iter()
                    .map(|c| c.guaranteed.saturating_add(c.burst))
                    .collect(),
            };
            for (tenant, quota) in members.into_iter().zip(quotas) {
                out.insert((tenant.clone(), upstream.id.clone()), quota);
            }
        }
        Ok(bucket)
    }

    fn announce_changes(&self, previous: &Quotas, next: &Quotas) {
        for ((tenant, upstream), quota) in &next.by_tenant {
            let before = previous
                .by_tenant
                .get(&(tenant.clone(), upstream.clone()))
                .copied()
                .unwrap_or(0);
            if before != *quota {
                self.events.publish(EventKind::QuotaChanged {
                    tenant_id: tenant.to_string(),
                    upstream_id: upstream.to_string(),
                    previous: before,
                    new: *quota,
                    cause: "fair share".into(),
                });
            }
        }
    }

    /// Recomputes every few milliseconds (a quarter of the shortest bucket, 20 ms to 1 s),
    /// on every configuration change and when a token comes back into service, until
    /// `shutdown` fires.
    pub fn spawn(&self, mut shutdown: watch::Receiver<bool>) {
        let allocator = self.clone();
        let mut config_changes = self.config.subscribe();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                // Recompute at the instant a token comes back into service too, so its
                // capacity is in the quotas as soon as leases may use it again.
                let every = allocator.tick();
                let wake = allocator.health.next_return().map_or(every, |at| {
                    at.saturating_duration_since(tokio::time::Instant::now())
                        .min(every)
                });
                let config_changed = tokio::select! {
                    _ = tokio::time::sleep(wake) => false,
                    _ = config_changes.changed() => true,
                    _ = shutdown.changed() => return,
                };
                // A configuration change that an admin write's own recompute covered
                // already, or that cannot move quotas (API keys), computes nothing.
                let refreshed = if config_changed {
                    allocator.refresh_for_config().await
                } else {
                    allocator.refresh().await
                };
                match refreshed {
                    Ok(()) => failing = false,
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "cannot refresh quotas; keeping the last ones");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    fn tick(&self) -> Duration {
        let shortest = self
            .config
            .current()
            .upstreams
            .values()
            .map(|u| u.window.as_millis() as i64)
            .min()
            .unwrap_or(60_000);
        Duration::from_millis((bucket_ms(shortest) / 4).clamp(20, 1_000) as u64)
    }
}

/// What a tenant wants per window. One that found itself at its quota recently wants
/// more than it got: open-ended, bounded later by its burst. Otherwise what it asked
/// for, plus an eighth as headroom: a quota exactly at the asked rate would be hit by
/// ordinary jitter, read as unmet demand, and make quotas swing.
fn wanted(demand: DemandCount) -> u32 {
    if demand.unmet > 0 {
        u32::MAX
    } else {
        demand.asked.saturating_add((demand.asked / 8).max(2))
    }
}

fn sorted(ids: impl Iterator<Item = Id>) -> Vec<Id> {
    let mut ids: Vec<Id> = ids.collect();
    ids.sort();
    ids
}

fn claim(snapshot: &Snapshot, tenant_id: &Id, upstream: &Id, usable: u32, demand: u32) -> Claim {
    let tenant = &snapshot.tenants[tenant_id];
    let dedicated = snapshot.routes[tenant_id]
        .iter()
        .find(|r| &r.upstream_id == upstream)
        .map_or(0, |r| r.dedicated.len() as u32);
    match snapshot.tiers.get(&tenant.tier_id) {
        Some(tier) => Claim {
            guaranteed: tenant.guaranteed(tier),
            burst: tenant.burst(tier),
            weight: tenant.weight(tier),
            demand,
            dedicated: dedicated.saturating_mul(usable),
            class: match tier.shared_access {
                SharedAccess::Priority => 0,
                SharedAccess::Normal => 1,
                SharedAccess::Limited => 2,
            },
        },
        None => Claim {
            guaranteed: 0,
            burst: 0,
            weight: 1.0,
            demand,
            dedicated: 0,
            class: 1,
        },
    }
}

/// Usable capacity per window of a pool's leasable tokens.
/// Usable capacity per window of the pool's tokens in service.
/// Copies `upstream`'s quotas from `previous` into `out`.
fn keep_quotas_of(previous: &Quotas, upstream: &Id, out: &mut HashMap<(Id, Id), u32>) {
    for ((tenant, on), quota) in &previous.by_tenant {
        if on == upstream {
            out.insert((tenant.clone(), on.clone()), *quota);
        }
    }
}

/// `error`, naming the upstream whose demand could not be read.
fn unreadable_error(upstream: &Id, error: CounterError) -> CounterError {
    match error {
        CounterError::Unavailable(why) => {
            CounterError::Unavailable(format!("upstream '{upstream}': {why}"))
        }
        CounterError::Internal(why) => {
            CounterError::Internal(format!("upstream '{upstream}': {why}"))
        }
    }
}

fn pool_capacity(
    snapshot: &Snapshot,
    pool: &Id,
    upstream: &Upstream,
    out_of_service: &BTreeSet<Id>,
) -> u32 {
    let tokens = snapshot
        .tokens
        .values()
        .filter(|t| t.record.owner.pool() == Some(pool) && t.record.upstream_id == upstream.id)
        .filter(|t| !t.record.disabled && t.secret.is_ok())
        .filter(|t| !out_of_service.contains(&t.record.id))
        .count() as u32;
    tokens.saturating_mul(upstream.usable_per_window())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::store::counters::{AcquireRequest, LeaseKey, MemoryCounters};

    fn id(value: &str) -> Id {
        Id::parse("test", value).expect("a valid id")
    }

    fn upstream() -> Upstream {
        Upstream {
            id: id("up"),
            display_name: String::new(),
            limit_per_window: 100,
            window: Duration::from_secs(60),
            safety_margin: 0.0,
            block_duration: Duration::from_secs(1),
            max_block: None,
            rate_limit_error_codes: Vec::new(),
            create_time_ms: 0,
            update_time_ms: 0,
        }
    }

    /// One first attempt of `tenant`: one unit of demand in the bucket in progress.
    fn ask(counters: &MemoryCounters, tenant: &str) {
        counters.acquire(&AcquireRequest {
            upstream_id: id("up"),
            pool_id: None,
            config_version: 0,
            nonce: LeaseKey::new_nonce(),
            tenant_id: id(tenant),
            tenant_limit: 1_000,
            token_limit: 100,
            window: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(1),
            cost: 1,
            dedicated: Vec::new(),
            pooled: vec![id("tok")].into(),
            pooled_digest: None,
            count_demand: true,
            queue: None,
            pace_burst: 0,
        });
    }

    /// The demand cache answers what a fresh read of the counters answers: within a
    /// bucket it reads only tenants it has not read (their counts cannot move until the
    /// bucket completes), and once a bucket completes it reads every tenant again.
    #[tokio::test]
    async fn demand_cache_answers_what_a_fresh_read_answers() {
        let bucket = Duration::from_millis(bucket_ms(60_000) as u64);
        let clock = Clock::manual(1_000 * bucket.as_millis() as i64);
        let memory = MemoryCounters::new(clock.clone());
        memory.mark_fresh(&id("up"));
        let counters = Counters::Memory(memory.clone());
        let mut cache = DemandCache::default();
        // Tenants without a pool: all in the upstream's counters space.
        let snapshot = Snapshot::default();
        let upstream = upstream();
        let fresh = |tenants: &[Id]| memory.demand(&upstream.id, upstream.window, tenants);

        ask(&memory, "a");
        clock.advance(bucket);
        let only_a = [id("a")];
        let read = cache
            .demand(&counters, &snapshot, &upstream, &only_a)
            .await
            .unwrap();
        assert_eq!(read, fresh(&only_a));
        assert_eq!(read.1[0].asked, 1);

        // In the same bucket: a asks again, b appears; neither count moves yet.
        ask(&memory, "a");
        ask(&memory, "b");
        let both = [id("a"), id("b")];
        let read = cache
            .demand(&counters, &snapshot, &upstream, &both)
            .await
            .unwrap();
        assert_eq!(read, fresh(&both));

        // The bucket completes: both counts move, and the cache sees it.
        clock.advance(bucket);
        let read = cache
            .demand(&counters, &snapshot, &upstream, &both)
            .await
            .unwrap();
        assert_eq!(read, fresh(&both));
        assert_eq!((read.1[0].asked, read.1[1].asked), (2, 1));
    }
}
