//! Behaviour suite of the lease counters.
//!
//! Every test written inside `on_both_backends!` runs three times: against the
//! in-process backend (manual clock, moved by hand, so instants are exact), against Redis
//! (the server's clock, real sleeps, short windows, a unique key prefix per test whose
//! keys are deleted afterwards), and unchanged against a throwaway three-master Redis
//! Cluster (`<test>::cluster`; one cluster shared by the tests of the process, each
//! under its own key prefix; killed and removed when the process exits). Answers
//! carry the store's own `now_ms`, so even on Redis the tests check instants exactly: a
//! probe is judged by the time the store says it ran.
//!
//! Redis must answer at `TOKENLEASE_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`).
//! When it does not, the Redis tests fail with a message saying so; they never skip.
//!
//! `sim` holds the property test (random workers using leases at random instants, the
//! last one included, checked by a strict upstream), `faults` the Redis outage tests,
//! `cluster` the Redis Cluster tests (keys spread over masters, a slot moved mid-test),
//! `throwaway_cluster` the cluster those start.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use redis::aio::MultiplexedConnection;

use super::*;
use crate::clock::Clock;

#[path = "tests/cluster.rs"]
mod cluster;
#[path = "tests/cost.rs"]
mod cost;
#[path = "tests/differential.rs"]
mod differential;
#[path = "tests/eviction.rs"]
mod eviction;
#[path = "tests/faults.rs"]
mod faults;
#[path = "tests/handover.rs"]
mod handover;
#[path = "tests/index_upkeep.rs"]
mod index_upkeep;
#[path = "tests/permissions.rs"]
mod permissions;
#[path = "tests/sim.rs"]
mod sim;
#[path = "tests/throwaway_cluster.rs"]
pub(crate) mod throwaway_cluster;
#[path = "tests/upgrade.rs"]
mod upgrade;

use throwaway_cluster::ThrowawayCluster;

const UPSTREAM: &str = "baselinker";
/// BaseLinker's 100 per minute minus the 5 % margin.
const USABLE: u32 = 95;
/// Where the memory backend's manual clock starts (Unix ms).
const MANUAL_START_MS: i64 = 1_750_000_000_000;

fn id(value: &str) -> Id {
    Id::parse("test", value).expect("valid test id")
}

fn ids(values: &[&str]) -> Vec<Id> {
    values.iter().map(|v| id(v)).collect()
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

/// The store-clock instant a denial says to come back at.
fn free_at(d: &Denied) -> i64 {
    d.now_ms + ms(d.retry_after)
}

fn redis_url() -> String {
    std::env::var("TOKENLEASE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_unreachable(url: &str, err: impl std::fmt::Display) -> ! {
    panic!(
        "Redis at {url} is unreachable ({err}). The counters suite runs every behaviour test \
         against Redis and never skips: start a server (`redis-server`) or point \
         TOKENLEASE_TEST_REDIS_URL at one."
    )
}

/// A plain connection for the test's own commands (TIME, SCAN, DEL), checked with PING.
async fn admin_connection(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|e| redis_unreachable(url, e));
    let connect = client.get_multiplexed_async_connection();
    let mut conn = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .unwrap_or_else(|e| redis_unreachable(url, e))
        .unwrap_or_else(|e| redis_unreachable(url, e));
    let ping = redis::cmd("PING");
    tokio::time::timeout(
        Duration::from_secs(5),
        ping.query_async::<String>(&mut conn),
    )
    .await
    .unwrap_or_else(|e| redis_unreachable(url, e))
    .unwrap_or_else(|e| redis_unreachable(url, e));
    conn
}

async fn redis_counters(url: &str, prefix: &str, timeout: Duration) -> RedisCounters {
    let settings = RedisSettings {
        url: url.to_owned(),
        key_prefix: prefix.to_owned(),
        timeout,
        durable: false,
    };
    RedisCounters::connect(&settings)
        .await
        .unwrap_or_else(|e| redis_unreachable(url, e))
}

async fn server_time_ms(conn: &mut MultiplexedConnection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(conn)
        .await
        .expect("Redis TIME");
    secs * 1000 + micros / 1000
}

/// Deletes every key under `prefix` (SCAN by pattern, then DEL), one DEL per key: on a
/// cluster node the keys of several counters spaces hash to different slots.
async fn delete_keys(conn: &mut MultiplexedConnection, prefix: &str) {
    let keys = keys_under(conn, prefix).await;
    if keys.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("DEL").arg(key).ignore();
    }
    let _: () = pipe.query_async(conn).await.expect("DEL");
}

