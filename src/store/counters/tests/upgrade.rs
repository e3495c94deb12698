//! Rolling upgrades: replicas of the previous release and of this one share one Redis
//! for a while. The previous release wrote a lease record as a hash (fields `tenant`,
//! `token`, `cost`, `expires`, `step`, `w`, and `ix`/`ip` for a pool token; `outcome`
//! once released); this one writes one string (`scripts::ACQUIRE`). A lease granted by
//! an old replica and released through a new one must be released, once, as before —
//! not answered WRONGTYPE.

use std::sync::Arc;

use super::*;
use crate::domain::BreakerPolicy;

fn request(pool: &Arc<[Id]>, digest: &Arc<str>) -> AcquireRequest {
    AcquireRequest {
        upstream_id: id(UPSTREAM),
        pool_id: None,
        config_version: 1,
        nonce: LeaseKey::new_nonce(),
        tenant_id: id("t-old"),
        tenant_limit: USABLE,
        token_limit: USABLE,
        window: Duration::from_secs(60),
        lease_ttl: Duration::from_secs(5),
        cost: 1,
        dedicated: vec![],
        pooled: pool.clone(),
        pooled_digest: Some(digest.clone()),
        count_demand: true,
        queue: None,
        pace_burst: 0,
    }
}

/// Counters under a prefix of their own, the upstream marked fresh, a pool of two tokens.
struct Fresh {
    prefix: String,
    counters: RedisCounters,
    conn: MultiplexedConnection,
    pool: Arc<[Id]>,
    digest: Arc<str>,
}

async fn fresh() -> Fresh {
    let url = redis_url();
    let prefix = format!("upgrade-{}", LeaseKey::new_nonce());
    let counters = redis_counters(&url, &prefix, Duration::from_secs(5)).await;
    let conn = admin_connection(&url).await;
    let upstream = id(UPSTREAM);
    counters
        .mark_fresh(Space::upstream(&upstream))
        .await
        .expect("mark fresh");
    let pool: Arc<[Id]> = ids(&["k-1", "k-2"]).into();
    let digest = list_digest(&pool).into();
    Fresh {
        prefix,
        counters,
        conn,
        pool,
        digest,
    }
}

fn report(key: &LeaseKey, outcome: ReleaseOutcome) -> OutcomeReport {
    OutcomeReport {
        key: key.clone(),
        outcome,
        blocked_until_ms: None,
        block_duration: Duration::from_secs(600),
        max_block: crate::domain::quarantine_max(Duration::from_secs(600), None),
        repeat_for: Duration::from_secs(65),
        policy: BreakerPolicy::default(),
    }
}

/// Rewrites a lease record the way the previous release wrote it.
async fn to_previous_format(conn: &mut MultiplexedConnection, record: &str) {
    let raw: String = redis::cmd("GET")
        .arg(record)
        .query_async(conn)
        .await
        .expect("the lease record is a string");
    let f: Vec<&str> = raw.split('|').collect();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(record)
        .query_async(conn)
        .await
        .expect("PTTL");
    let mut hset = redis::cmd("HSET");
    hset.arg(record);
    for (name, value) in [
        "tenant", "token", "cost", "expires", "step", "w", "ix", "ip",
    ]
    .iter()
    .zip([f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]])
    {
        hset.arg(*name).arg(value);
    }
    let _: () = redis::pipe()
        .cmd("DEL")
        .arg(record)
        .ignore()
        .add_command(hset)
        .ignore()
        .cmd("PEXPIRE")
        .arg(record)
        .arg(pttl)
        .ignore()
        .query_async(conn)
        .await
        .expect("rewrite the record");
}

#[tokio::test]
async fn a_lease_granted_by_the_previous_release_is_released_once() {
    let Fresh {
        prefix,
        counters,
        mut conn,
        pool,
        digest,
    } = fresh().await;
    let upstream = id(UPSTREAM);
    let space = Space::upstream(&upstream);

    let req = request(&pool, &digest);
    let AcquireOutcome::Granted(grant) = counters.acquire(&req).await.expect("acquire") else {
        panic!("an empty pool grants");
    };
    let key = lease_of(&req, &grant.token_id);
    let record = counters.key(space, "lease", &key.nonce);
    to_previous_format(&mut conn, &record).await;

    let released = counters
        .release_reporting(&report(&key, ReleaseOutcome::Success))
        .await;
    let again = counters
        .release_reporting(&report(&key, ReleaseOutcome::Success))
        .await;
    let other = counters.release(&key, ReleaseOutcome::NotUsed).await;
    let window = counters.key(space, "tw", key.tenant_id.as_str());
    let end: Option<i64> = redis::cmd("ZSCORE")
        .arg(&window)
        .arg(format!("{}#1", key.nonce))
        .query_async(&mut conn)
        .await
        .expect("ZSCORE");
    delete_keys(&mut conn, &prefix).await;

    assert_eq!(released.expect("released").0, ReleaseResult::Released);
    assert_eq!(again.expect("repeated").0, ReleaseResult::AlreadyReleased);
    assert_eq!(
        other.expect("conflicting"),
        ReleaseResult::Conflict {
            previous: ReleaseOutcome::Success
        }
    );
    let end = end.expect("the slot is still counted");
    assert!(
        end < grant.expires_at_ms,
        "a success ends the slot's occupancy at the release ({end}), before the lease's expiry ({})",
        grant.expires_at_ms
    );
}

