//! Rebalancing at work (the seed's §6): each replica samples its upstreams' usage from
//! the shared counters into a [`LoadHistory`], plans moves with
//! [`crate::quota::rebalance::plan`] from its averages, and applies moves as
//! configuration writes (`ConfigStore::move_tenant`: checked by the 80 % rule, recorded
//! as an audit row), each followed by a `TenantMoved` and a `ConfigChanged` event.
//!
//! The automatic mode (off by default) runs the same plan-and-apply on every replica
//! that has it on. Replicas do not coordinate beyond the store: a plan's moves are
//! made only while no other move of the upstream was recorded since the plan read the
//! audit trail (`MoveOrder::unless_moved_after`), so two replicas planning at once make
//! one plan, not two halves of two; the other plans again at its next check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::Leaser;
use super::snapshot::Snapshot;
use crate::clock::system_now_ms;
use crate::domain::{Id, MoveMode, TenantMove, TokenOwner, Upstream, drawn_guarantee};
use crate::error::{BACKEND_RETRY_AFTER, ServiceError};
use crate::events::{Change, EventBus, EventKind, Resource};
use crate::quota::load_history::LoadHistory;
use crate::quota::rebalance::{Band, Move, PoolLoad, TenantLoad, plan};
use crate::store::counters::Space;
use crate::store::{MoveOrder, StoreError};

/// Tenants read from the counters per call while sampling.
const SAMPLE_CHUNK: usize = 500;

/// How rebalancing runs (`[rebalance]` in the settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebalanceSettings {
    pub band: Band,
    /// The span the loads are averaged over.
    pub history: Duration,
    /// How often the counters are sampled.
    pub sample_every: Duration,
    /// The automatic mode's period; `None`: off.
    pub automatic_every: Option<Duration>,
}

/// One pool in a plan's report.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolReport {
    pub pool_id: Id,
    pub capacity: u32,
    pub used: f64,
    pub used_after: f64,
    pub guaranteed: u64,
    pub guaranteed_after: u64,
}

/// A plan with what it was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanReport {
    pub pools: Vec<PoolReport>,
    pub moves: Vec<Move>,
    pub history: Duration,
    pub band: Band,
    /// Why there are no moves; empty when there are.
    pub note: String,
    /// The audit trail's latest move of the upstream when the plan was made.
    pub last_move_version: i64,
}

/// What became of one move.
#[derive(Debug, Clone, PartialEq)]
pub enum MoveOutcome {
    Applied(TenantMove),
    Skipped { planned: Move, reason: String },
}

/// Samples, plans and applies; cheap to clone.
#[derive(Clone)]
pub struct Rebalancer {
    leaser: Leaser,
    events: EventBus,
    settings: RebalanceSettings,
    database_timeout: Duration,
    histories: Arc<Mutex<HashMap<Id, LoadHistory>>>,
}

impl Rebalancer {
    pub fn new(
        leaser: Leaser,
        events: EventBus,
        settings: RebalanceSettings,
        database_timeout: Duration,
    ) -> Self {
        Self {
            leaser,
            events,
            settings,
            database_timeout,
            histories: Arc::default(),
        }
    }

    pub fn settings(&self) -> RebalanceSettings {
        self.settings
    }

