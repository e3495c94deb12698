//! The lease ledger: the model of the lease counters, as pure code (no I/O, no clock:
//! every operation takes `now`). The embedded mode wraps one `Ledger` in a mutex
//! (`store::counters::MemoryCounters`); the Redis scripts (`store::counters::scripts`,
//! `index_scripts`, `breaker_scripts`) are its transliteration, and a differential test
//! (`store::counters::tests::differential`) replays random operations on both and
//! compares every reply and, after each operation, the windows, the wait queue, the
//! tokens' health records and the pool index.
//!
//! - `window.rs`: one sliding window; `pace.rs`: a token's pacing (GCRA);
//!   `queue.rs`: a tenant's demand and a pool's wait queue; `breaker.rs`: a token's
//!   breaker and quarantine; `health.rs`: every token's health; `acquire.rs`: the
//!   decision; this file: the ledger, releases and reads.
//!
//! # The accounting that keeps the upstream under its limit
//!
//! A lease granted at `g` and valid until `e = g + T` may be used at any instant of
//! `[g, e]`. The upstream counts requests in every window `[s, s + W]`. So each grant is
//! stored as an *occupancy interval* that ends at `e` (score = `e` in the window), and a
//! new grant at `now` is allowed only if the entries with `end ≥ now − W`, plus the new
//! ones, fit in the limit. Why that is enough: the grants whose use can fall in some
//! window `[s, s + W]` are those with `g ≤ s + W` and `e ≥ s`. The last of them to be
//! granted, at `g_last ≤ s + W`, saw every other one with `e ≥ s ≥ g_last − W` and
//! refused itself if they were too many. For unreleased leases this is a sliding window
//! of length `W + T` over grant times; a release with an outcome that used the lease
//! shortens the interval to end at the release (the call was over by then); "not used"
//! removes it.
//!
//! Time is the store's own clock (Redis `TIME`, or the process clock in memory), never
//! a replica's: replicas may disagree about time, the store does not.
//!
//! # When the counters are lost
//!
//! The argument above needs every earlier grant to be in the windows. When they are
//! gone (Redis restarted without persistence, a flushed key, a new embedded process),
//! the upstream's *fence* is gone with them: the first decision that finds it missing
//! sets it to `now + W + T` (T including the use grace) and nothing is granted before.
//! A grant made before the loss, at `g ≤ now`, is used by `g + T` and its request
//! leaves every window by `g + T + W ≤ now + W + T`; a grant from the fence on shares
//! no window with it, and grants after the fence are counted as above. A new upstream
//! is marked fresh when it is created (`Counters::mark_fresh`), so only a loss holds.
//!
//! A partial loss looks different: a Redis restarted from a snapshot or an AOF written
//! every second, or a replica promoted by a failover, has the fence but may lack the
//! last grants. So the fence also names the Redis process that last confirmed it (its
//! `run_id`); a decision on another process treats the counters as lost in the same way,
//! unless the deployment declares that its Redis keeps every acknowledged write
//! (`redis.durable`). Not covered: a failover inside a Redis Cluster, where keys also
//! move between nodes whole when slots are resharded, so a new node cannot mean a loss
//! (run each shard with `min-replicas-to-write` and AOF). The embedded mode has no such
//! case: its counters live and die with the process.
//!

mod acquire;
mod breaker;
mod health;
mod pace;
mod pool_index;
mod queue;
mod types;
mod window;

pub use pool_index::pool_digest;
pub use queue::{BUCKETS_PER_WINDOW, DemandCount, bucket_ms};
pub use types::*;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::domain::Id;
use pace::refund;
use queue::{Demand, WaitQueue};
use window::{Nonce, Window};

/// A released lease's pool index: its digest, the token's position, and whether the
/// release came after the lease's expiry.
type PoolPlace = (Arc<str>, i64, bool);

/// A lease in the lease table: its upstream (interned) and nonce.
type LeaseName = (Arc<str>, Nonce);

