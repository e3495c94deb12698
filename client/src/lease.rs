//! [`LeaseRequest`] and the [`LeaseGuard`] that gives the lease back.
//!
//! Drop policy (a destructor cannot await): an unreleased guard releases itself from
//! `Drop` by spawning the ReleaseLease on the Tokio runtime it is dropped in —
//! - `NOT_USED` when [`LeaseGuard::token`] was never called: the slot is given back;
//! - the outcome given to [`LeaseGuard::record`] when the token was taken;
//! - nothing when the token was taken and no outcome recorded (a panic in the middle
//!   of the upstream call, say): the call may still reach the upstream, so the lease is
//!   left to expire and its slot stays counted until its expiry + window, which covers
//!   any use within its validity. Releasing it as a success would free the slot a window
//!   after the release, possibly before the upstream forgets a call still in flight.
//!
//! Dropped outside a Tokio runtime (or while it shuts down), a guard cannot send
//! anything: the lease expires by itself, its slot counted until expiry + window. Use
//! [`LeaseGuard::release`] to release explicitly and see the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use secrecy::SecretString;

use crate::Client;
use crate::error::{Denial, DenialReason, Error};
use crate::kinds::{Priority, RequestKind};
use crate::pb;

/// How the upstream call made under a lease went.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tokenlease_client::Outcome;
///
/// let blocked = Outcome::RateLimited {
///     blocked_until: Some(SystemTime::now() + Duration::from_secs(600)),
/// };
/// assert_ne!(blocked, Outcome::Success);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered normally.
    Success,
    /// The upstream failed (5xx, timeout, connection error): feeds the token's breaker.
    UpstreamError,
    /// The upstream said the token is blocked: the service quarantines it until
    /// `blocked_until` (or for the upstream's block duration when `None`).
    RateLimited {
        /// When the upstream said the block ends.
        blocked_until: Option<SystemTime>,
    },
    /// The token was not used: the slot is given back.
    NotUsed,
}

impl Outcome {
    fn to_proto(self) -> (pb::ReleaseOutcome, Option<prost_types::Timestamp>) {
        match self {
            Self::Success => (pb::ReleaseOutcome::Success, None),
            Self::UpstreamError => (pb::ReleaseOutcome::UpstreamError, None),
            Self::NotUsed => (pb::ReleaseOutcome::NotUsed, None),
            Self::RateLimited { blocked_until } => (
                pb::ReleaseOutcome::UpstreamRateLimited,
                blocked_until.map(prost_types::Timestamp::from),
            ),
        }
    }
}

/// What is left of the tenant's and the token's capacity after a grant.
///
/// ```no_run
/// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
/// let lease = client.lease("acme", tokenlease_client::RequestKind::OrderSync).acquire().await?;
/// let quota = lease.quota();
/// println!("{} of {} left this window", quota.tenant_remaining, quota.tenant_limit);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    /// Requests the tenant may still start in the current window.
    pub tenant_remaining: u32,
    /// The tenant's quota for the current window, as the fair share sets it now.
    pub tenant_limit: u32,
    /// The most the tenant's quota can grow to.
    pub tenant_ceiling: u32,
    /// Requests the leased token may still serve in the current window.
    pub token_remaining: u32,
    /// The upstream's window.
    pub window: Duration,
}

/// The service's answer to a release.
///
/// ```no_run
/// # async fn run(lease: tokenlease_client::LeaseGuard) -> Result<(), tokenlease_client::Error> {
/// let released = lease.release(tokenlease_client::Outcome::Success).await?;
/// assert!(!released.already_released);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    /// The lease had been released before with the same outcome.
    pub already_released: bool,
}

/// An AcquireLease being set up: `client.lease(tenant, kind)…acquire().await`.
///
/// ```no_run
/// use std::time::Duration;
/// use tokenlease_client::{Priority, RequestKind};
///
/// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
/// let lease = client
///     .lease("acme", RequestKind::Inventory)
///     .priority(Priority::High)
///     .max_wait(Duration::from_secs(5))
///     .cost(2)
///     .acquire()
///     .await?;
/// # drop(lease); Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a lease request does nothing until `acquire` is awaited"]
pub struct LeaseRequest {
    client: Client,
    tenant_id: String,
    kind: RequestKind,
    priority: Option<Priority>,
    upstream: Option<String>,
    cost: u32,
    max_wait: Duration,
}

