//! Prometheus metrics: every metric name and label of tokenlease, in one place.
//!
//! The `metrics` facade is process-global, so is the recorder: `install` sets up the
//! Prometheus recorder once per process and every later call reuses it (several `App`s
//! in one test binary share it). `/metrics` is served by `serve` on its own listener
//! (setting `metrics.listen`), bound in `App::build` so a test can use port 0.
//!
//! What is measured (the seed's §4 list) and where it is recorded:
//! - grants, borrowed grants, denials, token exhaustion and pacing: in
//!   `lease::Leaser::acquire` (exhaustion told from pacing by `acquire_denied`);
//! - releases, rate-limit reports and upstream latency: in `grpc::lease_api` (the
//!   latency is a field of the ReleaseLease request, not of the use case);
//! - AcquireLease latency: in `grpc::lease_api`;
//! - callers waiting: a guard held by `Leaser::acquire` while it sleeps for a slot;
//! - token utilization: set every `metrics.refresh_ms` by `spawn_refresher` from the
//!   counters (the same read-out as `GetUsage`);
//! - breaker opens: `breaker_opened`, called by the circuit breaker.
//! - days until each pool needs another token: `pool_capacity_forecasts`, called by
//!   `history::Forecaster` every `history.forecast_interval_ms`, republished by the
//!   refresher in between (a gauge set once an hour would otherwise go idle).
//!
//! # Cardinality
//! Label values are configuration ids (tenant, token, upstream, pool), reasons and
//! outcomes — never a secret. Tokens and upstreams are few and admin-made; tenants may be
//! many, so at most `metrics.max_tenant_series` tenants get their own `tenant` label
//! value (first come, first served, for the life of the process); the others are
//! reported together as `tenant="_other"` (ids cannot start with `_`, so it never
//! collides with a tenant).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::Duration;

use anyhow::Context;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::domain::{Id, TokenOwner, TokenState};
use crate::store::counters::{AcquireRequest, DenyReason, LeaseKey, ReleaseOutcome};

