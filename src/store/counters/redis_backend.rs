//! Lease counters in Redis (one server or a Redis Cluster), shared by every replica.
//!
//! Keys: `<prefix>:{<space>}:tw:<tenant>` (tenant window), `…:kw:<token>` (token
//! window), `…:lease:<nonce>` (lease record), `…:fence:epoch` (the space's fence, see
//! `Counters::mark_fresh`: the one key without a TTL), where `<space>` is `<upstream>`
//! for tenants without a pool and `<upstream>.<pool>` for a pool, its tokens, its
//! tenants and their dedicated tokens (`Space`). The hash tag puts one space's keys in
//! one cluster slot, so a decision that spans a tenant and many tokens is one atomic
//! script, and a Redis Cluster spreads an upstream's pools over its masters. A token
//! that moves to another space is handed over by `prepare_moves`.
//!
//! Failure policy (fail closed): every call is bounded by `timeout`; a timeout or a
//! connection error becomes `CounterError::Unavailable` and the caller denies. An
//! acquire carries its deadline: a script that reaches Redis after it (Redis frozen or
//! slow) does nothing. One that ran in time but whose answer came late has its grant
//! recorded but never handed out, which costs a slot but can never exceed the limit.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    ErrorKind, IntoConnectionInfo, RedisError, Script, ServerErrorKind, ToRedisArgs, Value,
};
use tokio::sync::Semaphore;

use super::breaker::parse_transitions;
use super::breaker_redis::{bad_reply, policy_args};
use super::{
    AcquireOutcome, AcquireRequest, BUCKETS_PER_WINDOW, CounterError, DemandCount, Denied,
    DenyReason, Grant, LeaseKey, OutcomeReport, Recorded, ReleaseOutcome, ReleaseResult, Space,
    Unhealthy, UsageCounts, bucket_ms, scripts,
};
use crate::domain::{Id, TokenMove, TokenState};

/// Most counter calls in flight at once on one Redis Cluster connection; more wait for
/// a turn, within the call's timeout.
///
/// Why: the async cluster connection of redis 1.8.1 can wedge for good when a slot moves
/// (MOVED) while many calls are in flight on it. Instrumented, its slot-map refresh
/// waits for ever on the write side of its connection-map lock, while the redirected
/// requests queued on the read side are not polled again until the refresh ends; every
/// later call on that connection then times out (fail closed, but never recovering).
/// Reproduced by the counters' cluster test `a_moved_slot_is_followed_without_overgranting`
/// and by a plain `INCR` loop: from about 50 concurrent calls on, most runs wedged; at 40
/// and below, none did, and gated to 32 none of 300 concurrent calls wedged. 16 in
/// flight keeps well clear of that and is still far more than leasing needs (a decision
/// is one script of well under a millisecond). The client's own per-node
/// `connection_concurrency_limit` does not help: the waiting requests still sit inside
/// the connection.
const CLUSTER_IN_FLIGHT: usize = 16;

