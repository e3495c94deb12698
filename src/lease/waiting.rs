//! Callers that wait for a slot (`max_wait`): their place in the pool's queue, their
//! tenant's line on this replica (which also bounds how many wait), cleanup when they
//! go away, and the waiting loop itself (`Leaser::wait_for_slot`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{AcquireAnswer, AcquireInput, Attempt, Call, Leaser, Plan, denial};
use crate::domain::{Id, Priority};
use crate::error::ServiceError;
use crate::store::counters::{Counters, Denied, DenyReason, Space};

/// The offset added to a waiter's first attempt to order the queue: critical first,
/// low last, and low overtaken only by requests arriving within W/2 after it.
pub fn priority_offset(priority: Priority, window: Duration) -> i64 {
    let eighth = window.as_millis() as i64 / 8;
    match priority {
        Priority::Critical => 0,
        Priority::High => eighth,
        Priority::Normal => 2 * eighth,
        Priority::Low => 4 * eighth,
    }
}

/// The caller's entry in the shared queue. Dropped while still queued (the caller's
/// request was cancelled, or it gave up), it removes the entry in the background, so a
/// caller that goes away stops holding its place at once rather than at its deadline.
pub struct QueueEntry {
    pub counters: Counters,
    pub upstream_id: Id,
    /// The pool whose space holds the queue (`None`: the upstream's).
    pub pool_id: Option<Id>,
    pub queue_id: String,
    pub nonce: String,
    pub queued: bool,
}

impl Drop for QueueEntry {
    fn drop(&mut self) {
        if !self.queued {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (counters, upstream, pool, queue, nonce) = (
            self.counters.clone(),
            self.upstream_id.clone(),
            self.pool_id.clone(),
            self.queue_id.clone(),
            self.nonce.clone(),
        );
        runtime.spawn(async move {
            let space = Space::new(&upstream, pool.as_ref());
            if let Err(error) = counters.leave_queue(space, &queue, &nonce).await {
                tracing::debug!(%error, "could not leave the wait queue; the entry expires by itself");
            }
        });
    }
}

/// The callers of one tenant waiting on this replica, in queue order. Only the first
/// of them polls the shared counters; the others sleep until it is done, so a freed
/// slot costs one attempt per tenant and replica instead of one per waiting caller.
#[derive(Clone, Default)]
pub struct Lines {
    lines: Arc<Mutex<HashMap<Id, Line>>>,
}

#[derive(Default)]
struct Line {
    members: std::collections::BTreeMap<(i64, u64), Arc<tokio::sync::Notify>>,
    next_seq: u64,
}

/// A caller's place in its tenant's line; leaving (drop) wakes the next.
pub struct Place {
    lines: Lines,
    tenant: Id,
    key: (i64, u64),
    notify: Arc<tokio::sync::Notify>,
}

impl Lines {
    /// Joins `tenant`'s line at `order` (priority offset + arrival, lower first), unless
    /// `limit` callers of the tenant already wait on this replica.
    pub fn join(&self, tenant: &Id, order: i64, limit: usize) -> Option<Place> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let line = lines.entry(tenant.clone()).or_default();
        if line.members.len() >= limit {
            return None;
        }
        let key = (order, line.next_seq);
        line.next_seq += 1;
        let notify = Arc::new(tokio::sync::Notify::new());
        line.members.insert(key, notify.clone());
        Some(Place {
            lines: self.clone(),
            tenant: tenant.clone(),
            key,
            notify,
        })
    }

    /// Callers of `tenant` waiting on this replica now.
    pub fn depth(&self, tenant: &Id) -> usize {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.get(tenant).map_or(0, |l| l.members.len())
    }
}

impl Place {
    fn is_first(&self) -> bool {
        let lines = self.lines.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .get(&self.tenant)
            .and_then(|l| l.members.keys().next())
            .is_some_and(|k| *k == self.key)
    }

