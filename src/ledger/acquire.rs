//! The acquire decision: `scripts::ACQUIRE` is its transliteration, step by step (the
//! fence, the demand count, the tenant's window, the dedicated tokens, the pool index,
//! the wait queue, the chosen token's health, then the grant's record).

use std::sync::Arc;
use std::time::Duration;

use super::pace::Pacing;
use super::pool_index::{Chosen, PoolIndex, PoolRoom};
use super::queue::{GUARANTEED_AHEAD_MS, bucket_ms};
use super::types::{
    AcquireOutcome, AcquireRequest, Admission, Denied, DenyReason, Grant, Unhealthy,
};
use super::window::{Nonce, never};
use super::{Lease, Ledger, queue_key, tenant_key, token_key};
use crate::domain::Id;

/// The request's pacing (`pace.rs`).
fn pacing(req: &AcquireRequest) -> Option<Pacing> {
    Pacing::new(
        req.pace_burst,
        req.window.as_millis() as i64,
        req.token_limit,
    )
}

/// The token a decision chose: dedicated (its index) or from the pool.
struct Best {
    token: Id,
    /// Its slots in use.
    used: u32,
    pool: Option<Chosen>,
}

/// One decision's fixed inputs.
#[derive(Clone, Copy)]
struct Call<'a> {
    req: &'a AcquireRequest,
    now: i64,
    cost: u32,
    window_ms: i64,
    bucket: i64,
    /// The caller's virtual deadline, when it takes part in the queue.
    score: Option<i64>,
    /// Its place in the queue: the score, moved ahead of every tenant beyond its
    /// guarantee while its own tenant is within (set once the tenant's use is known).
    rank: Option<i64>,
}

impl Ledger {
    /// Decides one lease at `now` and records it when granted.
    pub fn acquire(&mut self, req: &AcquireRequest, now: i64) -> AcquireOutcome {
        if let Some(held) = self.fenced(req, now) {
            return held;
        }
        let window_ms = req.window.as_millis() as i64;
        let call = Call {
            req,
            now,
            // Every lease allows at least one call, so it takes at least one slot.
            cost: req.cost.max(1),
            window_ms,
            bucket: now.div_euclid(bucket_ms(window_ms)),
            score: req
                .queue
                .as_ref()
                .map(|q| q.score.unwrap_or(now + q.priority_offset_ms)),
            rank: None,
        };
        let mut index = (!req.pooled.is_empty()).then(|| self.take_index(req, now));
        let outcome = self.decide(&call, index.as_mut());
        if let Some(index) = index {
            self.put_index(&req.upstream_id, index);
        }
        outcome
    }

    /// The upstream's fence: a hold (counters lost, or a new process) denies the call.
    fn fenced(&mut self, req: &AcquireRequest, now: i64) -> Option<AcquireOutcome> {
        let (resume_at, reason) = match self.fences.get(&req.upstream_id) {
            Some(&at) => (at, DenyReason::CountersLost),
            None => {
                let ttl = req.lease_ttl.as_millis() as i64;
                let at = now + req.window.as_millis() as i64 + ttl;
                self.fences.insert(req.upstream_id.clone(), at);
                (at, DenyReason::CountersLostNoticed)
            }
        };
        let held = Denied {
            reason,
            retry_after: Duration::from_millis((resume_at - now) as u64),
            now_ms: now,
            queue_score: None,
        };
        (resume_at > now).then_some(AcquireOutcome::Denied(held))
    }