async fn keys_under(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let pattern = format!("{prefix}:*");
    let (mut cursor, mut keys) = (0u64, Vec::new());
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    /// A throwaway three-master Redis Cluster, started for the test.
    Cluster,
}

/// Where a test reads and moves the store's time.
#[derive(Clone)]
enum TimeSource {
    Manual(Clock),
    Server(MultiplexedConnection),
}

/// A granted lease as a worker would hold it.
#[derive(Debug, Clone)]
struct Leased {
    key: LeaseKey,
    grant: Grant,
}

/// One test's fresh counters, its clock, and the durations to use on that backend.
#[derive(Clone)]
struct Harness {
    counters: Counters,
    time: TimeSource,
    /// Redis URL (a comma-separated list for a cluster); empty for memory.
    url: String,
    /// The cluster the test runs on (shared by the tests of this process).
    cluster: Option<&'static ThrowawayCluster>,
    /// Redis key prefix (unique per test); empty for memory.
    prefix: String,
    window: Duration,
    ttl: Duration,
    /// How long before an instant a probe runs to see the slot still taken.
    lead: Duration,
}

impl Harness {
    /// Runs `body` on a fresh harness, then deletes the test's Redis keys, pass or fail.
    async fn run<F, Fut>(backend: Backend, body: F)
    where
        F: FnOnce(Harness) -> Fut,
        Fut: Future<Output = ()>,
    {
        let h = match backend {
            Backend::Memory => Self::memory(),
            Backend::Redis => Self::redis(redis_url(), None).await,
            Backend::Cluster => {
                let cluster = ThrowawayCluster::shared();
                Self::redis(cluster.url_list(), Some(cluster)).await
            }
        };
        h.counters
            .mark_fresh(Space::upstream(&id(UPSTREAM)))
            .await
            .expect("mark the test upstream fresh");
        let result = AssertUnwindSafe(body(h.clone())).catch_unwind().await;
        h.cleanup().await;
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    fn memory() -> Self {
        let clock = Clock::manual(MANUAL_START_MS);
        Self {
            counters: Counters::Memory(MemoryCounters::new(clock.clone())),
            time: TimeSource::Manual(clock),
            url: String::new(),
            cluster: None,
            prefix: String::new(),
            window: Duration::from_secs(60),
            ttl: Duration::from_secs(10),
            lead: Duration::from_millis(1),
        }
    }

    /// Counters on the Redis at `url`; on a cluster, the test's own commands (TIME)
    /// go to its first master (every node runs on this machine's clock).
    async fn redis(url: String, cluster: Option<&'static ThrowawayCluster>) -> Self {
        let first = url.split(',').next().unwrap_or_default().to_owned();
        let conn = admin_connection(&first).await;
        let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
        let counters = redis_counters(&url, &prefix, Duration::from_secs(5)).await;
        Self {
            counters: Counters::Redis(counters),
            time: TimeSource::Server(conn),
            url,
            cluster,
            prefix,
            window: Duration::from_millis(1500),
            ttl: Duration::from_millis(300),
            lead: Duration::from_millis(60),
        }
    }

    /// Deletes the test's keys (on a cluster, from every master).
    async fn cleanup(&self) {
        if let Some(cluster) = self.cluster {
            for url in cluster.urls() {
                delete_keys(&mut admin_connection(&url).await, &self.prefix).await;
            }
        } else if let TimeSource::Server(conn) = &self.time {
            delete_keys(&mut conn.clone(), &self.prefix).await;
        }
    }

    fn window_ms(&self) -> i64 {
        ms(self.window)
    }

    /// The same harness after its counters were lost: in memory a new process's
    /// counters (same clock), on Redis every key of the test deleted (a flush, or a
    /// restart without persistence).
    async fn lose_counters(self) -> Self {
        match &self.time {
            TimeSource::Manual(clock) => Self {
                counters: Counters::Memory(MemoryCounters::new(clock.clone())),
                ..self
            },
            TimeSource::Server(_) => {
                self.cleanup().await;
                self
            }
        }
    }

    /// More handles on the same counters: clones in memory, new connections
    /// ("replicas") on Redis.
    async fn replicas(&self, n: usize) -> Vec<Counters> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match &self.counters {
                Counters::Memory(_) => self.counters.clone(),
                Counters::Redis(_) => {
                    let timeout = Duration::from_secs(5);
                    Counters::Redis(redis_counters(&self.url, &self.prefix, timeout).await)
                }
            });
        }
        out
    }

    /// The store's clock now.
    async fn now_ms(&self) -> i64 {
        match &self.time {
            TimeSource::Manual(clock) => clock.now_ms(),
            TimeSource::Server(conn) => server_time_ms(&mut conn.clone()).await,
        }
    }

    /// Returns once the store's clock reads at least `at` (exactly `at` in memory).
    async fn advance_to(&self, at: i64) {
        loop {
            let now = self.now_ms().await;
            if now >= at {
                return;
            }
            let gap = Duration::from_millis((at - now) as u64);
            match &self.time {
                TimeSource::Manual(clock) => clock.advance(gap),
                TimeSource::Server(_) => tokio::time::sleep(gap).await,
            }
        }
    }

    async fn advance(&self, by: Duration) {
        let now = self.now_ms().await;
        self.advance_to(now + ms(by)).await;
    }

    /// A cost-1 request with the harness's window and TTL, token limit 95.
    fn request(
        &self,
        tenant: &str,
        tenant_limit: u32,
        dedicated: &[&str],
        pooled: &[&str],
    ) -> AcquireRequest {
        AcquireRequest {
            upstream_id: id(UPSTREAM),
            pool_id: None,
            config_version: 0,
            nonce: LeaseKey::new_nonce(),
            tenant_id: id(tenant),
            tenant_limit,
            token_limit: USABLE,
            window: self.window,
            lease_ttl: self.ttl,
            cost: 1,
            dedicated: ids(dedicated),
            pooled: ids(pooled).into(),
            pooled_digest: None,
            count_demand: false,
            queue: None,
            pace_burst: 0,
        }
    }

    /// Acquires with a fresh nonce; a backend error fails the test.
    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Leased, Denied> {
        try_acquire_on(&self.counters, req).await
    }

    async fn grant(&self, req: &AcquireRequest) -> Leased {
        self.try_acquire(req)
            .await
            .unwrap_or_else(|d| panic!("expected a grant for {}, got {d:?}", req.tenant_id))
    }

    async fn deny(&self, req: &AcquireRequest) -> Denied {
        match self.try_acquire(req).await {
            Ok(lease) => panic!("expected a denial for {}, got {lease:?}", req.tenant_id),
            Err(denied) => denied,
        }
    }

    async fn release(&self, key: &LeaseKey, outcome: ReleaseOutcome) -> ReleaseResult {
        self.counters
            .release(key, outcome)
            .await
            .expect("release answered")
    }

    async fn usage(&self, tenants: &[&str], tokens: &[&str]) -> UsageCounts {
        let (tenants, tokens) = (ids(tenants), ids(tokens));
        self.counters
            .usage(
                Space::upstream(&id(UPSTREAM)),
                self.window,
                &tenants,
                &tokens,
            )
            .await
            .expect("usage answered")
    }

    /// Checks that `req` is refused until exactly `at` (a probe shortly before must be
    /// denied and point at `at`) and granted from `at` on; returns the grant.
    async fn expect_free_at(&self, req: &AcquireRequest, at: i64) -> Leased {
        self.advance_to(at - ms(self.lead)).await;
        match self.try_acquire(req).await {
            Ok(lease) => {
                // Only possible when the store ran the probe late, at or after `at`.
                assert!(lease.grant.now_ms >= at, "granted at {lease:?} before {at}");
                return lease;
            }
            Err(d) => {
                assert!(
                    d.now_ms < at,
                    "denied at {} though free from {at}",
                    d.now_ms
                );
                assert_eq!(free_at(&d), at, "the denial must point at {at}: {d:?}");
            }
        }
        self.advance_to(at).await;
        self.grant(req).await
    }
}

