//! Rebalancing (issue 13, point 3) against the emulator with three replicas, W = 2 s:
//! a hot pool gives a tenant to a cold one and both end inside the band with no
//! violation and no guarantee broken during the move; with the load flipping back and
//! forth, the automatic mode (on all three replicas) moves each tenant at most once.

use std::collections::HashMap;
use std::time::Duration;

use tokenlease::grpc::pb;

use super::emulator::{Scenario, WINDOW, demand};
use super::helpers::{TestApp, authed, drain_events};
use super::workers::{Demand, Tally, now_ms};

/// Per token per window, after the 5 % margin.
const USABLE: f64 = 95.0;

/// A heavy tenant: 24 calls per window (one worker, a call every 83 ms); four of them
/// fill a one-token pool. A light one: 3.3 per window (a call every 600 ms).
fn heavy(t: &str) -> Demand {
    demand(t, pb::Priority::Normal, 1, 1_000, Some(83))
}
fn light(t: &str) -> Demand {
    demand(t, pb::Priority::Normal, 1, 1_000, Some(600))
}

/// Three replicas sampling every 200 ms over 3 s of history, `automatic` or not; pool
/// `shared` (tok-0) with `hot` tenants, pool `cold` (tok-1) with `cold` ones, 10
/// guaranteed each.
async fn two_pools(hot: &[&str], cold: &[&str], automatic: bool) -> Scenario {
    let weights: Vec<(&str, f64)> = hot.iter().map(|t| (*t, 1.0)).collect();
    let tweak = move |s: &mut tokenlease::config::Settings| {
        s.rebalance.sample_ms = 200;
        s.rebalance.history_ms = 3_000;
        s.rebalance.cooldown_ms = 600_000;
        s.rebalance.automatic = automatic;
        s.rebalance.check_ms = 500;
    };
    let s = Scenario::start_with(2, 10, &weights, tweak, Duration::from_secs(600)).await;
    let mut admin = s.replicas[0].admin().await;
    let pool = pb::Pool {
        id: "cold".into(),
        upstream_id: "up".into(),
        ..Default::default()
    };
    let request = pb::CreatePoolRequest { pool: Some(pool) };
    admin.create_pool(authed(request, &s.key)).await.unwrap();
    let get = pb::GetTokenRequest { id: "tok-1".into() };
    let token = admin
        .get_token(authed(get, &s.key))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut token = token.unwrap();
    token.owner = Some(pb::token::Owner::PoolId("cold".into()));
    let update = pb::UpdateTokenRequest {
        token: Some(token),
        update_mask: None,
    };
    admin.update_token(authed(update, &s.key)).await.unwrap();
    for t in cold {
        let tenant = pb::Tenant {
            id: (*t).into(),
            tier_id: "flex".into(),
            pool_id: "cold".into(),
            ..Default::default()
        };
        let request = pb::CreateTenantRequest {
            tenant: Some(tenant),
        };
        admin.create_tenant(authed(request, &s.key)).await.unwrap();
    }
    for r in &s.replicas {
        r.leaser.config.refresh().await.unwrap();
        r.leaser.allocator.refresh().await.unwrap();
    }
    s
}

/// Requests per window the upstream accepted on `token` between `from` and `to`, as a
/// share of its usable capacity.
fn utilization(s: &Scenario, token: usize, from: i64, to: i64) -> f64 {
    let stats = s.emulator.stats(&s.tokens[token]);
    let n = stats
        .accepted_at_ms
        .iter()
        .filter(|&&at| at >= from && at < to)
        .count();
    n as f64 / ((to - from) as f64 / WINDOW.as_millis() as f64) / USABLE
}

/// Every tenant got each window at least what it asked up to its guarantee (10), less
/// the call in flight at the window's end.
fn guarantees_held(tallies: &HashMap<String, Tally>, from: i64, to: i64) {
    let w = WINDOW.as_millis() as i64;
    for (tenant, tally) in tallies {
        let mut start = from;
        while start + w <= to {
            let (asked, granted) = tally.asked_and_granted_between(start, start + w);
            assert!(
                granted + 1 >= asked.min(10),
                "tenant {tenant} got {granted} of {asked} asked in [{start}, {}) (guarantee 10)",
                start + w
            );
            start += w;
        }
    }
}

async fn plan(app: &TestApp, key: &str) -> pb::PlanRebalanceResponse {
    let request = pb::PlanRebalanceRequest {
        upstream_id: "up".into(),
    };
    let mut admin = app.admin().await;
    admin
        .plan_rebalance(authed(request, key))
        .await
        .unwrap()
        .into_inner()
}

async fn moves(app: &TestApp, key: &str) -> Vec<pb::TenantMove> {
    let request = pb::ListTenantMovesRequest {
        upstream_id: "up".into(),
        ..Default::default()
    };
    let mut admin = app.admin().await;
    let answer = admin.list_tenant_moves(authed(request, key)).await.unwrap();
    answer.into_inner().moves
}

