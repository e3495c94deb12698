//! The lease use cases: acquire and release over the configuration snapshot and the
//! lease counters. No gRPC types here; `grpc/lease_api.rs` converts.

mod allocator;
mod health;
mod live;
mod patch;
mod rebalance;
mod snapshot;
mod usage;
mod waiting;

pub use allocator::{Allocator, Quotas};
pub use health::{TokenHealth, publish_admin_toggle, tenants_reaching};
pub use live::LiveConfig;
pub use rebalance::{MoveOutcome, PlanReport, PoolReport, RebalanceSettings, Rebalancer};
pub use snapshot::{LiveToken, Route, Snapshot};
pub use usage::{TenantUsage, TokenUsage, Usage};
pub use waiting::Lines;

use std::time::Duration;

use secrecy::SecretString;

use crate::auth::Caller;
use crate::domain::{Id, InvalidField, Priority, Tenant, TokenOwner, Upstream};
use crate::error::ServiceError;
use crate::store::counters::{
    AcquireOutcome, AcquireRequest, Counters, Denied, DenyReason, Grant, LeaseKey, QueueTicket,
    ReleaseOutcome, ReleaseResult,
};
use waiting::{QueueEntry, Retry, priority_offset};

/// The largest `cost` one lease may cover.
pub const MAX_COST: u32 = 100;

/// A validated AcquireLease.
#[derive(Debug, Clone)]
pub struct AcquireInput {
    pub tenant_id: Id,
    pub upstream_id: Option<Id>,
    pub priority: Priority,
    pub cost: u32,
    pub max_wait: Duration,
}

/// Why no lease was granted, for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialReason {
    TenantQuota,
    NoTokenCapacity,
    NoUsableToken,
    WaitTimeout,
    CountersRecovering,
}

impl DenialReason {
    /// The `reason` label of the denial metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::TenantQuota => "tenant_quota",
            Self::NoTokenCapacity => "no_token_capacity",
            Self::NoUsableToken => "no_usable_token",
            Self::WaitTimeout => "wait_timeout",
            Self::CountersRecovering => "counters_recovering",
        }
    }
}

/// A granted lease, with the opened secret.
pub struct LeaseGrant {
    pub lease_id: String,
    pub token_id: Id,
    pub secret: SecretString,
    pub expires_at_ms: i64,
    pub valid_for: Duration,
    pub tenant_remaining: u32,
    /// The fair-share quota the grant was decided with.
    pub tenant_limit: u32,
    /// Guaranteed + burst: the most `tenant_limit` can be.
    pub tenant_ceiling: u32,
    pub token_remaining: u32,
    pub window: Duration,
}

/// The answer to AcquireLease.
pub enum AcquireAnswer {
    Granted(LeaseGrant),
    Denied {
        reason: DenialReason,
        retry_after: Option<Duration>,
        message: String,
    },
}

/// The lease service: cheap to clone.
#[derive(Clone)]
pub struct Leaser {
    pub config: LiveConfig,
    pub counters: Counters,
    pub allocator: Allocator,
    /// How long a worker may start its upstream call.
    pub lease_ttl: Duration,
    /// How long after that the call may still reach the upstream (network, retries
    /// inside one call): an unreleased lease's slot is held for TTL + grace + W, and a
    /// release is accepted until TTL + grace. Without it, a call started at the last
    /// instant and arriving a few milliseconds later would fall outside the interval
    /// the windows account for.
    pub use_grace: Duration,
    pub max_wait: Duration,
    /// How many callers of one tenant may wait on this replica at once.
    pub max_waiters_per_tenant: usize,
    /// Share of a token's window it may grant back to back (100: no pacing).
    pub pace_burst_percent: u32,
    pub lines: Lines,
    /// Circuit breakers and quarantines: see `health.rs`.
    pub health: TokenHealth,
    /// True once the replica is shutting down: callers waiting for a slot are answered
    /// UNAVAILABLE at once, so that they go to another replica instead of being cut off.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Usage history: every answered acquire and first release is counted here
    /// (`crate::history`), and written to the configuration store by its flusher.
    pub history: crate::history::Recorder,
}

