//! [`Client`]: endpoints, API key, TLS, and failover between replicas.
//!
//! Failover policy, per call: replicas are tried in turn, starting with the one that
//! answered last. UNAVAILABLE, and errors tonic made locally from a transport failure,
//! move to the next replica at once; any other status is the answer. A replica whose
//! UNAVAILABLE carried a `google.rpc.RetryInfo` is not called again before that delay
//! (a draining replica says 0: "call another now"); one that could not be reached is
//! skipped for [`FailoverPolicy::down_for`]. When a whole round failed, the client waits
//! for the shortest retry-after it was given (or an exponential backoff when none was)
//! and tries another round, up to [`FailoverPolicy::rounds`]; a retry-after longer than
//! [`FailoverPolicy::max_retry_wait`] is not waited for but returned to the caller
//! ([`Error::Unavailable`] with the delay).
//!
//! Retrying AcquireLease is safe: the service grants nothing on UNAVAILABLE. A transport
//! error after the request was sent may lose a lease granted meanwhile; its slot stays
//! counted until its expiry + window, as any unreleased lease. ReleaseLease is
//! idempotent for the same outcome.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::call::FreshnessPolicy;
use crate::error::Error;
use crate::pb::lease_service_client::LeaseServiceClient;

/// How hard a call tries other replicas before giving up.
///
/// ```
/// use std::time::Duration;
/// use tokenlease_client::FailoverPolicy;
///
/// let patient = FailoverPolicy {
///     rounds: 5,
///     max_retry_wait: Duration::from_secs(10),
///     ..FailoverPolicy::default()
/// };
/// assert_eq!(patient.down_for, FailoverPolicy::default().down_for);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailoverPolicy {
    /// Rounds over all replicas per call (default 3).
    pub rounds: u32,
    /// The longest retry-after the client waits for between rounds (default 2 s);
    /// a longer one is returned to the caller.
    pub max_retry_wait: Duration,
    /// How long an unreachable replica is skipped (default 1 s).
    pub down_for: Duration,
    /// The first pause between rounds when no replica gave a retry-after (default
    /// 50 ms), doubled each round.
    pub backoff: Duration,
    /// Bound on one connection attempt (default 1 s).
    pub connect_timeout: Duration,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        Self {
            rounds: 3,
            max_retry_wait: Duration::from_secs(2),
            down_for: Duration::from_secs(1),
            backoff: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// Builds a [`Client`].
///
/// ```no_run
/// use tokenlease_client::Client;
///
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let ca = tonic::transport::Certificate::from_pem(std::fs::read("ca.pem")?);
/// let client = Client::builder()
///     .endpoints(["https://tl-1.internal:50051", "https://tl-2.internal:50051"])
///     .api_key(std::env::var("TOKENLEASE_API_KEY")?)
///     .tls(tonic::transport::ClientTlsConfig::new().ca_certificate(ca))
///     .upstream("baselinker")
///     .connect()?;
/// # drop(client); Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    api_key: Option<SecretString>,
    tls: Option<ClientTlsConfig>,
    upstream: Option<String>,
    failover: FailoverPolicy,
    freshness: FreshnessPolicy,
}

impl ClientBuilder {
    /// Adds a replica's URI (`http://…` or `https://…`).
    ///
    /// ```
    /// let builder = tokenlease_client::Client::builder().endpoint("http://127.0.0.1:50051");
    /// # drop(builder);
    /// ```
    pub fn endpoint(mut self, uri: impl Into<String>) -> Self {
        self.endpoints.push(uri.into());
        self
    }

    /// Adds several replicas' URIs.
    ///
    /// ```
    /// let builder = tokenlease_client::Client::builder()
    ///     .endpoints(["http://10.0.0.1:50051", "http://10.0.0.2:50051"]);
    /// # drop(builder);
    /// ```
    pub fn endpoints<I, S>(mut self, uris: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(uris.into_iter().map(Into::into));
        self
    }

