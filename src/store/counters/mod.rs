//! Lease counters: the sliding windows of every token and tenant, and the live leases.
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
//! # Backends
//! `Counters` is an enum over the two backends (chosen once in `startup.rs`), so both
//! run the same behaviour tests and no trait objects are needed.

mod index_scripts;
mod memory;
mod pace;
mod queue;
mod redis_backend;
mod scripts;

// Token health (circuit breaker, quarantine): see `breaker.rs`.
mod breaker;
mod breaker_memory;
mod breaker_redis;
mod breaker_scripts;

pub use breaker::{
    Admission, Admitted, OutcomeReport, Recorded, StatusReport, TokenStatus, Transition,
    TransitionCause,
};
pub use memory::MemoryCounters;
pub use queue::{BUCKETS_PER_WINDOW, DemandCount, bucket_ms};
pub use redis_backend::{RedisCounters, RedisSettings};

use std::time::Duration;

use crate::domain::Id;

/// Everything one acquire decision needs; built by `lease::plan` from the configuration.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// The upstream: all keys of one upstream share a Redis Cluster hash slot.
    pub upstream_id: Id,
    /// Random part of the lease id, chosen by the caller.
    pub nonce: String,
    pub tenant_id: Id,
    /// The tenant's quota per window.
    pub tenant_limit: u32,
    /// Usable requests per token per window (limit minus safety margin).
    pub token_limit: u32,
    pub window: Duration,
    pub lease_ttl: Duration,
    /// Slots the call takes in both windows; 0 counts as 1.
    pub cost: u32,
    /// The tenant's dedicated tokens, tried first (least used first).
    pub dedicated: Vec<Id>,
    /// The tenant's pool tokens, tried next (least used first).
    pub pooled: std::sync::Arc<[Id]>,
    /// `list_digest(&pooled)`, when the caller keeps it (the snapshot computes it once
    /// per pool); `None` computes it per call.
    pub pooled_digest: Option<std::sync::Arc<str>>,
    /// Count this call in the tenant's demand (its first attempt only, so a waiting
    /// caller that retries is one unit of demand, not many).
    pub count_demand: bool,
    /// Where the call stands among the pool's waiters; `None` ignores the queue.
    pub queue: Option<QueueTicket>,
    /// Pacing: how many slots a token may grant back to back before it grants one per
    /// `window / token_limit`; 0 turns pacing off. See `scripts::ACQUIRE`.
    pub pace_burst: u32,
}

/// A digest of a token list (16 hex digits of its SHA-256): with the window, limit
/// and pacing, it names the list's pool index in Redis (`index_scripts.rs`).
pub fn list_digest(tokens: &[Id]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for token in tokens {
        hash.update(token.as_str());
        hash.update(b",");
    }
    hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A call's place in its pool's wait queue (see `queue.rs`).
///
/// Waiters are ordered by a *virtual deadline*: the instant of their first attempt plus
/// an offset by priority (critical 0, high W/8, normal W/4, low W/2). Higher classes
/// therefore go first, and a low request is overtaken only by requests that arrived less
/// than W/2 after it: no class starves. A pool-token grant is allowed only when the
/// waiters ahead of the call that could use a slot now leave room for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTicket {
    /// The pool (or, for tenants without one, the tenant) whose queue this is.
    pub queue_id: String,
    /// The priority's offset, added to the first attempt's time.
    pub priority_offset_ms: i64,
    /// The virtual deadline from the first attempt's answer; `None` on the first.
    pub score: Option<i64>,
    /// How long to stay queued when denied; 0 means do not queue (answer now).
    pub wait_ms: i64,
}

/// A recorded grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub token_id: Id,
    /// The store's clock at the decision, in Unix milliseconds.
    pub now_ms: i64,
    pub expires_at_ms: i64,
    /// Slots the tenant holds in the window, this grant included.
    pub tenant_used: u32,
    /// Slots the token holds in the window, this grant included.
    pub token_used: u32,
    /// Whether this lease is the probe of a half-open token (see `breaker.rs`).
    pub probe: bool,
    /// Health transitions the decision made due (each reported once across replicas).
    pub transitions: Vec<Transition>,
}

/// The decision chose a token its health refuses (quarantined, open, or half-open with
/// its probe out: see `breaker.rs`); nothing was recorded. The caller routes around it
/// and decides again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unhealthy {
    pub token_id: Id,
    pub state: crate::domain::TokenState,
    /// When the token may be usable again (store clock, Unix ms).
    pub until_ms: i64,
    pub now_ms: i64,
    pub transitions: Vec<Transition>,
}

/// The binding constraint of a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    TenantQuota,
    NoTokenCapacity,
    /// Every candidate token is out of service (quarantined, breaker open, or half-open
    /// with its probe out): the retry-after is when the first may be leased again.
    NoUsableToken,
    /// The upstream's counters were lost (see `Counters::mark_fresh`): no grant until
    /// every lease granted before the loss can no longer reach the upstream.
    CountersLost,
    /// The same, found by this very decision, which started the hold: its caller
    /// announces it (once across replicas).
    CountersLostNoticed,
}

impl DenyReason {
    /// Whether the upstream is held because its counters were lost.
    pub fn counters_lost(self) -> bool {
        matches!(self, Self::CountersLost | Self::CountersLostNoticed)
    }
}