/// What stays the same across the attempts of one AcquireLease call.
struct Call {
    /// The call's id in the queue, and its lease's if granted.
    nonce: String,
    /// Whether a denial should (re)place the call in the shared queue: only the first
    /// waiter of each tenant line does, so every entry there is one that is polling and
    /// whose "may use a slot from" instant is current.
    enqueue: bool,
    /// Its virtual deadline in the queue, from the first attempt.
    score: Option<i64>,
    attempts: u32,
    deadline: tokio::time::Instant,
}

/// What one attempt came to.
enum Attempt {
    /// Granted, or denied for a reason waiting cannot change.
    Done(AcquireAnswer),
    /// Denied for now.
    Denied(Box<Plan>, Denied),
}

/// The answer to a caller that would wait on a replica that is shutting down: no lease
/// was granted, and another replica can answer at once.
fn shutting_down_error() -> ServiceError {
    ServiceError::Unavailable {
        message: "this replica is shutting down; no lease was granted: call another replica now"
            .into(),
        retry_after: Duration::ZERO,
    }
}

fn queue_id(plan: &Plan) -> String {
    plan.request
        .queue
        .as_ref()
        .map(|q| q.queue_id.clone())
        .unwrap_or_default()
}

/// One acquire decision prepared from the snapshot.
struct Plan {
    request: AcquireRequest,
    upstream: Upstream,
    /// The tenant's guaranteed + burst.
    ceiling: u32,
}

