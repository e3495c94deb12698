//! tokenlease shares a small set of rate-limited upstream API tokens (first: BaseLinker,
//! 100 requests per minute per token) among many tenants, over gRPC. Sync workers ask
//! for a lease before each upstream call and get the decrypted token or an exact
//! retry-after; no window of the upstream ever sees more than its limit.
//!
//! # Layout
//! - `domain/`: the configuration model and its rules (ids, tiers, the 80 % rule). Pure.
//! - `crypto`: AES-256-GCM sealing of upstream tokens under a key ring.
//! - `store/`: the configuration store (Postgres or SQLite, `store::ConfigStore`) and the
//!   lease counters (Redis or memory, `store::counters`).
//! - `ledger/`: the lease model as pure code (windows, pacing, the wait queue, token
//!   health; `now` a parameter): the embedded counters wrap it, the Redis scripts are
//!   its transliteration.
//! - `quota/`: pure quota algorithms: the weighted max-min fair share of a pool.
//! - `lease/`: the acquire and release use cases: the configuration snapshot
//!   (`live.rs`), quotas from measured demand (`allocator.rs`), waiting callers in
//!   priority order (`waiting.rs`), routing around unhealthy tokens (`health.rs`:
//!   circuit breaker and quarantine) and the usage read-out (`usage.rs`).
//! - `history/`: usage history per tenant and token in time buckets: the tallies
//!   (pure), the replica's recorder, the flusher into the configuration store, and the
//!   `GetUsageHistory` read.
//! - `cost/`: cost allocation, pure: each token's monthly cost prorated over a range
//!   and shared by tenants' grants (dedicated tokens to their owner), the rest unused.
//! - `grpc/`: the only place that sees proto types: conversions, status mapping, auth
//!   interceptor, the two services.
//! - `auth`, `admin`: API keys and callers; admin use cases shared by the CLI.
//! - `config`, `startup`: layered settings; building and running the server.
//! - `events`: the event bus behind `WatchEvents`; `store::event_relay` carries it
//!   between replicas over Redis pub/sub.
//! - `clock`: the one place the embedded mode reads time.
//! - `emulator/`, `baselinker`: a BaseLinker emulator (tests, `tokenlease emulator`) and client.
//! - `simulate/`: `tokenlease simulate`, capacity planning against the emulator.
//! - `forecast/`: when each pool's demand, from the usage history, will pass its
//!   tokens' capacity and how many it then needs (pure), cross-checked by `simulate`.
//! - `report/`: `tokenlease report`: per-tenant usage, trend and peak hours, the
//!   forecast, as a table and a chart.
//! - `metrics`: every Prometheus metric name and label, the recording functions, and
//!   the `/metrics` endpoint.
//! - `telemetry`: logs, and OpenTelemetry traces over OTLP with the caller's trace
//!   context taken from incoming calls.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod baselinker;
pub mod clock;
pub mod config;
pub mod cost;
pub mod crypto;
pub mod domain;
pub mod emulator;
pub mod error;
pub mod events;
pub mod forecast;
pub mod grpc;
pub mod history;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod quota;
pub mod report;
pub mod simulate;
pub mod startup;
pub mod store;
pub mod telemetry;