/// A denial; nothing was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub reason: DenyReason,
    /// When the earliest slot this request could use frees up, from `now_ms`.
    pub retry_after: Duration,
    pub now_ms: i64,
    /// The call's virtual deadline in the queue, to pass back on the next attempt.
    pub queue_score: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    Granted(Grant),
    Denied(Denied),
    Unhealthy(Unhealthy),
}

/// How a lease was used, as far as the counters care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseOutcome {
    Success,
    UpstreamError,
    UpstreamRateLimited,
    NotUsed,
}

impl ReleaseOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamRateLimited => "upstream_rate_limited",
            Self::NotUsed => "not_used",
        }
    }

    /// The code the release script replies with (1 success … 4 not used).
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Self::Success),
            2 => Some(Self::UpstreamError),
            3 => Some(Self::UpstreamRateLimited),
            4 => Some(Self::NotUsed),
            _ => None,
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Success,
            Self::UpstreamError,
            Self::UpstreamRateLimited,
            Self::NotUsed,
        ]
        .into_iter()
        .find(|o| o.as_str() == value)
    }
}

/// The parts of a lease id: `<upstream>.<tenant>.<token>.<nonce>`. Ids never contain
/// '.', so the id splits unambiguously, and the release script can name every key it
/// touches up front (required by Redis Cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseKey {
    pub upstream_id: Id,
    pub tenant_id: Id,
    pub token_id: Id,
    pub nonce: String,
}

impl LeaseKey {
    pub fn to_lease_id(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.upstream_id, self.tenant_id, self.token_id, self.nonce
        )
    }

    /// Parses a lease id; `None` when it is not one of ours.
    pub fn parse(lease_id: &str) -> Option<Self> {
        let mut parts = lease_id.split('.');
        let (u, te, to, n) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || n.len() != 32 || !n.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            upstream_id: Id::parse("lease_id", u).ok()?,
            tenant_id: Id::parse("lease_id", te).ok()?,
            token_id: Id::parse("lease_id", to).ok()?,
            nonce: n.to_owned(),
        })
    }

    /// A fresh random nonce (128 bits, hex).
    pub fn new_nonce() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }
}

/// The result of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseResult {
    Released,
    /// Released before with the same outcome.
    AlreadyReleased,
    /// Released before with another outcome.
    Conflict {
        previous: ReleaseOutcome,
    },
    /// Unknown, or expired.
    NotFound,
}

/// Slots held in the current window, per tenant and per token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsageCounts {
    pub tenants: Vec<u32>,
    pub tokens: Vec<u32>,
}

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
            Self::Memory(m) => Ok(m.acquire_admitted(req)),
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
    #[tracing::instrument(name = "counters.mark_fresh", skip_all, fields(upstream_id = %upstream))]
    pub async fn mark_fresh(&self, upstream: &Id) -> Result<(), CounterError> {
        match self {
            Self::Memory(m) => {
                m.mark_fresh(upstream);
                Ok(())
            }
            Self::Redis(r) => r.mark_fresh(upstream).await,
        }
    }

    /// `mark_fresh` for an upstream just created; a failure (Redis down) only costs its
    /// first leases one hold, so it is logged, not returned.
    pub async fn mark_created(&self, upstream: &Id) {
        if let Err(error) = self.mark_fresh(upstream).await {
            tracing::warn!(%error, %upstream, "cannot mark the new upstream's lease counters fresh; its first leases wait one window + TTL");
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

    /// Slots held now, for one upstream's tenants and tokens.
    #[tracing::instrument(name = "counters.usage", level = "debug", skip_all, fields(upstream_id = %upstream_id))]
    pub async fn usage(
        &self,
        upstream_id: &Id,
        window: Duration,
        tenants: &[Id],
        tokens: &[Id],
    ) -> Result<UsageCounts, CounterError> {
        match self {
            Self::Memory(m) => Ok(m.usage(upstream_id, window, tenants, tokens)),
            Self::Redis(r) => r.usage(upstream_id, window, tenants, tokens).await,
        }
    }

    /// Demand per tenant over the last window's completed buckets, with the index of the
    /// current bucket (allocations computed from the same bucket agree across replicas).
    pub async fn demand(
        &self,
        upstream_id: &Id,
        window: Duration,
        tenants: &[Id],
    ) -> Result<(i64, Vec<DemandCount>), CounterError> {
        match self {
            Self::Memory(m) => Ok(m.demand(upstream_id, window, tenants)),
            Self::Redis(r) => r.demand(upstream_id, window, tenants).await,
        }
    }

    /// Takes a waiter out of its queue (its caller gave up or went away).
    pub async fn leave_queue(
        &self,
        upstream_id: &Id,
        queue_id: &str,
        nonce: &str,
    ) -> Result<(), CounterError> {
        match self {
            Self::Memory(m) => {
                m.leave_queue(upstream_id, queue_id, nonce);
                Ok(())
            }
            Self::Redis(r) => r.leave_queue(upstream_id, queue_id, nonce).await,
        }
    }
}

/// The behaviour suite, run against both backends.
#[cfg(test)]
#[path = "tests.rs"]
mod behaviour;

#[cfg(test)]
mod tests {
    use super::*;

    /// Lease ids round-trip and foreign strings are rejected.
    #[test]
    fn lease_id_roundtrip() {
        let key = LeaseKey {
            upstream_id: Id::parse("x", "baselinker").unwrap(),
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
