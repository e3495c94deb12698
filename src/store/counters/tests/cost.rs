//! What one granted pair (acquire + release with an outcome) costs Redis, counted, not
//! timed: the commands the scripts run (`INFO commandstats` of a throwaway
//! `redis-server` that nothing else uses), by name, for pools of 10, 100 and 1,000
//! tokens, with a window no entry leaves during the count and with one several windows
//! pass in (a steady state: entries leave, pool tokens come due in the index). Issue 12
//! asks for fewer than 20 per granted pair; the functions run 19.5–19.6 while no entry
//! leaves a window (2 functions, each counting or updating two windows and keeping the
//! pool's index); asserted below with room for the one write that depends on timing,
//! as is that the count does not grow with the pool. The 300 ms window's steady state
//! costs more (below). The
//! run also prints Redis's own microseconds per pair (the `usec` column of
//! commandstats, scripts included): a reading, never asserted.
//!
//! The 300 ms window's steady state costs more than a real one: its demand buckets are
//! 15 ms, so most calls are a tenant's first in its bucket (which keeps the tenant's
//! window and demand hash: +3), and a pool token holds so few entries that its window
//! often empties (a refresh). With the benchmark's 60 s window, 100 tokens and ~4,000
//! pairs/s, a pair costs the same commands from the first second to the second
//! minute (`BENCHMARKS.md`).
//!
//! The calls are shaped like the service's (`lease::plan`): the wait queue on (a first
//! attempt that would answer at once when denied), demand counted, pacing at 25 % of
//! the limit; limits so high that nothing is denied, as in the benchmark.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::faults::{Throwaway, free_port};
use super::*;
use crate::domain::BreakerPolicy;

/// Commands per granted pair while no entry leaves a window: 19.5–19.6 today (about
/// half the pairs here share a millisecond with the one before and skip writing the
/// pool's last ask; +0.5 if none did: a slow machine). The id of the Redis process (`INFO server`) is
/// read once per process, not per acquire (`scripts::Library`); when the pool's index
/// is next due or to be renewed is read with the fence (`index_scripts.rs`); a release
/// reads and replaces the lease record in one command (`scripts::RELEASE`); the chosen
/// token's pace and health are one read (`set_schedule`), and the release learns from
/// the health record it feeds whether its token needs a new place in the index.
const CALM_BUDGET: f64 = 20.2;
/// Commands per granted pair, scripts' own calls included, in the 300 ms window's
/// steady state: 24–31 today, and a little room for the timing-dependent refreshes of
/// the pool's index (a loaded machine fits fewer pairs in a window, so more of them
/// come due per pair: +2 seen).
const BUDGET: f64 = 41.0;
/// How much more a pool of 1,000 tokens may cost than one of 10 (seen: 0.3).
const POOL_SLACK: f64 = 1.0;
const PAIRS: usize = 600;
const TENANTS: usize = 50;
const TOKEN_LIMIT: u32 = 1_000_000;

/// Command name → (calls, µs), from `INFO commandstats`.
type Stats = BTreeMap<String, (u64, u64)>;

async fn commandstats(conn: &mut MultiplexedConnection) -> Stats {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    let mut stats = Stats::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        stats.insert(name.to_owned(), (field("calls="), field("usec=")));
    }
    stats
}

/// Per pair: commands by name (the probe's own INFO taken out), and all of Redis's µs.
struct PairCost {
    /// Name → (calls, µs) per pair.
    commands: BTreeMap<String, (f64, f64)>,
    total: f64,
    usec: f64,
}

fn per_pair(before: &Stats, after: &Stats, pairs: usize) -> PairCost {
    let mut commands = BTreeMap::new();
    let (mut total, mut usec) = (0.0, 0.0);
    for (name, (calls, us)) in after {
        let (calls0, us0) = before.get(name).copied().unwrap_or((0, 0));
        // The second INFO commandstats is counted before it answers.
        let own = u64::from(name == "info");
        let calls = calls - calls0 - own;
        if calls == 0 {
            continue;
        }
        let n = calls as f64 / pairs as f64;
        let us = (us - us0) as f64 / pairs as f64;
        commands.insert(name.clone(), (n, us));
        total += n;
        // Scripts' usec includes the commands they run: count the script, not both.
        if matches!(name.as_str(), "evalsha" | "eval" | "fcall") {
            usec += us;
        }
    }
    PairCost {
        commands,
        total,
        usec,
    }
}

