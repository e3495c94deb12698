//! In-process lease counters for the embedded single-node mode. The same decisions as
//! the Redis scripts in `scripts.rs`, taken under one mutex.
//!
//! Why a std `Mutex` and not a tokio one: the critical section is short, does no I/O
//! and never awaits, so a blocking lock is cheaper and cannot be held across a yield.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pace::{Paced, Pacing, refund};
use super::queue::{Demand, DemandCount, WaitQueue, bucket_ms};
use super::{
    AcquireOutcome, AcquireRequest, Denied, DenyReason, Grant, LeaseKey, QueueTicket,
    ReleaseOutcome, ReleaseResult, UsageCounts,
};
use crate::clock::Clock;
use crate::domain::Id;

/// One sliding window: entries ordered by occupancy end.
#[derive(Default)]
struct Window {
    by_end: BTreeSet<(i64, String)>,
    end_of: HashMap<String, i64>,
}

impl Window {
    /// Drops entries that ended before `horizon`; returns how many are left.
    fn trim(&mut self, horizon: i64) -> u32 {
        while let Some(first) = self.by_end.first() {
            if first.0 >= horizon {
                break;
            }
            let (_, member) = self.by_end.pop_first().expect("checked non-empty");
            self.end_of.remove(&member);
        }
        self.by_end.len() as u32
    }

    /// See `free_at` in `scripts::ACQUIRE`.
    fn free_at(&self, now: i64, window_ms: i64, used: u32, cost: u32, limit: u32) -> i64 {
        let k = (used + cost).saturating_sub(limit);
        if k == 0 {
            return now;
        }
        match self.by_end.iter().nth(k as usize - 1) {
            Some((end, _)) => end + window_ms + 1,
            // `cost` exceeds `limit`: no waiting makes room.
            None => never(now, window_ms),
        }
    }

    fn insert(&mut self, member: String, end: i64) {
        if let Some(old) = self.end_of.insert(member.clone(), end) {
            self.by_end.remove(&(old, member.clone()));
        }
        self.by_end.insert((end, member));
    }

    /// Moves an existing entry's end (XX semantics: absent entries stay absent).
    fn move_end(&mut self, member: &str, end: i64) {
        if self.end_of.contains_key(member) {
            self.insert(member.to_owned(), end);
        }
    }

    fn remove(&mut self, member: &str) {
        if let Some(end) = self.end_of.remove(member) {
            self.by_end.remove(&(end, member.to_owned()));
        }
    }
}

struct Lease {
    tenant: Id,
    token: Id,
    cost: u32,
    expires: i64,
    /// The pace each slot of the grant spent (ms), 0 without pacing.
    step: f64,
    outcome: Option<ReleaseOutcome>,
}

/// The request's pacing (`pace.rs`).
fn pacing(req: &AcquireRequest) -> Option<Pacing> {
    Pacing::new(
        req.pace_burst,
        req.window.as_millis() as i64,
        req.token_limit,
    )
}

#[derive(Default)]
struct State {
    windows: HashMap<String, Window>,
    /// Live leases by `lease_key`.
    leases: HashMap<String, Lease>,
    /// Lease expiries, so expired leases are dropped without scanning all leases.
    expiries: BTreeSet<(i64, String)>,
    /// Demand per tenant window key.
    demand: HashMap<String, Demand>,
    /// Wait queues per pool.
    queues: HashMap<String, WaitQueue>,
    /// Pacing schedules per token window key (ms).
    paces: HashMap<String, f64>,
    /// Per upstream, the instant grants may resume from (`Counters::mark_fresh`); a
    /// new process has none, so it holds each upstream once unless marked fresh.
    fences: HashMap<Id, i64>,
}

impl State {
    fn drop_expired_leases(&mut self, now: i64) {
        while let Some(first) = self.expiries.first() {
            if first.0 >= now {
                break;
            }
            let (_, lease_key) = self.expiries.pop_first().expect("checked non-empty");
            self.leases.remove(&lease_key);
        }
    }

    fn window(&mut self, key: String) -> &mut Window {
        self.windows.entry(key).or_default()
    }
}

/// The retry instant of a request no waiting can satisfy (see `scripts::ACQUIRE`).
fn never(now: i64, window_ms: i64) -> i64 {
    now + window_ms
}