/// How the previous release's `RELEASE` read a string record that was already
/// released: `None` where it went on to release (or failed), else its result code (2
/// already released with this outcome, 3 with another, 4 not found). Its Lua, step by
/// step: nine `|`-separated fields, the expiry in the 4th and the window in the 6th
/// (an error if not numbers), the outcome in the 9th.
fn previous_release_of(
    raw: &str,
    tenant: &str,
    token: &str,
    outcome: &str,
    now: i64,
) -> Option<u8> {
    let f: Vec<&str> = raw.split('|').collect();
    let expires: f64 = f.get(3)?.parse().ok()?;
    let window: f64 = f.get(5).and_then(|w| w.parse().ok()).unwrap_or(0.0);
    if f[0] != tenant || f.get(1) != Some(&token) || expires + window < now as f64 {
        return Some(4);
    }
    match f.get(8) {
        Some(previous) if *previous == outcome => Some(2),
        Some(_) => Some(3),
        None => None,
    }
}

/// A lease released here may be released again through a replica of the previous
/// release (which appended the outcome to the record), and one released there is
/// released again here: each sees the other's released record as released, with its
/// outcome, for as long as the lease can be released.
#[tokio::test]
async fn released_records_read_the_same_in_both_releases() {
    let Fresh {
        prefix,
        counters,
        mut conn,
        pool,
        digest,
    } = fresh().await;
    let upstream = id(UPSTREAM);
    let space = Space::upstream(&upstream);
    let mut leases = Vec::new();
    for _ in 0..2 {
        let req = AcquireRequest {
            nonce: LeaseKey::new_nonce(),
            ..request(&pool, &digest)
        };
        let AcquireOutcome::Granted(grant) = counters.acquire(&req).await.expect("acquire") else {
            panic!("an empty pool grants");
        };
        leases.push(lease_of(&req, &grant.token_id));
    }
    let reader = conn.clone();
    let get = |key: &LeaseKey| {
        let record = counters.key(space, "lease", &key.nonce);
        let mut conn = reader.clone();
        async move {
            let raw: String = redis::cmd("GET")
                .arg(&record)
                .query_async(&mut conn)
                .await
                .expect("a string record");
            raw
        }
    };

    // Released here, then again through the previous release.
    let here = &leases[0];
    let first = counters.release(here, ReleaseOutcome::Success).await;
    let raw = get(here).await;
    let now = server_time_ms(&mut conn).await;
    let (tenant, token) = (here.tenant_id.as_str(), here.token_id.as_str());
    let again_there = previous_release_of(&raw, tenant, token, "success", now);
    let other_there = previous_release_of(&raw, tenant, token, "not_used", now);

    // Released by the previous release (the outcome appended), then again here.
    let there = &leases[1];
    let record = counters.key(space, "lease", &there.nonce);
    let _: () = redis::cmd("APPEND")
        .arg(&record)
        .arg("|upstream_error")
        .query_async(&mut conn)
        .await
        .expect("APPEND");
    let again_here = counters.release(there, ReleaseOutcome::UpstreamError).await;
    let other_here = counters.release(there, ReleaseOutcome::Success).await;
    let after = get(there).await;
    delete_keys(&mut conn, &prefix).await;

    assert_eq!(first.expect("released"), ReleaseResult::Released);
    assert_eq!(again_there, Some(2), "{raw}");
    assert_eq!(other_there, Some(3), "{raw}");
    assert_eq!(
        again_here.expect("repeated"),
        ReleaseResult::AlreadyReleased
    );
    let previous = ReleaseOutcome::UpstreamError;
    assert_eq!(
        other_here.expect("conflicting"),
        ReleaseResult::Conflict { previous }
    );
    assert!(after.ends_with("|upstream_error"), "{after}");
}