impl Leaser {
    /// Grants a lease or explains why not, waiting up to `max_wait` for a slot: a
    /// waiting caller keeps its place in the pool's queue (priority, then arrival) and
    /// tries again when the slot it may use frees.
    ///
    /// Its span carries the denial's reason (`denial_reason`), and an error status
    /// (`otel.status_code`) when the call fails.
    #[tracing::instrument(
        name = "lease.acquire",
        skip_all,
        fields(tenant_id = %input.tenant_id, token_id, denial_reason, otel.status_code, otel.status_description)
    )]
    pub async fn acquire(
        &self,
        caller: &Caller,
        input: AcquireInput,
    ) -> Result<AcquireAnswer, ServiceError> {
        let started = tokio::time::Instant::now();
        let tenant_id = input.tenant_id.clone();
        let answer = self.acquire_or_deny(caller, input).await;
        if let Ok(AcquireAnswer::Denied { reason, .. }) = &answer {
            tracing::Span::current().record("denial_reason", reason.label());
        }
        self.record_history(&tenant_id, started.elapsed(), &answer);
        mark_failed(&answer);
        answer
    }

    /// Counts an answered call in the usage history. Errors that say the request was
    /// wrong or not allowed (a tenant that does not exist, a cost too high, another
    /// tenant's call) are not the tenant's usage and are left out.
    fn record_history(
        &self,
        tenant_id: &Id,
        waited: Duration,
        answer: &Result<AcquireAnswer, ServiceError>,
    ) {
        use crate::history::Acquired;
        // The grant's token and whether it was borrowed were counted as it was made
        // (`attempt`), where both are known.
        let how = match answer {
            Ok(AcquireAnswer::Granted(_)) => Acquired::Granted,
            Ok(AcquireAnswer::Denied { reason, .. }) => Acquired::Denied {
                reason: reason.label(),
            },
            Err(
                ServiceError::ResourceExhausted { .. }
                | ServiceError::Unavailable { .. }
                | ServiceError::Internal(_),
            ) => Acquired::Failed,
            Err(_) => return,
        };
        let waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        let now = crate::clock::system_now_ms();
        self.history
            .record_acquire(now, tenant_id.as_str(), waited_ms, how);
    }

    async fn acquire_or_deny(
        &self,
        caller: &Caller,
        input: AcquireInput,
    ) -> Result<AcquireAnswer, ServiceError> {
        caller.require_tenant(&input.tenant_id)?;
        let deadline = tokio::time::Instant::now() + input.max_wait.min(self.max_wait);
        let mut call = Call {
            nonce: LeaseKey::new_nonce(),
            enqueue: false,
            score: None,
            attempts: 0,
            deadline,
        };
        let waits = !input.max_wait.is_zero() && !self.max_wait.is_zero();
        let (plan, denied) = loop {
            match self.attempt(&input, &mut call).await? {
                // Every token is out of service, but one is back within the wait.
                Attempt::Done(AcquireAnswer::Denied {
                    reason: DenialReason::NoUsableToken,
                    retry_after: Some(back),
                    ..
                }) if waits && tokio::time::Instant::now() + back <= deadline => {
                    tokio::select! {
                        _ = tokio::time::sleep(back.max(Duration::from_millis(1))) => {}
                        _ = self.shutting_down() => return Err(shutting_down_error()),
                    }
                }
                Attempt::Done(answer) => {
                    if let AcquireAnswer::Denied {
                        reason: DenialReason::NoUsableToken,
                        ..
                    } = &answer
                    {
                        crate::metrics::lease_denied(
                            &input.tenant_id,
                            DenialReason::NoUsableToken.label(),
                        );
                    }
                    return Ok(answer);
                }
                Attempt::Denied(plan, denied) => break (plan, denied),
            }
        };
        if waits && *self.stopping.borrow() {
            return Err(shutting_down_error());
        }
        if !waits || tokio::time::Instant::now() + denied.retry_after > deadline {
            return Ok(denial(
                &self.config.current(),
                &input.tenant_id,
                &plan,
                &denied,
                false,
            ));
        }
        let order =
            crate::clock::system_now_ms() + priority_offset(input.priority, plan.upstream.window);
        let Some(place) = self
            .lines
            .join(&input.tenant_id, order, self.max_waiters_per_tenant)
        else {
            return Err(self.queue_full(&input.tenant_id, &denied));
        };
        // From here on the call may sit in the shared queue; leave it however we end.
        let mut entry = QueueEntry {
            counters: self.counters.clone(),
            upstream_id: plan.request.upstream_id.clone(),
            pool_id: plan.request.pool_id.clone(),
            queue_id: queue_id(&plan),
            nonce: call.nonce.clone(),
            queued: true,
        };
        let _waiting = crate::metrics::waiting(&input.tenant_id);
        call.enqueue = true;
        let retry = Retry::of(&plan, &denied);
        let answer = tokio::select! {
            answer = self.wait_for_slot(&input, &mut call, &place, &mut entry, retry) => answer,
            // The caller leaves its line and the queue as a cancelled caller would.
            _ = self.shutting_down() => Err(shutting_down_error()),
        };
        if matches!(answer, Ok(AcquireAnswer::Granted(_))) {
            entry.queued = false; // the grant took it out of the shared queue
        }
        answer
    }

    /// Resolves once the replica is shutting down (or its server is gone).
    async fn shutting_down(&self) {
        let mut stopping = self.stopping.clone();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    /// One decision against the counters (the token's health admission included),
    /// answered within the counters' timeout whatever Redis does.
    async fn attempt(
        &self,
        input: &AcquireInput,
        call: &mut Call,
    ) -> Result<Attempt, ServiceError> {
        let budget = self.counters.timeout().unwrap_or(Duration::MAX);
        let answer_by = tokio::time::Instant::now().checked_add(budget);
        let left = || answer_by.map_or(Duration::MAX, |by| by - tokio::time::Instant::now());
        // A token the store's health refuses is not granted; plan again (the refused token
        // is now hinted unusable). Bounded, in case health keeps changing under us.
        for _ in 0..3 {
            let snapshot = self.config.current();
            let plan = match self.plan(&snapshot, input, call)? {
                Ok(plan) => plan,
                Err(denial) => return Ok(Attempt::Done(denial)),
            };
            let outcome = self.counters.acquire_within(&plan.request, left()).await?;
            call.attempts += 1;
            match outcome {
                AcquireOutcome::Granted(grant) => {
                    self.health.granted(&plan.request, &grant);
                    let borrowed = borrowed(&snapshot, &plan.request, &grant);
                    crate::metrics::lease_granted(&plan.request, borrowed);
                    tracing::Span::current().record("token_id", grant.token_id.as_str());
                    let pool_id = (snapshot.tokens.get(&grant.token_id))
                        .and_then(|t| t.record.owner.pool())
                        .map(Id::as_str);
                    let granted = crate::history::GrantOf {
                        tenant_id: plan.request.tenant_id.as_str(),
                        token_id: grant.token_id.as_str(),
                        pool_id,
                        upstream_id: plan.request.upstream_id.as_str(),
                    };
                    let now_ms = crate::clock::system_now_ms();
                    self.history.record_grant(now_ms, granted, borrowed);
                    return Ok(Attempt::Done(self.granted(&snapshot, &plan, grant)));
                }
                // The store's health refused the chosen token (`health.rs`): the hint now
                // routes around it; plan again.
                AcquireOutcome::Unhealthy(refused) => {
                    self.health.refused(&refused);
                    // The embedded store keeps the refused lease as given back: a new id.
                    call.nonce = LeaseKey::new_nonce();
                }
                // The chosen token moved to another space after this snapshot: reload the
                // configuration and plan again.
                AcquireOutcome::Denied(denied) if denied.reason == DenyReason::TokenMoved => {
                    if let Err(error) = self.config.refresh().await {
                        tracing::warn!(%error, "a token moved, and the configuration cannot be reloaded");
                    }
                }
                AcquireOutcome::Denied(denied) => {
                    if denied.reason == DenyReason::CountersLostNoticed {
                        self.announce_hold(&plan.request.upstream_id, &denied);
                    }
                    call.score = denied.queue_score;
                    return Ok(Attempt::Denied(Box::new(plan), denied));
                }
            }
        }
        Err(ServiceError::Unavailable {
            message: format!(
                "tenant '{}': token health or placement kept changing during the decision \
                 (or this replica cannot reload the configuration after a token moved); retry",
                input.tenant_id
            ),
            retry_after: Duration::from_millis(50),
        })
    }

    /// A rate-limit report on a token this service counts at less than half its usable
    /// slots is implausible: the token is used outside the service, the profile's limit
    /// is wrong, or the worker misreports. Logged and counted, not refused (the upstream
    /// may know better); a failed read is ignored.
    async fn check_plausible(&self, key: &LeaseKey) {
        let snapshot = self.config.current();
        let Some(upstream) = snapshot.upstreams.get(&key.upstream_id) else {
            return;
        };
        let tokens = std::slice::from_ref(&key.token_id);
        let used = match self
            .counters
            .usage(key.space(), upstream.window, &[], tokens)
            .await
        {
            Ok(counts) => counts.tokens.first().copied().unwrap_or(0),
            Err(_) => return,
        };
        let usable = upstream.usable_per_window();
        if used.saturating_mul(2) < usable {
            tracing::warn!(
                token_id = %key.token_id,
                tenant_id = %key.tenant_id,
                used,
                usable,
                "a worker reported the upstream rate-limited a token this service counts at \
                 less than half its limit: is the token used outside tokenlease, is the \
                 upstream profile's limit right, or does the worker misreport?"
            );
            crate::metrics::implausible_report(&key.token_id, &upstream.id);
        }
    }

    /// Tells operators and watchers that an upstream is held because its counters were
    /// lost: this decision noticed it, and no other will.
    fn announce_hold(&self, upstream: &Id, denied: &Denied) {
        let until_ms = denied.now_ms + denied.retry_after.as_millis() as i64;
        tracing::warn!(
            upstream_id = %upstream,
            hold_ms = denied.retry_after.as_millis() as u64,
            "the lease counters of this upstream were lost (Redis restarted empty, failed over \
             or flushed, or the service restarted): no lease until every lease granted before \
             has run out"
        );
        self.health.events().publish_at(
            denied.now_ms,
            crate::events::EventKind::CountersRecovering {
                upstream_id: upstream.to_string(),
                until_ms,
                cause: "lease counters lost; held for window + lease TTL + grace so that no \
                        lease granted before the loss shares a window with a new one"
                    .into(),
            },
        );
    }

    fn queue_full(&self, tenant: &Id, denied: &Denied) -> ServiceError {
        ServiceError::ResourceExhausted {
            message: format!(
                "tenant '{tenant}' already has {} callers waiting on this replica; retry later or wait less",
                self.max_waiters_per_tenant
            ),
            retry_after: denied.retry_after,
        }
    }

    /// Picks the upstream and candidate tokens; `Ok(Err(_))` is a denial without trying.
    #[tracing::instrument(name = "lease.plan", skip_all, fields(tenant_id = %input.tenant_id))]
    fn plan(
        &self,
        snapshot: &Snapshot,
        input: &AcquireInput,
        call: &Call,
    ) -> Result<Result<Plan, AcquireAnswer>, ServiceError> {
        let tenant = snapshot.tenants.get(&input.tenant_id).ok_or_else(|| {
            ServiceError::NotFound(format!(
                "tenant_id: tenant '{}' does not exist",
                input.tenant_id
            ))
        })?;
        let routes = snapshot
            .routes
            .get(&tenant.id)
            .map(|routes| &routes[..])
            .unwrap_or_default();
        let route = match &input.upstream_id {
            Some(up) => {
                let upstream = snapshot.upstreams.get(up);
                if upstream.is_none() {
                    return Err(ServiceError::NotFound(format!(
                        "upstream_id: upstream '{up}' does not exist"
                    )));
                }
                routes.iter().find(|r| &r.upstream_id == up)
            }
            None if routes.len() > 1 => {
                let names: Vec<&str> = routes.iter().map(|r| r.upstream_id.as_str()).collect();
                return Err(InvalidField::new(
                    "upstream_id",
                    format!(
                        "is required: tenant '{}' has tokens on upstreams {}",
                        tenant.id,
                        names.join(", ")
                    ),
                )
                .into());
            }
            None => routes.first(),
        };
        let Some(route) = route else {
            return Ok(Err(no_usable_token(tenant, snapshot)));
        };
        let upstream = snapshot.upstreams[&route.upstream_id].clone();
        let ceiling = snapshot.tenant_limit(tenant);
        check_cost(input.cost, tenant, ceiling, &upstream)?;
        // Route around open, quarantined and busy half-open dedicated tokens
        // (`health.rs`). Pool tokens go whole: the store keeps the pool's unusable
        // tokens out itself (its pool index, `index_scripts.rs`), and one list per pool
        // lets every tenant of the pool share that index.
        let dedicated = match self.health.route_around(&tenant.id, route) {
            Ok((dedicated, _)) => dedicated,
            Err(denial) => return Ok(Err(denial)),
        };
        let pooled = route.pooled.clone();
        let tenant_limit = self.allocator.quota(snapshot, &tenant.id, &upstream.id);
        let remaining_wait = call
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        let queue = QueueTicket {
            queue_id: match &tenant.pool_id {
                Some(pool) if !pooled.is_empty() => pool.to_string(),
                _ => format!("tenant:{}", tenant.id),
            },
            priority_offset_ms: priority_offset(input.priority, upstream.window),
            score: call.score,
            wait_ms: if call.enqueue {
                remaining_wait.as_millis() as i64
            } else {
                0
            },
            guaranteed: (snapshot.tiers.get(&tenant.tier_id)).map_or(0, |t| tenant.guaranteed(t)),
        };
        Ok(Ok(Plan {
            request: AcquireRequest {
                upstream_id: upstream.id.clone(),
                pool_id: snapshot.space_pool(&tenant.id, &upstream.id).cloned(),
                config_version: snapshot.version,
                nonce: call.nonce.clone(),
                tenant_id: tenant.id.clone(),
                tenant_limit,
                token_limit: upstream.usable_per_window(),
                window: upstream.window,
                lease_ttl: self.lease_ttl + self.use_grace,
                cost: input.cost,
                dedicated,
                pooled,
                pooled_digest: Some(route.pooled_digest.clone()),
                count_demand: call.attempts == 0,
                queue: Some(queue),
                pace_burst: pace_burst(upstream.usable_per_window(), self.pace_burst_percent),
            },
            upstream,
            ceiling,
        }))
    }

    fn granted(&self, snapshot: &Snapshot, plan: &Plan, grant: Grant) -> AcquireAnswer {
        let secret = snapshot
            .tokens
            .get(&grant.token_id)
            .and_then(|t| t.secret.as_ref().ok())
            .cloned()
            .unwrap_or_else(|| SecretString::from(String::new()));
        let req = &plan.request;
        let key = LeaseKey {
            upstream_id: req.upstream_id.clone(),
            pool_id: req.pool_id.clone(),
            tenant_id: req.tenant_id.clone(),
            token_id: grant.token_id.clone(),
            nonce: req.nonce.clone(),
        };
        AcquireAnswer::Granted(LeaseGrant {
            lease_id: key.to_lease_id(),
            token_id: grant.token_id,
            secret,
            expires_at_ms: grant.now_ms + self.lease_ttl.as_millis() as i64,
            valid_for: self.lease_ttl,
            tenant_remaining: req.tenant_limit.saturating_sub(grant.tenant_used),
            tenant_limit: req.tenant_limit,
            tenant_ceiling: plan.ceiling,
            token_remaining: req.token_limit.saturating_sub(grant.token_used),
            window: plan.upstream.window,
        })
    }

    /// Records how a lease went (`blocked_until_ms`: the upstream's block end, with
    /// UPSTREAM_RATE_LIMITED). Returns whether it had been released already.
    #[tracing::instrument(
        name = "lease.release",
        skip_all,
        fields(outcome = outcome.as_str(), otel.status_code, otel.status_description)
    )]
    pub async fn release(
        &self,
        caller: &Caller,
        lease_id: &str,
        outcome: ReleaseOutcome,
        blocked_until_ms: Option<i64>,
    ) -> Result<bool, ServiceError> {
        let released = self
            .record_release(caller, lease_id, outcome, blocked_until_ms)
            .await;
        mark_failed(&released);
        released
    }

    async fn record_release(
        &self,
        caller: &Caller,
        lease_id: &str,
        outcome: ReleaseOutcome,
        blocked_until_ms: Option<i64>,
    ) -> Result<bool, ServiceError> {
        if lease_id.is_empty() {
            return Err(InvalidField::new("lease_id", "is required").into());
        }
        // Not echoed: a caller that pastes the wrong value (an API key, a token) must
        // not find it in an error message, a log line or a trace.
        let key = LeaseKey::parse(lease_id).ok_or_else(|| {
            InvalidField::new(
                "lease_id",
                "is not a lease id (AcquireLease returns one: \
                 <upstream>.<tenant>.<token>.<32 hex digits>)",
            )
        })?;
        let not_found = || {
            ServiceError::NotFound(format!(
                "lease_id: lease '{}' is unknown, or its expiry + the upstream window has \
                 passed (a release is accepted while the lease's slot is counted)",
                key.to_lease_id()
            ))
        };
        caller.require_tenant(&key.tenant_id)?;
        // Also feeds the token's breaker and quarantine (`health.rs`).
        let result = self
            .release_reporting(&key, outcome, blocked_until_ms)
            .await?;
        if result == ReleaseResult::Released {
            self.history.record_release(
                crate::clock::system_now_ms(),
                key.tenant_id.as_str(),
                key.token_id.as_str(),
                key.upstream_id.as_str(),
                outcome,
            );
        }
        if result == ReleaseResult::Released && outcome == ReleaseOutcome::UpstreamRateLimited {
            self.check_plausible(&key).await;
        }
        match result {
            ReleaseResult::Released => Ok(false),
            ReleaseResult::AlreadyReleased => Ok(true),
            ReleaseResult::NotFound => Err(not_found()),
            ReleaseResult::Conflict { previous } => Err(ServiceError::FailedPrecondition(format!(
                "outcome: lease was already released as '{}'; a lease has one outcome",
                previous.as_str()
            ))),
        }
    }
}