/// Pool `shared` runs at ~100 % (a, b, c, d heavy), `cold` at ~14 % (e, f, g, h light).
/// Replica 1 plans one move, replica 2 applies it, replica 0's watchers see it; both
/// pools then run inside [30 %, 85 %] as the upstream counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_pool_gives_a_tenant_to_a_cold_one() {
    let (hot, cold) = (["a", "b", "c", "d"], ["e", "f", "g", "h"]);
    let s = two_pools(&hot, &cold, false).await;
    let demands: Vec<Demand> = hot.map(heavy).into_iter().chain(cold.map(light)).collect();
    let watch = pb::WatchEventsRequest::default();
    let mut client = s.replicas[0].lease().await;
    let events = client.watch_events(authed(watch, &s.key)).await;
    let mut events = events.unwrap().into_inner();
    let started = now_ms();
    let operator = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let planned = plan(&s.replicas[1], &s.key).await;
        println!("plan: {planned:#?}");
        assert_eq!(planned.moves.len(), 1, "{planned:?}");
        let apply = pb::ApplyRebalanceRequest {
            upstream_id: "up".into(),
            moves: planned.moves.clone(),
        };
        let mut admin = s.replicas[2].admin().await;
        let applied = admin.apply_rebalance(authed(apply, &s.key)).await.unwrap();
        (planned, applied.into_inner(), now_ms())
    };
    let (tallies, (planned, applied, moved_at)) =
        tokio::join!(s.run(&demands, Duration::from_secs(15)), operator);
    let ended = now_ms();
    let m = &planned.moves[0];
    assert_eq!(
        (m.from_pool_id.as_str(), m.to_pool_id.as_str()),
        ("shared", "cold")
    );
    assert_eq!(applied.applied.len(), 1, "{applied:?}");
    let (seen, _) = drain_events(&mut events, Duration::from_millis(300)).await;
    let moved: Vec<_> = seen
        .iter()
        .filter_map(|e| match e.kind.as_ref()? {
            pb::event::Kind::TenantMoved(t) => Some(t.tenant_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        moved,
        vec![m.tenant_id.clone()],
        "TenantMoved on another replica"
    );
    assert_eq!(moves(&s.replicas[0], &s.key).await, applied.applied);

    // From one window after the move: both pools inside the band.
    let after = moved_at + WINDOW.as_millis() as i64;
    let (shared, cold_use) = (
        utilization(&s, 0, after, ended),
        utilization(&s, 1, after, ended),
    );
    let before = (
        utilization(&s, 0, started + 2_000, moved_at),
        utilization(&s, 1, started + 2_000, moved_at),
    );
    println!(
        "before: shared {:.2}, cold {:.2}; after: shared {shared:.2}, cold {cold_use:.2}",
        before.0, before.1
    );
    assert!(
        before.0 > 0.85 && before.1 < 0.30,
        "the load was not as planned: {before:?}"
    );
    assert!(
        (0.30..=0.85).contains(&shared),
        "shared at {shared:.2} after the move"
    );
    assert!(
        (0.30..=0.85).contains(&cold_use),
        "cold at {cold_use:.2} after the move"
    );
    guarantees_held(&tallies, started + 2_000, ended);
    // Nothing more to move once the history holds only the new placement.
    let again = plan(&s.replicas[0], &s.key).await;
    assert!(again.moves.is_empty(), "{again:?}");
    s.assert_no_violation();
}

/// The load flips between the pools three times (6 s each); the automatic mode runs on
/// all three replicas. The first phase moves one heavy tenant to `cold`; the flip moves
/// one of cold's heavy tenants back the other way (the first is cooling down, and light
/// now anyway); the flip back finds both pools inside the band. No tenant moves twice,
/// no two replicas make the same move, and the upstream counts no violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_load_does_not_make_tenants_flap() {
    let (hot, cold) = (["a", "b", "c", "d"], ["e", "f", "g", "h"]);
    let s = two_pools(&hot, &cold, true).await;
    let phase = Duration::from_secs(6);
    let a_heavy: Vec<Demand> = hot.map(heavy).into_iter().chain(cold.map(light)).collect();
    let e_heavy: Vec<Demand> = hot.map(light).into_iter().chain(cold.map(heavy)).collect();
    let started = now_ms();
    let mut after_phase = vec![];
    let mut phase_end = started;
    for (i, demands) in [&a_heavy, &e_heavy, &a_heavy].into_iter().enumerate() {
        let from = now_ms();
        let tallies = s.run(demands, phase).await;
        phase_end = now_ms();
        guarantees_held(&tallies, from + 2_000, now_ms());
        let made = moves(&s.replicas[i % 3], &s.key).await;
        println!(
            "after phase {i}: {:?}",
            made.iter()
                .map(|m| (&m.tenant_id, &m.from_pool_id, &m.to_pool_id, &m.actor))
                .collect::<Vec<_>>()
        );
        after_phase.push(made.len());
    }
    let made = moves(&s.replicas[0], &s.key).await;
    let mut tenants: Vec<&str> = made.iter().map(|m| m.tenant_id.as_str()).collect();
    tenants.sort();
    tenants.dedup();
    assert_eq!(tenants.len(), made.len(), "a tenant moved twice: {made:?}");
    assert!(
        made.iter()
            .all(|m| m.mode == pb::MoveMode::Automatic as i32)
    );
    assert_eq!(
        after_phase,
        vec![1, 2, 2],
        "moves after each phase: {made:?}"
    );
    let first = made.last().unwrap();
    assert!(
        hot.contains(&first.tenant_id.as_str()) && first.to_pool_id == "cold",
        "{first:?}"
    );
    let second = &made[0];
    assert!(
        cold.contains(&second.tenant_id.as_str()) && second.to_pool_id == "shared",
        "{second:?}"
    );
    let last = phase_end - 4_000;
    let (shared, cold_use) = (
        utilization(&s, 0, last, phase_end),
        utilization(&s, 1, last, phase_end),
    );
    println!("last phase: shared {shared:.2}, cold {cold_use:.2} (from {started})");
    assert!(
        (0.30..=0.85).contains(&shared),
        "shared at {shared:.2} in the last phase"
    );
    assert!(
        (0.30..=0.85).contains(&cold_use),
        "cold at {cold_use:.2} in the last phase"
    );
    s.assert_no_violation();
}
