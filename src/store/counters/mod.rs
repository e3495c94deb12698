//! Lease counters: the sliding windows of every token and tenant, and the live leases.
//!
//! The model these counters keep — the accounting that keeps the upstream under its
//! limit, the fence when counters are lost, pacing, the wait queue, token health — is
//! the pure `crate::ledger`, which the in-memory backend wraps in a mutex and whose
//! transliteration the Redis scripts are (`tests/differential.rs` checks them against
//! each other).
//!
//! # Backends
//! `Counters` is an enum over the two backends (chosen once in `startup.rs`), so both
//! run the same behaviour tests and no trait objects are needed.

mod eviction;
mod index_scripts;
mod memory;
mod redis_backend;
mod scripts;

// Token health (circuit breaker, quarantine): see `breaker.rs`.
mod breaker;
mod breaker_redis;
mod breaker_scripts;

pub use crate::ledger::{
    AcquireOutcome, AcquireRequest, Admission, Admitted, BUCKETS_PER_WINDOW, DemandCount, Denied,
    DenyReason, Grant, LeaseKey, OutcomeReport, QueueTicket, Recorded, ReleaseOutcome,
    ReleaseResult, Space, StatusReport, TokenStatus, Transition, TransitionCause, Unhealthy,
    UsageCounts, bucket_ms, list_digest,
};
pub use eviction::{CHECK_EVERY as EVICTION_CHECK_EVERY, spawn_eviction_watch};
pub use memory::MemoryCounters;
pub use redis_backend::{RedisCounters, RedisSettings};

/// The Redis Functions library of this release (`FUNCTION LOAD`'s argument): the
/// service loads it by itself; `tokenlease redis-functions` prints it for a Redis user
/// that may not.
pub fn redis_functions() -> String {
    scripts::Library::new().code
}

use std::time::Duration;

use crate::domain::Id;

/// Why a counter call failed.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    /// The backend did not answer in time or could not be reached. Nothing may be
    /// assumed granted (fail closed); callers answer UNAVAILABLE with a retry-after.
    #[error("lease counters unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something we did not expect.
    #[error("lease counters error: {0}")]
    Internal(String),
}

/// The counters backend, chosen at start-up.
// One value per process, cloned rarely: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Counters {
    Memory(MemoryCounters),
    Redis(RedisCounters),
}

