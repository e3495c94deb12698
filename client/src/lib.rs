//! The Rust client of tokenlease: ask for a lease on
//! a shared upstream token before every upstream call, and give it back after, without
//! ever forgetting to.
//!
//! ```no_run
//! use tokenlease_client::{Client, Outcome, RequestKind};
//! use secrecy::ExposeSecret;
//!
//! # async fn run() -> Result<(), tokenlease_client::Error> {
//! let client = Client::builder()
//!     .endpoint("http://tokenlease-a:50051")
//!     .endpoint("http://tokenlease-b:50051")
//!     .api_key("tl_worker_key")
//!     .connect()?;
//! let mut lease = client
//!     .lease("acme", RequestKind::OrderSync)
//!     .max_wait(std::time::Duration::from_secs(2))
//!     .acquire()
//!     .await?;
//! let token = lease.token().expose_secret().to_owned();
//! // … call the upstream with `token` …
//! # drop(token);
//! lease.record(Outcome::Success);
//! // Dropping the guard releases the lease with the recorded outcome.
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `client`: [`Client`] and [`ClientBuilder`]: endpoints, API key, TLS, and failover
//!   between replicas (UNAVAILABLE and transport errors move to the next replica; a
//!   replica that answered with a `RetryInfo` is not called again before it).
//! - `lease`: [`LeaseRequest`] and the [`LeaseGuard`] that releases on drop.
//! - `call`: [`Client::call`], the acquire → run → release loop, the [`ReportOutcome`]
//!   trait that turns an upstream answer into an [`Outcome`], and the fallback with its
//!   [`FreshnessPolicy`].
//! - `watch`: [`Client::watch`], an event stream that resubscribes by itself.
//! - [`baselinker`]: the BaseLinker adapter (its answers as an [`Outcome`], "blocked
//!   until" times read in Europe/Warsaw).
//! - `trace`: `traceparent` metadata from the caller's current span.
//! - [`pb`]: the generated protobuf types, for what the wrappers do not cover.

#![forbid(unsafe_code)]

pub mod baselinker;
mod call;
mod client;
mod error;
mod kinds;
mod lease;
mod trace;
mod watch;

pub use call::{Call, FreshnessPolicy, ReportOutcome};
pub use client::{Client, ClientBuilder, FailoverPolicy};
pub use error::{Denial, DenialReason, Error};
pub use kinds::{Priority, RequestKind};
pub use lease::{LeaseGuard, LeaseRequest, Outcome, Quota, Released};
pub use watch::{Watch, WatchFilter, WatchItem};

/// The protobuf types and gRPC client stubs generated from `proto/tokenlease/v1`, for
/// calls the wrappers do not cover (the admin API, say). Their documentation is the
/// proto's.
///
/// ```no_run
/// use tokenlease_client::pb::{GetUsageRequest, admin_service_client::AdminServiceClient};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut admin = AdminServiceClient::connect("http://127.0.0.1:50051").await?;
/// let mut request = tonic::Request::new(GetUsageRequest {
///     tenant_id: "acme".into(),
///     ..Default::default()
/// });
/// request
///     .metadata_mut()
///     .insert("authorization", "Bearer tl_admin_key".parse()?);
/// let usage = admin.get_usage(request).await?.into_inner();
/// println!("{usage:?}");
/// # Ok(()) }
/// ```
// Proto comments are not rustdoc: `<key>` in them is text, not an HTML tag.
#[allow(
    missing_docs,
    clippy::all,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls
)]
pub mod pb {
    tonic::include_proto!("tokenlease.v1");
}