    fn decide(&mut self, call: &Call, mut index: Option<&mut PoolIndex>) -> AcquireOutcome {
        let (req, now, cost) = (call.req, call.now, call.cost);
        let tenant_key = tenant_key(&req.upstream_id, &req.tenant_id);
        if req.count_demand {
            let demand = self.demand.entry(tenant_key.clone()).or_default();
            demand.record(call.bucket, cost);
        }
        let has_waiters = req.queue.as_ref().is_some_and(|ticket| {
            let key = queue_key(&req.upstream_id, &ticket.queue_id);
            let queue = self.queues.entry(key).or_default();
            queue.purge(now);
            !queue.is_empty()
        });
        let tenant_used = self.window(tenant_key.clone()).trim(now - call.window_ms);
        let within_guarantee = req
            .queue
            .as_ref()
            .is_some_and(|q| tenant_used + cost <= q.guaranteed);
        let call = &Call {
            rank: call
                .score
                .map(|s| s - i64::from(within_guarantee) * GUARANTEED_AHEAD_MS),
            ..*call
        };
        let (mut best, mut earliest) = self.scan_dedicated(call);
        if let Some(index) = index.as_deref_mut() {
            if best.is_none() {
                match self.pi_choose(&req.upstream_id, index, cost, now) {
                    Some(chosen) => {
                        let (token, used) = (chosen.token.clone(), chosen.used);
                        best = Some(Best {
                            token,
                            used,
                            pool: Some(chosen),
                        });
                    }
                    None => {
                        let at = self.pi_earliest(&req.upstream_id, index, cost, now);
                        earliest = Some(earliest.map_or(at, |e: i64| e.min(at)));
                    }
                }
            }
            if req.pace_burst > 0 {
                index.asked = now;
            }
        }
        let earliest = earliest.unwrap_or(never(now, call.window_ms));
        if tenant_used + cost > req.tenant_limit {
            let window = &self.windows[&tenant_key];
            let free = window.free_at(now, call.window_ms, tenant_used, cost, req.tenant_limit);
            // Both limits bind: name the one that frees last (the upstream's on a tie).
            if best.is_none() && earliest >= free {
                return self.deny(call, DenyReason::NoTokenCapacity, earliest, free, true);
            }
            return self.deny(call, DenyReason::TenantQuota, free, free, true);
        }
        let Some(best) = best else {
            // No dedicated token passed and every pool token out of service: that is
            // the reason, not a full pool.
            let all_out = req.dedicated.is_empty() && index.is_some_and(|i| i.all_out());
            let reason = if all_out {
                DenyReason::NoUsableToken
            } else {
                DenyReason::NoTokenCapacity
            };
            return self.deny(call, reason, earliest, now, false);
        };
        if let (true, Some(index)) = (has_waiters && best.pool.is_some(), index.as_deref_mut())
            && let Some(grows) = self.waiters_ahead_fill(call, index)
        {
            // Room comes back when a token can take a slot again (*wait*), or when a
            // ready token's pace grows or its use drops.
            let at = self.pi_earliest(&req.upstream_id, index, 1, now);
            let at = grows.map_or(at, |g| at.min(g));
            return self.deny(call, DenyReason::NoTokenCapacity, at, now, false);
        }
        self.admit_and_grant(call, best, tenant_used, index)
    }

    /// The dedicated tokens, least used first: the best with room, or when the first
    /// full one has room (`None`: no dedicated token).
    fn scan_dedicated(&mut self, call: &Call) -> (Option<Best>, Option<i64>) {
        let (req, now, cost) = (call.req, call.now, call.cost);
        let (mut best, mut earliest): (Option<Best>, Option<i64>) = (None, None);
        for token in &req.dedicated {
            let key = token_key(&req.upstream_id, token);
            let window = self.windows.entry(key.clone()).or_default();
            let used = window.trim(now - call.window_ms);
            let room = used + cost <= req.token_limit;
            let free = window.free_at(now, call.window_ms, used, cost, req.token_limit);
            let pace = pacing(req).map(|p| {
                let schedule = self.paces.get(&key).copied();
                (p, schedule, p.view(schedule, now, cost, i64::MAX).fits)
            });
            let pace_fits = pace.map_or(now, |(_, _, fits)| fits);
            let beats = best.as_ref().is_none_or(|b| used < b.used);
            if room && pace_fits <= now {
                if beats {
                    best = Some(Best {
                        token: token.clone(),
                        used,
                        pool: None,
                    });
                }
            } else {
                let at = free.max(pace_fits);
                earliest = Some(earliest.map_or(at, |e| e.min(at)));
                if let (false, Some((pacing, schedule, _))) = (room, pace) {
                    let tat = schedule.unwrap_or(now as f64);
                    let mut drained = tat;
                    pacing.drain(&mut drained, now);
                    if drained != tat {
                        self.set_schedule(&req.upstream_id, token, drained);
                    }
                }
            }
        }
        (best, earliest)
    }

    /// Whether the waiters ahead of the caller that could use a slot now leave it no
    /// room among the ready pool tokens: `Some` when they do, with the first instant a
    /// ready token's pace grows or its use drops (every ready token was walked then).
    fn waiters_ahead_fill(&self, call: &Call, index: &PoolIndex) -> Option<Option<i64>> {
        let (req, now, cost) = (call.req, call.now, call.cost);
        let (Some(ticket), Some(rank)) = (&req.queue, call.rank) else {
            return None;
        };
        let queue = &self.queues[&queue_key(&req.upstream_id, &ticket.queue_id)];
        let upstream = &req.upstream_id;
        let mut room = self.pool_room(upstream, index, PoolRoom::default(), cost, now);
        let mut ahead = 0;
        for _ in queue.eligible_ahead(rank, &req.nonce, now) {
            ahead += 1;
            room = self.pool_room(upstream, index, room, ahead + cost, now);
            if ahead + cost > room.slots {
                break;
            }
        }
        (ahead + cost > room.slots).then(|| [room.grows, room.drops].into_iter().flatten().min())
    }

