//! The ledger's requests and answers, shared by both counters backends and the lease
//! use cases.

use std::time::Duration;

use crate::domain::{BreakerPolicy, Id, TokenState};

/// Where counters live: an upstream's own space (tenants without a pool, and their
/// dedicated tokens) or one of its pools' (the pool's tokens, its tenants, and their
/// dedicated tokens). One decision touches one space only; on Redis each space is one
/// hash slot (`{<upstream>}` or `{<upstream>.<pool>}`), so a Redis Cluster spreads an
/// upstream's pools over its masters. The in-process ledger keys by upstream alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Space<'a> {
    pub upstream: &'a Id,
    pub pool: Option<&'a Id>,
}

impl<'a> Space<'a> {
    pub fn new(upstream: &'a Id, pool: Option<&'a Id>) -> Self {
        Self { upstream, pool }
    }

    /// The upstream's own space.
    pub fn upstream(upstream: &'a Id) -> Self {
        Self {
            upstream,
            pool: None,
        }
    }
}

impl std::fmt::Display for Space<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pool {
            None => write!(f, "{}", self.upstream),
            Some(pool) => write!(f, "{}.{pool}", self.upstream),
        }
    }
}

/// Everything one acquire decision needs; built by `lease::plan` from the configuration.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// The upstream.
    pub upstream_id: Id,
    /// The tenant's pool, whose space the decision runs in (`None`: the upstream's).
    pub pool_id: Option<Id>,
    /// The configuration version the request was planned from: a token moved to
    /// another space at a later version is not granted from the old one
    /// (`Counters::prepare_moves`). 0 skips the check.
    pub config_version: i64,
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

impl AcquireRequest {
    pub fn space(&self) -> Space<'_> {
        Space::new(&self.upstream_id, self.pool_id.as_ref())
    }
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
    /// The tenant's guaranteed requests per window. While the tenant holds fewer, this
    /// call included, the caller goes ahead of every waiter whose tenant is beyond its
    /// own guarantee (`queue::GUARANTEED_AHEAD_MS`): a quiet tenant does not queue
    /// behind a flooding one.
    pub guaranteed: u32,
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
    pub state: TokenState,
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
    /// The chosen token moved to another space at a configuration version later than
    /// the request's (`Counters::prepare_moves`): the caller reloads its configuration
    /// and asks again. Only the Redis counters answer it.
    TokenMoved,
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

/// The parts of a lease id: `<upstream>.<tenant>.<token>.<nonce>`, and `.<pool>` after
/// them when the lease was granted in a pool's space. Ids never contain '.', so the id
/// splits unambiguously, and the release script can name every key it touches up front
/// (required by Redis Cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseKey {
    pub upstream_id: Id,
    /// The pool whose space holds the lease (`None`: the upstream's).
    pub pool_id: Option<Id>,
    pub tenant_id: Id,
    pub token_id: Id,
    pub nonce: String,
}

impl LeaseKey {
    pub fn space(&self) -> Space<'_> {
        Space::new(&self.upstream_id, self.pool_id.as_ref())
    }

    pub fn to_lease_id(&self) -> String {
        let id = format!(
            "{}.{}.{}.{}",
            self.upstream_id, self.tenant_id, self.token_id, self.nonce
        );
        match &self.pool_id {
            None => id,
            Some(pool) => format!("{id}.{pool}"),
        }
    }

    /// Parses a lease id; `None` when it is not one of ours.
    pub fn parse(lease_id: &str) -> Option<Self> {
        let mut parts = lease_id.split('.');
        let (u, te, to, n) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let pool = parts.next();
        if parts.next().is_some() || n.len() != 32 || !n.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            upstream_id: Id::parse("lease_id", u).ok()?,
            pool_id: match pool {
                None => None,
                Some(p) => Some(Id::parse("lease_id", p).ok()?),
            },
            tenant_id: Id::parse("lease_id", te).ok()?,
            token_id: Id::parse("lease_id", to).ok()?,
            nonce: n.to_owned(),
        })
    }

    /// A fresh random nonce (128 bits, hex), from the thread's cryptographically secure
    /// generator (uuid's `fast-rng`: rand's `ThreadRng`, seeded from the OS), which costs
    /// no system call per lease as reading the OS's generator each time did.
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