/// Metric names. Counters end in `_total`, durations are in seconds.
pub mod names {
    /// Counter {tenant, upstream}: upstream requests granted (a lease of cost n counts
    /// n). `rate(…[1m]) * 60` is the tenant's requests per minute.
    pub const GRANTED_REQUESTS: &str = "tokenlease_granted_requests_total";
    /// Counter {tenant, upstream}: grants that took the tenant above its guaranteed
    /// capacity, i.e. into borrowed (burst) capacity.
    pub const BORROWED_GRANTS: &str = "tokenlease_borrowed_grants_total";
    /// Counter {tenant, reason}: AcquireLease answered with a denial.
    pub const DENIALS: &str = "tokenlease_lease_denials_total";
    /// Counter {upstream, pool}: denials because every token the tenant may use had its
    /// window full (NO_TOKEN_CAPACITY, also when it ended a wait). Not pacing: see
    /// `TOKEN_PACING`, and [`acquire_denied`] for how the two are told apart.
    pub const TOKEN_EXHAUSTION: &str = "tokenlease_token_exhaustion_total";
    /// Counter {upstream, pool}: NO_TOKEN_CAPACITY denials while a token the tenant may
    /// use still had room in its window but had spent its pace (`lease.pace_burst_percent`:
    /// so many back to back, then one per window ÷ limit). Pacing spreads a window's
    /// grants; it is not exhaustion.
    pub const TOKEN_PACING: &str = "tokenlease_token_pacing_denials_total";
    /// Counter {upstream, outcome}: leases released, by outcome.
    pub const RELEASES: &str = "tokenlease_lease_releases_total";
    /// Counter {token, upstream}: releases reporting UPSTREAM_RATE_LIMITED, i.e. the
    /// upstream itself said a token was over its limit.
    pub const UPSTREAM_RATE_LIMITED: &str = "tokenlease_upstream_rate_limited_total";
    /// Counter {token, upstream}: UPSTREAM_RATE_LIMITED reports on a token the service
    /// counted at less than half its usable slots (used outside the service, a wrong
    /// profile, or a worker misreporting).
    pub const IMPLAUSIBLE_REPORTS: &str = "tokenlease_implausible_rate_limit_reports_total";
    /// Counter {token}: circuit breaker openings.
    pub const BREAKER_OPENS: &str = "tokenlease_breaker_opens_total";
    /// Histogram {upstream}: upstream call latency as reported in ReleaseLease.
    pub const UPSTREAM_LATENCY: &str = "tokenlease_upstream_latency_seconds";
    /// Histogram {result}: time AcquireLease took to answer, waiting included.
    pub const ACQUIRE_DURATION: &str = "tokenlease_acquire_duration_seconds";
    /// Gauge {tenant}: callers waiting in AcquireLease (max_wait) for a slot right now.
    pub const WAITING_CALLERS: &str = "tokenlease_waiting_callers";
    /// Gauge {token, upstream, pool}: slots held in the token's current window.
    pub const TOKEN_USED_SLOTS: &str = "tokenlease_token_used_slots";
    /// Gauge {token, upstream, pool}: slots a token may serve per window (limit − margin).
    pub const TOKEN_USABLE_SLOTS: &str = "tokenlease_token_usable_slots";
    /// Gauge {token, upstream, pool}: used / usable slots, 0 to 1.
    pub const TOKEN_UTILIZATION: &str = "tokenlease_token_utilization_ratio";
    /// Gauge {token, upstream, pool}: 1 while leases may be granted on the token (active,
    /// or half-open probing), 0 while it is out of service (quarantined, breaker open,
    /// disabled). Alerts that compare tokens leave out the ones at 0.
    pub const TOKEN_IN_SERVICE: &str = "tokenlease_token_in_service";
    /// Gauge {upstream, state}: tokens in each state (active, breaker_open,
    /// breaker_half_open, quarantined, disabled). Every replica reports the same shared
    /// state: aggregate with `max`, not `sum`.
    pub const TOKENS: &str = "tokenlease_tokens";
    /// Gauge {pool}: days until the pool's demand trend rises above its tokens'
    /// capacity (`crate::forecast`): 0 when it already has, `+Inf` when it does not
    /// within the forecast's horizon (90 days: no token needed); NaN while the pool
    /// has no whole day of history. Every replica computes the same value from the
    /// shared store: aggregate with `min`.
    pub const POOL_CAPACITY_FORECAST_DAYS: &str = "tokenlease_pool_capacity_forecast_days";
    /// Gauge: 1 while some Redis master of the lease counters may evict keys
    /// (`maxmemory` set with a policy other than `noeviction`), 0 while none may (and in
    /// embedded mode); absent until Redis has answered once. Read every minute
    /// (`store::counters::spawn_eviction_watch`).
    pub const REDIS_MAY_EVICT: &str = "tokenlease_redis_may_evict";
}

/// Every metric name, for tests and the dashboard check.
pub const ALL: &[&str] = &[
    names::GRANTED_REQUESTS,
    names::BORROWED_GRANTS,
    names::DENIALS,
    names::TOKEN_EXHAUSTION,
    names::TOKEN_PACING,
    names::RELEASES,
    names::UPSTREAM_RATE_LIMITED,
    names::IMPLAUSIBLE_REPORTS,
    names::BREAKER_OPENS,
    names::UPSTREAM_LATENCY,
    names::ACQUIRE_DURATION,
    names::WAITING_CALLERS,
    names::TOKEN_USED_SLOTS,
    names::TOKEN_USABLE_SLOTS,
    names::TOKEN_UTILIZATION,
    names::TOKEN_IN_SERVICE,
    names::TOKENS,
    names::POOL_CAPACITY_FORECAST_DAYS,
    names::REDIS_MAY_EVICT,
];