    /// The API key sent as `authorization: Bearer <key>` on every call.
    ///
    /// ```
    /// let builder = tokenlease_client::Client::builder().api_key("tl_worker_key");
    /// # drop(builder);
    /// ```
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(SecretString::from(key.into()));
        self
    }

    /// TLS settings (CA, client certificate for mutual TLS, domain name), used for every
    /// endpoint.
    ///
    /// ```no_run
    /// use tonic::transport::{Certificate, ClientTlsConfig};
    ///
    /// let ca = Certificate::from_pem(std::fs::read("ca.pem").unwrap());
    /// let builder = tokenlease_client::Client::builder()
    ///     .tls(ClientTlsConfig::new().ca_certificate(ca).domain_name("tokenlease"));
    /// # drop(builder);
    /// ```
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The upstream to lease tokens of, e.g. `"baselinker"` (default: none, which the
    /// service accepts when the tenant reaches tokens of one upstream only).
    ///
    /// ```
    /// let builder = tokenlease_client::Client::builder().upstream("baselinker");
    /// # drop(builder);
    /// ```
    pub fn upstream(mut self, upstream_id: impl Into<String>) -> Self {
        self.upstream = Some(upstream_id.into());
        self
    }

    /// How hard calls try other replicas (see [`FailoverPolicy`]).
    ///
    /// ```
    /// use tokenlease_client::{Client, FailoverPolicy};
    ///
    /// let builder = Client::builder().failover(FailoverPolicy { rounds: 1, ..Default::default() });
    /// # drop(builder);
    /// ```
    pub fn failover(mut self, policy: FailoverPolicy) -> Self {
        self.failover = policy;
        self
    }

    /// How stale a fallback's data may be, per priority (see [`FreshnessPolicy`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokenlease_client::{Client, FreshnessPolicy, Priority};
    ///
    /// let policy = FreshnessPolicy::default().with(Priority::Normal, Duration::from_secs(600));
    /// let builder = Client::builder().freshness(policy);
    /// # drop(builder);
    /// ```
    pub fn freshness(mut self, policy: FreshnessPolicy) -> Self {
        self.freshness = policy;
        self
    }

    /// Builds the client. Connections are made lazily, on first use, so a replica that
    /// is down now does not stop the start; an endpoint that is not a URI, a missing
    /// API key or bad TLS settings do.
    ///
    /// ```no_run
    /// # fn run() -> Result<(), tokenlease_client::Error> {
    /// let client = tokenlease_client::Client::builder()
    ///     .endpoint("http://127.0.0.1:50051")
    ///     .api_key("tl_worker_key")
    ///     .connect()?;
    /// # drop(client); Ok(()) }
    /// ```
    pub fn connect(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint given".into()));
        }
        let key = self
            .api_key
            .ok_or_else(|| Error::Config("no API key given".into()))?;
        let mut authorization: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", key.expose_secret()))
                .map_err(|_| Error::Config("the API key is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        let mut replicas = Vec::with_capacity(self.endpoints.len());
        for uri in &self.endpoints {
            let mut endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|_| Error::Config(format!("'{uri}' is not a valid URI")))?
                .connect_timeout(self.failover.connect_timeout);
            if let Some(tls) = &self.tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| Error::Config(format!("TLS for '{uri}': {e}")))?;
            }
            replicas.push(Replica {
                uri: uri.clone(),
                channel: endpoint.connect_lazy(),
                skip_until: Mutex::new(None),
            });
        }
        Ok(Client {
            shared: Arc::new(Shared {
                replicas,
                preferred: AtomicUsize::new(0),
                authorization,
                upstream: self.upstream,
                failover: self.failover,
                freshness: self.freshness,
            }),
        })
    }
}

/// A connection to one or more tokenlease replicas. Cheap to clone (one shared set of
/// connections); use one per process.
///
/// ```no_run
/// use tokenlease_client::Client;
///
/// # fn run() -> Result<(), tokenlease_client::Error> {
/// let client = Client::connect(["http://127.0.0.1:50051"], "tl_worker_key")?;
/// let for_another_task = client.clone();
/// # drop(for_another_task); Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    replicas: Vec<Replica>,
    /// The replica that answered last: calls start there.
    preferred: AtomicUsize,
    /// `Bearer <key>`, marked sensitive (redacted in `Debug`).
    authorization: AsciiMetadataValue,
    pub(crate) upstream: Option<String>,
    failover: FailoverPolicy,
    pub(crate) freshness: FreshnessPolicy,
}

#[derive(Debug)]
struct Replica {
    uri: String,
    channel: Channel,
    /// Not called before this instant: its RetryInfo, or a transport failure. A std
    /// mutex: held for a read or a write, never across an await.
    skip_until: Mutex<Option<Instant>>,
}

impl Replica {
    fn skipped_until(&self, now: Instant) -> Option<Instant> {
        let until = *self.skip_until.lock().unwrap_or_else(|e| e.into_inner());
        until.filter(|&u| u > now)
    }

    fn skip(&self, until: Option<Instant>) {
        *self.skip_until.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }
}

