//! [`Client::call`]: acquire a lease, run the upstream call with its token, release with
//! the outcome the call's result reports; or, when no lease can be had in time, run the
//! fallback with the denial.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, Instant};

use secrecy::SecretString;

use crate::Client;
use crate::error::{Denial, DenialReason, Error};
use crate::kinds::{Priority, RequestKind};
use crate::lease::{LeaseRequest, Outcome};

/// How a result of an upstream call is reported to tokenlease. Implemented for
/// `Result<T, E>` when `E` implements it (`Ok` is a success), for [`Outcome`] itself,
/// and for the BaseLinker adapter's [`Reply`](crate::baselinker::Reply).
///
/// ```
/// use tokenlease_client::{Outcome, ReportOutcome};
///
/// enum ShopError { Timeout, BadRequest }
///
/// impl ReportOutcome for ShopError {
///     fn outcome(&self) -> Outcome {
///         match self {
///             ShopError::Timeout => Outcome::UpstreamError,
///             // The upstream answered; the request was ours to fix.
///             ShopError::BadRequest => Outcome::Success,
///         }
///     }
/// }
///
/// let result: Result<u32, ShopError> = Err(ShopError::Timeout);
/// assert_eq!(result.outcome(), Outcome::UpstreamError);
/// ```
pub trait ReportOutcome {
    /// The outcome to release the lease with.
    fn outcome(&self) -> Outcome;
}

impl ReportOutcome for Outcome {
    fn outcome(&self) -> Outcome {
        *self
    }
}

impl<T, E: ReportOutcome> ReportOutcome for Result<T, E> {
    fn outcome(&self) -> Outcome {
        match self {
            Ok(_) => Outcome::Success,
            Err(error) => error.outcome(),
        }
    }
}

/// How stale the data a fallback serves may be, by priority. The defaults are the
/// strategy's: critical 5 min, normal 30 min, background (low) 2 h; high, which it
/// does not name, is held to critical's 5 min (customer-facing reads).
///
/// ```
/// use std::time::Duration;
/// use tokenlease_client::{FreshnessPolicy, Priority};
///
/// let policy = FreshnessPolicy::default();
/// assert_eq!(policy.max_staleness(Priority::Critical), Duration::from_secs(5 * 60));
/// assert_eq!(policy.max_staleness(Priority::Normal), Duration::from_secs(30 * 60));
/// assert_eq!(policy.max_staleness(Priority::Low), Duration::from_secs(2 * 3600));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreshnessPolicy {
    critical: Duration,
    high: Duration,
    normal: Duration,
    low: Duration,
}

impl Default for FreshnessPolicy {
    fn default() -> Self {
        Self {
            critical: Duration::from_secs(5 * 60),
            high: Duration::from_secs(5 * 60),
            normal: Duration::from_secs(30 * 60),
            low: Duration::from_secs(2 * 60 * 60),
        }
    }
}

impl FreshnessPolicy {
    /// The same policy with `max_staleness` for `priority`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenlease_client::{FreshnessPolicy, Priority};
    ///
    /// let policy = FreshnessPolicy::default().with(Priority::High, Duration::from_secs(60));
    /// assert_eq!(policy.max_staleness(Priority::High), Duration::from_secs(60));
    /// ```
    pub fn with(mut self, priority: Priority, max_staleness: Duration) -> Self {
        *self.slot(priority) = max_staleness;
        self
    }

    /// The oldest data a fallback should serve for a call of `priority`.
    ///
    /// ```
    /// use tokenlease_client::{FreshnessPolicy, Priority};
    ///
    /// let policy = FreshnessPolicy::default();
    /// assert!(policy.max_staleness(Priority::Critical) < policy.max_staleness(Priority::Low));
    /// ```
    pub fn max_staleness(&self, priority: Priority) -> Duration {
        match priority {
            Priority::Critical => self.critical,
            Priority::High => self.high,
            Priority::Normal => self.normal,
            Priority::Low => self.low,
        }
    }

    fn slot(&mut self, priority: Priority) -> &mut Duration {
        match priority {
            Priority::Critical => &mut self.critical,
            Priority::High => &mut self.high,
            Priority::Normal => &mut self.normal,
            Priority::Low => &mut self.low,
        }
    }
}

type Fallback<'a, R> =
    Box<dyn FnOnce(Denial) -> Pin<Box<dyn Future<Output = R> + Send + 'a>> + Send + 'a>;

/// An upstream call under a lease, set up by [`Client::call`]; awaiting it runs it.
/// The closure, the fallback and their futures must be `Send` (the call is one boxed
/// `Send` future, so it can be spawned); for anything else use
/// [`Client::lease`] and the [`LeaseGuard`](crate::LeaseGuard) directly.
///
/// ```no_run
/// use std::time::Duration;
/// use tokenlease_client::{Outcome, RequestKind};
///
/// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
/// let orders: Result<Vec<u32>, Outcome> = client
///     .call("acme", RequestKind::OrderSync, |_token| async move {
///         // … call the upstream with the token …
///         Ok(vec![1, 2, 3])
///     })
///     .max_wait(Duration::from_secs(1))
///     .with_fallback(|denial| async move {
///         println!("no lease ({:?}): serving the cache", denial.reason);
///         Ok(vec![])
///     })
///     .await?;
/// # drop(orders); Ok(()) }
/// ```
#[must_use = "a call does nothing until it is awaited"]
pub struct Call<'a, F, R> {
    request: LeaseRequest,
    work: F,
    fallback: Option<Fallback<'a, R>>,
}