/// Label names.
pub mod labels {
    /// A tenant id, or `_other` past `metrics.max_tenant_series`.
    pub const TENANT: &str = "tenant";
    pub const TOKEN: &str = "token";
    pub const UPSTREAM: &str = "upstream";
    /// A token state (`tokenlease_tokens`).
    pub const STATE: &str = "state";
    /// A pool id. On the denial counters, `dedicated` when the tenant has no pool; on the
    /// token gauges, `dedicated:<tenant>` for a token dedicated to a tenant (ids hold no
    /// ':', so it never collides with a pool), so each tenant's dedicated tokens form
    /// a group of their own.
    pub const POOL: &str = "pool";
    /// `tenant_quota`, `no_token_capacity`, `no_usable_token` or `wait_timeout`.
    pub const REASON: &str = "reason";
    /// `success`, `upstream_error`, `upstream_rate_limited` or `not_used`.
    pub const OUTCOME: &str = "outcome";
    /// `granted`, `denied` or `error`.
    pub const RESULT: &str = "result";
}

/// The `tenant` value shared by the tenants past the cap.
pub const OTHER_TENANTS: &str = "_other";

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ACQUIRE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Which tenants have their own label value: the first `cap` seen.
pub struct TenantLabels {
    cap: AtomicUsize,
    seen: RwLock<HashSet<String>>,
}

impl TenantLabels {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: AtomicUsize::new(cap),
            seen: RwLock::default(),
        }
    }

    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// The label value for `tenant`.
    pub fn label(&self, tenant: &Id) -> String {
        let id = tenant.as_str();
        if self.seen.read().expect("not poisoned").contains(id) {
            return id.to_owned();
        }
        let mut seen = self.seen.write().expect("not poisoned");
        if seen.contains(id) || seen.len() < self.cap.load(Ordering::Relaxed) {
            seen.insert(id.to_owned());
            id.to_owned()
        } else {
            OTHER_TENANTS.to_owned()
        }
    }
}

fn tenant_labels() -> &'static TenantLabels {
    static LABELS: OnceLock<TenantLabels> = OnceLock::new();
    LABELS.get_or_init(|| TenantLabels::new(500))
}

fn tenant(id: &Id) -> String {
    tenant_labels().label(id)
}

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same
/// handle and only update the tenant cap). Series not updated for `idle` are dropped
/// from the output: token gauges are refreshed far more often, so a deleted or
/// disabled token's series goes away instead of showing its last value forever.
pub fn install(max_tenant_series: usize, idle: Duration) -> anyhow::Result<PrometheusHandle> {
    tenant_labels().set_cap(max_tenant_series);
    let handle = HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(idle))
            .set_buckets_for_metric(
                Matcher::Full(names::UPSTREAM_LATENCY.into()),
                LATENCY_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::ACQUIRE_DURATION.into()),
                    ACQUIRE_BUCKETS,
                )
            })
            .map_err(|e| e.to_string())?;
        let handle = builder.install_recorder().map_err(|e| e.to_string())?;
        describe_all();
        Ok(handle)
    });
    handle
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
        .context("cannot install the Prometheus metrics recorder")
}

