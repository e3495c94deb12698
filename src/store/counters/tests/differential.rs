//! The differential test: the Redis scripts against the ledger they transliterate.
//!
//! Random operation sequences (acquires of random cost, with and without the wait
//! queue and pacing; releases of random leases with random outcomes, repeated,
//! conflicting or late; health reads and resets; pauses so that windows slide, leases
//! expire and breakers half-open) run against Redis. Every Redis reply carries the
//! instant the script ran at (Redis's clock); the same operation is then applied to a
//! `Ledger` at that instant, and the two replies must be equal — the token chosen,
//! the counts, the reason, the exact retry-after, the queue score, the health
//! transitions. After every operation the state both keep is compared too (windows,
//! waiters, health records, the pool index), so a difference is found at the
//! operation that made it. A mismatch fails with the seed and the operations so far.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::domain::BreakerPolicy;
use crate::ledger::Ledger;

/// One run's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    tenants: usize,
    pool: usize,
    token_limit: u32,
    pace_burst: u32,
    queued: bool,
    ops: usize,
}

const WINDOW_MS: u64 = 400;
const TTL_MS: u64 = 150;

struct Run {
    shape: Shape,
    redis: RedisCounters,
    ledger: Ledger,
    rng: StdRng,
    tenants: Vec<(Id, u32, Vec<Id>)>,
    pool: Arc<[Id]>,
    /// Every lease granted so far.
    leases: Vec<LeaseKey>,
    /// A denied call each tenant may retry: its nonce and queue score.
    pending: Vec<Option<(String, i64)>>,
    log: Vec<String>,
    prefix: String,
    /// The instant of the last operation's reply (Redis's clock).
    last_now: i64,
    /// The pool index's digest, once Redis has the index.
    digest: Option<String>,
    /// Every acquire asks for one slot (the tests of one case).
    one_slot: bool,
    /// The connection that reads Redis's keys (the state compared, the report).
    conn: MultiplexedConnection,
}

impl Run {
    async fn new(url: &str, prefix: &str, shape: Shape, seed: u64) -> Self {
        let redis = redis_counters(url, prefix, Duration::from_secs(5)).await;
        let mut ledger = Ledger::default();
        redis
            .mark_fresh(Space::upstream(&id(UPSTREAM)))
            .await
            .expect("mark fresh");
        ledger.mark_fresh(&id(UPSTREAM));
        let tenants = (0..shape.tenants)
            .map(|t| {
                // The first tenant has a dedicated token.
                let dedicated = if t == 0 { ids(&["d-0"]) } else { Vec::new() };
                (id(&format!("t-{t}")), 2 + t as u32 * 2, dedicated)
            })
            .collect();
        let pool: Vec<Id> = (0..shape.pool).map(|k| id(&format!("k-{k}"))).collect();
        Self {
            shape,
            redis,
            ledger,
            rng: StdRng::seed_from_u64(seed),
            tenants,
            pool: pool.into(),
            leases: Vec::new(),
            pending: vec![None; shape.tenants],
            log: vec![format!("seed {seed}, {shape:?}")],
            prefix: prefix.to_owned(),
            last_now: 0,
            digest: None,
            one_slot: false,
            conn: admin_connection(url).await,
        }
    }

    async fn fail(&self, what: &str) -> ! {
        let tail = self.log.len().saturating_sub(120);
        panic!(
            "Redis and the ledger disagree: {what}\n--- {} (TOKENLEASE_DIFF_SEED replays the \
             operations, not their timing); the last operations:\n{}\n--- Redis:\n{}\n\
             --- the ledger:\n{}",
            self.log[0],
            self.log[tail.max(1)..].join("\n"),
            self.dump().await,
            self.ledger.dump()
        );
    }