impl Counters {
    /// Decides and records one lease atomically.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<AcquireOutcome, CounterError> {
        self.acquire_within(req, Duration::MAX).await
    }

    /// `acquire`, answering within `budget` (or the configured Redis timeout, if
    /// shorter): a decision that would reach Redis later is not made.
    #[tracing::instrument(name = "counters.acquire", skip_all, fields(upstream_id = %req.upstream_id, tenant_id = %req.tenant_id))]
    pub async fn acquire_within(
        &self,
        req: &AcquireRequest,
        budget: Duration,
    ) -> Result<AcquireOutcome, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.acquire(req)),
            Self::Redis(r) => r.acquire_within(req, budget).await,
        }
    }

    /// How long one call may wait for the counters (`None`: in process, no wait).
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(r) => Some(r.timeout()),
        }
    }

    /// Marks the counters of a new upstream as complete: nothing was ever granted on it,
    /// so nothing can have been lost.
    ///
    /// Every upstream's counters carry a *fence*. The first acquire that finds it
    /// missing (Redis restarted empty, a flushed key, a new embedded process) cannot
    /// know what was granted before: it sets the fence to now + W + TTL (+ grace, which
    /// the TTL passed to the counters includes) and every acquire on the upstream is
    /// denied (`CountersLost`) until then. Why that is enough: a lease granted before
    /// the loss, at t₀ ≤ now, is used at the latest at t₀ + TTL + grace, and that call
    /// leaves every window by t₀ + TTL + grace + W ≤ the fence; grants from the fence on
    /// share no window with it. Writing the fence here, when the upstream is created,
    /// spares a new deployment that wait; it never lifts a hold already set.
    ///
    /// On Redis each space (`Space`: the upstream's, and each pool's) has its own fence,
    /// so a pool created later is marked when it is created, and a pool that existed
    /// before its space did (an upgrade from one space per upstream) is held once.
    #[tracing::instrument(name = "counters.mark_fresh", skip_all, fields(space = %space))]
    pub async fn mark_fresh(&self, space: Space<'_>) -> Result<(), CounterError> {
        match self {
            Self::Memory(m) => {
                m.mark_fresh(space.upstream);
                Ok(())
            }
            Self::Redis(r) => r.mark_fresh(space).await,
        }
    }

    /// `mark_fresh` for an upstream or pool just created; a failure (Redis down) only
    /// costs its first leases one hold, so it is logged, not returned.
    pub async fn mark_created(&self, space: Space<'_>) {
        if let Err(error) = self.mark_fresh(space).await {
            tracing::warn!(%error, %space, "cannot mark new lease counters fresh; their first leases wait one window + TTL");
        }
    }

    /// Records the outcome of a lease and feeds it to its token's health (one round
    /// trip on Redis): the health record is only fed by a first or repeated release
    /// with the same outcome (`Released`, `AlreadyReleased`), and applies each lease once.
    #[tracing::instrument(name = "counters.release", skip_all, fields(tenant_id = %report.key.tenant_id, token_id = %report.key.token_id))]
    pub async fn release_reporting(
        &self,
        report: &OutcomeReport,
    ) -> Result<(ReleaseResult, Option<Recorded>), CounterError> {
        match self {
            Self::Memory(m) => Ok(m.release_reporting(report)),
            Self::Redis(r) => r.release_reporting(report).await,
        }
    }

    /// Records the outcome of a lease without telling its token's health (a lease given
    /// back, a test); "not used" frees its slots.
    #[tracing::instrument(name = "counters.release", skip_all, fields(tenant_id = %key.tenant_id, token_id = %key.token_id))]
    pub async fn release(
        &self,
        key: &LeaseKey,
        outcome: ReleaseOutcome,
    ) -> Result<ReleaseResult, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.release(key, outcome)),
            Self::Redis(r) => r.release(key, outcome).await,
        }
    }

    /// Slots held now, for tenants and tokens of one space.
    #[tracing::instrument(name = "counters.usage", level = "debug", skip_all, fields(space = %space))]
    pub async fn usage(
        &self,
        space: Space<'_>,
        window: Duration,
        tenants: &[Id],
        tokens: &[Id],
    ) -> Result<UsageCounts, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.usage(space.upstream, window, tenants, tokens)),
            Self::Redis(r) => r.usage(space, window, tenants, tokens).await,
        }
    }

    /// Demand per tenant over the last window's completed buckets, with the index of the
    /// current bucket (allocations computed from the same bucket agree across replicas).
    /// Tenants of one space.
    pub async fn demand(
        &self,
        space: Space<'_>,
        window: Duration,
        tenants: &[Id],
    ) -> Result<(i64, Vec<DemandCount>), CounterError> {
        match self {
            Self::Memory(m) => Ok(m.demand(space.upstream, window, tenants)),
            Self::Redis(r) => r.demand(space, window, tenants).await,
        }
    }

    /// Hands tokens over to their new counters spaces (`Space`) before the configuration
    /// that moves them commits as `version` (`ConfigStore::set_token_mover`). Per token:
    ///
    /// - in its new space, its window is filled up to its limit with entries ending
    ///   `hold` from now (the lease TTL + grace: the longest a lease granted in the old
    ///   space may still be used), so no slot it held there is granted again here until
    ///   that slot has left every window; and its health record (quarantine, breaker)
    ///   is carried over;
    /// - in its old space, it is marked moved at `version`: a replica still planning
    ///   from an older configuration is not granted it there (`DenyReason::TokenMoved`:
    ///   it reloads its configuration and plans again in the new space).
    ///
    /// A moved token is therefore out of service for `hold` + W. `limits` gives an
    /// upstream's usable requests per window and window. In process there is one
    /// space per upstream: nothing to do.
    pub async fn prepare_moves(
        &self,
        moves: &[crate::domain::TokenMove],
        version: i64,
        hold: Duration,
        limits: impl Fn(&Id) -> Option<(u32, Duration)>,
    ) -> Result<(), CounterError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(r) => r.prepare_moves(moves, version, hold, limits).await,
        }
    }

    /// Takes a waiter out of its queue (its caller gave up or went away).
    pub async fn leave_queue(
        &self,
        space: Space<'_>,
        queue_id: &str,
        nonce: &str,
    ) -> Result<(), CounterError> {
        match self {
            Self::Memory(m) => {
                m.leave_queue(space.upstream, queue_id, nonce);
                Ok(())
            }
            Self::Redis(r) => r.leave_queue(space, queue_id, nonce).await,
        }
    }
}

/// The behaviour suite, run against both backends.
#[cfg(test)]
#[path = "tests.rs"]
pub(crate) mod behaviour;

#[cfg(test)]
mod tests {
    use super::*;

    /// Lease ids round-trip and foreign strings are rejected.
    #[test]
    fn lease_id_roundtrip() {
        let key = LeaseKey {
            upstream_id: Id::parse("x", "baselinker").unwrap(),
            pool_id: None,
            tenant_id: Id::parse("x", "acme").unwrap(),
            token_id: Id::parse("x", "tok-1").unwrap(),
            nonce: LeaseKey::new_nonce(),
        };
        assert_eq!(LeaseKey::parse(&key.to_lease_id()), Some(key));
        for bad in [
            "",
            "a.b.c",
            "a.b.c.d",
            "a.b.c.0123456789abcdef0123456789abcdeg",
            "A.b.c.0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(LeaseKey::parse(bad), None, "{bad}");
        }
    }
}