fn describe_all() {
    use names::*;
    describe_counter!(
        GRANTED_REQUESTS,
        "Upstream requests granted, by tenant (a lease of cost n counts n)."
    );
    describe_counter!(
        BORROWED_GRANTS,
        "Grants that took the tenant above its guaranteed capacity."
    );
    describe_counter!(DENIALS, "AcquireLease denials, by tenant and reason.");
    describe_counter!(
        TOKEN_EXHAUSTION,
        "Denials because every token the tenant may use had its window full."
    );
    describe_counter!(
        TOKEN_PACING,
        "Token-capacity denials while a token had room in its window but had spent its pace."
    );
    describe_counter!(RELEASES, "Leases released, by outcome.");
    describe_counter!(
        UPSTREAM_RATE_LIMITED,
        "Releases reporting that the upstream answered rate-limited."
    );
    describe_counter!(
        IMPLAUSIBLE_REPORTS,
        "Rate-limit reports on a token counted at less than half its usable slots."
    );
    describe_counter!(BREAKER_OPENS, "Circuit breaker openings, by token.");
    describe_histogram!(
        UPSTREAM_LATENCY,
        metrics::Unit::Seconds,
        "Upstream call latency reported in ReleaseLease."
    );
    describe_histogram!(
        ACQUIRE_DURATION,
        metrics::Unit::Seconds,
        "Time AcquireLease took to answer, waiting included."
    );
    describe_gauge!(
        WAITING_CALLERS,
        "Callers waiting in AcquireLease for a slot."
    );
    describe_gauge!(
        TOKEN_USED_SLOTS,
        "Slots held in the token's current window."
    );
    describe_gauge!(
        TOKEN_USABLE_SLOTS,
        "Slots a token may serve per window (limit minus safety margin)."
    );
    describe_gauge!(TOKEN_UTILIZATION, "Used / usable slots of a token, 0 to 1.");
    describe_gauge!(
        TOKEN_IN_SERVICE,
        "1 while a token may be leased (active or half-open), 0 while quarantined, open or disabled."
    );
    describe_gauge!(
        TOKENS,
        "Tokens per upstream and state (active, breaker_open, breaker_half_open, quarantined, disabled)."
    );
    describe_gauge!(
        POOL_CAPACITY_FORECAST_DAYS,
        "Days until the pool's demand trend exceeds its capacity (0: already; +Inf: not within 90 days)."
    );
    describe_gauge!(
        REDIS_MAY_EVICT,
        "1 while Redis may evict the lease counters (maxmemory with a policy other than noeviction)."
    );
}

/// The eviction gauge's last value (0: not read yet, 1: no, 2: yes), republished by
/// the refresher between the minute's reads.
static MAY_EVICT: AtomicUsize = AtomicUsize::new(0);

/// Publishes whether Redis may evict the lease counters.
pub fn redis_may_evict(may: bool) {
    MAY_EVICT.store(if may { 2 } else { 1 }, Ordering::Relaxed);
    gauge!(names::REDIS_MAY_EVICT).set(if may { 1.0 } else { 0.0 });
}

fn republish_may_evict() {
    match MAY_EVICT.load(Ordering::Relaxed) {
        0 => {}
        known => gauge!(names::REDIS_MAY_EVICT).set(if known == 2 { 1.0 } else { 0.0 }),
    }
}

/// The forecast gauge's last values, per pool (republished by the refresher).
fn forecast_days() -> &'static Mutex<HashMap<String, f64>> {
    static DAYS: OnceLock<Mutex<HashMap<String, f64>>> = OnceLock::new();
    DAYS.get_or_init(Mutex::default)
}

/// Publishes the forecast gauge: `days` per pool. Pools in `previous` (what this
/// caller published last time) that are no longer given are dropped (their series
/// goes idle); `previous` becomes this call's pools.
pub fn pool_capacity_forecasts(days: &[(String, f64)], previous: &mut HashSet<String>) {
    let mut published = forecast_days().lock().expect("not poisoned");
    for pool in previous.drain() {
        published.remove(&pool);
    }
    for (pool, value) in days {
        published.insert(pool.clone(), *value);
        previous.insert(pool.clone());
        gauge!(names::POOL_CAPACITY_FORECAST_DAYS, labels::POOL => pool.clone()).set(*value);
    }
}

/// A grant: requests per tenant, and whether it drew on borrowed capacity (the tenant's
/// slots in the window, this grant included, exceed its guarantee).
pub fn lease_granted(request: &AcquireRequest, borrowed: bool) {
    let tenant_label = tenant(&request.tenant_id);
    let upstream = request.upstream_id.to_string();
    counter!(names::GRANTED_REQUESTS, labels::TENANT => tenant_label.clone(), labels::UPSTREAM => upstream.clone())
        .increment(u64::from(request.cost.max(1)));
    if borrowed {
        counter!(names::BORROWED_GRANTS, labels::TENANT => tenant_label, labels::UPSTREAM => upstream)
            .increment(1);
    }
}

/// A denial the caller gets, by tenant and reason (`lease::DenialReason::label`).
pub fn lease_denied(tenant_id: &Id, reason: &'static str) {
    counter!(names::DENIALS, labels::TENANT => tenant(tenant_id), labels::REASON => reason)
        .increment(1);
}

