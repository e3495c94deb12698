//! In-process lease counters for the embedded single-node mode: one `ledger::Ledger`
//! under one mutex, at the process clock. The decisions are the ledger's; the Redis
//! scripts take the same ones.
//!
//! Why a std `Mutex` and not a tokio one: the critical section is short, does no I/O
//! and never awaits, so a blocking lock is cheaper and cannot be held across a yield.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    AcquireOutcome, AcquireRequest, Admitted, DemandCount, LeaseKey, OutcomeReport, Recorded,
    ReleaseOutcome, ReleaseResult, StatusReport, UsageCounts,
};
use crate::clock::Clock;
use crate::domain::Id;
use crate::ledger::Ledger;

/// In-process counters; cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct MemoryCounters {
    ledger: Arc<Mutex<Ledger>>,
    clock: Clock,
}

impl MemoryCounters {
    pub fn new(clock: Clock) -> Self {
        Self {
            ledger: Arc::default(),
            clock,
        }
    }

    /// The ledger and the instant to apply the next operation at.
    fn lock(&self) -> (MutexGuard<'_, Ledger>, i64) {
        // Every ledger operation checks before it writes and completes before the guard
        // drops, so a poisoned lock (a panic elsewhere) still holds a consistent ledger.
        let ledger = self
            .ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (ledger, self.clock.now_ms())
    }

    pub fn mark_fresh(&self, upstream: &Id) {
        self.lock().0.mark_fresh(upstream);
    }

    /// The decision, the chosen token's admission and the grant's record, in one step.
    pub fn acquire(&self, req: &AcquireRequest) -> AcquireOutcome {
        let (mut ledger, now) = self.lock();
        ledger.acquire(req, now)
    }

    pub fn leave_queue(&self, upstream: &Id, queue_id: &str, nonce: &str) {
        self.lock().0.leave_queue(upstream, queue_id, nonce);
    }

    pub fn demand(
        &self,
        upstream: &Id,
        window: Duration,
        tenants: &[Id],
    ) -> (i64, Vec<DemandCount>) {
        let (ledger, now) = self.lock();
        ledger.demand(upstream, window, tenants, now)
    }

    pub fn release(&self, key: &LeaseKey, outcome: ReleaseOutcome) -> ReleaseResult {
        let (mut ledger, now) = self.lock();
        ledger.release(key, outcome, now)
    }

    pub fn release_reporting(&self, report: &OutcomeReport) -> (ReleaseResult, Option<Recorded>) {
        let (mut ledger, now) = self.lock();
        ledger.release_reporting(report, now)
    }

    pub fn usage(
        &self,
        upstream: &Id,
        window: Duration,
        tenants: &[Id],
        tokens: &[Id],
    ) -> UsageCounts {
        let (mut ledger, now) = self.lock();
        ledger.usage(upstream, window, tenants, tokens, now)
    }

    pub fn admit_grant(&self, upstream: &Id, token: &Id, nonce: &str, expires: i64) -> Admitted {
        let (mut ledger, now) = self.lock();
        ledger.admit_grant(upstream, token, nonce, expires, now)
    }

    pub fn record_outcome(&self, report: &OutcomeReport) -> Recorded {
        let (mut ledger, now) = self.lock();
        ledger.record_outcome(report, now)
    }

    pub fn reset_health(&self, upstream: &Id, token: &Id) -> StatusReport {
        let (mut ledger, now) = self.lock();
        ledger.reset_health(upstream, token, now)
    }

    pub fn token_status(&self, upstream: &Id, tokens: &[Id]) -> StatusReport {
        let (mut ledger, now) = self.lock();
        ledger.token_status(upstream, tokens, now)
    }
}