fn request(pool: &Arc<[Id]>, digest: &Arc<str>, tenant: usize, window: Duration) -> AcquireRequest {
    AcquireRequest {
        upstream_id: id(UPSTREAM),
        pool_id: None,
        config_version: 1,
        nonce: LeaseKey::new_nonce(),
        tenant_id: id(&format!("t-{tenant}")),
        tenant_limit: TOKEN_LIMIT,
        token_limit: TOKEN_LIMIT,
        window,
        lease_ttl: window / 12,
        cost: 1,
        dedicated: vec![],
        pooled: pool.clone(),
        pooled_digest: Some(digest.clone()),
        count_demand: true,
        queue: Some(QueueTicket {
            queue_id: "shared".to_owned(),
            priority_offset_ms: 0,
            score: None,
            wait_ms: 0,
            guaranteed: 10,
        }),
        pace_burst: TOKEN_LIMIT / 4,
    }
}

fn report(key: LeaseKey) -> OutcomeReport {
    OutcomeReport {
        key,
        outcome: ReleaseOutcome::Success,
        blocked_until_ms: None,
        block_duration: Duration::from_secs(600),
        max_block: crate::domain::quarantine_max(Duration::from_secs(600), None),
        repeat_for: Duration::from_secs(65),
        policy: BreakerPolicy::default(),
    }
}

/// Runs `PAIRS` granted pairs on a pool of `tokens` (after a warm-up that builds the
/// pool's index and loads the scripts) and returns their cost.
async fn measure(url: &str, tokens: usize, window: Duration) -> PairCost {
    let prefix = format!("cost{tokens}-{}", window.as_millis());
    let counters = redis_counters(url, &prefix, Duration::from_secs(5)).await;
    counters
        .mark_fresh(Space::upstream(&id(UPSTREAM)))
        .await
        .expect("mark fresh");
    let names: Vec<String> = (0..tokens).map(|i| format!("k-{i}")).collect();
    let pool: Arc<[Id]> = names.iter().map(|n| id(n)).collect();
    let digest: Arc<str> = list_digest(&pool).into();
    let pair = |i: usize| {
        let req = request(&pool, &digest, i % TENANTS, window);
        let counters = &counters;
        async move {
            let granted = match counters.acquire(&req).await.expect("acquire answered") {
                AcquireOutcome::Granted(grant) => grant,
                other => panic!("nothing may be denied at these limits: {other:?}"),
            };
            let key = LeaseKey {
                upstream_id: req.upstream_id.clone(),
                pool_id: None,
                tenant_id: req.tenant_id.clone(),
                token_id: granted.token_id,
                nonce: req.nonce.clone(),
            };
            counters
                .release_reporting(&report(key))
                .await
                .expect("release answered");
        }
    };
    // Every tenant's and token's window exists before the count starts.
    for i in 0..2 * TENANTS.max(tokens) {
        pair(i).await;
    }
    let mut conn = admin_connection(url).await;
    let before = commandstats(&mut conn).await;
    for i in 0..PAIRS {
        pair(i).await;
    }
    let after = commandstats(&mut conn).await;
    per_pair(&before, &after, PAIRS)
}

fn show(tokens: usize, window: Duration, cost: &PairCost) -> String {
    let mut by_calls: Vec<_> = cost.commands.iter().collect();
    by_calls.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    let list: Vec<String> = by_calls
        .iter()
        .map(|(name, (n, us))| format!("{name} {n:.1} ({us:.1} µs)"))
        .collect();
    format!(
        "{tokens:>5} tokens, W {:>5} ms: {:.1} commands, {:.1} µs of scripts per pair ({})",
        window.as_millis(),
        cost.total,
        cost.usec,
        list.join(", ")
    )
}

#[tokio::test]
async fn a_granted_pair_costs_the_same_commands_whatever_the_pool_size() {
    let server = Throwaway::start(free_port()).await;
    let mut report = vec![];
    let mut totals = vec![];
    // A window of a minute: no entry leaves a window during the count. A window of
    // 300 ms: the count spans several, so entries leave windows as in a steady state
    // (and pool tokens come due in the index as their use drops).
    for window in [Duration::from_secs(60), Duration::from_millis(300)] {
        for tokens in [10, 100, 1_000] {
            let cost = measure(&server.url(), tokens, window).await;
            report.push(show(tokens, window, &cost));
            totals.push(cost.total);
        }
    }
    let report = report.join("\n");
    println!("{report}");
    for total in &totals {
        assert!(
            *total < BUDGET,
            "over {BUDGET} commands per pair:\n{report}"
        );
    }
    for total in &totals[..3] {
        assert!(
            *total <= CALM_BUDGET,
            "over {CALM_BUDGET} commands per pair while no entry leaves a window:\n{report}"
        );
    }
    // Compared where the count is deterministic (no entry leaves a window): in the
    // steady state it depends on how many pairs a window holds, i.e. on the machine's
    // speed at the time (40–44 seen on one machine for the same pool).
    assert!(
        totals[2] <= totals[0] + POOL_SLACK,
        "the cost grows with the pool:\n{report}"
    );
}