/// A denial after asking the counters: counted by reason, and, when the binding limit
/// was the tokens' (`binding`, even if the caller sees WAIT_TIMEOUT), as token
/// exhaustion or as pacing of `pool` (`None`: dedicated tokens).
///
/// The counters answer NO_TOKEN_CAPACITY both when every token's window is full and
/// when a token has room but has spent its pace. With pacing off (`pace_burst` 0) it
/// is always exhaustion. With pacing on, they are told apart here with the tokens'
/// windows as last read for the gauges (every `metrics.refresh_ms`): pacing when a
/// token the tenant may use, in service, had room for the call at that reading;
/// exhaustion otherwise (also before the first reading). So a window that filled
/// since the last reading is counted as pacing until the next one (at most
/// `metrics.refresh_ms`, default 5 s, of a window of minutes).
pub fn acquire_denied(
    request: &AcquireRequest,
    reason: &'static str,
    binding: DenyReason,
    pool: Option<&Id>,
) {
    lease_denied(&request.tenant_id, reason);
    if binding == DenyReason::NoTokenCapacity {
        let paced = request.pace_burst > 0 && window_room().had_room(request);
        let name = match paced {
            true => names::TOKEN_PACING,
            false => names::TOKEN_EXHAUSTION,
        };
        let pool = pool.map_or_else(|| "dedicated".to_owned(), Id::to_string);
        counter!(name, labels::UPSTREAM => request.upstream_id.to_string(), labels::POOL => pool)
            .increment(1);
    }
}

/// Room in the tokens' windows at the last reading (`token_usage`), for telling
/// exhaustion from pacing in [`acquire_denied`]. Tokens out of service are left out.
#[derive(Default)]
struct WindowRoom {
    /// Whether a reading was made yet.
    read: bool,
    /// Per token: usable − used.
    tokens: HashMap<Id, u32>,
    /// Per upstream, per pool: the most room among its tokens.
    pools: HashMap<Id, HashMap<Id, u32>>,
}

impl WindowRoom {
    fn from_readings(tokens: &[TokenReading]) -> WindowRoom {
        let mut room = WindowRoom {
            read: true,
            ..WindowRoom::default()
        };
        for t in tokens.iter().filter(|t| t.in_service()) {
            let free = t.usable.saturating_sub(t.used);
            room.tokens.insert(t.token_id.clone(), free);
            if let Some(TokenOwner::Pool(pool)) = &t.owner {
                let pools = room.pools.entry(t.upstream_id.clone()).or_default();
                let most = pools.entry(pool.clone()).or_default();
                *most = (*most).max(free);
            }
        }
        room
    }

    /// Whether a token `request` may use had room for it at the last reading.
    fn had_room(&self, request: &AcquireRequest) -> bool {
        if !self.read {
            return false;
        }
        let cost = request.cost.max(1);
        let fits = |token: &Id| self.tokens.get(token).is_some_and(|free| *free >= cost);
        if request.dedicated.iter().any(fits) {
            return true;
        }
        match &request.pool_id {
            // One look-up, however large the pool.
            Some(pool) => (self.pools.get(&request.upstream_id))
                .and_then(|pools| pools.get(pool))
                .is_some_and(|free| *free >= cost),
            None => request.pooled.iter().any(fits),
        }
    }
}

fn window_room() -> std::sync::RwLockReadGuard<'static, WindowRoom> {
    window_room_lock().read().expect("not poisoned")
}

fn window_room_lock() -> &'static RwLock<WindowRoom> {
    static ROOM: OnceLock<RwLock<WindowRoom>> = OnceLock::new();
    ROOM.get_or_init(RwLock::default)
}

/// A rate-limit report the service's own counts make implausible (see `Leaser`).
pub fn implausible_report(token: &Id, upstream: &Id) {
    counter!(names::IMPLAUSIBLE_REPORTS, labels::TOKEN => token.to_string(), labels::UPSTREAM => upstream.to_string())
        .increment(1);
}