/// The key of the lease `req` was granted on `token`.
fn lease_of(req: &AcquireRequest, token: &Id) -> LeaseKey {
    LeaseKey {
        upstream_id: req.upstream_id.clone(),
        pool_id: req.pool_id.clone(),
        tenant_id: req.tenant_id.clone(),
        token_id: token.clone(),
        nonce: req.nonce.clone(),
    }
}

async fn try_acquire_on(counters: &Counters, req: &AcquireRequest) -> Result<Leased, Denied> {
    let req = AcquireRequest {
        nonce: LeaseKey::new_nonce(),
        ..req.clone()
    };
    match counters.acquire(&req).await.expect("acquire answered") {
        AcquireOutcome::Granted(grant) => Ok(Leased {
            key: lease_of(&req, &grant.token_id),
            grant,
        }),
        AcquireOutcome::Denied(denied) => Err(denied),
        AcquireOutcome::Unhealthy(refused) => panic!("no token health here: {refused:?}"),
    }
}

fn counts(tenants: &[u32], tokens: &[u32]) -> UsageCounts {
    UsageCounts {
        tenants: tenants.to_vec(),
        tokens: tokens.to_vec(),
    }
}

/// A reference model of one token used by cost-1 requests of one test: the instants
/// its taken slots free up. Predicts every answer exactly.
struct Slots {
    limit: u32,
    window_ms: i64,
    frees: Vec<i64>,
}

