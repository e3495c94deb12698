//! The acquire decision: the twin of `scripts::ACQUIRE`, step by step (the fence, the
//! tenant's window, the candidate tokens, the wait queue, the chosen token's health,
//! then the grant's record).

use std::collections::HashMap;
use std::time::Duration;

use super::pace::{Paced, Pacing};
use super::queue::{WaitQueue, bucket_ms};
use super::types::{
    AcquireOutcome, AcquireRequest, Admission, Denied, DenyReason, Grant, QueueTicket, Unhealthy,
};
use super::window::never;
use super::{Lease, Ledger, lease_key, queue_key, tenant_key, token_key};
use crate::domain::Id;

/// The request's pacing (`pace.rs`).
pub(super) fn pacing(req: &AcquireRequest) -> Option<Pacing> {
    Pacing::new(
        req.pace_burst,
        req.window.as_millis() as i64,
        req.token_limit,
    )
}

/// What a scan of the candidate tokens found.
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

/// A call's queue, its ticket and its virtual deadline.
type Queued<'a> = (&'a mut WaitQueue, &'a QueueTicket, i64);

fn denied(reason: DenyReason, at: i64, now: i64, queue_score: Option<i64>) -> AcquireOutcome {
    AcquireOutcome::Denied(Denied {
        reason,
        retry_after: Duration::from_millis((at - now).max(0) as u64),
        now_ms: now,
        queue_score,
    })
}