/// A first release of a lease (not a repeated one): outcome, rate-limit reports per
/// token, and the upstream latency when the worker reported it.
pub fn lease_released(lease_id: &str, outcome: ReleaseOutcome, upstream_latency: Option<Duration>) {
    let Some(key) = LeaseKey::parse(lease_id) else {
        return;
    };
    let upstream = key.upstream_id.to_string();
    counter!(names::RELEASES, labels::UPSTREAM => upstream.clone(), labels::OUTCOME => outcome.as_str())
        .increment(1);
    if outcome == ReleaseOutcome::UpstreamRateLimited {
        counter!(names::UPSTREAM_RATE_LIMITED, labels::TOKEN => key.token_id.to_string(), labels::UPSTREAM => upstream.clone())
            .increment(1);
    }
    if let Some(latency) = upstream_latency
        && outcome != ReleaseOutcome::NotUsed
    {
        histogram!(names::UPSTREAM_LATENCY, labels::UPSTREAM => upstream).record(latency);
    }
}

/// How long one AcquireLease took; `result` is `granted`, `denied` or `error`.
pub fn acquire_finished(result: &'static str, elapsed: Duration) {
    histogram!(names::ACQUIRE_DURATION, labels::RESULT => result).record(elapsed);
}

/// A circuit breaker opened on `token`.
pub fn breaker_opened(token: &Id) {
    counter!(names::BREAKER_OPENS, labels::TOKEN => token.to_string()).increment(1);
}

/// Callers waiting, per tenant label. Kept here (not only in the gauge) so the
/// refresher can republish them: an idle gauge would otherwise be dropped mid-wait.
fn waiting_counts() -> &'static Mutex<HashMap<String, i64>> {
    static WAITING: OnceLock<Mutex<HashMap<String, i64>>> = OnceLock::new();
    WAITING.get_or_init(Mutex::default)
}

fn add_waiting(label: &str, delta: i64) {
    let mut counts = waiting_counts().lock().expect("not poisoned");
    let count = counts.entry(label.to_owned()).or_default();
    *count += delta;
    gauge!(names::WAITING_CALLERS, labels::TENANT => label.to_owned()).set(*count as f64);
}

/// Counts a caller as waiting until dropped.
#[must_use = "the caller counts as waiting only while the guard lives"]
pub struct Waiting {
    label: String,
}

/// Marks a caller of `tenant_id` as waiting for a slot.
pub fn waiting(tenant_id: &Id) -> Waiting {
    let label = tenant(tenant_id);
    add_waiting(&label, 1);
    Waiting { label }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        add_waiting(&self.label, -1);
    }
}

/// One token's usage, as the gauges show it (read from `lease::Leaser::usage`).
#[derive(Debug, Clone)]
pub struct TokenReading {
    pub token_id: Id,
    pub upstream_id: Id,
    /// Its pool or tenant (`None`: gone from the configuration since the read).
    pub owner: Option<TokenOwner>,
    pub state: TokenState,
    pub used: u32,
    pub usable: u32,
    pub disabled: bool,
}

impl TokenReading {
    /// Whether leases may be granted on it: active, or half-open (probing).
    pub fn in_service(&self) -> bool {
        !self.disabled && matches!(self.state, TokenState::Active | TokenState::BreakerHalfOpen)
    }

    /// The `pool` label of its gauges (see `labels::POOL`).
    pub fn pool_label(&self) -> String {
        match &self.owner {
            Some(TokenOwner::Pool(pool)) => pool.to_string(),
            Some(TokenOwner::Dedicated(tenant)) => format!("dedicated:{tenant}"),
            None => "unknown".to_owned(),
        }
    }
}