/// A script holds Redis for its whole run and every lease decision waits behind it, so
/// the reads that span every tenant (the allocator's demand, GetUsage's windows, the
/// metrics' token gauges) are cut into scripts of at most `READ_CHUNK` keys (one script
/// of 1,000 tenants' demand held Redis ~7 ms: the p99 of AcquireLease). Checked on
/// what Redis ran (`SLOWLOG` of a throwaway server, every command logged), and the
/// chunked reads still answer every tenant in order.
#[tokio::test]
async fn reads_of_every_tenant_hold_redis_one_chunk_at_a_time() {
    use super::redis_backend::READ_CHUNK;
    // What "briefly" means here: 128 keys, about a millisecond of Redis at most.
    const MAX_KEYS: usize = 128;
    const { assert!(READ_CHUNK <= MAX_KEYS) };
    let server = Throwaway::start(free_port()).await;
    let counters = redis_counters(&server.url(), "chunks", Duration::from_secs(5)).await;
    let upstream = id(UPSTREAM);
    let space = Space::upstream(&upstream);
    counters.mark_fresh(space).await.expect("mark fresh");
    let window = Duration::from_secs(60);
    let pool: Arc<[Id]> = (0..10).map(|i| id(&format!("k-{i}"))).collect();
    let digest: Arc<str> = list_digest(&pool).into();
    // Asked by tenants far apart in the list: 0, 333 and 999 (once, twice, three times).
    for (tenant, asks) in [(0, 1), (333, 2), (999, 3)] {
        for _ in 0..asks {
            let req = request(&pool, &digest, tenant, window);
            assert!(matches!(
                counters.acquire(&req).await.expect("acquire answered"),
                AcquireOutcome::Granted(_)
            ));
        }
    }
    let tenants: Vec<Id> = (0..1_000).map(|i| id(&format!("t-{i}"))).collect();
    // The log holds the scripts' own commands too (~11,000 entries): read with time.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let mut conn = redis::Client::open(server.url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("a connection to the throwaway Redis");
    for setting in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "100000"),
    ] {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(setting.0)
            .arg(setting.1)
            .exec_async(&mut conn)
            .await
            .expect("CONFIG SET");
    }
    redis::cmd("SLOWLOG")
        .arg("RESET")
        .exec_async(&mut conn)
        .await
        .expect("SLOWLOG RESET");

    let usage = counters
        .usage(space, window, &tenants, &pool)
        .await
        .expect("usage");
    let used: Vec<(usize, u32)> = usage
        .tenants
        .iter()
        .copied()
        .enumerate()
        .filter(|u| u.1 > 0)
        .collect();
    assert_eq!(used, vec![(0, 1), (333, 2), (999, 3)]);
    assert_eq!(usage.tokens.iter().sum::<u32>(), 6);
    // Demand counts completed buckets: read it one bucket on, from Redis's own clock.
    let bucket = bucket_ms(window.as_millis() as i64);
    let (start, _) = counters.demand(space, window, &[]).await.expect("demand");
    loop {
        let (now, counts) = counters
            .demand(space, window, &tenants)
            .await
            .expect("demand");
        if now > start {
            let asked: Vec<(usize, u32)> = counts
                .iter()
                .map(|c| c.asked)
                .enumerate()
                .filter(|a| a.1 > 0)
                .collect();
            assert_eq!(asked, vec![(0, 1), (333, 2), (999, 3)]);
            break;
        }
        tokio::time::sleep(Duration::from_millis((bucket / 10) as u64)).await;
    }

    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("SLOWLOG GET");
    let mut scripts = 0;
    for entry in log {
        // An entry: id, time, µs, the command's arguments (the first 32), client, name.
        let redis::Value::Array(fields) = entry else {
            panic!("a SLOWLOG entry")
        };
        let args: Vec<String> = redis::from_redis_value(fields[3].clone()).expect("arguments");
        if args[0].eq_ignore_ascii_case("evalsha") || args[0].eq_ignore_ascii_case("eval") {
            scripts += 1;
            let keys: usize = args[2].parse().expect("numkeys");
            assert!(keys <= MAX_KEYS, "a script of {keys} keys: {args:?}");
        }
    }
    assert!(scripts >= 1_110 / READ_CHUNK, "only {scripts} scripts ran");
}