impl Slots {
    fn new(limit: u32, window_ms: i64) -> Self {
        Self {
            limit,
            window_ms,
            frees: Vec::new(),
        }
    }

    /// Slots still taken at `now`, earliest to free first.
    fn taken_at(&self, now: i64) -> Vec<i64> {
        let mut taken: Vec<i64> = self.frees.iter().copied().filter(|&f| f > now).collect();
        taken.sort_unstable();
        taken
    }

    /// Checks an answer against the model and records a grant.
    fn check(&mut self, answer: &Result<Leased, Denied>) {
        match answer {
            Ok(lease) => {
                let taken = self.taken_at(lease.grant.now_ms).len() as u32;
                assert!(taken < self.limit, "granted with {taken} taken: {lease:?}");
                assert_eq!(lease.grant.token_used, taken + 1, "{lease:?}");
                self.frees
                    .push(lease.grant.expires_at_ms + self.window_ms + 1);
            }
            Err(d) => {
                let taken = self.taken_at(d.now_ms);
                assert_eq!(taken.len() as u32, self.limit, "denied with room: {d:?}");
                assert_eq!(d.reason, DenyReason::NoTokenCapacity);
                assert_eq!(
                    free_at(d),
                    taken[0],
                    "retry must point at the first free slot"
                );
            }
        }
    }
}

/// Declares async test bodies `fn(Harness)` and runs each as `<name>::memory`,
/// `<name>::redis` and `<name>::cluster`.
macro_rules! on_both_backends {
    ($( $(#[$meta:meta])* async fn $name:ident($h:ident: Harness) $body:block )*) => {$(
        $(#[$meta])*
        async fn $name($h: Harness) $body

        mod $name {
            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                super::Harness::run(super::Backend::Memory, super::$name).await
            }

            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                super::Harness::run(super::Backend::Redis, super::$name).await
            }

            $(#[$meta])*
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                super::Harness::run(super::Backend::Cluster, super::$name).await
            }
        }
    )*};
}

#[path = "tests/pacing.rs"]
mod pacing;

#[path = "tests/guarantee_queue.rs"]
mod guarantee_queue;