/// Slots a token may grant back to back: `percent` of its limit, at least 1; 0 (no
/// pacing) at 100 %.
fn pace_burst(token_limit: u32, percent: u32) -> u32 {
    if percent >= 100 {
        return 0;
    }
    let burst = (u64::from(token_limit) * u64::from(percent)).div_ceil(100);
    burst.clamp(1, u64::from(u32::MAX)) as u32
}

fn check_cost(
    cost: u32,
    tenant: &Tenant,
    tenant_limit: u32,
    upstream: &Upstream,
) -> Result<(), ServiceError> {
    let token_limit = upstream.usable_per_window();
    if cost > token_limit {
        return Err(InvalidField::new(
            "cost",
            format!(
                "is {cost}, more than a token of '{}' may serve per window ({token_limit})",
                upstream.id
            ),
        )
        .into());
    }
    if cost > tenant_limit {
        return Err(ServiceError::FailedPrecondition(format!(
            "cost: {cost} is more than tenant '{}' may use per window ({tenant_limit}); raise its tier or overrides",
            tenant.id
        )));
    }
    Ok(())
}

fn no_usable_token(tenant: &Tenant, snapshot: &Snapshot) -> AcquireAnswer {
    let reachable: Vec<&LiveToken> = snapshot
        .tokens
        .values()
        .filter(|t| match &t.record.owner {
            TokenOwner::Dedicated(owner) => owner == &tenant.id,
            TokenOwner::Pool(pool) => tenant.pool_id.as_ref() == Some(pool),
        })
        .collect();
    let sealed_shut = reachable
        .iter()
        .filter(|t| !t.record.disabled && t.secret.is_err())
        .count();
    let detail = if reachable.is_empty() {
        "no token is dedicated to it or in its pool".to_owned()
    } else if sealed_shut > 0 {
        format!(
            "{sealed_shut} of its tokens cannot be decrypted with the configured master keys (see the server log)"
        )
    } else {
        "all of its tokens are disabled".to_owned()
    };
    AcquireAnswer::Denied {
        reason: DenialReason::NoUsableToken,
        retry_after: None,
        message: format!("tenant '{}' has no usable token: {detail}", tenant.id),
    }
}

