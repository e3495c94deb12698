//! Callers that wait for a slot (`max_wait`): their place in the pool's queue, their
//! tenant's line on this replica (which also bounds how many wait), and cleanup when
//! they go away.

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