/// Publishes token usage gauges, and makes each token's counters exist from the
/// start (at 0), so `increase()` sees their first event.
pub fn token_usage(tokens: &[TokenReading]) {
    token_states(tokens);
    *window_room_lock().write().expect("not poisoned") = WindowRoom::from_readings(tokens);
    for t in tokens {
        let labels = [
            (labels::TOKEN, t.token_id.to_string()),
            (labels::UPSTREAM, t.upstream_id.to_string()),
        ];
        counter!(names::UPSTREAM_RATE_LIMITED, &labels).increment(0);
        counter!(names::IMPLAUSIBLE_REPORTS, &labels).increment(0);
        counter!(names::BREAKER_OPENS, labels::TOKEN => t.token_id.to_string()).increment(0);
        // The denial counters of its pool (as `acquire_denied` labels them) too.
        let pool = match &t.owner {
            Some(TokenOwner::Pool(pool)) => pool.to_string(),
            _ => "dedicated".to_owned(),
        };
        let space = [
            (labels::UPSTREAM, t.upstream_id.to_string()),
            (labels::POOL, pool),
        ];
        counter!(names::TOKEN_EXHAUSTION, &space).increment(0);
        counter!(names::TOKEN_PACING, &space).increment(0);
        let labels = [
            (labels::TOKEN, t.token_id.to_string()),
            (labels::UPSTREAM, t.upstream_id.to_string()),
            (labels::POOL, t.pool_label()),
        ];
        let in_service = if t.in_service() { 1.0 } else { 0.0 };
        gauge!(names::TOKEN_IN_SERVICE, &labels).set(in_service);
        if t.disabled {
            continue; // its other gauges go idle and leave the output
        }
        gauge!(names::TOKEN_USED_SLOTS, &labels).set(f64::from(t.used));
        gauge!(names::TOKEN_USABLE_SLOTS, &labels).set(f64::from(t.usable));
        let ratio = if t.usable == 0 {
            0.0
        } else {
            f64::from(t.used) / f64::from(t.usable)
        };
        gauge!(names::TOKEN_UTILIZATION, &labels).set(ratio);
    }
}

/// Tokens per upstream and state, zeros included (an alert needs the series to exist).
fn token_states(tokens: &[TokenReading]) {
    const STATES: [(TokenState, &str); 5] = [
        (TokenState::Active, "active"),
        (TokenState::BreakerOpen, "breaker_open"),
        (TokenState::BreakerHalfOpen, "breaker_half_open"),
        (TokenState::Quarantined, "quarantined"),
        (TokenState::Disabled, "disabled"),
    ];
    let mut counts: HashMap<(&Id, TokenState), u32> = HashMap::new();
    for t in tokens {
        let state = if t.disabled {
            TokenState::Disabled
        } else {
            t.state
        };
        *counts.entry((&t.upstream_id, state)).or_default() += 1;
    }
    let upstreams: std::collections::BTreeSet<&Id> =
        tokens.iter().map(|t| &t.upstream_id).collect();
    for upstream in upstreams {
        for (state, label) in STATES {
            let count = counts.get(&(upstream, state)).copied().unwrap_or(0);
            gauge!(names::TOKENS, labels::UPSTREAM => upstream.to_string(), labels::STATE => label)
                .set(f64::from(count));
        }
    }
}

/// Every `every`, until `stop`: reads token usage (`read`, from the counters) into the
/// gauges, republishes the waiting gauges and runs the recorder's upkeep. A failed read
/// (Redis away) leaves the gauges as they were; it is logged once per outage.
pub fn spawn_refresher<F, Fut, E>(
    read: F,
    handle: PrometheusHandle,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<TokenReading>, E>> + Send,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match read().await {
                Ok(tokens) => {
                    failing = false;
                    token_usage(&tokens);
                }
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "cannot read token usage for metrics");
                }
                Err(_) => {}
            }
            for (label, count) in waiting_counts().lock().expect("not poisoned").iter() {
                gauge!(names::WAITING_CALLERS, labels::TENANT => label.clone()).set(*count as f64);
            }
            for (pool, days) in forecast_days().lock().expect("not poisoned").iter() {
                gauge!(names::POOL_CAPACITY_FORECAST_DAYS, labels::POOL => pool.clone()).set(*days);
            }
            republish_may_evict();
            handle.run_upkeep();
        }
    });
}