impl Client {
    /// Starts an AcquireLease for `tenant_id`, for a call of `kind`.
    ///
    /// ```no_run
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// let lease = client
    ///     .lease("acme", tokenlease_client::RequestKind::Payment)
    ///     .acquire()
    ///     .await?;
    /// # drop(lease); Ok(()) }
    /// ```
    pub fn lease(&self, tenant_id: impl Into<String>, kind: RequestKind) -> LeaseRequest {
        LeaseRequest {
            client: self.clone(),
            tenant_id: tenant_id.into(),
            kind,
            priority: None,
            upstream: self.shared.upstream.clone(),
            cost: 1,
            max_wait: Duration::ZERO,
        }
    }
}

impl LeaseRequest {
    /// How long the service may hold the call for a slot (default 0: answer at once).
    ///
    /// ```no_run
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// let lease = client
    ///     .lease("acme", tokenlease_client::RequestKind::OrderSync)
    ///     .max_wait(std::time::Duration::from_secs(2))
    ///     .acquire()
    ///     .await?;
    /// # drop(lease); Ok(()) }
    /// ```
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// How many upstream requests the lease covers (default 1, at most 100).
    ///
    /// ```no_run
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// let lease = client.lease("acme", tokenlease_client::RequestKind::OrderSync).cost(3).acquire().await?;
    /// # drop(lease); Ok(()) }
    /// ```
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// An explicit priority (default: the service derives it from the kind).
    ///
    /// ```no_run
    /// use tokenlease_client::{Priority, RequestKind};
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// let lease = client.lease("acme", RequestKind::OrderSync).priority(Priority::Low).acquire().await?;
    /// # drop(lease); Ok(()) }
    /// ```
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority);
        self
    }

    /// The upstream to lease a token of (default: the client's).
    ///
    /// ```no_run
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// let lease = client
    ///     .lease("acme", tokenlease_client::RequestKind::OrderSync)
    ///     .upstream("baselinker")
    ///     .acquire()
    ///     .await?;
    /// # drop(lease); Ok(()) }
    /// ```
    pub fn upstream(mut self, upstream_id: impl Into<String>) -> Self {
        self.upstream = Some(upstream_id.into());
        self
    }

    /// The priority the call has: the explicit one, or the kind's default.
    pub(crate) fn effective_priority(&self) -> Priority {
        self.priority
            .unwrap_or_else(|| self.kind.default_priority())
    }

    /// A denial carrying this request's priority and its freshness bound.
    pub(crate) fn denial(
        &self,
        reason: DenialReason,
        retry_after: Option<Duration>,
        message: String,
    ) -> Denial {
        let priority = self.effective_priority();
        Denial {
            reason,
            retry_after,
            message,
            priority,
            max_staleness: self.client.shared.freshness.max_staleness(priority),
        }
    }

    /// Asks for the lease, failing over between replicas. A denial is
    /// [`Error::Denied`]; when no replica answers, [`Error::Unavailable`].
    ///
    /// ```no_run
    /// use tokenlease_client::{Error, RequestKind};
    /// # async fn run(client: tokenlease_client::Client) {
    /// match client.lease("acme", RequestKind::OrderSync).acquire().await {
    ///     Ok(lease) => println!("lease {} on token {}", lease.lease_id(), lease.token_id()),
    ///     Err(Error::Denied(denial)) => println!("{:?}, retry after {:?}", denial.reason, denial.retry_after),
    ///     Err(error) => eprintln!("{error}"),
    /// }
    /// # }
    /// ```
    pub async fn acquire(self) -> Result<LeaseGuard, Error> {
        let wait_ends = Instant::now() + self.max_wait;
        let answer = self
            .client
            .with_failover(|mut stub| {
                // A retry on another replica waits only for what is left of the wait.
                let remaining = wait_ends.saturating_duration_since(Instant::now());
                let message = pb::AcquireLeaseRequest {
                    tenant_id: self.tenant_id.clone(),
                    upstream_id: self.upstream.clone().unwrap_or_default(),
                    priority: self
                        .priority
                        .map_or(pb::Priority::Unspecified, Priority::to_proto)
                        as i32,
                    request_kind: self.kind.to_proto() as i32,
                    cost: self.cost,
                    max_wait: (!remaining.is_zero())
                        .then(|| prost_types::Duration::try_from(remaining).ok())
                        .flatten(),
                };
                let request = self.client.request(message);
                async move { stub.acquire_lease(request).await }
            })
            .await?
            .into_inner();
        match answer.result {
            Some(pb::acquire_lease_response::Result::Lease(lease)) => {
                Ok(LeaseGuard::new(self.client, lease))
            }
            Some(pb::acquire_lease_response::Result::Denial(denial)) => {
                let retry_after = denial.retry_after.and_then(|d| Duration::try_from(d).ok());
                Err(Error::Denied(self.denial(
                    DenialReason::from_proto(denial.reason),
                    retry_after,
                    denial.message,
                )))
            }
            None => Err(Error::Status(tonic::Status::internal(
                "AcquireLease answered neither a lease nor a denial",
            ))),
        }
    }
}