/// Keys one read script (demand, usage) takes at most. A script holds Redis for its
/// whole run, and every lease decision waits behind it: the demand of 1,000 tenants in
/// one script took ~7 ms and their windows' usage ~3 ms (Redis `SLOWLOG`), which was the
/// p99 of AcquireLease at 2,000 pairs/s. 128 keys hold Redis for well under a
/// millisecond.
pub(super) const READ_CHUNK: usize = 128;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port[/db]`; several comma-separated URLs mean a Redis Cluster.
    pub url: String,
    /// Prefix of every key, so several deployments (or tests) can share one Redis.
    pub key_prefix: String,
    /// Upper bound on one counter call, connection attempts included.
    pub timeout: Duration,
    /// Whether this Redis keeps every acknowledged write across restarts and failovers
    /// (`appendfsync always`, or replication that waits). When false, a new Redis
    /// process behind the same keys holds every upstream once (see the fence).
    pub durable: bool,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    /// The connection and the turns of `CLUSTER_IN_FLIGHT` calls on it.
    Cluster(ClusterConnection, Arc<Semaphore>),
}

/// Redis counters; cheap to clone (multiplexed connections).
#[derive(Clone)]
pub struct RedisCounters {
    connection: Connection,
    prefix: String,
    timeout: Duration,
    /// Whether a fence confirmed by another Redis process is trusted (see the fence in
    /// `scripts::ACQUIRE`): when Redis is declared durable, and on a Redis Cluster,
    /// where resharding moves keys between nodes whole (MIGRATE) and must not hold.
    trust_new_server: bool,
    /// The lease path's functions (`scripts::Library`), loaded when Redis lacks them.
    library: Arc<scripts::Library>,
    acquire: Arc<str>,
    release: Arc<str>,
    usage: Script,
    demand: Script,
    leave_queue: Script,
    mark_fresh: Script,
    move_out: Script,
    move_in: Script,
    peek_health: Script,
}

/// One call of a library function: its keys and arguments, built as a script's are.
#[derive(Default)]
struct FunctionCall {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl FunctionCall {
    fn key(&mut self, key: String) -> &mut Self {
        self.keys.push(key);
        self
    }

    fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }
}

/// Sockets to Redis send each request at once. A decision is one small script: with
/// Nagle's algorithm on (the redis crate's default), a request written while the
/// previous one is unacknowledged waits for the peer's delayed ACK, ~40 ms on Linux,
/// and that was the p99 of AcquireLease with as few as 4 calls in flight.
fn no_delay() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// A Redis error as the caller should see it: anything that trying again later can
/// cure (I/O, timeouts, a cluster slot moving or migrating — MOVED, ASK, TRYAGAIN —,
/// CLUSTERDOWN, a node loading or demoted during a failover) is `Unavailable`, which
/// callers answer UNAVAILABLE with a retry-after; only what retrying cannot change (a
/// script error, an unexpected reply) is `Internal`.
///
/// A Redis that is full (`maxmemory` with `noeviction`: OOM) is `Unavailable` too, as
/// is a command or key the service's Redis user may not use (NOPERM when Redis refuses
/// the call itself, an ERR naming "the user executing the script" when it refuses a
/// command or key inside a function), each with what to do: an operator cures both
/// while the service runs.
fn classify(e: RedisError) -> CounterError {
    let refused = e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || server_says(&e, "The user executing the script");
    if refused {
        return unavailable(format!(
            "{e}. Redis refused the service's user a command or key (`ACL LOG` on the \
             server names it): grant what the README lists (\"Running it in \
             production\"), and FUNCTION LOAD unless the lease library is loaded for it: \
             `tokenlease redis-functions | redis-cli -x FUNCTION LOAD REPLACE`, as a user \
             that may, after every upgrade"
        ));
    }
    if e.code() == Some("OOM") {
        return unavailable(format!(
            "{e} Redis is full and refuses writes: give it more memory (maxmemory), \
             keeping maxmemory-policy noeviction"
        ));
    }
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_cluster_error()
        || !matches!(e.retry_method(), redis::RetryMethod::NoRetry);
    if transient {
        unavailable(e)
    } else {
        CounterError::Internal(e.to_string())
    }
}

/// Whether Redis answered the generic `ERR` with a message containing `text`: how
/// Redis reports a function it does not have, or a library it has already.
fn server_says(e: &RedisError, text: &str) -> bool {
    e.code() == Some("ERR") && e.detail().is_some_and(|detail| detail.contains(text))
}

/// Waits at most `timeout` for a call to Redis; its error, or the wait, as callers see it.
async fn bounded(
    timeout: Duration,
    call: impl Future<Output = redis::RedisResult<Value>>,
) -> Result<Value, CounterError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(unavailable(format!(
            "no answer from Redis within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(classify(e)),
        Ok(Ok(value)) => Ok(value),
    }
}

/// A reply that must be a list of integers (`what` names the call in the error).
pub(super) fn ints(what: &str, reply: Value) -> Result<Vec<i64>, CounterError> {
    redis::from_redis_value(reply)
        .map_err(|e| CounterError::Internal(format!("unexpected {what} reply: {e}")))
}

/// Reads the demand of `tenants`, `chunk` at a time, with `read`. Every chunk must count
/// the same completed buckets: a read that crossed a bucket's end (a bucket lasts a
/// twelfth of the window, a read a few milliseconds) is read again; the third try is
/// taken as it is, its first chunks one bucket behind.
async fn read_in_step<'a, F, Fut>(
    tenants: &'a [Id],
    chunk: usize,
    mut read: F,
) -> Result<(i64, Vec<DemandCount>), CounterError>
where
    F: FnMut(&'a [Id]) -> Fut,
    Fut: Future<Output = Result<(i64, Vec<DemandCount>), CounterError>>,
{
    if tenants.is_empty() {
        // No chunk to compare: one read, for the current bucket.
        return read(tenants).await;
    }
    let mut attempt = 1;
    loop {
        let (mut first, mut last) = (i64::MAX, i64::MIN);
        let mut counts = Vec::with_capacity(tenants.len());
        for part in tenants.chunks(chunk) {
            let (at, part_counts) = read(part).await?;
            (first, last) = (first.min(at), last.max(at));
            counts.extend(part_counts);
        }
        if first == last || attempt == 3 {
            return Ok((last, counts));
        }
        attempt += 1;
    }
}

fn unavailable(err: impl std::fmt::Display) -> CounterError {
    CounterError::Unavailable(err.to_string())
}

impl RedisCounters {
    /// Connects. A single server is connected lazily (the service starts, and fails
    /// closed, while Redis is down; it reconnects by itself); a cluster is connected
    /// now, since its topology must be read first.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, CounterError> {
        let urls: Vec<&str> = settings
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let connection = if urls.len() > 1 {
            let client = ClusterClient::builder(urls)
                .connection_timeout(settings.timeout)
                .response_timeout(settings.timeout)
                .retries(1)
                .tcp_settings(no_delay())
                .build()
                .map_err(|e| CounterError::Internal(format!("invalid Redis Cluster URLs: {e}")))?;
            let conn = tokio::time::timeout(settings.timeout * 4, client.get_async_connection())
                .await
                .map_err(|_| unavailable("timed out connecting to the Redis Cluster"))?
                .map_err(unavailable)?;
            Connection::Cluster(conn, Arc::new(Semaphore::new(CLUSTER_IN_FLIGHT)))
        } else {
            let info = settings
                .url
                .as_str()
                .into_connection_info()
                .map_err(|e| CounterError::Internal(format!("invalid Redis URL: {e}")))?
                .set_tcp_settings(no_delay());
            let client = redis::Client::open(info)
                .map_err(|e| CounterError::Internal(format!("invalid Redis URL: {e}")))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            Connection::Single(
                ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?,
            )
        };
        let trust_new_server = settings.durable || matches!(connection, Connection::Cluster(..));
        let library = scripts::Library::new();
        Ok(Self {
            connection,
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            trust_new_server,
            acquire: library.function("acquire").into(),
            release: library.function("release").into(),
            library: Arc::new(library),
            usage: Script::new(scripts::USAGE),
            demand: Script::new(scripts::DEMAND),
            leave_queue: Script::new(scripts::LEAVE_QUEUE),
            mark_fresh: Script::new(scripts::MARK_FRESH),
            move_out: Script::new(scripts::MOVE_OUT),
            move_in: Script::new(scripts::MOVE_IN),
            peek_health: Script::new(scripts::PEEK_HEALTH),
        })
    }

    pub(super) fn key(&self, space: Space<'_>, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.key_base(space))
    }

    /// What every key of `space` starts with, its hash tag included.
    pub(super) fn key_base(&self, space: Space<'_>) -> String {
        format!("{}:{{{space}}}:", self.prefix)
    }

    /// How long one call waits for Redis.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(super) async fn run(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<Value, CounterError> {
        self.run_for(invocation, self.timeout).await
    }

    /// `run`, waiting at most `timeout` (no more than the configured one).
    async fn run_for(
        &self,
        invocation: redis::ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<Value, CounterError> {
        async fn go(
            invocation: &redis::ScriptInvocation<'_>,
            conn: &mut impl ConnectionLike,
        ) -> redis::RedisResult<Value> {
            invocation.invoke_async(conn).await
        }
        let call = async {
            match &self.connection {
                Connection::Single(c) => go(&invocation, &mut c.clone()).await,
                Connection::Cluster(c, turns) => {
                    // The semaphore is never closed, so a turn always comes.
                    let _turn = turns.acquire().await.ok();
                    go(&invocation, &mut c.clone()).await
                }
            }
        };
        bounded(timeout, call).await
    }

    /// Sends one command on the connection (on a cluster, in one of its turns).
    async fn query(&self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match &self.connection {
            Connection::Single(c) => cmd.query_async(&mut c.clone()).await,
            Connection::Cluster(c, turns) => {
                // The semaphore is never closed, so a turn always comes.
                let _turn = turns.acquire().await.ok();
                cmd.query_async(&mut c.clone()).await
            }
        }
    }

    /// `INFO <section>`: a single server's text, or, on a cluster, a map of each
    /// master's address to its text.
    pub(super) async fn info(&self, section: &str) -> Result<Value, CounterError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg(section);
        bounded(self.timeout, self.query(&cmd)).await
    }

    /// Calls a function of the library, loading the library first when Redis does not
    /// have it (a new, restarted or flushed Redis; on a cluster, every master gets it),
    /// waiting at most `timeout` for the answer.
    async fn call_function(
        &self,
        function: &str,
        call: &FunctionCall,
        timeout: Duration,
    ) -> Result<Value, CounterError> {
        let mut fcall = redis::cmd("FCALL");
        fcall
            .arg(function)
            .arg(call.keys.len())
            .arg(&call.keys)
            .arg(&call.args);
        let go = async {
            match self.query(&fcall).await {
                Err(e) if server_says(&e, "Function not found") => {
                    let mut load = redis::cmd("FUNCTION");
                    load.arg("LOAD").arg(&self.library.code);
                    match self.query(&load).await {
                        // Another replica loaded it first.
                        Err(e) if !server_says(&e, "already exists") => return Err(e),
                        _ => {}
                    }
                    self.query(&fcall).await
                }
                answered => answered,
            }
        };
        bounded(timeout, go).await
    }

    /// Decides one lease, waiting at most the configured timeout for the answer.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<AcquireOutcome, CounterError> {
        self.acquire_within(req, self.timeout).await
    }

    /// Decides one lease, waiting at most `budget` (and no more than the configured
    /// timeout) for the answer; the script does nothing if it runs later than that.
    pub async fn acquire_within(
        &self,
        req: &AcquireRequest,
        budget: Duration,
    ) -> Result<AcquireOutcome, CounterError> {
        let budget = budget.min(self.timeout);
        let started = tokio::time::Instant::now();
        let digest = crate::ledger::pool_digest(req);
        match self.acquire_script(req, &digest, false, budget).await? {
            Some(outcome) => Ok(outcome),
            // The pool's index is missing (new pool, new configuration, expired or lost):
            // send the pool's tokens so that the script builds it.
            None => {
                let left = budget.saturating_sub(started.elapsed());
                self.acquire_script(req, &digest, true, left)
                    .await?
                    .ok_or_else(|| CounterError::Internal("the pool index was not built".into()))
            }
        }
    }

    /// One run of the acquire script; `None` when the pool's index must be built first
    /// (`with_pool`: send the pool's token ids for that).
    async fn acquire_script(
        &self,
        req: &AcquireRequest,
        digest: &str,
        with_pool: bool,
        budget: Duration,
    ) -> Result<Option<AcquireOutcome>, CounterError> {
        let up = req.space();
        let queue_id = req.queue.as_ref().map_or("-", |q| q.queue_id.as_str());
        let mut inv = FunctionCall::default();
        inv.key(self.key(up, "tw", req.tenant_id.as_str()))
            .key(self.key(up, "lease", &req.nonce))
            .key(self.key(up, "dem", req.tenant_id.as_str()))
            .key(self.key(up, "wq", queue_id))
            .key(self.key(up, "wqe", queue_id))
            .key(self.key(up, "wqi", queue_id));
        for token in &req.dedicated {
            inv.key(self.key(up, "kw", token.as_str()));
        }
        inv.key(self.key(up, "fence", "epoch"));
        let window_ms = req.window.as_millis() as i64;
        inv.arg(window_ms)
            .arg(req.lease_ttl.as_millis() as u64)
            .arg(req.cost)
            .arg(req.tenant_limit)
            .arg(req.token_limit)
            .arg(req.dedicated.len())
            .arg(req.tenant_id.as_str())
            .arg(&req.nonce)
            .arg(bucket_ms(window_ms))
            .arg(if req.count_demand { "1" } else { "0" })
            .arg(
                req.queue
                    .as_ref()
                    .and_then(|q| q.score)
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            )
            .arg(req.queue.as_ref().map_or(0, |q| q.priority_offset_ms))
            .arg(req.queue.as_ref().map_or(-1, |q| q.wait_ms.max(0)))
            .arg(req.pace_burst)
            .arg(if self.trust_new_server { "1" } else { "0" })
            // When this call stops waiting for the answer: a script that reaches Redis
            // later does nothing.
            .arg(crate::clock::system_now_ms() + budget.as_millis() as i64)
            .arg(self.key_base(up))
            .arg(req.queue.as_ref().map_or(0, |q| q.guaranteed))
            .arg(req.config_version);
        for token in &req.dedicated {
            inv.arg(token.as_str());
        }
        inv.arg(digest);
        if with_pool {
            for token in req.pooled.iter() {
                inv.arg(token.as_str());
            }
        }
        let reply = ints(
            "acquire",
            self.call_function(&self.acquire, &inv, budget).await?,
        )?;
        if let [-2, _now] = reply[..] {
            return Ok(None);
        }
        parse_acquire_reply(&reply, req).map(Some)
    }

    pub async fn mark_fresh(&self, space: Space<'_>) -> Result<(), CounterError> {
        let mut inv = self.mark_fresh.prepare_invoke();
        inv.key(self.key(space, "fence", "epoch"));
        self.run(inv).await.map(|_| ())
    }

    /// See `Counters::prepare_moves`: per move, first its new space (harmless if the
    /// write then fails: the token is not used there), then its old one.
    pub async fn prepare_moves(
        &self,
        moves: &[TokenMove],
        version: i64,
        hold: Duration,
        limits: impl Fn(&Id) -> Option<(u32, Duration)>,
    ) -> Result<(), CounterError> {
        for m in moves {
            let Some((limit, window)) = limits(&m.upstream_id) else {
                continue;
            };
            let token = m.token_id.as_str();
            let from = Space::new(&m.upstream_id, m.from_pool.as_ref());
            let to = Space::new(&m.upstream_id, m.to_pool.as_ref());
            let mut read = self.move_out.prepare_invoke();
            read.key(self.key(from, "fence", "epoch"))
                .key(self.key(from, "moved", "tokens"))
                .key(self.key(from, "health", token))
                .arg(token)
                .arg(version);
            let mut inv = self.move_in.prepare_invoke();
            inv.key(self.key(to, "kw", token))
                .key(self.key(to, "moved", "tokens"))
                .key(self.key(to, "fence", "epoch"))
                .key(self.key(to, "health", token))
                .arg(token)
                .arg(hold.as_millis() as u64)
                .arg(limit)
                .arg(window.as_millis() as u64);
            // The health record travels with the token: read it first (a mark set now
            // with no handover after it would only make the token wait in its old space).
            let bad = |e: redis::ParsingError| {
                CounterError::Internal(format!("unexpected health record reply: {e}"))
            };
            let health: Vec<Value> =
                redis::from_redis_value(self.peek_health(from, token).await?).map_err(bad)?;
            if let Some((pttl, fields)) = health.split_first() {
                inv.arg(redis::from_redis_value::<i64>(pttl.clone()).map_err(bad)?);
                for field in fields {
                    inv.arg(redis::from_redis_value::<Vec<u8>>(field.clone()).map_err(bad)?);
                }
            }
            self.run(inv).await?;
            self.run(read).await?;
        }
        Ok(())
    }

    /// A token's health record in `space`: its PTTL, then its fields and values.
    async fn peek_health(&self, space: Space<'_>, token: &str) -> Result<Value, CounterError> {
        let mut inv = self.peek_health.prepare_invoke();
        inv.key(self.key(space, "health", token));
        self.run(inv).await
    }

    /// The demand of `tenants`, read `READ_CHUNK` at a time (`read_in_step`).
    pub async fn demand(
        &self,
        upstream: Space<'_>,
        window: Duration,
        tenants: &[Id],
    ) -> Result<(i64, Vec<DemandCount>), CounterError> {
        read_in_step(tenants, READ_CHUNK, |chunk| {
            self.demand_chunk(upstream, window, chunk)
        })
        .await
    }

    async fn demand_chunk(
        &self,
        upstream: Space<'_>,
        window: Duration,
        tenants: &[Id],
    ) -> Result<(i64, Vec<DemandCount>), CounterError> {
        let mut inv = self.demand.prepare_invoke();
        for tenant in tenants {
            inv.key(self.key(upstream, "dem", tenant.as_str()));
        }
        inv.arg(bucket_ms(window.as_millis() as i64))
            .arg(BUCKETS_PER_WINDOW);
        let reply: Vec<i64> = redis::from_redis_value(self.run(inv).await?)
            .map_err(|e| CounterError::Internal(format!("unexpected demand reply: {e}")))?;
        if reply.len() != 2 * tenants.len() + 1 {
            return Err(CounterError::Internal(format!(
                "demand reply has {} values for {} tenants",
                reply.len(),
                tenants.len()
            )));
        }
        let clamp = |v: i64| v.clamp(0, u32::MAX as i64) as u32;
        let counts = reply[1..]
            .chunks(2)
            .map(|c| DemandCount {
                asked: clamp(c[0]),
                unmet: clamp(c[1]),
            })
            .collect();
        Ok((reply[0], counts))
    }

    pub async fn leave_queue(
        &self,
        upstream: Space<'_>,
        queue_id: &str,
        nonce: &str,
    ) -> Result<(), CounterError> {
        let mut inv = self.leave_queue.prepare_invoke();
        inv.key(self.key(upstream, "wq", queue_id))
            .key(self.key(upstream, "wqe", queue_id))
            .key(self.key(upstream, "wqi", queue_id))
            .arg(nonce);
        self.run(inv).await.map(|_| ())
    }

    pub async fn release(
        &self,
        key: &LeaseKey,
        outcome: ReleaseOutcome,
    ) -> Result<ReleaseResult, CounterError> {
        let (result, _, _) = self.release_script(key, outcome, None).await?;
        Ok(result)
    }

    /// See `Counters::release_reporting`: one script records the release and feeds
    /// the token's health.
    pub async fn release_reporting(
        &self,
        report: &OutcomeReport,
    ) -> Result<(ReleaseResult, Option<Recorded>), CounterError> {
        let (result, recorded, _) = self
            .release_script(&report.key, report.outcome, Some(report))
            .await?;
        Ok((result, recorded))
    }

    /// `release_reporting`, with the instant (Redis's clock) the script ran at: the
    /// differential test replays the release on the ledger at that instant.
    #[cfg(test)]
    pub(super) async fn release_reporting_at(
        &self,
        report: &OutcomeReport,
    ) -> Result<(ReleaseResult, Option<Recorded>, i64), CounterError> {
        self.release_script(&report.key, report.outcome, Some(report))
            .await
    }

    async fn release_script(
        &self,
        key: &LeaseKey,
        outcome: ReleaseOutcome,
        report: Option<&OutcomeReport>,
    ) -> Result<(ReleaseResult, Option<Recorded>, i64), CounterError> {
        let up = key.space();
        let mut inv = FunctionCall::default();
        inv.key(self.key(up, "lease", &key.nonce))
            .key(self.key(up, "tw", key.tenant_id.as_str()))
            .key(self.key(up, "kw", key.token_id.as_str()))
            .key(self.key(up, "health", key.token_id.as_str()))
            .key(self.key(up, "health-done", &key.nonce))
            .arg(outcome.as_str())
            .arg(key.tenant_id.as_str())
            .arg(key.token_id.as_str())
            .arg(&key.nonce)
            .arg(if report.is_some() { "1" } else { "0" })
            .arg(self.key_base(up));
        if let Some(report) = report {
            for arg in policy_args(report) {
                inv.arg(arg);
            }
        }
        let reply = ints(
            "release",
            self.call_function(&self.release, &inv, self.timeout)
                .await?,
        )?;
        let bad = || bad_reply("release", &reply);
        let [code, previous, now, applied, ref rest @ ..] = reply[..] else {
            return Err(bad());
        };
        let result = match code {
            1 => ReleaseResult::Released,
            2 => ReleaseResult::AlreadyReleased,
            3 => ReleaseResult::Conflict {
                previous: ReleaseOutcome::from_code(previous).ok_or_else(bad)?,
            },
            4 => ReleaseResult::NotFound,
            _ => return Err(bad()),
        };
        let fed = report.is_some() && code <= 2;
        let recorded = fed
            .then(|| {
                Some(Recorded {
                    now_ms: now,
                    applied: applied == 1,
                    transitions: parse_transitions(rest, &[&key.token_id])?,
                })
            })
            .map(|recorded| recorded.ok_or_else(bad))
            .transpose()?;
        Ok((result, recorded, now))
    }

    /// Slots held now in the windows of `tenants` and `tokens`, read `READ_CHUNK`
    /// windows at a time (each count is of its own instant, as a reading).
    pub async fn usage(
        &self,
        upstream: Space<'_>,
        window: Duration,
        tenants: &[Id],
        tokens: &[Id],
    ) -> Result<UsageCounts, CounterError> {
        let keys: Vec<String> = tenants
            .iter()
            .map(|t| self.key(upstream, "tw", t.as_str()))
            .chain(tokens.iter().map(|t| self.key(upstream, "kw", t.as_str())))
            .collect();
        let mut counts: Vec<u32> = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(READ_CHUNK) {
            let mut inv = self.usage.prepare_invoke();
            for key in chunk {
                inv.key(key);
            }
            inv.arg(window.as_millis() as u64);
            let chunk_counts: Vec<u32> = redis::from_redis_value(self.run(inv).await?)
                .map_err(|e| CounterError::Internal(format!("unexpected usage reply: {e}")))?;
            if chunk_counts.len() != chunk.len() {
                return Err(CounterError::Internal(format!(
                    "usage reply has {} counts for {} windows",
                    chunk_counts.len(),
                    chunk.len()
                )));
            }
            counts.extend(chunk_counts);
        }
        let token_counts = counts.split_off(tenants.len());
        Ok(UsageCounts {
            tenants: counts,
            tokens: token_counts,
        })
    }
}

/// The candidate token at a reply's 1-based index: the dedicated tokens, then the pool's.
fn candidate(req: &AcquireRequest, index: i64) -> Option<&Id> {
    let i = usize::try_from(index).ok()?.checked_sub(1)?;
    match i.checked_sub(req.dedicated.len()) {
        None => req.dedicated.get(i),
        Some(p) => req.pooled.get(p),
    }
}

/// Transitions in a reply (rare): the candidate list is built only when there are some.
fn transitions_in(flat: &[i64], req: &AcquireRequest) -> Option<Vec<super::Transition>> {
    if flat.is_empty() {
        return Some(Vec::new());
    }
    let tokens: Vec<&Id> = req.dedicated.iter().chain(req.pooled.iter()).collect();
    parse_transitions(flat, &tokens)
}

fn parse_acquire_reply(
    reply: &[i64],
    req: &AcquireRequest,
) -> Result<AcquireOutcome, CounterError> {
    let bad = || CounterError::Internal(format!("unexpected acquire reply {reply:?}"));
    let token = |index: i64| candidate(req, index).cloned().ok_or_else(bad);
    match reply {
        [
            1,
            index,
            now,
            expires,
            tenant_used,
            token_used,
            verdict,
            rest @ ..,
        ] => Ok(AcquireOutcome::Granted(Grant {
            token_id: token(*index)?,
            now_ms: *now,
            expires_at_ms: *expires,
            tenant_used: *tenant_used as u32,
            token_used: *token_used as u32,
            probe: *verdict == 2,
            transitions: transitions_in(rest, req).ok_or_else(bad)?,
        })),
        [2, index, now, state, until, rest @ ..] => Ok(AcquireOutcome::Unhealthy(Unhealthy {
            token_id: token(*index)?,
            state: TokenState::from_code(*state).ok_or_else(bad)?,
            until_ms: *until,
            now_ms: *now,
            transitions: transitions_in(rest, req).ok_or_else(bad)?,
        })),
        [-1, _now] => Err(CounterError::Unavailable(
            "the decision reached Redis after the call's deadline and did nothing".into(),
        )),
        [0, reason, retry_ms, now, score] => Ok(AcquireOutcome::Denied(Denied {
            reason: match reason {
                1 => DenyReason::TenantQuota,
                3 => DenyReason::CountersLost,
                4 => DenyReason::CountersLostNoticed,
                5 => DenyReason::NoUsableToken,
                6 => DenyReason::TokenMoved,
                _ => DenyReason::NoTokenCapacity,
            },
            retry_after: Duration::from_millis((*retry_ms).max(0) as u64),
            now_ms: *now,
            queue_score: (*score >= 0).then_some(*score),
        })),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::ErrorKind;

    /// A slot moving or migrating, a cluster without a quorum, a node loading or
    /// demoted by a failover: the caller is told to retry (UNAVAILABLE), not that the
    /// service failed (INTERNAL). A script error stays internal.
    #[test]
    fn cluster_and_failover_errors_are_unavailable() {
        for kind in [
            ServerErrorKind::Moved,
            ServerErrorKind::Ask,
            ServerErrorKind::TryAgain,
            ServerErrorKind::ClusterDown,
            ServerErrorKind::MasterDown,
            ServerErrorKind::BusyLoading,
            ServerErrorKind::ReadOnly,
        ] {
            let error = RedisError::from((ErrorKind::from(kind), "from the server"));
            assert!(
                matches!(classify(error), CounterError::Unavailable(_)),
                "{kind:?}"
            );
        }
        let script = RedisError::from((ErrorKind::UnexpectedReturnType, "bad reply"));
        assert!(matches!(classify(script), CounterError::Internal(_)));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(classify(refused), CounterError::Unavailable(_)));
    }

    /// A demand read whose chunks straddle a bucket's end is read again; the third try
    /// is taken as it is. `bucket_of[attempt][chunk]` is the bucket each read saw.
    async fn read_with(bucket_of: &[[i64; 3]]) -> ((i64, Vec<u32>), usize) {
        let tenants: Vec<Id> = (0..5)
            .map(|i| Id::parse("tenant", &format!("t{i}")).unwrap())
            .collect();
        let reads = std::cell::Cell::new(0);
        let read = |part: &[Id]| {
            let n = reads.get();
            reads.set(n + 1);
            let bucket = bucket_of[n / 3][n % 3];
            let counts = part
                .iter()
                .map(|t| DemandCount {
                    asked: t.as_str()[1..].parse::<u32>().unwrap() + 10 * n as u32,
                    unmet: 0,
                })
                .collect();
            std::future::ready(Ok((bucket, counts)))
        };
        let (bucket, counts) = read_in_step(&tenants, 2, read).await.expect("read");
        let asked = counts.iter().map(|c| c.asked).collect();
        ((bucket, asked), reads.get())
    }

    #[tokio::test]
    async fn a_demand_read_across_a_bucket_end_is_read_again() {
        // In step at once: one pass over the three chunks.
        assert_eq!(
            read_with(&[[7, 7, 7]]).await,
            ((7, vec![0, 1, 12, 13, 24]), 3)
        );
        // The bucket ended during the first pass: the second pass is taken.
        assert_eq!(
            read_with(&[[7, 8, 8], [8, 8, 8]]).await,
            ((8, vec![30, 31, 42, 43, 54]), 6)
        );
        // Three passes that all straddle: the third, as it is, at its latest bucket.
        assert_eq!(
            read_with(&[[1, 2, 2], [2, 3, 3], [3, 3, 4]]).await,
            ((4, vec![60, 61, 72, 73, 84]), 9)
        );
    }
}