impl Ledger {
    /// Decides one lease at `now` and records it when granted.
    pub fn acquire(&mut self, req: &AcquireRequest, now: i64) -> AcquireOutcome {
        if let Some(held) = self.fenced(req, now) {
            return held;
        }
        let window_ms = req.window.as_millis() as i64;
        // Every lease allows at least one call, so it takes at least one slot.
        let cost = req.cost.max(1);
        self.drop_expired_leases(now);
        let tenant_key = tenant_key(&req.upstream_id, &req.tenant_id);
        let bucket = now.div_euclid(bucket_ms(window_ms));
        if req.count_demand {
            let demand = self.demand.entry(tenant_key.clone()).or_default();
            demand.record(bucket, cost);
        }
        let tenant_used = self.window(tenant_key.clone()).trim(now - window_ms);
        let blocked = self.health.blocked(&req.upstream_id, now);
        let scan = self.scan_tokens(req, now, cost, &blocked);
        let Self {
            windows,
            queues,
            demand,
            ..
        } = self;
        let mut queue = req.queue.as_ref().map(|ticket| {
            let queue = queues
                .entry(queue_key(&req.upstream_id, &ticket.queue_id))
                .or_default();
            queue.purge(now);
            let score = ticket.score.unwrap_or(now + ticket.priority_offset_ms);
            (queue, ticket, score)
        });
        let deny = |queue: &mut Option<Queued>, reason, at: i64, eligible: i64| {
            let score = queue.as_mut().map(|(queue, ticket, score)| {
                if ticket.wait_ms > 0 {
                    queue.enqueue(&req.nonce, *score, now + ticket.wait_ms, eligible);
                }
                *score
            });
            denied(reason, at, now, score)
        };
        if tenant_used + cost > req.tenant_limit {
            let window = windows.get(&tenant_key).expect("trimmed above");
            let free = window.free_at(now, window_ms, tenant_used, cost, req.tenant_limit);
            if req.count_demand {
                let demand = demand.entry(tenant_key).or_default();
                demand.record_unmet(bucket, cost);
            }
            // Both limits bind: name the one that frees last (the upstream's on a tie).
            if scan.best.is_none() && scan.earliest >= free {
                return deny(&mut queue, DenyReason::NoTokenCapacity, scan.earliest, free);
            }
            return deny(&mut queue, DenyReason::TenantQuota, free, free);
        }
        let Some((idx, token_used)) = scan.best else {
            // No dedicated token passed and every pool token out of service: that is
            // the reason, not a full pool.
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
        // A pool slot goes to the waiters ahead first.
        if idx >= req.dedicated.len()
            && let Some((q, _, score)) = queue.as_ref()
            && q.count_ahead(*score, &req.nonce, now, scan.pool_room) + cost > scan.pool_room
        {
            let at = scan.pool_next_free;
            return deny(&mut queue, DenyReason::NoTokenCapacity, at, now);
        }
        let in_queue = queue.is_some();
        let token = req.dedicated.iter().chain(req.pooled.iter()).nth(idx);
        let token = token.expect("index from the scan").clone();
        self.admit_and_grant(req, token, now, cost, (tenant_used, token_used), in_queue)
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
        (resume_at > now).then(|| denied(reason, resume_at, now, None))
    }

    /// The chosen token's health has the last word: a refused token is reported and
    /// nothing is recorded (the caller routes around it); otherwise the grant is
    /// recorded and the caller leaves its queue.
    fn admit_and_grant(
        &mut self,
        req: &AcquireRequest,
        token: Id,
        now: i64,
        cost: u32,
        (tenant_used, token_used): (u32, u32),
        in_queue: bool,
    ) -> AcquireOutcome {
        let expires = now + req.lease_ttl.as_millis() as i64;
        let admitted = self.admit_grant(&req.upstream_id, &token, &req.nonce, expires, now);
        let probe = match admitted.admission {
            Admission::Leasable => false,
            Admission::Probe => true,
            Admission::Refused { state, until_ms } => {
                return AcquireOutcome::Unhealthy(Unhealthy {
                    token_id: token,
                    state,
                    until_ms,
                    now_ms: now,
                    transitions: admitted.transitions,
                });
            }
        };
        if in_queue && let Some(ticket) = &req.queue {
            let key = queue_key(&req.upstream_id, &ticket.queue_id);
            if let Some(queue) = self.queues.get_mut(&key) {
                queue.remove(&req.nonce);
            }
        }
        self.record_grant(req, &token, now, cost);
        AcquireOutcome::Granted(Grant {
            token_id: token,
            now_ms: now,
            expires_at_ms: expires,
            tenant_used: tenant_used + cost,
            token_used: token_used + cost,
            probe,
            transitions: admitted.transitions,
        })
    }

    /// Reads every candidate token: the least used with room (dedicated tokens first),
    /// else when the first full one has room. `blocked`: pool tokens whose health
    /// refuses a lease until the instant given (the Redis pool index keeps them out
    /// the same way; dedicated tokens are left to the admission, like there).
    fn scan_tokens(
        &mut self,
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
        let mut sooner = |at: i64| earliest = Some(earliest.map_or(at, |e: i64| e.min(at)));
        let candidates = req.dedicated.iter().chain(req.pooled.iter());
        for (idx, token) in candidates.enumerate() {
            if matches!(scan.best, Some((b, _)) if b < n_dedicated) && idx >= n_dedicated {
                break;
            }
            let key = token_key(&req.upstream_id, token);
            let pace = match pacing(req) {
                Some(p) => p.view(self.paces.get(&key).copied(), now, cost, scan.earliest),
                None => Paced {
                    room: u32::MAX,
                    fits: now,
                    grows: scan.earliest,
                },
            };
            let window = self.windows.entry(key.clone()).or_default();
            let used = window.trim(now - window_ms);
            let free = || window.free_at(now, window_ms, used, cost, req.token_limit);
            let pooled = idx >= n_dedicated;
            let health_at = blocked.get(token).copied().filter(|_| pooled);
            if let Some(at) = health_at.filter(|&at| at > now) {
                let at = free().max(pace.fits).max(at);
                sooner(at);
                scan.pool_next_free = scan.pool_next_free.min(at);
                continue;
            }
            if pooled {
                let window_room = req.token_limit.saturating_sub(used);
                scan.pool_room += window_room.min(pace.room);
                let next = if window_room > pace.room {
                    Some(pace.grows)
                } else {
                    window.first_end().map(|end| end + window_ms + 1)
                };
                if let Some(next) = next {
                    scan.pool_next_free = scan.pool_next_free.min(next);
                }
            }
            if used + cost <= req.token_limit && pace.fits <= now {
                if scan.best.is_none_or(|(_, best_used)| used < best_used) {
                    scan.best = Some((idx, used));
                }
            } else {
                sooner(free().max(pace.fits));
                if used + cost > req.token_limit
                    && let Some(pacing) = pacing(req)
                {
                    pacing.drain(self.paces.entry(key).or_insert(now as f64), now);
                }
            }
        }
        scan.earliest = earliest.unwrap_or(scan.earliest);
        scan
    }

    /// Records a grant in both windows and the lease table.
    fn record_grant(&mut self, req: &AcquireRequest, token: &Id, now: i64, cost: u32) {
        let expires = now + req.lease_ttl.as_millis() as i64;
        let tenant_key = tenant_key(&req.upstream_id, &req.tenant_id);
        let token_key = token_key(&req.upstream_id, token);
        for i in 1..=cost {
            let member = format!("{}#{i}", req.nonce);
            self.window(tenant_key.clone())
                .insert(member.clone(), expires);
            self.window(token_key.clone()).insert(member, expires);
        }
        let pacing = pacing(req);
        if let Some(pacing) = pacing {
            let schedule = self.paces.entry(token_key).or_insert(now as f64);
            pacing.spend(schedule, now, cost);
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
        self.leases.insert(lease_key.clone(), lease);
        self.expiries.insert((expires, lease_key));
    }
}