/// A granted lease: the token, and the promise to release it. Dropping the guard
/// releases it (see the policy below); [`LeaseGuard::release`] does it explicitly.
///
/// Drop policy: `NOT_USED` when [`LeaseGuard::token`] was never called, the outcome
/// given to [`LeaseGuard::record`] when it was; a guard whose token was taken and no
/// outcome recorded is left to expire (the call may still be in flight), and so is any
/// guard dropped outside a Tokio runtime. The release is spawned on the current Tokio
/// runtime and fails over between replicas like any call.
///
/// ```no_run
/// use secrecy::ExposeSecret;
/// use tokenlease_client::{Outcome, RequestKind};
///
/// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
/// let mut lease = client.lease("acme", RequestKind::OrderSync).acquire().await?;
/// let header_value = lease.token().expose_secret().to_owned(); // marks the token taken
/// // … the upstream call …
/// # drop(header_value);
/// lease.record(Outcome::Success);
/// drop(lease); // released as SUCCESS in the background
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping a lease at once gives it back unused"]
pub struct LeaseGuard {
    client: Client,
    lease_id: String,
    token_id: String,
    token: SecretString,
    expires_at: Option<SystemTime>,
    valid_for: Duration,
    granted: Instant,
    quota: Quota,
    taken: AtomicBool,
    recorded: Option<Outcome>,
    released: bool,
}

impl LeaseGuard {
    fn new(client: Client, lease: pb::Lease) -> Self {
        let quota = lease.quota.unwrap_or_default();
        Self {
            client,
            lease_id: lease.lease_id,
            token_id: lease.token_id,
            token: SecretString::from(lease.token),
            expires_at: lease.expires_at.and_then(|t| SystemTime::try_from(t).ok()),
            valid_for: lease
                .valid_for
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default(),
            granted: Instant::now(),
            quota: Quota {
                tenant_remaining: quota.tenant_remaining,
                tenant_limit: quota.tenant_limit,
                tenant_ceiling: quota.tenant_ceiling,
                token_remaining: quota.token_remaining,
                window: quota
                    .window
                    .and_then(|d| Duration::try_from(d).ok())
                    .unwrap_or_default(),
            },
            taken: AtomicBool::new(false),
            recorded: None,
            released: false,
        }
    }

    /// The upstream token. Calling this marks it taken: from then on the guard no longer
    /// releases as `NOT_USED` on drop.
    ///
    /// ```no_run
    /// use secrecy::ExposeSecret;
    /// # async fn run(lease: tokenlease_client::LeaseGuard) {
    /// let header = ("X-BLToken", lease.token().expose_secret().to_owned());
    /// # drop(header); }
    /// ```
    pub fn token(&self) -> &SecretString {
        self.taken.store(true, Ordering::Relaxed);
        &self.token
    }

    /// Whether [`LeaseGuard::token`] was called.
    ///
    /// ```no_run
    /// # async fn run(lease: tokenlease_client::LeaseGuard) {
    /// assert!(!lease.token_taken());
    /// let _ = lease.token();
    /// assert!(lease.token_taken());
    /// # }
    /// ```
    pub fn token_taken(&self) -> bool {
        self.taken.load(Ordering::Relaxed)
    }