/// A call's queue, its ticket and its virtual deadline.
type Queued<'a> = (&'a mut WaitQueue, &'a QueueTicket, i64);

/// What a scan of the candidate tokens found (see `scripts::ACQUIRE`).
struct TokenScan {
    /// The chosen token (index into dedicated ++ pooled) and its slots in use.
    best: Option<(usize, u32)>,
    /// When the earliest full token has room for the call.
    earliest: i64,
    /// Free slots over the pool tokens scanned.
    pool_room: u32,
    /// When the next pool slot frees.
    pool_next_free: i64,
}

/// `blocked`: pool tokens whose health refuses a lease until the instant given (the
/// pool index of the Redis backend keeps them out the same way; dedicated tokens are
/// left to the admission, like there).
fn scan_tokens(
    state: &mut State,
    req: &AcquireRequest,
    now: i64,
    cost: u32,
    blocked: &HashMap<Id, i64>,
) -> TokenScan {
    let window_ms = req.window.as_millis() as i64;
    let n_dedicated = req.dedicated.len();
    let mut scan = TokenScan {
        best: None,
        earliest: never(now, window_ms),
        pool_room: 0,
        pool_next_free: never(now, window_ms),
    };
    let mut earliest: Option<i64> = None;
    for (idx, token) in req.dedicated.iter().chain(req.pooled.iter()).enumerate() {
        if matches!(scan.best, Some((b, _)) if b < n_dedicated) && idx >= n_dedicated {
            break;
        }
        let key = token_key(&req.upstream_id, token);
        let pace = match pacing(req) {
            Some(p) => p.view(state.paces.get(&key).copied(), now, cost, scan.earliest),
            None => Paced {
                room: u32::MAX,
                fits: now,
                grows: scan.earliest,
            },
        };
        let window = state.window(key.clone());
        let used = window.trim(now - window_ms);
        let health_at = blocked
            .get(token)
            .copied()
            .filter(|_| idx >= n_dedicated)
            .unwrap_or(now);
        if health_at > now {
            let free = window.free_at(now, window_ms, used, cost, req.token_limit);
            let at = free.max(pace.fits).max(health_at);
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
            scan.pool_next_free = scan.pool_next_free.min(at);
            continue;
        }
        if idx >= n_dedicated {
            let window_room = req.token_limit.saturating_sub(used);
            scan.pool_room += window_room.min(pace.room);
            if window_room > pace.room {
                scan.pool_next_free = scan.pool_next_free.min(pace.grows);
            } else if let Some((end, _)) = window.by_end.first() {
                scan.pool_next_free = scan.pool_next_free.min(end + window_ms + 1);
            }
        }
        if used + cost <= req.token_limit && pace.fits <= now {
            if scan.best.is_none_or(|(_, best_used)| used < best_used) {
                scan.best = Some((idx, used));
            }
        } else {
            let free = window
                .free_at(now, window_ms, used, cost, req.token_limit)
                .max(pace.fits);
            earliest = Some(earliest.map_or(free, |e| e.min(free)));
            if used + cost > req.token_limit
                && let Some(pacing) = pacing(req)
            {
                pacing.drain(state.paces.entry(key).or_insert(now as f64), now);
            }
        }
    }
    scan.earliest = earliest.unwrap_or(scan.earliest);
    scan
}

/// Records a grant in both windows and the lease table.
fn record_grant(state: &mut State, req: &AcquireRequest, token: &Id, now: i64, cost: u32) {
    let expires = now + req.lease_ttl.as_millis() as i64;
    for i in 1..=cost {
        let member = format!("{}#{i}", req.nonce);
        state
            .window(tenant_key(&req.upstream_id, &req.tenant_id))
            .insert(member.clone(), expires);
        state
            .window(token_key(&req.upstream_id, token))
            .insert(member, expires);
    }
    let pacing = pacing(req);
    if let Some(pacing) = pacing {
        let key = token_key(&req.upstream_id, token);
        pacing.spend(state.paces.entry(key).or_insert(now as f64), now, cost);
    }
    let lease_key = lease_key(&req.upstream_id, &req.nonce);
    let lease = Lease {
        tenant: req.tenant_id.clone(),
        token: token.clone(),
        cost,
        expires,
        step: pacing.map_or(0.0, |p| p.step()),
        outcome: None,
    };
    state.leases.insert(lease_key.clone(), lease);
    state.expiries.insert((expires, lease_key));
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

/// Leases are per upstream, as in Redis: an id naming another upstream finds nothing.
fn lease_key(upstream: &Id, nonce: &str) -> String {
    format!("{upstream}/lease/{nonce}")
}

/// In-process counters; cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct MemoryCounters {
    state: Arc<Mutex<State>>,
    pub(super) clock: Clock,
    /// Token health (breaker, quarantine): see `breaker_memory.rs`.
    pub(super) health: Arc<Mutex<super::breaker_memory::HealthBook>>,
}