    /// Waits until this caller is first in its line; returns whether it had to wait.
    pub async fn turn(&self) -> bool {
        let mut waited = false;
        loop {
            // Registered before the check, so a wake-up between the two is not lost.
            let notified = self.notify.notified();
            if self.is_first() {
                return waited;
            }
            waited = true;
            notified.await;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut lines = self.lines.lines.lock().unwrap_or_else(|p| p.into_inner());
        let Some(line) = lines.get_mut(&self.tenant) else {
            return;
        };
        line.members.remove(&self.key);
        match line.members.values().next() {
            Some(next) => next.notify_one(),
            None => {
                lines.remove(&self.tenant);
            }
        }
    }
}

/// When a denied waiter tries again.
pub(super) struct Retry {
    /// When the slot it may use frees.
    after: Duration,
    /// After a quota denial, the upstream and the quota it met: a rise wakes it sooner.
    quota: Option<(Id, u32)>,
}

impl Retry {
    pub(super) fn of(plan: &Plan, denied: &Denied) -> Self {
        let req = &plan.request;
        Retry {
            after: denied.retry_after,
            quota: (denied.reason == DenyReason::TenantQuota)
                .then(|| (req.upstream_id.clone(), req.tenant_limit)),
        }
    }
}

impl Leaser {
    /// The waiting part of `acquire`: when first in its tenant's line on this replica,
    /// the caller tries again at each instant a slot it may use frees, until granted or
    /// out of time. A caller that stops being first (a caller of a higher priority
    /// joined the line ahead of it) keeps its entry in the shared queue: the caller
    /// ahead has the earlier virtual deadline, so it takes the next slot, and then this
    /// caller is first again with its place still held.
    pub(super) async fn wait_for_slot(
        &self,
        input: &AcquireInput,
        call: &mut Call,
        place: &Place,
        entry: &mut QueueEntry,
        mut retry: Retry,
    ) -> Result<AcquireAnswer, ServiceError> {
        loop {
            let waited = match tokio::time::timeout_at(call.deadline, place.turn()).await {
                Ok(waited) => waited,
                Err(_) => break,
            };
            // Newly first: a slot may just have been freed by the caller before us.
            if !waited {
                if tokio::time::Instant::now() + retry.after > call.deadline {
                    break;
                }
                self.pause(&input.tenant_id, &retry).await;
            }
            let attempt = self.attempt(input, call).await?;
            // A grant the token's health refused changes the call's id (`attempt`).
            entry.nonce.clone_from(&call.nonce);
            match attempt {
                Attempt::Done(answer) => return Ok(answer),
                Attempt::Denied(plan, denied) => retry = Retry::of(&plan, &denied),
            }
        }
        // Out of time: one last look, so the answer carries a current retry-after.
        call.deadline = tokio::time::Instant::now();
        match self.attempt(input, call).await? {
            Attempt::Done(answer) => Ok(answer),
            // The caller's queue entry goes with its `QueueEntry` guard.
            Attempt::Denied(plan, denied) => Ok(denial(
                &self.config.current(),
                &input.tenant_id,
                &plan,
                &denied,
                true,
            )),
        }
    }

    /// Sleeps until the instant a denial pointed at or, after a quota denial, until the
    /// tenant's quota rises: quotas rise as demand is measured, and a caller denied at
    /// the old quota should not sleep until a slot of its own frees (up to a window)
    /// when the new quota admits it now.
    async fn pause(&self, tenant: &Id, retry: &Retry) {
        let mut quotas = self.allocator.subscribe();
        let raised = async {
            let Some((upstream, limit)) = &retry.quota else {
                return std::future::pending().await;
            };
            let key = (tenant.clone(), upstream.clone());
            let rose = quotas.wait_for(|q| q.by_tenant.get(&key).is_some_and(|l| l > limit));
            if rose.await.is_err() {
                std::future::pending::<()>().await; // no allocator any more: just sleep
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(retry.after.max(Duration::from_millis(1))) => {}
            _ = raised => {}
        }
    }
}