    /// Every key of the run, with its content (sorted sets with scores, hashes).
    async fn dump(&self) -> String {
        let mut conn = self.conn.clone();
        let mut keys = keys_under(&mut conn, &self.prefix).await;
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let mut cmd = match kind.as_str() {
                "zset" => redis::cmd("ZRANGE"),
                "hash" => redis::cmd("HGETALL"),
                _ => redis::cmd("TYPE"),
            };
            cmd.arg(&key);
            if kind == "zset" {
                cmd.arg(0).arg(-1).arg("WITHSCORES");
            }
            let value: redis::Value = cmd.query_async(&mut conn).await.unwrap();
            out.push(format!("{key}: {value:?}"));
        }
        out.join("\n")
    }

    fn request(&mut self, t: usize) -> AcquireRequest {
        let (tenant, limit, dedicated) = self.tenants[t].clone();
        let cost = match self.rng.random_range(0..10) {
            _ if self.one_slot => 1,
            0..=6 => 1,
            7 | 8 => 2,
            _ => self.shape.token_limit + 1,
        };
        let retry = self.pending[t].take().filter(|_| self.rng.random_bool(0.6));
        let (nonce, score) = match retry {
            Some((nonce, score)) => (nonce, Some(score)),
            None => (LeaseKey::new_nonce(), None),
        };
        let queue = self.shape.queued.then(|| QueueTicket {
            queue_id: "pool".into(),
            priority_offset_ms: [0, 50, 100][t % 3],
            score,
            wait_ms: if self.rng.random_bool(0.7) { 300 } else { 0 },
            // Some tenants within their guarantee for a while, queued ahead of others.
            guaranteed: [2, 0, 4, 0][t % 4],
        });
        AcquireRequest {
            upstream_id: id(UPSTREAM),
            pool_id: None,
            config_version: 0,
            nonce,
            tenant_id: tenant,
            tenant_limit: limit,
            token_limit: self.shape.token_limit,
            window: Duration::from_millis(WINDOW_MS),
            lease_ttl: Duration::from_millis(TTL_MS),
            cost,
            dedicated,
            pooled: self.pool.clone(),
            pooled_digest: None,
            count_demand: score.is_none(),
            queue,
            pace_burst: self.shape.pace_burst,
        }
    }

    async fn acquire(&mut self) {
        let t = self.rng.random_range(0..self.tenants.len());
        self.acquire_for(t).await;
    }

    /// One acquire of tenant `t`, on both; Redis's reply.
    async fn acquire_for(&mut self, t: usize) -> AcquireOutcome {
        let req = self.request(t);
        let redis = self.redis.acquire(&req).await.expect("Redis answered");
        let now = match &redis {
            AcquireOutcome::Granted(g) => g.now_ms,
            AcquireOutcome::Denied(d) => d.now_ms,
            AcquireOutcome::Unhealthy(u) => u.now_ms,
        };
        let ledger = self.ledger.acquire(&req, now);
        self.last_now = now;
        self.log.push(format!(
            "{now} acquire {} cost {} nonce {} queue {:?} -> {redis:?}",
            req.tenant_id,
            req.cost,
            &req.nonce[..6],
            req.queue.as_ref().map(|q| (q.score, q.wait_ms)),
        ));
        if redis != ledger {
            self.fail(&format!("acquire: Redis {redis:?}, ledger {ledger:?}"))
                .await;
        }
        match &redis {
            AcquireOutcome::Granted(g) => self.leases.push(lease_of(&req, &g.token_id)),
            AcquireOutcome::Denied(d) => {
                self.pending[t] = d.queue_score.map(|score| (req.nonce, score));
            }
            AcquireOutcome::Unhealthy(_) => {}
        }
        redis
    }

    /// An acquire of tenant `t` that must be granted; the state compared after it.
    async fn grant(&mut self, t: usize) -> LeaseKey {
        let granted = self.acquire_for(t).await;
        assert!(matches!(granted, AcquireOutcome::Granted(_)), "{granted:?}");
        self.compare_state().await;
        self.leases.last().cloned().expect("just granted")
    }

    async fn release(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        // Recent leases mostly, sometimes an old one (released, expired).
        let n = self.leases.len();
        let span = if self.rng.random_bool(0.8) {
            n.min(4)
        } else {
            n
        };
        let i = n - 1 - self.rng.random_range(0..span);
        let key = self.leases[i].clone();
        let outcome = match self.rng.random_range(0..10) {
            0..=4 => ReleaseOutcome::Success,
            5 | 6 => ReleaseOutcome::NotUsed,
            7 | 8 => ReleaseOutcome::UpstreamError,
            _ => ReleaseOutcome::UpstreamRateLimited,
        };
        self.release_as(key, outcome).await;
    }

    /// One release of `key` with `outcome`, fed to the token's health, on both;
    /// Redis's reply.
    async fn release_as(
        &mut self,
        key: LeaseKey,
        outcome: ReleaseOutcome,
    ) -> (ReleaseResult, Option<Recorded>) {
        let report = OutcomeReport {
            key: key.clone(),
            outcome,
            blocked_until_ms: None,
            block_duration: Duration::from_millis(1_200),
            max_block: Duration::from_millis(1_500),
            repeat_for: Duration::from_millis(TTL_MS + WINDOW_MS),
            policy: BreakerPolicy {
                failures_to_open: 2,
                open_for: Duration::from_millis(250),
                successes_to_close: 1,
            },
        };
        let (result, recorded, now) = self
            .redis
            .release_reporting_at(&report)
            .await
            .expect("Redis answered");
        let ledger = self.ledger.release_reporting(&report, now);
        self.last_now = now;
        self.log.push(format!(
            "{now} release {} {} of {} {outcome:?} -> {result:?} {recorded:?}",
            &key.nonce[..6],
            key.token_id,
            key.tenant_id
        ));
        if (result.clone(), recorded.clone()) != ledger {
            let what = format!("release: Redis {:?}, ledger {ledger:?}", (result, recorded));
            self.fail(&what).await;
        }
        (result, recorded)
    }

    async fn health(&mut self) {
        let tokens = self.tokens();
        let reset = self.rng.random_bool(0.2);
        let (redis, what) = if reset {
            let token = tokens[self.rng.random_range(0..tokens.len())].clone();
            self.reset_on_both(&token).await
        } else {
            let report = self
                .redis
                .token_status(Space::upstream(&id(UPSTREAM)), &tokens)
                .await;
            let report = report.expect("Redis answered");
            let ledger = self
                .ledger
                .token_status(&id(UPSTREAM), &tokens, report.now_ms);
            (report, ledger)
        };
        self.last_now = redis.now_ms;
        self.log.push(format!(
            "{} {} -> {:?}",
            redis.now_ms,
            if reset { "reset" } else { "status" },
            redis.tokens.iter().map(|s| s.state).collect::<Vec<_>>()
        ));
        if redis != what {
            let what = format!("health: Redis {redis:?}, ledger {what:?}");
            self.fail(&what).await;
        }
    }

    /// An admin's reset of `token`'s health on both: Redis's report, the ledger's.
    async fn reset_on_both(&mut self, token: &Id) -> (StatusReport, StatusReport) {
        let report = self
            .redis
            .reset_health(Space::upstream(&id(UPSTREAM)), token)
            .await
            .expect("Redis answered");
        let ledger = self
            .ledger
            .reset_health(&id(UPSTREAM), token, report.now_ms);
        (report, ledger)
    }

    async fn play(&mut self) {
        for _ in 0..self.shape.ops {
            match self.rng.random_range(0..20) {
                0..=9 => self.acquire().await,
                10..=15 => self.release().await,
                16 => self.health().await,
                _ => {
                    let pause = self.rng.random_range(0..60);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
            }
            self.compare_state().await;
        }
    }

    /// After each operation, the state both keep must be the same, not only the
    /// replies: the windows' entries still in the window at the operation's instant,
    /// the queue's live waiters, every token's health record (breaker, quarantine,
    /// pacing schedule, where the pool index names it) and the pool index's sets. A difference found here is found at the operation
    /// that made it, not at a later reply it changes.
    async fn compare_state(&mut self) {
        let now = self.last_now;
        let redis = self.redis_state(now).await;
        let ledger = self.ledger_state(now);
        if redis != ledger {
            let diff: Vec<String> = redis
                .iter()
                .zip(&ledger)
                .filter(|(r, l)| r != l)
                .map(|(r, l)| format!("Redis  {r}\nledger {l}"))
                .collect();
            self.fail(&format!(
                "state after the last operation:\n{}",
                diff.join("\n")
            ))
            .await;
        }
    }

    /// The tenants' and tokens' windows, the waiters, the tokens' health records, then
    /// the index's sets, one line each.
    fn ledger_state(&self, now: i64) -> Vec<String> {
        let upstream = id(UPSTREAM);
        let horizon = now - WINDOW_MS as i64;
        let mut out = Vec::new();
        for (kind, id) in self.windowed() {
            let ends = self.ledger.window_ends(&upstream, kind, &id, horizon);
            out.push(format!("{kind}:{id} {ends:?}"));
        }
        let waiters = self.ledger.waiters(&upstream, "pool", now);
        out.push(format!("waiters {waiters:?}"));
        for token in self.tokens() {
            let line = self.ledger.health_line(&upstream, &token);
            out.push(format!("health:{token} {line}"));
        }
        let sets = self.ledger.index_sets(&upstream).unwrap_or_default();
        for (name, set) in ["ir", "iw", "ih"].into_iter().zip(sets) {
            let set: Vec<(String, String)> = set
                .into_iter()
                .map(|(score, token)| (token, score.to_string()))
                .collect();
            out.push(format!("{name} {set:?}"));
        }
        out
    }

    async fn redis_state(&mut self, now: i64) -> Vec<String> {
        let mut conn = self.conn.clone();
        let base = format!("{}:{{{UPSTREAM}}}:", self.prefix);
        let horizon = now - WINDOW_MS as i64;
        let mut out = Vec::new();
        for (kind, id) in self.windowed() {
            let ends: Vec<(String, i64)> = redis::cmd("ZRANGE")
                .arg(format!("{base}{kind}:{id}"))
                .arg(horizon)
                .arg("+inf")
                .arg("BYSCORE")
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .unwrap();
            let ends: Vec<i64> = ends.into_iter().map(|(_, end)| end).collect();
            out.push(format!("{kind}:{id} {ends:?}"));
        }
        out.push(format!(
            "waiters {:?}",
            redis_waiters(&mut conn, &base, now).await
        ));
        if self.digest.is_none() {
            let indexes = keys_under(&mut conn, &format!("{base}im")).await;
            self.digest = indexes
                .first()
                .map(|k| k.rsplit(':').next().unwrap().to_owned());
        }
        for token in self.tokens() {
            let line = redis_health_line(&mut conn, &base, &token, self.digest.as_deref()).await;
            out.push(format!("health:{token} {line}"));
        }
        for name in ["ir", "iw", "ih"] {
            let mut set: Vec<(String, String)> = Vec::new();
            if let Some(digest) = &self.digest {
                set = redis::cmd("ZRANGE")
                    .arg(format!("{base}{name}:{digest}"))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                // The member "" (score +inf) keeps the key from ever being empty.
                set.retain(|(token, _)| !token.is_empty());
            }
            out.push(format!("{name} {set:?}"));
        }
        out
    }

    /// The windows compared: every tenant's, every token's (`tw`, `kw`).
    fn windowed(&self) -> Vec<(&'static str, Id)> {
        let tenants = self.tenants.iter().map(|(t, ..)| ("tw", t.clone()));
        tenants
            .chain(self.tokens().into_iter().map(|k| ("kw", k)))
            .collect()
    }

    /// Every token: the pool's, then the dedicated one.
    fn tokens(&self) -> Vec<Id> {
        self.pool.iter().cloned().chain(ids(&["d-0"])).collect()
    }
}