    /// Samples every `sample_every` and, in automatic mode, plans and applies every
    /// `automatic_every`, until `stop`.
    pub fn spawn(&self, mut stop: watch::Receiver<bool>) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut sample = tokio::time::interval(this.settings.sample_every);
            let auto_every = this.settings.automatic_every.unwrap_or(Duration::MAX / 4);
            let mut auto =
                tokio::time::interval_at(tokio::time::Instant::now() + auto_every, auto_every);
            loop {
                tokio::select! {
                    _ = sample.tick() => {
                        if let Err(error) = this.sample_all().await {
                            tracing::warn!(%error, "cannot sample usage for rebalancing; trying again");
                        }
                    }
                    _ = auto.tick(), if this.settings.automatic_every.is_some() => this.run_automatic().await,
                    _ = stop.changed() => return,
                }
            }
        });
    }

    /// Reads every upstream's usage (of upstreams with two pools or more) into its
    /// history.
    pub async fn sample_all(&self) -> Result<(), ServiceError> {
        let snapshot = self.leaser.config.current();
        for upstream in snapshot.upstreams.values() {
            if pools_of(&snapshot, &upstream.id).len() < 2 {
                continue;
            }
            let used = self.read_use(&snapshot, upstream).await?;
            let span = self.settings.history.as_millis() as i64;
            self.histories
                .lock()
                .expect("history lock")
                .entry(upstream.id.clone())
                .or_insert_with(|| LoadHistory::new(span))
                .record(system_now_ms(), used);
        }
        Ok(())
    }

    /// Per tenant of a pool of `upstream`: the slots it holds on its pool's tokens (its
    /// window minus what its dedicated tokens hold), read pool by pool (each pool's
    /// tenants share its counters space).
    async fn read_use(
        &self,
        snapshot: &Snapshot,
        upstream: &Upstream,
    ) -> Result<HashMap<Id, f64>, ServiceError> {
        let mut used = HashMap::new();
        for pool in pools_of(snapshot, &upstream.id) {
            let tenants: Vec<Id> = tenants_of(snapshot, &upstream.id)
                .into_iter()
                .filter(|t| snapshot.tenants[t].pool_id.as_ref() == Some(&pool))
                .collect();
            let space = Space::new(&upstream.id, Some(&pool));
            for chunk in tenants.chunks(SAMPLE_CHUNK) {
                let dedicated: Vec<Vec<Id>> = chunk
                    .iter()
                    .map(|t| dedicated_of(snapshot, t, &upstream.id))
                    .collect();
                let tokens: Vec<Id> = dedicated.iter().flatten().cloned().collect();
                let counters = &self.leaser.counters;
                let counts = counters
                    .usage(space, upstream.window, chunk, &tokens)
                    .await?;
                let mut token_counts = counts.tokens.iter();
                for ((tenant, own), held) in chunk.iter().zip(&dedicated).zip(&counts.tenants) {
                    let on_own: u32 = token_counts.by_ref().take(own.len()).sum();
                    used.insert(tenant.clone(), f64::from(held.saturating_sub(on_own)));
                }
            }
        }
        Ok(used)
    }

    /// The plan for `upstream_id` from this replica's history.
    pub async fn plan(&self, upstream_id: &Id) -> Result<PlanReport, ServiceError> {
        let live = &self.leaser.config;
        let moved = self
            .read_store(live.store().move_history(upstream_id))
            .await?;
        // The plan must see every move it will be checked against (`unless_moved_after`):
        // another replica's move may be newer than this replica's snapshot.
        if live.current().version < moved.last_version {
            self.read_store(live.refresh_to(moved.last_version)).await?;
        }
        let snapshot = live.current();
        let Some(upstream) = snapshot.upstreams.get(upstream_id) else {
            return Err(ServiceError::NotFound(format!(
                "upstream_id: upstream '{upstream_id}' does not exist"
            )));
        };
        let now = system_now_ms();
        let averages = self
            .histories
            .lock()
            .expect("history lock")
            .get(upstream_id)
            .map(|h| h.averages(now))
            .unwrap_or_default();
        let pools = pool_loads(&snapshot, upstream_id);
        let tenants: Vec<TenantLoad> = tenants_of(&snapshot, upstream_id)
            .into_iter()
            .filter_map(|id| {
                let tenant = &snapshot.tenants[&id];
                let tier = snapshot.tiers.get(&tenant.tier_id)?;
                let own = dedicated_of(&snapshot, &id, upstream_id).len() as u64;
                Some(TenantLoad {
                    guaranteed: drawn_guarantee(tenant.guaranteed(tier), own, upstream) as u32,
                    used: averages.used.get(&id).copied().unwrap_or(0.0),
                    moved_at_ms: moved.moved_at_ms.get(&id).copied(),
                    pool: tenant.pool_id.as_ref()?.as_str().to_owned(),
                    id: id.as_str().to_owned(),
                })
            })
            .collect();
        let moves = plan(&pools, &tenants, self.settings.band, now);
        Ok(PlanReport {
            pools: reports(&pools, &tenants, &moves),
            note: note(
                &pools,
                &tenants,
                &moves,
                self.settings.band,
                averages.samples,
            ),
            moves,
            history: Duration::from_millis(averages.covered_ms as u64),
            band: self.settings.band,
            last_move_version: moved.last_version,
        })
    }

    /// Makes `moves` (or, when `None`, the moves of a plan made now), in order, each as
    /// its own write; a move that no longer applies is skipped with its reason.
    pub async fn apply(
        &self,
        upstream_id: &Id,
        moves: Option<Vec<Move>>,
        mode: MoveMode,
        actor: &str,
    ) -> Result<Vec<MoveOutcome>, ServiceError> {
        let (moves, mut seen) = match moves {
            Some(moves) => (moves, None),
            None => {
                let report = self.plan(upstream_id).await?;
                (report.moves, Some(report.last_move_version))
            }
        };
        let mut outcomes = Vec::with_capacity(moves.len());
        for planned in moves {
            let order = MoveOrder {
                tenant_id: parse(&planned.tenant, "move.tenant_id")?,
                from_pool_id: parse(&planned.from, "move.from_pool_id")?,
                to_pool_id: parse(&planned.to, "move.to_pool_id")?,
                reason: if planned.reason.is_empty() {
                    format!("applied by {actor}")
                } else {
                    planned.reason.clone()
                },
                mode,
                actor: actor.to_owned(),
                unless_moved_after: seen,
            };
            let store = self.leaser.config.store();
            match self.read_store(store.move_tenant(&order)).await {
                Ok((record, _, version)) => {
                    seen = seen.map(|_| record.version);
                    self.moved(&record, version).await;
                    outcomes.push(MoveOutcome::Applied(record));
                }
                Err(ServiceError::FailedPrecondition(reason) | ServiceError::NotFound(reason)) => {
                    outcomes.push(MoveOutcome::Skipped { planned, reason });
                }
                Err(other) => return Err(other),
            }
        }
        Ok(outcomes)
    }

    /// Plans and applies on every upstream whose history covers its span.
    async fn run_automatic(&self) {
        let snapshot = self.leaser.config.current();
        let actor = format!("replica {}", self.events.replica_id());
        let full = self
            .settings
            .history
            .saturating_sub(self.settings.sample_every);
        for upstream in snapshot.upstreams.keys() {
            let covered = self
                .histories
                .lock()
                .expect("history lock")
                .get(upstream)
                .map_or(0, |h| h.averages(system_now_ms()).covered_ms);
            if Duration::from_millis(covered as u64) < full {
                continue;
            }
            match self
                .apply(upstream, None, MoveMode::Automatic, &actor)
                .await
            {
                Ok(outcomes) => log_outcomes(upstream, &outcomes),
                Err(error) => tracing::warn!(%error, %upstream, "automatic rebalancing failed"),
            }
        }
    }

    /// After a move: this replica's snapshot and quotas follow it, and watchers learn.
    async fn moved(&self, record: &TenantMove, version: i64) {
        self.events.publish(EventKind::TenantMoved {
            tenant_id: record.tenant_id.as_str().to_owned(),
            from_pool_id: record.from_pool_id.as_str().to_owned(),
            to_pool_id: record.to_pool_id.as_str().to_owned(),
            cause: record.reason.clone(),
        });
        let (id, timeout) = (record.tenant_id.as_str(), self.database_timeout);
        (self.leaser)
            .follow_write(
                &self.events,
                timeout,
                Resource::Tenant,
                id,
                Change::Updated,
                version,
            )
            .await;
    }

    /// A store call bounded by the database timeout.
    async fn read_store<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, ServiceError> {
        match tokio::time::timeout(self.database_timeout, call).await {
            Ok(result) => result.map_err(ServiceError::from),
            Err(_) => Err(ServiceError::Unavailable {
                message: format!(
                    "the configuration database did not answer within {:?}: a move in \
                     progress may or may not have been made (ListTenantMoves shows those \
                     that were)",
                    self.database_timeout
                ),
                retry_after: BACKEND_RETRY_AFTER,
            }),
        }
    }
}

