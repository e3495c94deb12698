//! What can go wrong, and the denial a caller may fall back on.

use std::time::Duration;

use crate::Priority;
use crate::pb;

/// Why no lease was granted.
///
/// ```
/// use tokenlease_client::DenialReason;
///
/// let reason = DenialReason::TenantQuota;
/// assert_ne!(reason, DenialReason::Unavailable);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenialReason {
    /// The tenant has used its quota for the current window.
    TenantQuota,
    /// Every usable token the tenant may use is full (or at its pace) for now.
    NoTokenCapacity,
    /// The tenant has no usable token (disabled, quarantined, breaker open, none).
    NoUsableToken,
    /// The caller asked to wait and `max_wait` passed before a slot freed.
    WaitTimeout,
    /// The upstream's lease counters were lost; leasing resumes after `retry_after`.
    CountersRecovering,
    /// Not the service's answer: no replica could be reached (or each asked to be
    /// retried later than the client's [`FailoverPolicy`](crate::FailoverPolicy) waits).
    Unavailable,
    /// A reason this client does not know (a newer service).
    Other(i32),
}

impl DenialReason {
    pub(crate) fn from_proto(value: i32) -> Self {
        match pb::DenialReason::try_from(value) {
            Ok(pb::DenialReason::TenantQuota) => Self::TenantQuota,
            Ok(pb::DenialReason::NoTokenCapacity) => Self::NoTokenCapacity,
            Ok(pb::DenialReason::NoUsableToken) => Self::NoUsableToken,
            Ok(pb::DenialReason::WaitTimeout) => Self::WaitTimeout,
            Ok(pb::DenialReason::CountersRecovering) => Self::CountersRecovering,
            _ => Self::Other(value),
        }
    }
}

/// No lease could be had in time: why, when to try again, and how stale a cached answer
/// the caller's fallback may serve instead (from the [`FreshnessPolicy`](crate::FreshnessPolicy)
/// for the call's priority).
///
/// ```
/// use std::time::Duration;
/// use tokenlease_client::{Denial, DenialReason, Priority};
///
/// fn serve_from_cache(denial: &Denial, cached_age: Duration) -> bool {
///     denial.accepts_age(cached_age)
/// }
/// let denial = Denial {
///     reason: DenialReason::TenantQuota,
///     retry_after: Some(Duration::from_secs(3)),
///     message: "tenant acme used its quota".into(),
///     priority: Priority::Critical,
///     max_staleness: Duration::from_secs(300),
/// };
/// assert!(serve_from_cache(&denial, Duration::from_secs(60)));
/// assert!(!serve_from_cache(&denial, Duration::from_secs(600)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The binding constraint.
    pub reason: DenialReason,
    /// When a slot this caller could use frees up, counted from the answer; `None` when
    /// no time can be given.
    pub retry_after: Option<Duration>,
    /// A sentence for people.
    pub message: String,
    /// The call's priority (given, or derived from its kind).
    pub priority: Priority,
    /// The oldest cached data the fallback should serve for this priority.
    pub max_staleness: Duration,
}

impl Denial {
    /// Whether data `age` old is fresh enough to serve instead of a live answer.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokenlease_client::{Denial, DenialReason, Priority};
    /// let denial = Denial {
    ///     reason: DenialReason::NoTokenCapacity,
    ///     retry_after: None,
    ///     message: String::new(),
    ///     priority: Priority::Low,
    ///     max_staleness: Duration::from_secs(7200),
    /// };
    /// assert!(denial.accepts_age(Duration::from_secs(3600)));
    /// ```
    pub fn accepts_age(&self, age: Duration) -> bool {
        age <= self.max_staleness
    }
}

/// What went wrong with a call to tokenlease.
///
/// ```
/// use tokenlease_client::{Client, Error, RequestKind};
///
/// # async fn run(client: Client) {
/// match client.lease("acme", RequestKind::OrderSync).acquire().await {
///     Ok(lease) => drop(lease),
///     Err(Error::Denied(denial)) => println!("retry after {:?}", denial.retry_after),
///     Err(other) => eprintln!("{other}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No lease: the service said no, or no replica answered in time.
    #[error("no lease: {}", .0.message)]
    Denied(Denial),
    /// The service answered an error that retrying elsewhere would not change (bad
    /// input, authentication, permission, a full wait queue, an unknown lease…).
    #[error("tokenlease answered {}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// No replica answered: each was unreachable or asked to be retried later.
    #[error("no tokenlease replica available: {message}")]
    Unavailable {
        /// What the last replica tried said, or why it could not be reached.
        message: String,
        /// The shortest retry-after a replica gave, if any did.
        retry_after: Option<Duration>,
    },
    /// The client's configuration is wrong (an endpoint that is not a URI, an API key
    /// that cannot be a header value, a TLS setting).
    #[error("invalid client configuration: {0}")]
    Config(String),
}