    /// Denies, queueing the caller when it waits; `eligible` is when it could use a
    /// slot; `over_quota` counts the call as demand its quota did not meet.
    fn deny(
        &mut self,
        call: &Call,
        reason: DenyReason,
        at: i64,
        eligible: i64,
        over_quota: bool,
    ) -> AcquireOutcome {
        let (req, now) = (call.req, call.now);
        if req.count_demand && over_quota {
            let key = tenant_key(&req.upstream_id, &req.tenant_id);
            self.demand
                .entry(key)
                .or_default()
                .record_unmet(call.bucket, call.cost);
        }
        if let (Some(ticket), Some(rank)) = (&req.queue, call.rank)
            && ticket.wait_ms > 0
        {
            let key = queue_key(&req.upstream_id, &ticket.queue_id);
            let queue = self.queues.entry(key).or_default();
            queue.enqueue(&req.nonce, rank, now + ticket.wait_ms, eligible);
        }
        AcquireOutcome::Denied(Denied {
            reason,
            retry_after: Duration::from_millis((at - now).max(0) as u64),
            now_ms: now,
            queue_score: call.score,
        })
    }

    /// The chosen token's health has the last word: a refused token is reported and
    /// nothing is recorded (the caller routes around it); otherwise the grant is
    /// recorded and the caller leaves its queue.
    fn admit_and_grant(
        &mut self,
        call: &Call,
        best: Best,
        tenant_used: u32,
        index: Option<&mut PoolIndex>,
    ) -> AcquireOutcome {
        let (req, now, cost) = (call.req, call.now, call.cost);
        let expires = now + req.lease_ttl.as_millis() as i64;
        let upstream = &req.upstream_id;
        let admitted = self.admit_grant(upstream, &best.token, &req.nonce, expires, now);
        let probe = match admitted.admission {
            Admission::Leasable => false,
            Admission::Probe => true,
            Admission::Refused { state, until_ms } => {
                if let (Some(chosen), Some(index)) = (&best.pool, index) {
                    self.pi_refresh(upstream, index, &chosen.token, chosen.pos, false, now);
                }
                return AcquireOutcome::Unhealthy(Unhealthy {
                    token_id: best.token,
                    state,
                    until_ms,
                    now_ms: now,
                    transitions: admitted.transitions,
                });
            }
        };
        if let Some(ticket) = req.queue.as_ref().filter(|t| t.score.is_some()) {
            let key = queue_key(upstream, &ticket.queue_id);
            if let Some(queue) = self.queues.get_mut(&key) {
                queue.remove(&req.nonce);
            }
        }
        let pool = best
            .pool
            .as_ref()
            .zip(index.as_deref())
            .map(|(c, i)| (i.digest.clone(), c.pos));
        self.record_grant(req, &best, pool, now, cost);
        if let (Some(chosen), Some(index)) = (&best.pool, index) {
            let used = best.used + cost;
            self.pi_granted(upstream, index, chosen, used, (expires, probe), now);
        }
        AcquireOutcome::Granted(Grant {
            token_id: best.token,
            now_ms: now,
            expires_at_ms: expires,
            tenant_used: tenant_used + cost,
            token_used: best.used + cost,
            probe,
            transitions: admitted.transitions,
        })
    }

    /// Records a grant in both windows, the token's pace and the lease table.
    /// `pool`: the index (digest) and position of a pool token.
    fn record_grant(
        &mut self,
        req: &AcquireRequest,
        best: &Best,
        pool: Option<(Arc<str>, i64)>,
        now: i64,
        cost: u32,
    ) {
        let expires = now + req.lease_ttl.as_millis() as i64;
        let tenant_key = tenant_key(&req.upstream_id, &req.tenant_id);
        let token_key = token_key(&req.upstream_id, &best.token);
        let nonce = Nonce::of(&req.nonce);
        self.window(tenant_key).insert(&nonce, cost, expires);
        self.window(token_key.clone()).insert(&nonce, cost, expires);
        let pacing = pacing(req);
        if let Some(pacing) = pacing {
            let mut tat = self.paces.get(&token_key).copied().unwrap_or(now as f64);
            pacing.spend(&mut tat, now, cost);
            self.set_schedule(&req.upstream_id, &best.token, tat);
        }
        let name = (self.name(req.upstream_id.as_str()), nonce);
        let lease = Lease {
            tenant: self.name(req.tenant_id.as_str()),
            token: self.name(best.token.as_str()),
            cost,
            expires,
            step: pacing.map_or(0.0, |p| p.step()),
            outcome: None,
            pool,
            window_ms: req.window.as_millis() as i64,
        };
        // Kept, as a release is accepted, while the lease's slots are counted.
        let forget_after = expires + lease.window_ms;
        self.leases.insert(name.clone(), lease);
        self.expiries.insert((forget_after, name));
    }
}
