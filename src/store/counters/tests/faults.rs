//! Property 12 on Redis: with Redis gone, frozen, or not yet started, every call fails
//! closed (`CounterError::Unavailable`) within the configured timeout, never a grant,
//! never a panic or a hang; when Redis comes back the same `RedisCounters` works again
//! by itself. Each test runs its own throwaway `redis-server` on a free port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

const TIMEOUT: Duration = Duration::from_millis(300);
/// Scheduling slack on top of the timeout (the tests run in parallel).
const SLACK: Duration = Duration::from_millis(250);
/// How long a recovered Redis may take to be used again.
const RECOVERY: Duration = Duration::from_secs(5);

pub(super) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// A `redis-server` child process; killed when dropped.
pub(super) struct Throwaway {
    port: u16,
    child: Option<Child>,
}

impl Throwaway {
    pub(super) async fn start(port: u16) -> Self {
        Self::start_in(port, &std::env::temp_dir()).await
    }

    /// Starts with `dir` as its data folder: a `dump.rdb` there (from `SAVE`) is loaded.
    async fn start_in(port: u16, dir: &std::path::Path) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", &format!("tokenlease-test-{port}.rdb")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed to run the fault tests");
        let server = Self {
            port,
            child: Some(child),
        };
        server.wait_ready().await;
        server
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = redis::Client::open(self.url()).expect("url");
        loop {
            let ping = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill redis-server");
            child.wait().expect("reap redis-server");
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`) to the server process.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status();
        assert!(status.expect("run kill").success(), "kill {signal} {pid}");
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

async fn counters_for(url: &str) -> RedisCounters {
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let counters = counters_with(url, &prefix, false).await;
    // A new upstream; fails (and is ignored) when Redis is not up yet.
    let _ = counters.mark_fresh(Space::upstream(&id(UPSTREAM))).await;
    counters
}

pub(super) async fn counters_with(url: &str, prefix: &str, durable: bool) -> RedisCounters {
    let settings = RedisSettings {
        url: url.to_owned(),
        key_prefix: prefix.to_owned(),
        timeout: TIMEOUT,
        durable,
    };
    RedisCounters::connect(&settings)
        .await
        .expect("a single-server connection is lazy and cannot fail")
}

pub(super) fn request() -> AcquireRequest {
    AcquireRequest {
        upstream_id: id(UPSTREAM),
        pool_id: None,
        config_version: 0,
        nonce: LeaseKey::new_nonce(),
        tenant_id: id("t-a"),
        tenant_limit: 1000,
        token_limit: USABLE,
        window: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(10),
        cost: 1,
        dedicated: vec![],
        pooled: ids(&["k-1"]).into(),
        pooled_digest: None,
        count_demand: false,
        queue: None,
        pace_burst: 0,
    }
}

pub(super) fn fresh(req: &AcquireRequest) -> AcquireRequest {
    AcquireRequest {
        nonce: LeaseKey::new_nonce(),
        ..req.clone()
    }
}

/// Every counter call fails closed, `Unavailable`, within the timeout plus slack.
async fn assert_fails_closed(counters: &RedisCounters, what: &str) {
    let req = request();
    let key = lease_of(&req, &id("k-1"));
    for attempt in 0..3 {
        let started = Instant::now();
        let answer = counters.acquire(&fresh(&req)).await;
        let took = started.elapsed();
        assert!(
            matches!(answer, Err(CounterError::Unavailable(_))),
            "{what}, attempt {attempt}: {answer:?}"
        );
        assert!(
            took <= TIMEOUT + SLACK,
            "{what}, attempt {attempt}: answered after {took:?}"
        );
    }
    let released = counters.release(&key, ReleaseOutcome::Success).await;
    assert!(
        matches!(released, Err(CounterError::Unavailable(_))),
        "{what}: {released:?}"
    );
    let usage = counters
        .usage(req.space(), req.window, &[], &req.pooled)
        .await;
    assert!(
        matches!(usage, Err(CounterError::Unavailable(_))),
        "{what}: {usage:?}"
    );
    // An admin's reset (one script since it reports the health it replaces).
    let reset = counters.reset_health(req.space(), &id("k-1")).await;
    assert!(
        matches!(reset, Err(CounterError::Unavailable(_))),
        "{what}: {reset:?}"
    );
}

/// Polls acquire until it grants; until then only `Unavailable` is acceptable.
async fn assert_recovers(counters: &RedisCounters, what: &str) {
    poll_until_granted(counters, &request(), None, what).await;
}

/// After Redis came back empty: `Unavailable` until it answers, then the hold of lost
/// counters, W + TTL from the first decision that noticed (a short window here), then
/// grants again, from the end of the hold on.
async fn assert_holds_then_recovers(counters: &RedisCounters, what: &str) {
    let req = AcquireRequest {
        window: Duration::from_millis(1_000),
        lease_ttl: Duration::from_millis(300),
        ..request()
    };
    poll_until_granted(counters, &req, Some(1_300), what).await;
}

/// Polls `req` every 100 ms until it is granted, accepting `Unavailable` meanwhile and,
/// when `hold_ms` is given, the hold of lost counters: the first such denial must point
/// `hold_ms` ahead, later ones at the same instant, and the grant may not come earlier.
async fn poll_until_granted(
    counters: &RedisCounters,
    req: &AcquireRequest,
    hold_ms: Option<i64>,
    what: &str,
) {
    let deadline = Instant::now() + RECOVERY;
    let mut resume = None;
    loop {
        match counters.acquire(&fresh(req)).await {
            Ok(AcquireOutcome::Granted(grant)) => {
                if hold_ms.is_some() {
                    let resume = resume.unwrap_or_else(|| panic!("{what}: granted without a hold"));
                    assert!(
                        grant.now_ms >= resume,
                        "{what}: granted at {} before {resume}",
                        grant.now_ms
                    );
                }
                return;
            }
            Ok(AcquireOutcome::Denied(d)) if hold_ms.is_some() && d.reason.counters_lost() => {
                // The first decision after the loss noticed it; later ones only see it.
                let noticed = resume.is_none();
                assert_eq!(
                    d.reason == DenyReason::CountersLostNoticed,
                    noticed,
                    "{what}: {d:?}"
                );
                let first = d.now_ms + hold_ms.unwrap_or_default();
                let at = d.now_ms + ms(d.retry_after);
                assert_eq!(*resume.get_or_insert(first), at, "{what}: {d:?}");
            }
            Err(CounterError::Unavailable(_)) => {}
            other => panic!("{what}: while recovering got {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no grant within {RECOVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_grants(counters: &RedisCounters) {
    let answer = counters.acquire(&fresh(&request())).await;
    assert!(
        matches!(answer, Ok(AcquireOutcome::Granted(_))),
        "{answer:?}"
    );
}

/// Property 12: Redis killed → `Unavailable` within the timeout, never a grant;
/// restarted on the same port, empty → the same counters hold the upstream (its
/// counters were lost), then grant again by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_fails_closed_then_recovers() {
    let port = free_port();
    let mut server = Throwaway::start(port).await;
    let counters = counters_for(&server.url()).await;
    assert_grants(&counters).await;
    server.kill();
    assert_fails_closed(&counters, "Redis killed").await;
    let _server = Throwaway::start(port).await;
    assert_holds_then_recovers(&counters, "Redis restarted empty").await;
}

/// A new Redis process behind the same keys (a restart that reloaded a snapshot, or a
/// failover to a replica) may lack the last grants even though the fence survived: the
/// fence names the Redis process that confirmed it, so the first decision on the new
/// one holds the upstream for W + TTL, unless the deployment declares its Redis durable
/// (every acknowledged write survives). Here 2 grants after the `SAVE` are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_redis_process_with_the_old_keys_holds_unless_durable() {
    let (port, dir) = (free_port(), tempfile::tempdir().unwrap());
    let mut server = Throwaway::start_in(port, dir.path()).await;
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let counters = counters_with(&server.url(), &prefix, false).await;
    let durable = counters_with(&server.url(), &prefix, true).await;
    let held = request();
    let trusted = AcquireRequest {
        upstream_id: id("up-durable"),
        pool_id: None,
        config_version: 0,
        ..request()
    };
    counters
        .mark_fresh(Space::upstream(&held.upstream_id))
        .await
        .expect("mark fresh");
    durable
        .mark_fresh(Space::upstream(&trusted.upstream_id))
        .await
        .expect("mark fresh");
    let granted = |answer| matches!(answer, Ok(AcquireOutcome::Granted(_)));
    assert!(granted(counters.acquire(&fresh(&held)).await));
    assert!(granted(durable.acquire(&fresh(&trusted)).await));
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SAVE")
        .query_async::<()>(&mut conn)
        .await
        .expect("SAVE");
    for _ in 0..2 {
        assert!(granted(counters.acquire(&fresh(&held)).await));
        assert!(granted(durable.acquire(&fresh(&trusted)).await));
    }
    server.kill();
    let _server = Throwaway::start_in(port, dir.path()).await;

    let answer = eventually_answered(&counters, &held).await;
    let AcquireOutcome::Denied(denied) = answer else {
        panic!("granted on a Redis that lost the last grants: {answer:?}")
    };
    assert_eq!(denied.reason, DenyReason::CountersLostNoticed, "{denied:?}");
    assert_eq!(
        denied.retry_after,
        held.window + held.lease_ttl,
        "{denied:?}"
    );
    let answer = eventually_answered(&durable, &trusted).await;
    assert!(
        matches!(answer, AcquireOutcome::Granted(_)),
        "durable: {answer:?}"
    );
}

/// The first answer once the reconnection is through.
async fn eventually_answered(counters: &RedisCounters, req: &AcquireRequest) -> AcquireOutcome {
    let deadline = Instant::now() + RECOVERY;
    loop {
        match counters.acquire(&fresh(req)).await {
            Ok(answer) => return answer,
            Err(CounterError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
}

/// Property 12: Redis frozen (SIGSTOP: connected but silent) → `Unavailable` within the
/// timeout, not a hang; thawed → grants again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_fails_closed_then_recovers() {
    let server = Throwaway::start(free_port()).await;
    let counters = counters_for(&server.url()).await;
    assert_grants(&counters).await;
    server.signal("-STOP");
    assert_fails_closed(&counters, "Redis frozen").await;
    server.signal("-CONT");
    assert_recovers(&counters, "Redis thawed").await;
}

/// A late script takes no slot: 5 acquires fail while Redis is frozen; when it thaws it
/// runs their scripts, after their deadlines, and they grant nothing. A grant before
/// (it also loads the lease functions, so that the frozen calls send FCALL and not a
/// first FCALL waiting for "Function not found") and the first grant after the thaw (on the same
/// connection, so after them) leave 2 slots used, not 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_failed_while_redis_was_frozen_take_no_slot() {
    let server = Throwaway::start(free_port()).await;
    let counters = counters_for(&server.url()).await;
    let (req, tenants) = (request(), [id("t-a")]);
    let usage = || counters.usage(req.space(), req.window, &tenants, &req.pooled);
    assert_grants(&counters).await;
    assert_eq!(usage().await.expect("usage"), counts(&[1], &[1]));
    server.signal("-STOP");
    for attempt in 0..5 {
        let answer = counters.acquire(&fresh(&req)).await;
        assert!(
            matches!(answer, Err(CounterError::Unavailable(_))),
            "attempt {attempt}: {answer:?}"
        );
    }
    server.signal("-CONT");
    assert_recovers(&counters, "Redis thawed").await;
    assert_eq!(
        usage().await.expect("usage"),
        counts(&[2], &[2]),
        "only the grants before the freeze and after the thaw hold slots"
    );
}

/// Property 12: counters created while Redis is down (lazy connect) answer
/// `Unavailable`, not a panic or a hang, and work once Redis starts (after the hold:
/// an empty Redis cannot tell "new" from "lost").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_fails_closed_then_recovers() {
    let port = free_port();
    let counters = counters_for(&format!("redis://127.0.0.1:{port}")).await;
    assert_fails_closed(&counters, "Redis not started").await;
    let _server = Throwaway::start(port).await;
    assert_holds_then_recovers(&counters, "Redis started").await;
}

/// No leak: every key the counters write carries a TTL of at most TTL + W + 1 s (the
/// tenant's window: one demand bucket more, as it is kept once a bucket; a pool token's
/// window: its pool index's, 10 W + 10 min), so a replica or worker that dies mid-lease
/// leaves nothing behind for ever; the one exception is the upstream's fence (one small
/// key per upstream, which must outlive idleness: its absence means the counters were
/// lost). And no loss: the token's window outlives its newest entry by W.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_all_expire() {
    Harness::run(Backend::Redis, |h| async move {
        // Paced, so that the token's pacing schedule is written too (a field of its
        // health record, by a pool token's grant, which leaves its life to the pool
        // index).
        let req = AcquireRequest {
            pace_burst: 50,
            ..h.request("t-a", 100, &[], &["k-2"])
        };
        let released = h.grant(&req).await;
        let newest = h.grant(&req).await;
        h.release(&released.key, ReleaseOutcome::Success).await;
        let TimeSource::Server(conn) = &h.time else {
            unreachable!("Redis harness")
        };
        let mut conn = conn.clone();
        let mut keys = keys_under(&mut conn, &h.prefix).await;
        let fence = format!("{}:{{{UPSTREAM}}}:fence:epoch", h.prefix);
        assert!(keys.contains(&fence), "{keys:?}");
        let fence_ttl: i64 = redis::cmd("PTTL")
            .arg(&fence)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert_eq!(fence_ttl, -1, "the fence never expires");
        keys.retain(|k| *k != fence);
        // The pool's index (`index_scripts.rs`): five keys kept while the pool is used,
        // then gone 10 windows + 10 minutes after its last use, and the token's window
        // and health record (its pacing schedule) that it keeps alive.
        let (index, counters): (Vec<String>, Vec<String>) = keys.into_iter().partition(|k| {
            [":ir:", ":iw:", ":ip:", ":im:", ":ih:", ":health:", ":kw:"]
                .iter()
                .any(|kind| k.contains(kind))
        });
        assert_eq!(
            index.len(),
            7,
            "the pool index, the pacing and the token's window: {index:?}"
        );
        assert_eq!(counters.len(), 3, "tenant window, two leases: {counters:?}");
        let token_window = index.iter().find(|k| k.contains(":kw:")).expect("kw");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(token_window)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        let needed = newest.grant.expires_at_ms + h.window_ms() - h.now_ms().await;
        assert!(
            ttl >= needed,
            "{token_window}: PTTL {ttl}, its entries need {needed}"
        );
        let bound = ms(h.ttl + h.window) + 1000;
        let tenant_bound = bound + bucket_ms(ms(h.window));
        let index_bound = super::index_upkeep::index_life(h.window);
        for (key, bound) in counters
            .iter()
            .map(|k| {
                (
                    k,
                    if k.contains(":tw:") {
                        tenant_bound
                    } else {
                        bound
                    },
                )
            })
            .chain(index.iter().map(|k| (k, index_bound)))
        {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .expect("PTTL");
            assert!((1..=bound).contains(&ttl), "{key}: PTTL {ttl}");
        }
    })
    .await;
}

/// A pool token's window lives as long as its pool's index, which renews both at half
/// their life (a grant sets a window's life only when it held no entry): when the
/// index's life runs low, the next decision renews every pool token's window, also one
/// no grant touched since. Here k-1's window is cut to 2 s and the index's life below
/// half, and the renewal made due (the fence's `r:<digest>`, which says when it is:
/// half the index's life after the last renewal); a grant on k-2 then gives k-1's
/// window the index's life again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_index_keeps_its_tokens_windows_alive() {
    Harness::run(Backend::Redis, |h| async move {
        // Paced: k-1's health record then holds its pacing schedule, which the index
        // keeps alive too.
        let req = AcquireRequest {
            pace_burst: 50,
            ..h.request("t-a", 100, &[], &["k-1", "k-2"])
        };
        assert_eq!(h.grant(&req).await.grant.token_id.as_str(), "k-1");
        let TimeSource::Server(conn) = &h.time else {
            unreachable!("Redis harness")
        };
        let mut conn = conn.clone();
        let keys = keys_under(&mut conn, &h.prefix).await;
        let find = |part: &str| {
            keys.iter()
                .find(|k| k.contains(part))
                .unwrap_or_else(|| panic!("no {part} in {keys:?}"))
                .clone()
        };
        let (window, meta) = (find(":kw:k-1"), find(":im:"));
        let schedule = find(":health:k-1");
        for (key, ms) in [(&window, 2_000), (&schedule, 2_000), (&meta, 1_000)] {
            let _: () = redis::cmd("PEXPIRE")
                .arg(key)
                .arg(ms)
                .query_async(&mut conn)
                .await
                .expect("PEXPIRE");
        }
        let digest = meta.rsplit(":im:").next().expect("a digest");
        let _: () = redis::cmd("HSET")
            .arg(find(":fence:"))
            .arg(format!("r:{digest}"))
            .arg(0)
            .query_async(&mut conn)
            .await
            .expect("HSET");
        assert_eq!(h.grant(&req).await.grant.token_id.as_str(), "k-2");
        let index_life = super::index_upkeep::index_life(h.window);
        let keys = [window, schedule];
        let lives = super::index_upkeep::pttls(&mut conn, &keys).await;
        for (key, ttl) in keys.iter().zip(lives) {
            assert!(
                ttl > index_life - 60_000,
                "{key}: PTTL {ttl}, the index's life is {index_life}"
            );
        }
    })
    .await;
}

/// The pool index is a cache of the windows: lost (expired, flushed alone, evicted),
/// the next decision rebuilds it from the windows and is as exact as before — no grant
/// over the limit, and the retry points at the instant the first full token frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pool_index_is_rebuilt_from_the_windows() {
    Harness::run(Backend::Redis, |h| async move {
        let mut req = h.request("t-a", 100, &[], &["k-1", "k-2"]);
        req.token_limit = 2;
        let mut first_end = i64::MAX;
        for _ in 0..4 {
            first_end = first_end.min(h.grant(&req).await.grant.expires_at_ms);
        }
        let TimeSource::Server(conn) = &h.time else {
            unreachable!("Redis harness")
        };
        let mut conn = conn.clone();
        let index: Vec<String> = keys_under(&mut conn, &h.prefix)
            .await
            .into_iter()
            .filter(|k| {
                [":ir:", ":iw:", ":ip:", ":im:", ":ih:"]
                    .iter()
                    .any(|kind| k.contains(kind))
            })
            .collect();
        assert_eq!(index.len(), 5, "{index:?}");
        let _: () = redis::cmd("DEL")
            .arg(&index)
            .query_async(&mut conn)
            .await
            .expect("DEL");
        // The fence still says the index lives (`index_scripts.rs`): the choice finds it
        // gone, and the call is asked again with the pool's tokens — counted once.
        let counted = AcquireRequest {
            count_demand: true,
            ..req.clone()
        };
        let denied = h.deny(&counted).await;
        assert_eq!(denied.reason, DenyReason::NoTokenCapacity);
        assert_eq!(free_at(&denied), first_end + h.window_ms() + 1);
        let bucket = bucket_ms(h.window_ms());
        h.advance(Duration::from_millis(bucket as u64 + 1)).await;
        let upstream = id(UPSTREAM);
        let space = Space::upstream(&upstream);
        let (_, demand) = h
            .counters
            .demand(space, h.window, &[id("t-a")])
            .await
            .expect("demand");
        assert_eq!(demand[0].asked, 1, "{demand:?}");
        h.expect_free_at(&req, first_end + h.window_ms() + 1).await;
        let usage = h.usage(&[], &["k-1", "k-2"]).await;
        assert!(
            usage.tokens.iter().all(|&used| used <= 2),
            "over the limit: {usage:?}"
        );
    })
    .await;
}