/// A token's health hash as `Ledger::health_line` says it: the breaker's state with
/// only the fields that state uses (`breaker_scripts.rs`: `b` 1 active, 2 open, 3
/// half-open; absent fields are an active token's), the quarantine's end (`qu`, 0:
/// none), the pacing schedule (`t`) and where the pool index names the token
/// (`x:<digest>`).
async fn redis_health_line(
    conn: &mut MultiplexedConnection,
    base: &str,
    token: &Id,
    digest: Option<&str>,
) -> String {
    let fields: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(format!("{base}health:{token}"))
        .arg(&["b", "f", "ou", "pn", "pe", "ps", "qu", "t"])
        .arg(format!("x:{}", digest.unwrap_or("")))
        .query_async(conn)
        .await
        .unwrap();
    let number = |i: usize| -> i64 { fields[i].as_deref().map_or(0, |v| v.parse().unwrap()) };
    let breaker = match number(0) {
        0 | 1 => format!("closed, {} failures", number(1)),
        2 => format!("open until {}", number(2)),
        3 => {
            let probe = fields[3]
                .as_deref()
                .filter(|nonce| !nonce.is_empty())
                .map(|nonce| (nonce, number(4)));
            format!("half-open, probe {probe:?}, {} successes", number(5))
        }
        other => format!("unknown state {other}"),
    };
    let quarantine = Some(number(6)).filter(|&until| until > 0);
    let schedule: Option<f64> = fields[7].as_deref().map(|t| t.parse().unwrap());
    let named: Option<i64> = fields[8].as_deref().map(|p| p.parse().unwrap());
    format!("{breaker}, quarantine {quarantine:?}, schedule {schedule:?}, named at {named:?}")
}