/// Why a token changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionCause {
    /// Consecutive upstream errors opened the breaker.
    UpstreamErrors,
    /// The breaker's open time passed: half-open.
    OpenElapsed,
    /// Enough probes succeeded: closed.
    ProbesSucceeded,
    /// A probe failed: open again.
    ProbeFailed,
    /// The upstream answered "rate limited": quarantined.
    RateLimited,
    /// The quarantine ended.
    QuarantineElapsed,
}

impl TransitionCause {
    const ALL: [Self; 6] = [
        Self::UpstreamErrors,
        Self::OpenElapsed,
        Self::ProbesSucceeded,
        Self::ProbeFailed,
        Self::RateLimited,
        Self::QuarantineElapsed,
    ];

    /// The code the Redis scripts use (`C_*` in `breaker_scripts.rs`).
    pub fn code(self) -> i64 {
        Self::ALL.iter().position(|c| *c == self).expect("listed") as i64 + 1
    }

    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// For people: the `cause` of a TokenStateChanged event.
    pub fn describe(self, policy: &BreakerPolicy) -> String {
        match self {
            Self::UpstreamErrors => format!(
                "circuit breaker opened after {} consecutive upstream errors",
                policy.failures_to_open
            ),
            Self::OpenElapsed => {
                "circuit breaker half-open: one probe lease at a time is granted".into()
            }
            Self::ProbesSucceeded => format!(
                "circuit breaker closed after {} successful probe leases",
                policy.successes_to_close
            ),
            Self::ProbeFailed => "circuit breaker re-opened: the probe lease failed".into(),
            Self::RateLimited => {
                "quarantined: the upstream answered that the token is rate limited".into()
            }
            Self::QuarantineElapsed => "quarantine over".into(),
        }
    }
}

/// One change of a token's state, observed (and so reported) exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub token_id: Id,
    /// When it happened, store clock (for lazy transitions: when it became due).
    pub at_ms: i64,
    pub previous: TokenState,
    pub new: TokenState,
    /// For BREAKER_OPEN and QUARANTINED: when that state ends.
    pub until_ms: Option<i64>,
    pub cause: TransitionCause,
}

/// Whether a granted lease may be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Healthy token.
    Leasable,
    /// Half-open token: this lease is its probe.
    Probe,
    /// Not now: quarantined, open, or half-open with a probe already out. The token
    /// may be usable again at `until_ms` (store clock), earlier for a probe released.
    Refused { state: TokenState, until_ms: i64 },
}

/// The answer to `admit_grant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub admission: Admission,
    pub now_ms: i64,
    pub transitions: Vec<Transition>,
}

/// What a release tells the breaker.
#[derive(Debug, Clone)]
pub struct OutcomeReport {
    pub key: LeaseKey,
    pub outcome: ReleaseOutcome,
    /// With UPSTREAM_RATE_LIMITED: when the upstream said the block ends (Unix ms).
    pub blocked_until_ms: Option<i64>,
    /// The upstream profile's block duration, used when `blocked_until_ms` is absent.
    pub block_duration: Duration,
    /// The longest quarantine this report may set (`Upstream::max_block`).
    pub max_block: Duration,
    /// How long a release can still be repeated after it: the life of the lease record,
    /// the lease's TTL (grace included) + the window (see `Ledger::release`).
    pub repeat_for: Duration,
    pub policy: BreakerPolicy,
}

/// The answer to `record_outcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub now_ms: i64,
    /// Whether this call changed the record. False when the outcome changes nothing (a
    /// success on a healthy token) or this lease's outcome was applied already (a
    /// repeated release).
    pub applied: bool,
    pub transitions: Vec<Transition>,
}

/// A token's health now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    pub token_id: Id,
    /// QUARANTINED while quarantined, otherwise the breaker's state.
    pub state: TokenState,
    /// When `state` is QUARANTINED or BREAKER_OPEN: when the token may be leased again.
    pub until_ms: Option<i64>,
    /// The breaker alone (ACTIVE when closed).
    pub breaker: TokenState,
    /// Consecutive upstream errors counted while closed.
    pub consecutive_failures: u32,
}

/// The answer to `token_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub now_ms: i64,
    pub tokens: Vec<TokenStatus>,
    pub transitions: Vec<Transition>,
}