impl Client {
    /// Acquires a lease for `tenant_id`, runs `work` with its token, and releases the
    /// lease with the outcome the result reports ([`ReportOutcome`]) and the call's
    /// latency. A denial is [`Error::Denied`] unless a fallback is set
    /// ([`Call::with_fallback`]). If `work` panics, or the call is cancelled while
    /// `work` runs, the lease is left to expire (see [`LeaseGuard`](crate::LeaseGuard)'s
    /// drop policy).
    ///
    /// ```no_run
    /// use tokenlease_client::{Outcome, RequestKind};
    /// use secrecy::ExposeSecret;
    ///
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// let status: Outcome = client
    ///     .call("acme", RequestKind::OrderStatus, |token| async move {
    ///         let _header = token.expose_secret().len();
    ///         Outcome::Success
    ///     })
    ///     .await?;
    /// # drop(status); Ok(()) }
    /// ```
    pub fn call<'a, F, Fut, R>(
        &self,
        tenant_id: impl Into<String>,
        kind: RequestKind,
        work: F,
    ) -> Call<'a, F, R>
    where
        F: FnOnce(SecretString) -> Fut,
        Fut: Future<Output = R>,
        R: ReportOutcome,
    {
        Call {
            request: self.lease(tenant_id, kind),
            work,
            fallback: None,
        }
    }
}

impl<'a, F, Fut, R> Call<'a, F, R>
where
    F: FnOnce(SecretString) -> Fut + Send + 'a,
    Fut: Future<Output = R> + Send + 'a,
    R: ReportOutcome + Send + 'a,
{
    /// How long the service may hold the call for a slot (default 0).
    ///
    /// ```no_run
    /// # use tokenlease_client::{Outcome, RequestKind};
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// client
    ///     .call("acme", RequestKind::OrderSync, |_token| async { Outcome::Success })
    ///     .max_wait(std::time::Duration::from_millis(500))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.request = self.request.max_wait(max_wait);
        self
    }

    /// How many upstream requests the lease covers (default 1).
    ///
    /// ```no_run
    /// # use tokenlease_client::{Outcome, RequestKind};
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// client
    ///     .call("acme", RequestKind::OrderSync, |_token| async { Outcome::Success })
    ///     .cost(2)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn cost(mut self, cost: u32) -> Self {
        self.request = self.request.cost(cost);
        self
    }

    /// An explicit priority (default: derived from the kind); it also chooses the
    /// fallback's freshness bound.
    ///
    /// ```no_run
    /// # use tokenlease_client::{Outcome, Priority, RequestKind};
    /// # async fn run(client: tokenlease_client::Client) -> Result<(), tokenlease_client::Error> {
    /// client
    ///     .call("acme", RequestKind::OrderSync, |_token| async { Outcome::Success })
    ///     .priority(Priority::Critical)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn priority(mut self, priority: Priority) -> Self {
        self.request = self.request.priority(priority);
        self
    }

    /// What to do when no lease can be had in time: `fallback` gets the [`Denial`]
    /// (its reason, retry-after, and the oldest data it may serve for the call's
    /// priority) and its result is the call's. It runs on a service denial and when no
    /// replica answers ([`DenialReason::Unavailable`]); other errors (bad input, auth)
    /// are returned as they are.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use tokenlease_client::{Outcome, RequestKind};
    /// # async fn run(client: tokenlease_client::Client, cache_age: Duration) -> Result<(), tokenlease_client::Error> {
    /// let answer: Result<&str, Outcome> = client
    ///     .call("acme", RequestKind::Analytics, |_token| async { Ok("live") })
    ///     .with_fallback(move |denial| async move {
    ///         if denial.accepts_age(cache_age) { Ok("cached") } else { Err(Outcome::NotUsed) }
    ///     })
    ///     .await?;
    /// # drop(answer); Ok(()) }
    /// ```
    pub fn with_fallback<G, GFut>(mut self, fallback: G) -> Self
    where
        G: FnOnce(Denial) -> GFut + Send + 'a,
        GFut: Future<Output = R> + Send + 'a,
    {
        self.fallback = Some(Box::new(move |denial| Box::pin(fallback(denial))));
        self
    }

    async fn run(self) -> Result<R, Error> {
        let Call {
            request,
            work,
            fallback,
        } = self;
        let denial_of_unavailable = |request: &LeaseRequest, message: String, retry_after| {
            request.denial(DenialReason::Unavailable, retry_after, message)
        };
        let lease = match request.clone().acquire().await {
            Ok(lease) => lease,
            Err(Error::Denied(denial)) => match fallback {
                Some(fallback) => return Ok(fallback(denial).await),
                None => return Err(Error::Denied(denial)),
            },
            Err(Error::Unavailable {
                message,
                retry_after,
            }) if fallback.is_some() => {
                let denial = denial_of_unavailable(&request, message, retry_after);
                return Ok((fallback.expect("checked above"))(denial).await);
            }
            Err(other) => return Err(other),
        };
        let mut lease = lease;
        let token = lease.token().clone();
        let started = Instant::now();
        let result = work(token).await;
        let latency = started.elapsed();
        let outcome = result.outcome();
        lease.record(outcome);
        lease.disarm();
        if let Err(error) = lease.release_with(outcome, Some(latency)).await {
            // The upstream call happened: its result matters more than the release,
            // and the lease expires by itself.
            tracing::warn!(lease_id = %lease.lease_id(), %error, "releasing a lease after the call failed");
        }
        Ok(result)
    }
}

impl<'a, F, Fut, R> IntoFuture for Call<'a, F, R>
where
    F: FnOnce(SecretString) -> Fut + Send + 'a,
    Fut: Future<Output = R> + Send + 'a,
    R: ReportOutcome + Send + 'a,
{
    type Output = Result<R, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<R, Error>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