/// Binds the `/metrics` listener.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr} (setting metrics.listen)"))
}

/// Serves `GET /metrics` in the Prometheus text format until `stop`.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    handle.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .context("the metrics server failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse("t", s).unwrap()
    }

    /// The first `cap` tenants keep their own label; the rest share `_other`, and a
    /// tenant keeps the label it got first.
    #[test]
    fn tenant_series_are_capped() {
        let labels = TenantLabels::new(2);
        assert_eq!(labels.label(&id("a")), "a");
        assert_eq!(labels.label(&id("b")), "b");
        assert_eq!(labels.label(&id("c")), OTHER_TENANTS);
        assert_eq!(labels.label(&id("a")), "a");
        labels.set_cap(3);
        assert_eq!(labels.label(&id("d")), "d");
        assert_eq!(labels.label(&id("c")), OTHER_TENANTS);
    }

    fn reading(token: &str, owner: TokenOwner, used: u32, state: TokenState) -> TokenReading {
        TokenReading {
            token_id: id(token),
            upstream_id: id("up"),
            owner: Some(owner),
            state,
            used,
            usable: 10,
            disabled: false,
        }
    }

    fn request(pool: Option<&str>, dedicated: &[&str], cost: u32) -> AcquireRequest {
        AcquireRequest {
            upstream_id: id("up"),
            pool_id: pool.map(id),
            config_version: 0,
            nonce: "n".into(),
            tenant_id: id("acme"),
            tenant_limit: 100,
            token_limit: 10,
            window: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(5),
            cost,
            dedicated: dedicated.iter().map(|t| id(t)).collect(),
            pooled: Vec::new().into(),
            pooled_digest: None,
            count_demand: true,
            queue: None,
            pace_burst: 3,
        }
    }

    /// A pacing denial is one where a token the tenant may use, in service, had room
    /// for the call at the last reading; before any reading, or with every such window
    /// full, it is exhaustion. A quarantined token's room does not count.
    #[test]
    fn pacing_is_room_in_a_window_of_a_token_in_service() {
        let pool = |p: &str| TokenOwner::Pool(id(p));
        assert!(!WindowRoom::default().had_room(&request(Some("p"), &[], 1)));
        let room = WindowRoom::from_readings(&[
            reading("full", pool("p"), 10, TokenState::Active),
            reading("two-left", pool("p"), 8, TokenState::Active),
            reading("idle-but-out", pool("q"), 0, TokenState::Quarantined),
            reading(
                "mine",
                TokenOwner::Dedicated(id("acme")),
                9,
                TokenState::Active,
            ),
        ]);
        assert!(room.had_room(&request(Some("p"), &[], 2)));
        assert!(!room.had_room(&request(Some("p"), &[], 3)));
        assert!(!room.had_room(&request(Some("q"), &[], 1)));
        assert!(room.had_room(&request(None, &["mine"], 1)));
        assert!(!room.had_room(&request(Some("q"), &["mine"], 2)));
    }

    /// The `pool` label of token gauges: the pool, or `dedicated:<tenant>`.
    #[test]
    fn token_gauges_name_their_pool() {
        let shared = reading("a", TokenOwner::Pool(id("shared")), 0, TokenState::Active);
        assert_eq!(shared.pool_label(), "shared");
        let mine = reading(
            "b",
            TokenOwner::Dedicated(id("acme")),
            0,
            TokenState::Active,
        );
        assert_eq!(mine.pool_label(), "dedicated:acme");
        let open = reading(
            "c",
            TokenOwner::Pool(id("shared")),
            0,
            TokenState::BreakerOpen,
        );
        assert!(shared.in_service() && !open.in_service());
    }

    /// Every name is prefixed, unique, and counters end in `_total`.
    #[test]
    fn names_are_prefixed_and_unique() {
        let unique: HashSet<&str> = ALL.iter().copied().collect();
        assert_eq!(unique.len(), ALL.len());
        for name in ALL {
            assert!(name.starts_with("tokenlease_"), "{name}");
        }
    }
}
