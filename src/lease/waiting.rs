//! Callers that wait for a slot (`max_wait`): their place in the pool's queue, the
//! per-tenant bound on how many wait on this replica, and cleanup when they go away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::{Id, Priority};
use crate::store::counters::Counters;

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

/// How many callers of each tenant wait on this replica.
#[derive(Clone, Default)]
pub struct WaitingCallers {
    per_tenant: Arc<Mutex<HashMap<Id, usize>>>,
}

impl WaitingCallers {
    /// Counts one more waiter of `tenant`, unless `limit` already wait.
    pub fn enter(&self, tenant: &Id, limit: usize) -> Option<WaitSlot> {
        let mut map = self.per_tenant.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(tenant.clone()).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(WaitSlot {
            callers: self.clone(),
            tenant: tenant.clone(),
        })
    }

    /// Callers of `tenant` waiting now.
    pub fn depth(&self, tenant: &Id) -> usize {
        self.per_tenant
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }
}

/// One waiting caller; dropping it frees its place in the count.
pub struct WaitSlot {
    callers: WaitingCallers,
    tenant: Id,
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let mut map = self
            .callers
            .per_tenant
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.tenant);
            }
        }
    }
}

/// The caller's entry in the shared queue. Dropped while still queued (the caller's
/// request was cancelled, or it gave up), it removes the entry in the background, so a
/// caller that goes away stops holding its place at once rather than at its deadline.
pub struct QueueEntry {
    pub counters: Counters,
    pub upstream_id: Id,
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
        let (counters, upstream, queue, nonce) = (
            self.counters.clone(),
            self.upstream_id.clone(),
            self.queue_id.clone(),
            self.nonce.clone(),
        );
        runtime.spawn(async move {
            if let Err(error) = counters.leave_queue(&upstream, &queue, &nonce).await {
                tracing::debug!(%error, "could not leave the wait queue; the entry expires by itself");
            }
        });
    }
}
