//! Tokens moving between counters spaces (`Counters::prepare_moves`): on Redis each pool
//! has its own space (its own cluster slot), so a token that joins another pool leaves
//! its window behind. The handover keeps property 1 anyway: the new space counts the
//! token full for as long as a lease from the old one may still be used (and W more),
//! and a replica still planning from the old configuration is not granted the token in
//! the old space. The in-process counters have one space per upstream (nothing to hand
//! over), so these run on Redis and Redis Cluster only.

use super::*;
use crate::domain::{TokenMove, TokenState};

fn pool(id_: &str) -> Id {
    id(id_)
}

/// A request for pool token k-1 in `pool`'s space, planned at configuration `version`.
fn in_pool(h: &Harness, pool: &Id, version: i64) -> AcquireRequest {
    AcquireRequest {
        pool_id: Some(pool.clone()),
        config_version: version,
        ..h.request("t", 10_000, &[], &["k-1"])
    }
}

fn k1_moves(from: &Id, to: &Id) -> [TokenMove; 1] {
    [TokenMove {
        token_id: id("k-1"),
        upstream_id: id(UPSTREAM),
        from_pool: Some(from.clone()),
        to_pool: Some(to.clone()),
    }]
}

async fn fresh_pools(h: &Harness, pools: &[&Id]) {
    let upstream = id(UPSTREAM);
    for p in pools {
        let space = Space::new(&upstream, Some(p));
        h.counters.mark_fresh(space).await.expect("mark fresh");
    }
}

/// k-1 holds 3 slots in pool `pa` when it moves to `pb` (configuration version 2): a
/// replica still at version 1 is refused it in `pa` (it must reload); in `pb` it is full
/// until every lease from `pa` has left the window (TTL + W after the handover), then
/// grants again. A later configuration that finds it back in `pa` (its move undone)
/// clears the stale mark and is granted there.
async fn a_moved_token_is_not_granted_twice(h: Harness) {
    let (pa, pb) = (pool("pa"), pool("pb"));
    fresh_pools(&h, &[&pa, &pb]).await;
    for _ in 0..3 {
        h.grant(&in_pool(&h, &pa, 1)).await;
    }
    let before = h.now_ms().await;
    let limits = |_: &Id| Some((USABLE, h.window));
    h.counters
        .prepare_moves(&k1_moves(&pa, &pb), 2, h.ttl, limits)
        .await
        .expect("handover");

    let stale = h.deny(&in_pool(&h, &pa, 1)).await;
    assert_eq!(stale.reason, DenyReason::TokenMoved, "{stale:?}");
    let full = h.deny(&in_pool(&h, &pb, 2)).await;
    assert_eq!(full.reason, DenyReason::NoTokenCapacity, "{full:?}");
    let free = free_at(&full);
    assert!(
        free >= before + ms(h.ttl) + h.window_ms(),
        "free at {free}, before TTL + W after the handover ({before})"
    );
    h.advance_to(free).await;
    let granted = h.grant(&in_pool(&h, &pb, 2)).await;
    assert_eq!(
        granted.grant.token_used, 1,
        "the handover entries left the window"
    );

    // Back in pa at version 3 (as if the move was undone): the mark is stale and goes.
    let back = h.grant(&in_pool(&h, &pa, 3)).await;
    assert_eq!(back.key.pool_id, Some(pa.clone()));
    let again = h.grant(&in_pool(&h, &pa, 1)).await;
    assert_eq!(again.key.pool_id, Some(pa), "the mark is gone for everyone");
}

/// A quarantined token stays quarantined in its new space.
async fn a_moved_token_keeps_its_quarantine(h: Harness) {
    let (pa, pb) = (pool("qa"), pool("qb"));
    fresh_pools(&h, &[&pa, &pb]).await;
    let lease = h.grant(&in_pool(&h, &pa, 1)).await;
    let now = h.now_ms().await;
    let report = OutcomeReport {
        key: lease.key.clone(),
        outcome: ReleaseOutcome::UpstreamRateLimited,
        blocked_until_ms: Some(now + 600_000),
        block_duration: Duration::from_secs(600),
        max_block: Duration::from_secs(3_600),
        repeat_for: h.ttl + h.window,
        policy: crate::domain::BreakerPolicy::default(),
    };
    h.counters
        .release_reporting(&report)
        .await
        .expect("release");
    let limits = |_: &Id| Some((USABLE, h.window));
    h.counters
        .prepare_moves(&k1_moves(&pa, &pb), 2, h.ttl, limits)
        .await
        .expect("handover");
    let upstream = id(UPSTREAM);
    let space = Space::new(&upstream, Some(&pb));
    let status = h.counters.token_status(space, &[id("k-1")]).await.unwrap();
    assert_eq!(
        status.tokens[0].state,
        TokenState::Quarantined,
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_moved_token_not_granted_twice() {
    Harness::run(Backend::Redis, a_moved_token_is_not_granted_twice).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_moved_token_not_granted_twice() {
    Harness::run(Backend::Cluster, a_moved_token_is_not_granted_twice).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_moved_token_keeps_its_quarantine() {
    Harness::run(Backend::Redis, a_moved_token_keeps_its_quarantine).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_moved_token_keeps_its_quarantine() {
    Harness::run(Backend::Cluster, a_moved_token_keeps_its_quarantine).await
}