    /// Records how the upstream call went, for the release on drop. Recording marks the
    /// token taken unless the outcome is `NotUsed`.
    ///
    /// ```no_run
    /// # async fn run(mut lease: tokenlease_client::LeaseGuard) {
    /// lease.record(tokenlease_client::Outcome::UpstreamError);
    /// # }
    /// ```
    pub fn record(&mut self, outcome: Outcome) {
        if outcome != Outcome::NotUsed {
            self.taken.store(true, Ordering::Relaxed);
        }
        self.recorded = Some(outcome);
    }

    /// The lease id, as ReleaseLease takes it.
    ///
    /// ```no_run
    /// # fn run(lease: tokenlease_client::LeaseGuard) {
    /// println!("holding {}", lease.lease_id());
    /// # }
    /// ```
    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// The id of the token leased (not secret).
    ///
    /// ```no_run
    /// # fn run(lease: tokenlease_client::LeaseGuard) {
    /// println!("on token {}", lease.token_id());
    /// # }
    /// ```
    pub fn token_id(&self) -> &str {
        &self.token_id
    }

    /// The instant the upstream call must start before, on the service's clock.
    ///
    /// ```no_run
    /// # fn run(lease: tokenlease_client::LeaseGuard) {
    /// println!("valid until {:?}", lease.expires_at());
    /// # }
    /// ```
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// How long the lease is still valid, on this process's clock (its validity
    /// counted from when the answer arrived, so a little less than the service's).
    ///
    /// ```no_run
    /// # fn run(lease: tokenlease_client::LeaseGuard) {
    /// if lease.remaining_validity().is_zero() {
    ///     println!("too late to start the call");
    /// }
    /// # }
    /// ```
    pub fn remaining_validity(&self) -> Duration {
        self.valid_for.saturating_sub(self.granted.elapsed())
    }

    /// What is left of the tenant's and the token's capacity after this grant.
    ///
    /// ```no_run
    /// # fn run(lease: tokenlease_client::LeaseGuard) {
    /// println!("{} left on the token", lease.quota().token_remaining);
    /// # }
    /// ```
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Releases the lease with `outcome` and waits for the service's answer.
    ///
    /// ```no_run
    /// # async fn run(lease: tokenlease_client::LeaseGuard) -> Result<(), tokenlease_client::Error> {
    /// lease.release(tokenlease_client::Outcome::NotUsed).await?;
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self, outcome: Outcome) -> Result<Released, Error> {
        self.released = true;
        self.release_with(outcome, None).await
    }

    /// Releases with `outcome` and the upstream call's latency.
    pub(crate) async fn release_with(
        &self,
        outcome: Outcome,
        latency: Option<Duration>,
    ) -> Result<Released, Error> {
        send_release(&self.client, &self.lease_id, outcome, latency).await
    }

    /// Marks the guard released, so that `Drop` sends nothing.
    pub(crate) fn disarm(&mut self) {
        self.released = true;
    }

    /// The outcome `Drop` releases with, if any (see the type's docs).
    fn outcome_on_drop(&self) -> Option<Outcome> {
        if !self.token_taken() {
            return Some(Outcome::NotUsed);
        }
        self.recorded
    }
}

async fn send_release(
    client: &Client,
    lease_id: &str,
    outcome: Outcome,
    latency: Option<Duration>,
) -> Result<Released, Error> {
    let (outcome, blocked_until) = outcome.to_proto();
    let answer = client
        .with_failover(|mut stub| {
            let message = pb::ReleaseLeaseRequest {
                lease_id: lease_id.to_owned(),
                outcome: outcome as i32,
                blocked_until,
                upstream_latency: latency.and_then(|l| prost_types::Duration::try_from(l).ok()),
            };
            let request = client.request(message);
            async move { stub.release_lease(request).await }
        })
        .await?
        .into_inner();
    Ok(Released {
        already_released: answer.already_released,
    })
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Some(outcome) = self.outcome_on_drop() else {
            tracing::debug!(lease_id = %self.lease_id, "lease token taken but no outcome recorded: left to expire");
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(lease_id = %self.lease_id, "lease dropped outside a tokio runtime: left to expire");
            return;
        };
        let client = self.client.clone();
        let lease_id = std::mem::take(&mut self.lease_id);
        runtime.spawn(async move {
            if let Err(error) = send_release(&client, &lease_id, outcome, None).await {
                tracing::warn!(%lease_id, %error, "releasing a dropped lease failed");
            }
        });
    }
}