/// The waiters of the queue `pool` whose wait lasts until `now` or later, as
/// `(score, nonce, eligible)` in queue order: the keys `wq` (scores), `wqe` (ends of
/// the waits) and `wqi` (when each could use a slot).
async fn redis_waiters(
    conn: &mut MultiplexedConnection,
    base: &str,
    now: i64,
) -> Vec<(i64, String, i64)> {
    let live: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{base}wqe:pool"))
        .arg(now)
        .arg("+inf")
        .arg("BYSCORE")
        .query_async(conn)
        .await
        .unwrap();
    let queue: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg(format!("{base}wq:pool"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for (nonce, score) in queue.into_iter().filter(|(n, _)| live.contains(n)) {
        let eligible: Option<i64> = redis::cmd("HGET")
            .arg(format!("{base}wqi:pool"))
            .arg(&nonce)
            .query_async(conn)
            .await
            .unwrap();
        out.push((score, nonce, eligible.unwrap_or(-1)));
    }
    out
}

/// Runs `shape` for a few seeds against the Redis of the suite.
async fn differential(shape: Shape) {
    let base: u64 = std::env::var("TOKENLEASE_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    for seed in base..base + 3 {
        one_run(shape, seed, async |run: &mut Run| run.play().await).await;
    }
}

/// `body` on a run of its own keys against the Redis of the suite; the keys are
/// deleted whether it passes or not.
async fn one_run(shape: Shape, seed: u64, body: impl AsyncFnOnce(&mut Run)) {
    let url = redis_url();
    let mut conn = admin_connection(&url).await;
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let mut run = Run::new(&url, &prefix, shape, seed).await;
    let result = AssertUnwindSafe(body(&mut run)).catch_unwind().await;
    delete_keys(&mut conn, &prefix).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn redis_and_the_ledger_agree_without_queue_or_pacing() {
    differential(Shape {
        tenants: 3,
        pool: 4,
        token_limit: 3,
        pace_burst: 0,
        queued: false,
        ops: 300,
    })
    .await;
}

#[tokio::test]
async fn redis_and_the_ledger_agree_with_the_wait_queue() {
    differential(Shape {
        tenants: 4,
        pool: 3,
        token_limit: 3,
        pace_burst: 0,
        queued: true,
        ops: 300,
    })
    .await;
}

#[tokio::test]
async fn redis_and_the_ledger_agree_with_pacing() {
    differential(Shape {
        tenants: 3,
        pool: 3,
        token_limit: 4,
        pace_burst: 2,
        queued: true,
        ops: 300,
    })
    .await;
}

/// More tokens than a decision refreshes at once (16), and a pace step that is not a
/// whole number of milliseconds (400 / 3).
#[tokio::test]
async fn redis_and_the_ledger_agree_on_a_large_pool_with_fractional_pacing() {
    differential(Shape {
        tenants: 5,
        pool: 20,
        token_limit: 3,
        pace_burst: 2,
        queued: true,
        ops: 400,
    })
    .await;
}

/// A release fed to the token's health leaves a record without the lease's place in
/// its pool index, so a repeat of it that changes the health (a success that clears
/// the failure another lease counted since) leaves the token where it is, in both:
/// the ledger used to re-place it (re-scored W / 8 on), Redis did not.
#[tokio::test]
async fn a_repeated_release_that_changes_health_leaves_the_token_in_place() {
    let shape = Shape {
        tenants: 2,
        pool: 1,
        token_limit: 3,
        pace_burst: 0,
        queued: false,
        ops: 0,
    };
    one_run(shape, 11, repeat_changes_health).await;
}

async fn repeat_changes_health(run: &mut Run) {
    run.one_slot = true;
    let first = run.grant(1).await;
    // A success on a healthy token changes nothing: the lease is released, no health.
    let (result, recorded) = run.release_as(first.clone(), ReleaseOutcome::Success).await;
    assert_eq!(result, ReleaseResult::Released);
    assert!(!recorded.expect("fed").applied);
    let second = run.grant(1).await;
    let (_, recorded) = run.release_as(second, ReleaseOutcome::UpstreamError).await;
    assert!(recorded.expect("fed").applied, "one failure counted");
    // The token full: out of the index's ready set until the first slot leaves.
    run.grant(1).await;
    // Once the first slot has left, and before any decision meets the token again.
    tokio::time::sleep(Duration::from_millis(WINDOW_MS + 20)).await;
    let (result, recorded) = run.release_as(first, ReleaseOutcome::Success).await;
    assert_eq!(result, ReleaseResult::AlreadyReleased);
    assert!(recorded.expect("fed").applied, "the failure cleared");
    run.compare_state().await;
}

/// An admin's reset reports the token's health just before and puts the token back
/// in its place as of the same instant: one script. As two (the health read, then the
/// reset), the place was computed a millisecond after the instant reported whenever
/// Redis's clock turned between them, and the ledger, replaying the reset at the
/// instant reported, scored the token's next re-check a millisecond earlier.
#[tokio::test]
async fn a_reset_reports_and_replaces_at_one_instant() {
    let shape = Shape {
        tenants: 40,
        pool: 1,
        token_limit: 100,
        pace_burst: 0,
        queued: false,
        ops: 0,
    };
    one_run(shape, 12, resets).await;
}

async fn resets(run: &mut Run) {
    run.one_slot = true;
    let t = run.tenants.len() - 1;
    let first = run.grant(t).await;
    let (_, recorded) = run.release_as(first, ReleaseOutcome::Success).await;
    let released = recorded.expect("fed").now_ms;
    // Once the first slot leaves sooner than W / 8 from now, a token put back in its
    // index is re-checked W / 8 after the instant it was put back.
    tokio::time::sleep(Duration::from_millis(WINDOW_MS - WINDOW_MS / 8 + 5)).await;
    let token = id("k-0");
    while run.last_now < released + WINDOW_MS as i64 - 5 {
        // Quarantined, so held out of the index until the reset puts it back.
        let lease = run.grant(t).await;
        run.release_as(lease, ReleaseOutcome::UpstreamRateLimited)
            .await;
        let (report, ledger) = run.reset_on_both(&token).await;
        assert_eq!(report, ledger);
        run.last_now = report.now_ms;
        run.log.push(format!("{} reset", report.now_ms));
        run.compare_state().await;
    }
}

/// The keys whose life the ledger reads as a rule end at an instant of the scripts'
/// clock, not `PEXPIRE`'s: a lease record when releases stop being accepted (its
/// expiry + W), a wait queue's three keys together, W after its last waiter's wait.
/// A relative expiry is counted from the instant the command runs, which may be a
/// millisecond past the script's `TIME`; a repeated release in that millisecond was
/// answered by Redis and not by the ledger (seed 9259244318139276052), and a queue
/// whose keys ended a millisecond apart could keep a waiter the ledger had dropped.
#[tokio::test]
async fn key_lives_end_on_the_scripts_clock() {
    let shape = Shape {
        tenants: 4,
        pool: 3,
        token_limit: 3,
        pace_burst: 0,
        queued: true,
        ops: 0,
    };
    one_run(shape, 7, ends_on_the_scripts_clock).await;
}

/// `key_lives_end_on_the_scripts_clock`'s 400 calls.
async fn ends_on_the_scripts_clock(run: &mut Run) {
    let conn = &mut run.conn.clone();
    let prefix = run.prefix.clone();
    let key = |what: &str| format!("{prefix}:{{{UPSTREAM}}}:{what}");
    let expiry = |conn: &mut MultiplexedConnection, key: String| {
        let mut conn = conn.clone();
        async move {
            let at: i64 = redis::cmd("PEXPIRETIME")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            at
        }
    };
    let window = WINDOW_MS as i64;
    let (mut granted, mut queued) = (0, 0);
    for i in 0..400 {
        let mut req = run.request(i % run.shape.tenants);
        if let Some(q) = req.queue.as_mut() {
            q.wait_ms = 300;
        }
        match run.redis.acquire(&req).await.expect("Redis answered") {
            AcquireOutcome::Granted(g) => {
                granted += 1;
                let at = expiry(conn, key(&format!("lease:{}", req.nonce))).await;
                assert_eq!(at, g.expires_at_ms + window, "lease record of grant {i}");
                // Given back, so that the pool keeps granting.
                let lease = lease_of(&req, &g.token_id);
                let released = run.redis.release(&lease, ReleaseOutcome::NotUsed).await;
                assert_eq!(released.unwrap(), ReleaseResult::Released, "grant {i}");
            }
            AcquireOutcome::Denied(d) => {
                queued += 1;
                for what in ["wq", "wqe", "wqi"] {
                    let at = expiry(conn, key(&format!("{what}:pool"))).await;
                    assert_eq!(at, d.now_ms + 300 + window, "{what} after denial {i}");
                }
            }
            AcquireOutcome::Unhealthy(_) => {}
        }
    }
    assert!(
        granted > 50 && queued > 50,
        "{granted} grants, {queued} denials"
    );
}