fn parse(value: &str, field: &str) -> Result<Id, ServiceError> {
    Id::parse(field, value).map_err(ServiceError::from)
}

fn log_outcomes(upstream: &Id, outcomes: &[MoveOutcome]) {
    for outcome in outcomes {
        match outcome {
            MoveOutcome::Applied(m) => tracing::info!(
                %upstream, tenant = %m.tenant_id, from = %m.from_pool_id, to = %m.to_pool_id,
                reason = %m.reason, "rebalancing moved a tenant"
            ),
            MoveOutcome::Skipped { planned, reason } => tracing::info!(
                %upstream, tenant = %planned.tenant, %reason, "rebalancing skipped a move"
            ),
        }
    }
}

/// The pools of `upstream`, by id.
fn pools_of(snapshot: &Snapshot, upstream: &Id) -> Vec<Id> {
    let mut pools: Vec<Id> = snapshot
        .pools
        .values()
        .filter(|p| &p.upstream_id == upstream)
        .map(|p| p.id.clone())
        .collect();
    pools.sort();
    pools
}

/// The tenants in a pool of `upstream`, by id.
fn tenants_of(snapshot: &Snapshot, upstream: &Id) -> Vec<Id> {
    let mut tenants: Vec<Id> = snapshot
        .tenants
        .values()
        .filter(|t| {
            let pool = t.pool_id.as_ref().and_then(|p| snapshot.pools.get(p));
            pool.is_some_and(|p| &p.upstream_id == upstream)
        })
        .map(|t| t.id.clone())
        .collect();
    tenants.sort();
    tenants
}