/// Whether a grant drew on borrowed capacity: the tenant's slots in the window, this
/// grant included, exceed its guarantee.
fn borrowed(snapshot: &Snapshot, request: &AcquireRequest, grant: &Grant) -> bool {
    let guaranteed = snapshot.tenants.get(&request.tenant_id).and_then(|t| {
        let tier = snapshot.tiers.get(&t.tier_id)?;
        Some(t.guaranteed(tier))
    });
    guaranteed.is_some_and(|g| grant.tenant_used > g)
}

impl Leaser {
    /// After a configuration write committed as `version`: this replica's snapshot and
    /// quotas follow it at once (read-your-writes; on failure the poller and the
    /// allocator catch up), then watchers get a `ConfigChanged`.
    pub async fn follow_write(
        &self,
        events: &crate::events::EventBus,
        timeout: Duration,
        resource: crate::events::Resource,
        id: &str,
        change: crate::events::Change,
        version: i64,
    ) {
        match tokio::time::timeout(timeout, self.config.refresh_to(version)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "snapshot refresh after a configuration write failed; the poller will retry")
            }
            Err(_) => tracing::warn!(
                "snapshot refresh after a configuration write timed out; the poller will retry"
            ),
        }
        if let Err(error) = self.allocator.refresh_for_config().await {
            tracing::warn!(%error, "quota refresh after a configuration write failed; the allocator will retry");
        }
        events.publish(crate::events::EventKind::ConfigChanged {
            resource,
            id: id.to_owned(),
            change,
            version,
        });
    }
}