/// A lease, live or within W of its expiry. The table holds every grant of the last
/// W + TTL (over a million at 20,000 grants a second), so a lease allocates nothing of
/// its own: names are shared (`Ledger::names`), the nonce is a number.
struct Lease {
    tenant: Arc<str>,
    token: Arc<str>,
    cost: u32,
    expires: i64,
    /// The pace each slot of the grant spent (ms), 0 without pacing.
    step: f64,
    outcome: Option<ReleaseOutcome>,
    /// A pool token's index (its digest) and position there.
    pool: Option<(Arc<str>, i64)>,
    window_ms: i64,
}

/// The state of every upstream's counters. Keys name things as the Redis keys do
/// (`<upstream>/tw/<tenant>`, `<upstream>/kw/<token>`, …), so that one ledger holds
/// every upstream.
#[derive(Default)]
pub struct Ledger {
    windows: HashMap<String, Window>,
    /// Leases by upstream and nonce, until their expiry + W (releases are accepted so
    /// long).
    leases: HashMap<LeaseName, Lease>,
    /// When each lease is forgotten, so that old leases are dropped without scanning.
    expiries: BTreeSet<(i64, LeaseName)>,
    /// The upstream, tenant and token ids and pool digests the leases name, each kept
    /// once. It grows only with the configuration (ids and token lists that were
    /// granted through), not with grants.
    names: HashSet<Arc<str>>,
    /// Demand per tenant window key.
    demand: HashMap<String, Demand>,
    /// Wait queues per pool.
    queues: HashMap<String, WaitQueue>,
    /// Pacing schedules per token window key (ms).
    paces: HashMap<String, f64>,
    /// Per upstream, the instant grants may resume from (`mark_fresh`); a new ledger
    /// has none, so it holds each upstream once unless marked fresh.
    fences: HashMap<Id, i64>,
    health: health::HealthBook,
    /// Pool indexes by `<upstream>/<digest>` (`pool_index.rs`).
    indexes: HashMap<String, pool_index::PoolIndex>,
}

fn queue_key(upstream: &Id, queue_id: &str) -> String {
    format!("{upstream}/wq/{queue_id}")
}

fn tenant_key(upstream: &Id, tenant: &Id) -> String {
    format!("{upstream}/tw/{tenant}")
}

fn token_key(upstream: &Id, token: &Id) -> String {
    format!("{upstream}/kw/{token}")
}

impl Ledger {
    /// Marks an upstream's counters complete: no hold before its first grant.
    pub fn mark_fresh(&mut self, upstream: &Id) {
        self.fences.entry(upstream.clone()).or_insert(0);
    }