/// The enabled tokens of `upstream` dedicated to `tenant`, by id.
fn dedicated_of(snapshot: &Snapshot, tenant: &Id, upstream: &Id) -> Vec<Id> {
    let mut own: Vec<Id> = snapshot
        .tokens
        .values()
        .filter(|t| {
            !t.record.disabled
                && &t.record.upstream_id == upstream
                && t.record.owner == TokenOwner::Dedicated(tenant.clone())
        })
        .map(|t| t.record.id.clone())
        .collect();
    own.sort();
    own
}

/// Each pool of `upstream` with the usable capacity of its enabled tokens.
fn pool_loads(snapshot: &Snapshot, upstream: &Id) -> Vec<PoolLoad> {
    pools_of(snapshot, upstream)
        .into_iter()
        .map(|id| PoolLoad {
            capacity: snapshot
                .pool_reports
                .get(&id)
                .map_or(0, |r| r.capacity_per_window),
            id: id.as_str().to_owned(),
        })
        .collect()
}

/// Each pool's use and guarantees before and after `moves`.
fn reports(pools: &[PoolLoad], tenants: &[TenantLoad], moves: &[Move]) -> Vec<PoolReport> {
    pools
        .iter()
        .map(|pool| {
            let mut report = PoolReport {
                pool_id: Id::from_trusted(pool.id.clone()),
                capacity: pool.capacity,
                used: 0.0,
                used_after: 0.0,
                guaranteed: 0,
                guaranteed_after: 0,
            };
            for t in tenants {
                let after = moves
                    .iter()
                    .find(|m| m.tenant == t.id)
                    .map_or(&t.pool, |m| &m.to);
                if t.pool == pool.id {
                    report.used += t.used;
                    report.guaranteed += u64::from(t.guaranteed);
                }
                if *after == pool.id {
                    report.used_after += t.used;
                    report.guaranteed_after += u64::from(t.guaranteed);
                }
            }
            report
        })
        .collect()
}

/// Why a plan has no moves, for people; empty when it has.
fn note(
    pools: &[PoolLoad],
    tenants: &[TenantLoad],
    moves: &[Move],
    band: Band,
    samples: usize,
) -> String {
    if !moves.is_empty() {
        return String::new();
    }
    if samples == 0 {
        return "no usage history yet on this replica: it samples the counters every \
                rebalance.sample_ms; ask again later"
            .into();
    }
    let share = |p: &PoolLoad| {
        let used: f64 = tenants
            .iter()
            .filter(|t| t.pool == p.id)
            .map(|t| t.used)
            .sum();
        used / f64::from(p.capacity.max(1))
    };
    let hot = pools.iter().any(|p| share(p) > band.high);
    let cold = pools.iter().any(|p| share(p) < band.low);
    match (hot, cold) {
        (false, _) => "no pool runs above the band: nothing to move".into(),
        (true, false) => "a pool runs hot but none runs below the band to take its load: \
                          add tokens to the hot pool"
            .into(),
        (true, true) => "no move helps without making the receiving pool hot, breaking its \
                         80 % guarantee rule, or moving a tenant still cooling down from its \
                         last move"
            .into(),
    }
}