/// Gives the current span an error status when `result` failed; the message is the
/// error's, which never carries a secret (see `ServiceError`).
fn mark_failed<T>(result: &Result<T, ServiceError>) {
    if let Err(error) = result {
        let span = tracing::Span::current();
        span.record("otel.status_description", error.to_string());
        span.record("otel.status_code", "ERROR");
    }
}

fn denial(
    snapshot: &Snapshot,
    tenant: &Id,
    plan: &Plan,
    denied: &Denied,
    waited: bool,
) -> AcquireAnswer {
    let reason = match denied.reason {
        _ if waited => DenialReason::WaitTimeout,
        DenyReason::TenantQuota => DenialReason::TenantQuota,
        DenyReason::NoTokenCapacity => DenialReason::NoTokenCapacity,
        DenyReason::NoUsableToken | DenyReason::TokenMoved => DenialReason::NoUsableToken,
        DenyReason::CountersLost | DenyReason::CountersLostNoticed => {
            DenialReason::CountersRecovering
        }
    };
    let pool = snapshot
        .tenants
        .get(&plan.request.tenant_id)
        .and_then(|t| t.pool_id.as_ref());
    crate::metrics::acquire_denied(&plan.request, reason.label(), denied.reason, pool);
    AcquireAnswer::Denied {
        reason,
        retry_after: Some(denied.retry_after),
        message: denial_message(denied.reason, tenant, plan),
    }
}