impl Client {
    /// A client for `endpoints` with `api_key` and the default policies; see
    /// [`Client::builder`] for TLS and the rest.
    ///
    /// ```no_run
    /// # fn run() -> Result<(), tokenlease_client::Error> {
    /// let client = tokenlease_client::Client::connect(
    ///     ["http://10.0.0.1:50051", "http://10.0.0.2:50051"],
    ///     "tl_worker_key",
    /// )?;
    /// # drop(client); Ok(()) }
    /// ```
    pub fn connect<I, S>(endpoints: I, api_key: impl Into<String>) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder()
            .endpoints(endpoints)
            .api_key(api_key)
            .connect()
    }

    /// A builder, for TLS, the upstream, and the policies.
    ///
    /// ```
    /// let builder = tokenlease_client::Client::builder();
    /// # drop(builder);
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The URI of the replica calls go to first (the one that answered last).
    ///
    /// ```no_run
    /// # fn run(client: tokenlease_client::Client) {
    /// println!("talking to {}", client.current_endpoint());
    /// # }
    /// ```
    pub fn current_endpoint(&self) -> &str {
        let index = self.shared.preferred.load(Ordering::Relaxed);
        &self.shared.replicas[index].uri
    }

    /// `message` as a request with the API key and the current trace context.
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.shared.authorization.clone());
        crate::trace::inject(request.metadata_mut());
        request
    }

    /// Runs `attempt` on replicas in turn until one answers, as the module docs say.
    /// `attempt` builds its request afresh each time (the remaining wait shrinks).
    pub(crate) async fn with_failover<T, F, Fut>(&self, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(LeaseServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let shared = &self.shared;
        let policy = shared.failover;
        let count = shared.replicas.len();
        let mut last_message = String::from("no replica tried");
        for round in 0..policy.rounds.max(1) {
            let start = shared.preferred.load(Ordering::Relaxed);
            // The shortest time until some replica may be called again.
            let mut next_try: Option<Duration> = None;
            for offset in 0..count {
                let index = (start + offset) % count;
                let replica = &shared.replicas[index];
                let now = Instant::now();
                if let Some(until) = replica.skipped_until(now) {
                    next_try = shortest(next_try, until - now);
                    continue;
                }
                match attempt(LeaseServiceClient::new(replica.channel.clone())).await {
                    Ok(answer) => {
                        shared.preferred.store(index, Ordering::Relaxed);
                        replica.skip(None);
                        return Ok(answer);
                    }
                    Err(status) if is_failover(&status) => {
                        let retry_after = retry_info(&status);
                        let pause = retry_after.unwrap_or(policy.down_for);
                        replica.skip(Some(Instant::now() + pause));
                        tracing::debug!(replica = %replica.uri, code = ?status.code(), ?retry_after, "tokenlease replica unavailable, trying the next");
                        last_message = format!("{}: {}", replica.uri, status.message());
                        next_try = shortest(next_try, retry_after.unwrap_or(Duration::ZERO));
                    }
                    Err(status) => return Err(Error::Status(status)),
                }
            }
            if round + 1 == policy.rounds.max(1) {
                break;
            }
            let backoff = policy
                .backoff
                .checked_mul(2u32.saturating_pow(round))
                .unwrap_or(Duration::MAX)
                .min(policy.max_retry_wait);
            let pause = match next_try {
                Some(wait) if wait > policy.max_retry_wait => {
                    return Err(Error::Unavailable {
                        message: last_message,
                        retry_after: Some(wait),
                    });
                }
                Some(wait) if !wait.is_zero() => wait,
                _ => backoff,
            };
            tokio::time::sleep(pause).await;
        }
        let now = Instant::now();
        let retry_after = shared
            .replicas
            .iter()
            .filter_map(|r| r.skipped_until(now).map(|u| u - now))
            .min();
        Err(Error::Unavailable {
            message: last_message,
            retry_after,
        })
    }
}

fn shortest(current: Option<Duration>, candidate: Duration) -> Option<Duration> {
    Some(current.map_or(candidate, |c| c.min(candidate)))
}

/// Whether another replica may answer better: UNAVAILABLE, or an error tonic made on
/// this side from a transport failure (it carries the failure as its source; a status
/// the server sent has none).
fn is_failover(status: &Status) -> bool {
    use std::error::Error as _;
    match status.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Internal | Code::Cancelled => status.source().is_some(),
        _ => false,
    }
}

/// The `google.rpc.RetryInfo` delay of a status, if it has one.
pub(crate) fn retry_info(status: &Status) -> Option<Duration> {
    let details = status.get_error_details();
    details.retry_info()?.retry_delay
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    /// UNAVAILABLE fails over, with or without RetryInfo; a server's other answers do not.
    #[test]
    fn which_statuses_fail_over() {
        assert!(is_failover(&Status::unavailable("draining")));
        assert!(!is_failover(&Status::permission_denied("not yours")));
        assert!(!is_failover(&Status::unknown("a server's unknown")));
        assert!(!is_failover(&Status::resource_exhausted("queue full")));
    }

    /// The RetryInfo delay is read back from a status built as the service builds it.
    #[test]
    fn reads_retry_info() {
        let status = Status::with_error_details(
            Code::Unavailable,
            "redis down",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(1500))),
        );
        assert_eq!(retry_info(&status), Some(Duration::from_millis(1500)));
        assert_eq!(retry_info(&Status::unavailable("no details")), None);
    }
}