impl MemoryCounters {
    pub fn new(clock: Clock) -> Self {
        Self {
            state: Arc::default(),
            clock,
            health: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a window half-updated in a way
        // that breaks the limit (entries are added after all checks), so keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn mark_fresh(&self, upstream: &Id) {
        self.lock().fences.entry(upstream.clone()).or_insert(0);
    }

    pub fn acquire(&self, req: &AcquireRequest) -> AcquireOutcome {
        let now = self.clock.now_ms();
        let window_ms = req.window.as_millis() as i64;
        // Every lease allows at least one call, so it takes at least one slot.
        let cost = req.cost.max(1);
        // Read before the state's lock: the two locks are never held together.
        let blocked = self.health_blocked(&req.upstream_id, now);
        let mut guard = self.lock();
        let state = &mut *guard;
        let (resume_at, reason) = match state.fences.get(&req.upstream_id) {
            Some(&at) => (at, DenyReason::CountersLost),
            None => {
                let at = now + window_ms + req.lease_ttl.as_millis() as i64;
                state.fences.insert(req.upstream_id.clone(), at);
                (at, DenyReason::CountersLostNoticed)
            }
        };
        if resume_at > now {
            return AcquireOutcome::Denied(Denied {
                reason,
                retry_after: Duration::from_millis((resume_at - now) as u64),
                now_ms: now,
                queue_score: None,
            });
        }
        state.drop_expired_leases(now);
        let tenant_key = tenant_key(&req.upstream_id, &req.tenant_id);
        let bucket = now.div_euclid(bucket_ms(window_ms));
        if req.count_demand {
            state
                .demand
                .entry(tenant_key.clone())
                .or_default()
                .record(bucket, cost);
        }
        let tenant_used = state.window(tenant_key.clone()).trim(now - window_ms);
        let scan = scan_tokens(state, req, now, cost, &blocked);
        let mut queue = req.queue.as_ref().map(|ticket| {
            let queue = state
                .queues
                .entry(queue_key(&req.upstream_id, &ticket.queue_id))
                .or_default();
            queue.purge(now);
            let score = ticket.score.unwrap_or(now + ticket.priority_offset_ms);
            (queue, ticket, score)
        });
        let unmet = |state_demand: &mut HashMap<String, Demand>| {
            if req.count_demand {
                state_demand
                    .entry(tenant_key.clone())
                    .or_default()
                    .record_unmet(bucket, cost);
            }
        };
        let deny = |queue: &mut Option<Queued>, reason, at: i64, eligible: i64| {
            let queue_score = queue.as_mut().map(|(queue, ticket, score)| {
                if ticket.wait_ms > 0 {
                    queue.enqueue(&req.nonce, *score, now + ticket.wait_ms, eligible);
                }
                *score
            });
            AcquireOutcome::Denied(Denied {
                reason,
                retry_after: Duration::from_millis((at - now).max(0) as u64),
                now_ms: now,
                queue_score,
            })
        };
        if tenant_used + cost > req.tenant_limit {
            let window = state.windows.get(&tenant_key).expect("trimmed above");
            let free = window.free_at(now, window_ms, tenant_used, cost, req.tenant_limit);
            // Both limits bind: name the one that frees last (the upstream's on a tie).
            unmet(&mut state.demand);
            if scan.best.is_none() && scan.earliest >= free {
                return deny(&mut queue, DenyReason::NoTokenCapacity, scan.earliest, free);
            }
            return deny(&mut queue, DenyReason::TenantQuota, free, free);
        }
        let Some((idx, token_used)) = scan.best else {
            // No dedicated token passed and every pool token out of service: that is
            // the reason, not a full pool (as the Redis script says it).
            let all_out = req.dedicated.is_empty()
                && !req.pooled.is_empty()
                && req.pooled.iter().all(|t| blocked.contains_key(t));
            let reason = if all_out {
                DenyReason::NoUsableToken
            } else {
                DenyReason::NoTokenCapacity
            };
            return deny(&mut queue, reason, scan.earliest, now);
        };
        if idx >= req.dedicated.len()
            && let Some((q, _, score)) = queue.as_ref()
            && q.count_ahead(*score, &req.nonce, now, scan.pool_room) + cost > scan.pool_room
        {
            return deny(
                &mut queue,
                DenyReason::NoTokenCapacity,
                scan.pool_next_free,
                now,
            );
        }
        if let Some((q, _, _)) = queue.as_mut() {
            q.remove(&req.nonce);
        }
        let token = req
            .dedicated
            .iter()
            .chain(req.pooled.iter())
            .nth(idx)
            .expect("index from the scan")
            .clone();
        record_grant(state, req, &token, now, cost);
        AcquireOutcome::Granted(Grant {
            token_id: token,
            now_ms: now,
            expires_at_ms: now + req.lease_ttl.as_millis() as i64,
            tenant_used: tenant_used + cost,
            token_used: token_used + cost,
            probe: false,
            transitions: Vec::new(),
        })
    }

    pub fn leave_queue(&self, upstream: &Id, queue_id: &str, nonce: &str) {
        if let Some(queue) = self.lock().queues.get_mut(&queue_key(upstream, queue_id)) {
            queue.remove(nonce);
        }
    }

    /// The tenants' demand over the last completed buckets, and the current bucket.
    pub fn demand(
        &self,
        upstream: &Id,
        window: Duration,
        tenants: &[Id],
    ) -> (i64, Vec<DemandCount>) {
        let bucket = self
            .clock
            .now_ms()
            .div_euclid(bucket_ms(window.as_millis() as i64));
        let state = self.lock();
        let counts = tenants
            .iter()
            .map(|t| {
                state
                    .demand
                    .get(&tenant_key(upstream, t))
                    .map_or_else(DemandCount::default, |d| d.completed(bucket))
            })
            .collect();
        (bucket, counts)
    }

    pub fn release(&self, key: &LeaseKey, outcome: ReleaseOutcome) -> ReleaseResult {
        let now = self.clock.now_ms();
        let mut state = self.lock();
        state.drop_expired_leases(now);
        let Some(lease) = state
            .leases
            .get_mut(&lease_key(&key.upstream_id, &key.nonce))
        else {
            return ReleaseResult::NotFound;
        };
        if lease.tenant != key.tenant_id || lease.token != key.token_id || lease.expires < now {
            return ReleaseResult::NotFound;
        }
        match lease.outcome {
            Some(previous) if previous == outcome => return ReleaseResult::AlreadyReleased,
            Some(previous) => return ReleaseResult::Conflict { previous },
            None => lease.outcome = Some(outcome),
        }
        let (cost, step) = (lease.cost, lease.step);
        if outcome == ReleaseOutcome::NotUsed
            && let Some(schedule) = state
                .paces
                .get_mut(&token_key(&key.upstream_id, &key.token_id))
        {
            refund(schedule, now, cost, step);
        }
        let keys = [
            tenant_key(&key.upstream_id, &key.tenant_id),
            token_key(&key.upstream_id, &key.token_id),
        ];
        for key_name in keys {
            let window = state.window(key_name);
            for i in 1..=cost {
                let member = format!("{}#{i}", key.nonce);
                if outcome == ReleaseOutcome::NotUsed {
                    window.remove(&member);
                } else {
                    window.move_end(&member, now);
                }
            }
        }
        ReleaseResult::Released
    }

    pub fn usage(
        &self,
        upstream: &Id,
        window: Duration,
        tenants: &[Id],
        tokens: &[Id],
    ) -> UsageCounts {
        let horizon = self.clock.now_ms() - window.as_millis() as i64;
        let mut state = self.lock();
        let mut count = |key: String| state.windows.get_mut(&key).map_or(0, |w| w.trim(horizon));
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