fn denial_message(reason: DenyReason, tenant: &Id, plan: &Plan) -> String {
    match reason {
        DenyReason::TenantQuota => format!(
            "tenant '{tenant}' has used its quota of {} requests per {:?}",
            plan.request.tenant_limit, plan.upstream.window
        ),
        DenyReason::NoTokenCapacity if plan.request.pace_burst > 0 => format!(
            "every token tenant '{tenant}' may use is at its limit of {} requests per {:?} \
             or at its pace ({} back to back, then one per {:?})",
            plan.request.token_limit,
            plan.upstream.window,
            plan.request.pace_burst,
            plan.upstream.window / plan.request.token_limit.max(1),
        ),
        DenyReason::NoTokenCapacity => format!(
            "every token tenant '{tenant}' may use is at its limit of {} requests per {:?}",
            plan.request.token_limit, plan.upstream.window
        ),
        DenyReason::NoUsableToken => format!(
            "no token tenant '{tenant}' may use on upstream '{}' is in service now: each is \
             quarantined after an upstream rate-limit answer, has its circuit breaker open \
             after upstream errors, or is half-open with its one probe lease out (see \
             GetUsage or WatchEvents for which)",
            plan.upstream.id
        ),
        DenyReason::TokenMoved => format!(
            "a token tenant '{tenant}' may use moved to another pool and this replica could \
             not reload the configuration yet; retry"
        ),
        DenyReason::CountersLost | DenyReason::CountersLostNoticed => format!(
            "the lease counters of upstream '{}' were lost (Redis restarted empty or failed \
             over, or the service restarted): no lease until every lease granted before can \
             no longer reach the upstream (window + lease TTL + grace after the loss was \
             noticed)",
            plan.upstream.id
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::pace_burst;

    /// A share of the limit rounded up, at least 1, 0 (off) at 100 %, no overflow.
    #[test]
    fn pace_burst_is_a_share_of_the_limit() {
        assert_eq!(pace_burst(95, 25), 24);
        assert_eq!(pace_burst(5, 25), 2);
        assert_eq!(pace_burst(1, 1), 1);
        assert_eq!(pace_burst(95, 100), 0);
        assert_eq!(pace_burst(u32::MAX, 99), 4_252_017_623);
    }
}
