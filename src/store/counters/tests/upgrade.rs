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
    let url = redis_url();
    let prefix = format!("upgrade-{}", LeaseKey::new_nonce());
    let counters = redis_counters(&url, &prefix, Duration::from_secs(5)).await;
    let mut conn = admin_connection(&url).await;
    let upstream = id(UPSTREAM);
    let space = Space::upstream(&upstream);
    counters.mark_fresh(space).await.expect("mark fresh");
    let pool: Arc<[Id]> = ids(&["k-1", "k-2"]).into();
    let digest: Arc<str> = list_digest(&pool).into();

    let req = request(&pool, &digest);
    let AcquireOutcome::Granted(grant) = counters.acquire(&req).await.expect("acquire") else {
        panic!("an empty pool grants");
    };
    let key = LeaseKey {
        upstream_id: req.upstream_id.clone(),
        pool_id: None,
        tenant_id: req.tenant_id.clone(),
        token_id: grant.token_id.clone(),
        nonce: req.nonce.clone(),
    };
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