on_both_backends! {
    /// Property 1: one token grants exactly its usable limit (95) per window, then denies
    /// with retry at its first slot's end + W; denials are not counted, so after many of
    /// them the first slot frees at exactly the predicted instant, and the next after it.
    async fn token_grants_exactly_its_limit(h: Harness) {
        let req = h.request("t-a", 10_000, &[], &["k-1"]);
        let mut slots = Slots::new(USABLE, h.window_ms());
        for n in 1..=USABLE {
            let answer = h.try_acquire(&req).await;
            assert!(answer.is_ok(), "grant {n} of {USABLE} refused: {answer:?}");
            slots.check(&answer);
            if n % 10 == 0 {
                h.advance(Duration::from_millis(20)).await;
            }
        }
        let first_free = slots.taken_at(0)[0];
        let start = h.now_ms().await;
        for step in 0..20 {
            h.advance_to(start + (first_free - ms(h.lead) - start) * step / 20).await;
            for _ in 0..10 {
                let answer = h.try_acquire(&req).await;
                assert!(answer.is_err(), "granted over the limit: {answer:?}");
                slots.check(&answer);
            }
        }
        let lease = h.expect_free_at(&req, first_free).await;
        slots.check(&Ok(lease));
        let next = h.try_acquire(&req).await;
        slots.check(&next);
    }

    /// Property 2 (quota side): a tenant at its quota is denied `TenantQuota`, retry at
    /// its own first slot's end + W, while another tenant on the same token is granted.
    async fn tenant_quota_binds_only_that_tenant(h: Harness) {
        let a = h.request("t-a", 3, &[], &["k-1"]);
        let b = h.request("t-b", 50, &[], &["k-1"]);
        let first = h.grant(&a).await;
        h.grant(&a).await;
        assert_eq!(h.grant(&a).await.grant.tenant_used, 3);
        let denied = h.deny(&a).await;
        assert_eq!(denied.reason, DenyReason::TenantQuota);
        assert_eq!(free_at(&denied), first.grant.expires_at_ms + h.window_ms() + 1);
        let other = h.grant(&b).await.grant;
        assert_eq!((other.tenant_used, other.token_used), (1, 4));
        let usage = h.usage(&["t-a", "t-b"], &["k-1"]).await;
        assert_eq!(usage, counts(&[3, 1], &[4]));
    }

    /// A tenant at its quota while no candidate token has room either is told the later
    /// of the two instants (retrying at the earlier one would fail again), and the
    /// reason names that later, binding limit.
    async fn quota_denial_waits_for_a_token_too(h: Harness) {
        let mut a_on_k1 = h.request("t-a", 1, &["k-1"], &[]);
        a_on_k1.token_limit = 1;
        let a_first = h.grant(&a_on_k1).await;
        h.advance(Duration::from_millis(100)).await;
        let mut b_on_k2 = h.request("t-b", 5, &[], &["k-2"]);
        b_on_k2.token_limit = 1;
        let b_first = h.grant(&b_on_k2).await;
        let mut a_on_k2 = h.request("t-a", 1, &[], &["k-2"]);
        a_on_k2.token_limit = 1;
        let denied = h.deny(&a_on_k2).await;
        assert_eq!(denied.reason, DenyReason::NoTokenCapacity);
        let token_free = b_first.grant.expires_at_ms + h.window_ms() + 1;
        assert!(token_free > a_first.grant.expires_at_ms + h.window_ms() + 1);
        assert_eq!(free_at(&denied), token_free);
    }

    /// Property 5 and the accounting: "not used" gives the slot back at once; a used
    /// release (success, upstream error, rate-limited) keeps it until release + W, not
    /// expiry + W; an unreleased lease keeps it until expiry + W.
    async fn release_frees_or_shortens_the_slot(h: Harness) {
        let one_slot = |token: &str| {
            let mut req = h.request("t-a", 1000, &[], &[token]);
            req.token_limit = 1;
            req
        };
        let not_used = one_slot("k-not-used");
        let lease = h.grant(&not_used).await;
        assert_eq!(h.release(&lease.key, ReleaseOutcome::NotUsed).await, ReleaseResult::Released);
        assert_eq!(h.grant(&not_used).await.grant.token_used, 1, "the slot came back");

        let used = [
            ("k-success", ReleaseOutcome::Success),
            ("k-error", ReleaseOutcome::UpstreamError),
            ("k-limited", ReleaseOutcome::UpstreamRateLimited),
        ];
        let mut leases = Vec::new();
        for (token, _) in &used {
            leases.push(h.grant(&one_slot(token)).await);
        }
        let unreleased = h.grant(&one_slot("k-unreleased")).await;
        h.advance(h.ttl / 2).await;
        let mut expected = Vec::new();
        for ((token, outcome), lease) in used.iter().zip(&leases) {
            let before = h.now_ms().await;
            assert_eq!(h.release(&lease.key, *outcome).await, ReleaseResult::Released);
            let after = h.now_ms().await;
            let at = free_at(&h.deny(&one_slot(token)).await);
            let w = h.window_ms();
            assert!((before + w + 1..=after + w + 1).contains(&at), "{outcome:?}: {at}");
            assert!(at < lease.grant.expires_at_ms + w + 1, "{outcome:?}: not shortened");
            expected.push((at, one_slot(token)));
        }
        let expiry_free = unreleased.grant.expires_at_ms + h.window_ms() + 1;
        assert_eq!(free_at(&h.deny(&one_slot("k-unreleased")).await), expiry_free);
        expected.push((expiry_free, one_slot("k-unreleased")));
        expected.sort_by_key(|(at, _)| *at);
        for (at, req) in &expected {
            h.expect_free_at(req, *at).await;
        }
    }

    /// Property 5: releasing twice with the same outcome is `AlreadyReleased`, with
    /// another `Conflict { previous }` (and frees nothing); a release after the expiry
    /// is accepted until expiry + W and frees nothing; an unknown nonce, a lease past
    /// that, or a lease id naming another tenant, token or upstream is `NotFound` and
    /// leaves the lease untouched.
    async fn release_statuses(h: Harness) {
        let req = h.request("t-a", 100, &[], &["k-1"]);
        let lease = h.grant(&req).await;
        let wrong = [
            LeaseKey { tenant_id: id("t-b"), ..lease.key.clone() },
            LeaseKey { token_id: id("k-2"), ..lease.key.clone() },
            LeaseKey { upstream_id: id("other-upstream"), ..lease.key.clone() },
            LeaseKey { nonce: LeaseKey::new_nonce(), ..lease.key.clone() },
        ];
        for key in &wrong {
            let result = h.release(key, ReleaseOutcome::NotUsed).await;
            assert_eq!(result, ReleaseResult::NotFound, "{key:?}");
        }
        assert_eq!(h.usage(&["t-a"], &["k-1"]).await.tokens, vec![1], "wrong ids freed nothing");
        assert_eq!(h.release(&lease.key, ReleaseOutcome::Success).await, ReleaseResult::Released);
        let again = h.release(&lease.key, ReleaseOutcome::Success).await;
        assert_eq!(again, ReleaseResult::AlreadyReleased);
        for other in [ReleaseOutcome::NotUsed, ReleaseOutcome::UpstreamError] {
            let previous = ReleaseOutcome::Success;
            assert_eq!(h.release(&lease.key, other).await, ReleaseResult::Conflict { previous });
        }
        // A released lease named with another tenant or token is not found either, and
        // its record stays as it was.
        for key in &wrong[..2] {
            assert_eq!(h.release(key, ReleaseOutcome::Success).await, ReleaseResult::NotFound, "{key:?}");
        }
        assert_eq!(h.release(&lease.key, ReleaseOutcome::Success).await, ReleaseResult::AlreadyReleased);
        assert_eq!(h.usage(&["t-a"], &["k-1"]).await.tokens, vec![1], "conflict freed nothing");

        // After its expiry, a release is accepted until expiry + W, and frees nothing.
        let late = h.grant(&req).await;
        h.advance_to(late.grant.expires_at_ms + 1).await;
        assert_eq!(h.release(&late.key, ReleaseOutcome::NotUsed).await, ReleaseResult::Released);
        let usage = h.usage(&["t-a"], &["k-1"]).await;
        assert_eq!(usage.tokens, vec![2], "an expired lease's slot stays counted");
        let again = h.release(&late.key, ReleaseOutcome::NotUsed).await;
        assert_eq!(again, ReleaseResult::AlreadyReleased);
        h.advance_to(late.grant.expires_at_ms + ms(h.window) + 1).await;
        assert_eq!(h.release(&late.key, ReleaseOutcome::NotUsed).await, ReleaseResult::NotFound);
        assert_eq!(h.release(&lease.key, ReleaseOutcome::Success).await, ReleaseResult::NotFound);
    }

    /// Token choice: a dedicated token with room wins over emptier pool tokens; among
    /// dedicated tokens, then among pool tokens, the least used wins (first listed on a
    /// tie); with every token full the retry points at the earliest slot to free.
    async fn token_choice_order(h: Harness) {
        let limit = 4;
        let mut first_end = i64::MAX;
        for (token, preload) in [("d-1", 2), ("d-2", 1), ("p-1", 3), ("p-2", 1)] {
            let mut req = h.request("t-load", 1000, &[], &[token]);
            req.token_limit = limit;
            for _ in 0..preload {
                first_end = first_end.min(h.grant(&req).await.grant.expires_at_ms);
            }
        }
        let mut req = h.request("t-a", 1000, &["d-1", "d-2"], &["p-1", "p-2", "p-3"]);
        req.token_limit = limit;
        let expected = [
            "d-2", "d-1", "d-2", "d-1", "d-2", "p-3", "p-2", "p-3", "p-2", "p-3", "p-1", "p-2",
            "p-3",
        ];
        for (n, token) in expected.iter().enumerate() {
            let got = h.grant(&req).await.grant.token_id;
            assert_eq!(got.as_str(), *token, "grant {n}");
        }
        let denied = h.deny(&req).await;
        assert_eq!(denied.reason, DenyReason::NoTokenCapacity);
        assert_eq!(free_at(&denied), first_end + h.window_ms() + 1);
    }

    /// Least used first also once time frees slots: a full pool token whose entries
    /// have left the window is the least used again and wins over a busier token that
    /// had room all along (the Redis pool index refreshes tokens whose instant came).
    async fn a_token_freed_by_time_is_least_used_again(h: Harness) {
        let mut req = h.request("t-a", 1000, &[], &["k-1", "k-2"]);
        req.token_limit = 2;
        let g1 = h.grant(&req).await;
        let g2 = h.grant(&req).await;
        let g3 = h.grant(&req).await;
        let chosen = [&g1, &g2, &g3].map(|g| g.grant.token_id.to_string());
        assert_eq!(chosen, ["k-1", "k-2", "k-1"]);
        h.release(&g1.key, ReleaseOutcome::Success).await;
        let released = h.now_ms().await;
        h.release(&g3.key, ReleaseOutcome::Success).await;
        let last_release = h.now_ms().await;
        assert!(released < g2.grant.expires_at_ms, "g2 still counts after k-1 frees");
        h.advance_to(last_release + h.window_ms() + 1).await;
        let usage = h.usage(&[], &["k-1", "k-2"]).await;
        assert_eq!(usage.tokens, vec![0, 1], "k-1 freed by time, k-2 still holds g2");
        assert_eq!(h.grant(&req).await.grant.token_id.as_str(), "k-1");
    }

    /// Cost > 1 takes `cost` slots on both windows, is refused while fewer than `cost`
    /// are free (retry when enough have freed), skips a dedicated token without room
    /// for the cost, and a "not used" release gives all its slots back.
    async fn cost_takes_several_slots(h: Harness) {
        let mut req = h.request("t-a", 100, &[], &["k-1"]);
        req.token_limit = 5;
        req.cost = 3;
        let big = h.grant(&req).await;
        assert_eq!((big.grant.tenant_used, big.grant.token_used), (3, 3));
        assert_eq!(h.usage(&["t-a"], &["k-1"]).await, counts(&[3], &[3]));
        let denied = h.deny(&req).await;
        assert_eq!(denied.reason, DenyReason::NoTokenCapacity);
        assert_eq!(free_at(&denied), big.grant.expires_at_ms + h.window_ms() + 1);
        req.cost = 2;
        assert_eq!(h.grant(&req).await.grant.token_used, 5);
        assert_eq!(h.release(&big.key, ReleaseOutcome::NotUsed).await, ReleaseResult::Released);
        assert_eq!(h.usage(&["t-a"], &["k-1"]).await, counts(&[2], &[2]));
        req.cost = 3;
        assert_eq!(h.grant(&req).await.grant.token_used, 5);

        let mut spill = h.request("t-b", 100, &["d-1"], &["p-1"]);
        spill.token_limit = 5;
        spill.cost = 3;
        assert_eq!(h.grant(&spill).await.grant.token_id.as_str(), "d-1");
        assert_eq!(h.grant(&spill).await.grant.token_id.as_str(), "p-1");
        let mut quota = h.request("t-c", 4, &[], &["p-2"]);
        quota.cost = 3;
        h.grant(&quota).await;
        quota.cost = 2;
        assert_eq!(h.deny(&quota).await.reason, DenyReason::TenantQuota);
    }

    /// Property 1 across replicas: 500 concurrent acquires from 4 replicas on one token
    /// (limit 95, quotas not binding) grant exactly 95, each seeing a distinct count.
    async fn concurrent_acquires_grant_exactly_the_limit(h: Harness) {
        let replicas = h.replicas(4).await;
        let mut tasks = Vec::new();
        for i in 0..500 {
            let counters = replicas[i % replicas.len()].clone();
            let mut req = h.request(&format!("t-{}", i % 10), 10_000, &[], &["k-1"]);
            (req.window, req.lease_ttl) = (Duration::from_secs(60), Duration::from_secs(10));
            tasks.push(tokio::spawn(async move { try_acquire_on(&counters, &req).await }));
        }
        let mut counts = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                Ok(lease) => counts.push(lease.grant.token_used),
                Err(d) => assert_eq!(d.reason, DenyReason::NoTokenCapacity),
            }
        }
        counts.sort_unstable();
        assert_eq!(counts, (1..=USABLE).collect::<Vec<_>>());
        let (upstream, tokens) = (id(UPSTREAM), ids(&["k-1"]));
        let usage = h.counters.usage(Space::upstream(&upstream), Duration::from_secs(60), &[], &tokens).await;
        assert_eq!(usage.expect("usage").tokens, vec![USABLE]);
    }

    /// Usage counts: per tenant and per token, the slots held (cost included), minus
    /// "not used" releases, until they leave the window; unknown ids count 0.
    async fn usage_matches_grants_and_releases(h: Harness) {
        let on_k1 = h.request("t-a", 100, &[], &["k-1"]);
        let mut on_k2 = h.request("t-a", 100, &["k-2"], &["k-1"]);
        on_k2.cost = 2;
        let b = h.request("t-b", 100, &[], &["k-1"]);
        h.grant(&on_k1).await;
        let pair = h.grant(&on_k2).await;
        let last = h.grant(&b).await;
        let (tenants, tokens) = (["t-a", "t-b", "t-x"], ["k-1", "k-2", "k-x"]);
        let usage = h.usage(&tenants, &tokens).await;
        assert_eq!(usage, counts(&[3, 1, 0], &[2, 2, 0]));
        assert_eq!(h.release(&last.key, ReleaseOutcome::NotUsed).await, ReleaseResult::Released);
        assert_eq!(h.release(&pair.key, ReleaseOutcome::Success).await, ReleaseResult::Released);
        let usage = h.usage(&tenants, &tokens).await;
        assert_eq!(usage, counts(&[3, 0, 0], &[1, 2, 0]));
        assert_eq!(h.usage(&[], &[]).await, UsageCounts::default());
        h.advance_to(pair.grant.expires_at_ms + h.window_ms() + 1).await;
        let usage = h.usage(&tenants, &tokens).await;
        assert_eq!(usage, counts(&[0; 3], &[0; 3]));
    }

    /// Requests no waiting can satisfy never panic and never grant: a zero quota, a
    /// cost above the token or the tenant limit, or no candidate token is a denial with
    /// a one-window retry; a zero cost still takes one slot. The counters keep working.
    async fn impossible_requests_are_denied_cleanly(h: Harness) {
        let w = h.window;
        let base = h.request("t-a", 10, &[], &["k-1"]);
        h.grant(&base).await;
        let with = |change: fn(&mut AcquireRequest)| {
            let mut req = base.clone();
            change(&mut req);
            req
        };
        let (quota, no_token) = (DenyReason::TenantQuota, DenyReason::NoTokenCapacity);
        let cases = [
            ("zero quota", with(|r| r.tenant_limit = 0), quota),
            ("cost above token limit", with(|r| (r.cost, r.tenant_limit) = (96, 1000)), no_token),
            ("cost above quota", with(|r| r.cost = 11), quota),
            ("no token", with(|r| r.pooled = std::sync::Arc::from([])), no_token),
        ];
        for (what, req, reason) in &cases {
            let denied = h.deny(req).await;
            assert_eq!((denied.reason, denied.retry_after), (*reason, w), "{what}");
        }
        let zero = h.grant(&AcquireRequest { cost: 0, ..base.clone() }).await;
        assert_eq!((zero.grant.tenant_used, zero.grant.token_used), (2, 2), "cost 0 counts as 1");
        assert_eq!(h.grant(&base).await.grant.token_used, 3);
    }
}