    /// `name`, shared.
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.names.insert(name.clone());
        name
    }

    /// The windows and pool indexes, sorted, as the differential test prints them
    /// beside Redis's keys when the two disagree.
    #[cfg(test)]
    pub fn dump(&self) -> String {
        let mut out: Vec<String> = self
            .windows
            .iter()
            .map(|(key, w)| format!("{key}: {}", w.dump()))
            .chain(
                self.indexes
                    .iter()
                    .map(|(key, i)| format!("{key}: {}", i.dump())),
            )
            .collect();
        out.sort();
        out.join("\n")
    }

    /// The ends of the entries at or after `horizon` in the window of a tenant or a
    /// token (`kind` `tw` or `kw`), earliest first (the differential test).
    #[cfg(test)]
    pub fn window_ends(&self, upstream: &Id, kind: &str, id: &Id, horizon: i64) -> Vec<i64> {
        let key = match kind {
            "tw" => tenant_key(upstream, id),
            _ => token_key(upstream, id),
        };
        self.windows
            .get(&key)
            .map_or_else(Vec::new, |w| w.ends_from(horizon))
    }

    /// The live waiters of a wait queue (`WaitQueue::live`; the differential test).
    #[cfg(test)]
    pub fn waiters(&self, upstream: &Id, queue_id: &str, now: i64) -> Vec<(i64, String, i64)> {
        self.queues
            .get(&queue_key(upstream, queue_id))
            .map_or_else(Vec::new, |q| q.live(now))
    }

    /// The sets of the upstream's pool index (`ready`, `wait`, `out`), when it has one
    /// (the differential test).
    #[cfg(test)]
    pub fn index_sets(&self, upstream: &Id) -> Option<[Vec<(i64, String)>; 3]> {
        self.index_of(upstream).map(pool_index::PoolIndex::sets)
    }

    /// The upstream's pool index, when it has one (the differential test's runs have
    /// one pool).
    #[cfg(test)]
    fn index_of(&self, upstream: &Id) -> Option<&pool_index::PoolIndex> {
        let prefix = format!("{upstream}/");
        self.indexes
            .iter()
            .find(|(key, _)| key.starts_with(&prefix))
            .map(|(_, index)| index)
    }

    fn window(&mut self, key: String) -> &mut Window {
        self.windows.entry(key).or_default()
    }

    fn drop_expired_leases(&mut self, now: i64) {
        while let Some(first) = self.expiries.first() {
            if first.0 >= now {
                break;
            }
            let (_, lease_key) = self.expiries.pop_first().expect("checked non-empty");
            self.leases.remove(&lease_key);
        }
    }

    /// Takes a waiter out of its queue.
    pub fn leave_queue(&mut self, upstream: &Id, queue_id: &str, nonce: &str) {
        if let Some(queue) = self.queues.get_mut(&queue_key(upstream, queue_id)) {
            queue.remove(nonce);
        }
    }

    /// The tenants' demand over the last completed buckets, and the current bucket.
    pub fn demand(
        &self,
        upstream: &Id,
        window: Duration,
        tenants: &[Id],
        now: i64,
    ) -> (i64, Vec<DemandCount>) {
        let bucket = now.div_euclid(bucket_ms(window.as_millis() as i64));
        let counts = tenants
            .iter()
            .map(|t| {
                self.demand
                    .get(&tenant_key(upstream, t))
                    .map_or_else(DemandCount::default, |d| d.completed(bucket))
            })
            .collect();
        (bucket, counts)
    }

    /// Records a lease's outcome: "not used" gives its slots (and its pace) back, any
    /// other outcome ends its occupancy now. A release after the lease's expiry, until
    /// expiry + W while its slots are still counted, records the outcome and changes no
    /// slot: the call may have run until the expiry (a slow call started at the last
    /// instant). Later, the lease is unknown.
    pub fn release(&mut self, key: &LeaseKey, outcome: ReleaseOutcome, now: i64) -> ReleaseResult {
        let (result, pool) = self.release_slots(key, outcome, false, now);
        self.reindex(
            key,
            outcome,
            result == ReleaseResult::Released,
            false,
            pool,
            now,
        );
        result
    }

    /// `release`, then the outcome fed to the token's health when the release was a
    /// first or a repeated one with the same outcome (as `scripts::RELEASE` does).
    pub fn release_reporting(
        &mut self,
        report: &OutcomeReport,
        now: i64,
    ) -> (ReleaseResult, Option<Recorded>) {
        let key = &report.key;
        let (result, pool) = self.release_slots(key, report.outcome, true, now);
        let fed = matches!(
            result,
            ReleaseResult::Released | ReleaseResult::AlreadyReleased
        );
        let recorded = fed.then(|| self.record_outcome(report, now));
        let applied = recorded.as_ref().is_some_and(|r| r.applied);
        let released = result == ReleaseResult::Released;
        self.reindex(key, report.outcome, released, applied, pool, now);
        (result, recorded)
    }

    /// The release itself; with the lease's place in its pool index when the lease is
    /// known. A release `fed` to the token's health leaves a record without that place
    /// (`scripts::RELEASE`): a repeat of it changes the health at most, and the token's
    /// place follows at the next decision that meets it. One not fed keeps the place,
    /// so that a repeat fed later moves the token.
    fn release_slots(
        &mut self,
        key: &LeaseKey,
        outcome: ReleaseOutcome,
        fed: bool,
        now: i64,
    ) -> (ReleaseResult, Option<PoolPlace>) {
        self.drop_expired_leases(now);
        // Leases are per upstream, as in Redis: an id naming another upstream finds
        // nothing. An upstream never named has no lease.
        let Some(upstream) = self.names.get(key.upstream_id.as_str()).cloned() else {
            return (ReleaseResult::NotFound, None);
        };
        let nonce = Nonce::of(&key.nonce);
        let Some(lease) = self.leases.get_mut(&(upstream, nonce.clone())) else {
            return (ReleaseResult::NotFound, None);
        };
        let counted_until = lease.expires + lease.window_ms;
        let names_it =
            *lease.tenant == *key.tenant_id.as_str() && *lease.token == *key.token_id.as_str();
        if !names_it || counted_until < now {
            return (ReleaseResult::NotFound, None);
        }
        let late = lease.expires < now;
        // A late release changes no slot, so the index has nothing to follow but health.
        let pool = lease.pool.clone().map(|(d, p)| (d, p, late));
        match lease.outcome {
            Some(previous) if previous == outcome => {
                return (ReleaseResult::AlreadyReleased, pool);
            }
            Some(previous) => return (ReleaseResult::Conflict { previous }, pool),
            None => lease.outcome = Some(outcome),
        }
        if fed {
            lease.pool = None;
        }
        if late {
            return (ReleaseResult::Released, pool);
        }
        let (cost, step, end) = (lease.cost, lease.step, lease.expires);
        let token_key = token_key(&key.upstream_id, &key.token_id);
        if outcome == ReleaseOutcome::NotUsed
            && let Some(&schedule) = self.paces.get(&token_key)
        {
            let mut tat = schedule;
            refund(&mut tat, now, cost, step);
            if tat != schedule {
                self.set_schedule(&key.upstream_id, &key.token_id, tat);
            }
        }
        for key_name in [tenant_key(&key.upstream_id, &key.tenant_id), token_key] {
            let window = self.window(key_name);
            // Until this one release, the lease's slots end at its expiry.
            if outcome == ReleaseOutcome::NotUsed {
                window.remove(&nonce, cost, end);
            } else {
                window.move_end(&nonce, cost, end, now);
            }
        }
        (ReleaseResult::Released, pool)
    }

    /// A pool token's place in its pool's index follows what a release changed: its
    /// use ("not used"), its health (`applied`), or the instant a full token frees; on
    /// a token with room another outcome only moves the instant its use next drops,
    /// which the index does not keep exactly for a ready token (`pool_index`).
    fn reindex(
        &mut self,
        key: &LeaseKey,
        outcome: ReleaseOutcome,
        released: bool,
        applied: bool,
        pool: Option<PoolPlace>,
        now: i64,
    ) {
        let Some((digest, pos, late)) = pool else {
            return;
        };
        let released = released && !late;
        let index_key = format!("{}/{digest}", key.upstream_id);
        let Some(mut index) = self.indexes.remove(&index_key).filter(|i| i.expires > now) else {
            return;
        };
        let token = &key.token_id;
        // Whether the token is out for its window or its health: `x:<digest>` in Redis.
        let moved = released && (outcome == ReleaseOutcome::NotUsed || index.names(token));
        if moved || applied {
            self.pi_refresh(&key.upstream_id, &mut index, token, pos, false, now);
        }
        self.indexes.insert(index_key, index);
    }

    /// Slots held at `now`, for one upstream's tenants and tokens.
    pub fn usage(
        &mut self,
        upstream: &Id,
        window: Duration,
        tenants: &[Id],
        tokens: &[Id],
        now: i64,
    ) -> UsageCounts {
        let horizon = now - window.as_millis() as i64;
        let mut count = |key: String| self.windows.get_mut(&key).map_or(0, |w| w.trim(horizon));
        UsageCounts {
            tenants: tenants
                .iter()
                .map(|t| count(tenant_key(upstream, t)))
                .collect(),
            tokens: tokens
                .iter()
                .map(|t| count(token_key(upstream, t)))
                .collect(),
        }
    }
}