on_both_backends! {
    /// Lost counters (Redis flushed or restarted empty, a new embedded process) hold the
    /// upstream: the first decision after the loss sets the fence at now + W + TTL (and
    /// is told so: CountersLostNoticed, for its caller to announce the hold once) and
    /// every decision until then is denied CountersLost, pointing at the fence; from the
    /// fence on, grants resume. Without the hold, the grant before the loss and those
    /// after it could share a window beyond the limit.
    async fn lost_counters_hold_grants_until_earlier_leases_are_out(h: Harness) {
        let req = h.request("t-a", 10_000, &[], &["k-1"]);
        h.grant(&req).await;
        let h = h.lose_counters().await;
        let noticed = h.deny(&req).await;
        assert_eq!(noticed.reason, DenyReason::CountersLostNoticed, "{noticed:?}");
        let resume = noticed.now_ms + ms(h.window + h.ttl);
        assert_eq!(free_at(&noticed), resume, "{noticed:?}");
        let again = h.deny(&req).await;
        assert_eq!(
            (again.reason, free_at(&again)),
            (DenyReason::CountersLost, resume),
            "the hold is set once, not moved by later calls"
        );
        h.expect_free_at(&req, resume).await;
        // The hold is the upstream's: marking it fresh afterwards does not lift one.
        let h = h.lose_counters().await;
        let held = h.deny(&req).await;
        h.counters.mark_fresh(Space::upstream(&id(UPSTREAM))).await.expect("mark fresh");
        assert_eq!(free_at(&h.deny(&req).await), free_at(&held));
    }

    /// Demand for fair sharing: each call's first attempt counts once, in the bucket it
    /// arrives in, read back once that bucket completes; a call that found its tenant at
    /// quota also counts as unmet; retries of a waiting call do not count again.
    async fn demand_counts_first_attempts(h: Harness) {
        let mut first = h.request("t-a", 2, &[], &["k-1"]);
        first.count_demand = true;
        for _ in 0..3 {
            let _ = h.try_acquire(&first).await; // 2 granted, the third over quota
        }
        let retry = AcquireRequest { count_demand: false, ..first.clone() };
        let _ = h.try_acquire(&retry).await;
        h.advance(Duration::from_millis(super::bucket_ms(h.window_ms()) as u64 + 1)).await;
        let (_, counts) = h.counters.demand(Space::upstream(&id(UPSTREAM)), h.window, &[id("t-a"), id("t-b")]).await.unwrap();
        assert_eq!(counts, vec![super::DemandCount { asked: 3, unmet: 1 }, super::DemandCount::default()]);
    }
}

/// Token health: circuit breaker and quarantine (property 7).
#[path = "tests/breaker.rs"]
mod breaker;
