//! Rebalancing through the admin API (issue 13, point 3): PlanRebalance from the usage
//! history, ApplyRebalance as checked writes with a TenantMoved event and an audit row
//! each, ListTenantMoves, and stale or impossible moves skipped with their reason. On
//! both counter backends.

use std::time::{Duration, Instant};

use tokenlease::grpc::pb;

use super::fixtures::{PoolSetup, create_tenant, token_secret};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed, drain_events, millis};

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $name() { super::$name(super::Db::Sqlite, super::Counters::Memory).await } )* }
        mod redis { $( #[tokio::test] async fn $name() { super::$name(super::Db::Postgres, super::Counters::Redis).await } )* }
    };
}

for_each_backend!(a_hot_pool_gives_a_tenant_to_a_cold_one);

/// Takes `n` leases for `tenant` and keeps them (never released: each slot stays
/// counted for TTL + grace + W, well past the test's reads).
async fn hold(app: &TestApp, tenant: &str, n: usize) {
    let mut lease = app.lease().await;
    let give_up = Instant::now() + Duration::from_secs(20);
    let mut held = 0;
    while held < n {
        assert!(
            Instant::now() < give_up,
            "{tenant} got only {held} of {n} leases"
        );
        let req = pb::AcquireLeaseRequest {
            tenant_id: tenant.into(),
            max_wait: Some(millis(1_000)),
            ..Default::default()
        };
        let answer = lease.acquire_lease(authed(req, &app.admin_key)).await;
        if let Some(pb::acquire_lease_response::Result::Lease(_)) =
            answer.unwrap().into_inner().result
        {
            held += 1;
        }
    }
}

async fn plan(app: &TestApp) -> pb::PlanRebalanceResponse {
    let request = pb::PlanRebalanceRequest {
        upstream_id: "up".into(),
    };
    let mut admin = app.admin().await;
    let answer = admin.plan_rebalance(authed(request, &app.admin_key)).await;
    answer.unwrap().into_inner()
}

async fn create_cold_pool(
    admin: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    key: &str,
) {
    let pool = pb::Pool {
        id: "cold".into(),
        upstream_id: "up".into(),
        ..Default::default()
    };
    admin
        .create_pool(authed(pb::CreatePoolRequest { pool: Some(pool) }, key))
        .await
        .unwrap();
    let token = pb::Token {
        id: "cold-0".into(),
        upstream_id: "up".into(),
        secret: token_secret(99),
        owner: Some(pb::token::Owner::PoolId("cold".into())),
        ..Default::default()
    };
    let request = pb::CreateTokenRequest { token: Some(token) };
    admin.create_token(authed(request, key)).await.unwrap();
}

/// Pool `shared` (one token, 95 usable per window) holds a, b, c using 30 each (95 %,
/// hot); pool `cold` (one token) holds d using 5 (5 %). The plan moves one of a, b, c
/// (63 % and 37 % after); applying it moves the tenant, sends TenantMoved and records
/// it; applying it again is skipped as stale; a new plan has nothing left to move.
async fn a_hot_pool_gives_a_tenant_to_a_cold_one(db: Db, counters: Counters) {
    let env = TestEnv::new(db, counters).await;
    let mut settings = env.settings();
    settings.lease.ttl_ms = 30_000;
    settings.rebalance.sample_ms = 100;
    settings.rebalance.history_ms = 1_000;
    let app = env.spawn_with(settings).await;
    let mut admin = app.admin().await;
    let key = app.admin_key.clone();
    let pool = PoolSetup {
        window_ms: 20_000,
        guaranteed: 10,
        ..PoolSetup::default()
    };
    pool.create(&mut admin, &key).await;
    create_cold_pool(&mut admin, &key).await;
    for t in ["a", "b", "c"] {
        create_tenant(&mut admin, &key, t, "flex").await;
    }
    let d = pb::Tenant {
        id: "d".into(),
        tier_id: "flex".into(),
        pool_id: "cold".into(),
        ..Default::default()
    };
    let request = pb::CreateTenantRequest { tenant: Some(d) };
    admin.create_tenant(authed(request, &key)).await.unwrap();

    let quiet = plan(&app).await;
    assert!(
        quiet.moves.is_empty() && !quiet.note.is_empty(),
        "{quiet:?}"
    );

    for (t, n) in [("a", 30), ("b", 30), ("c", 30), ("d", 5)] {
        hold(&app, t, n).await;
    }
    // A whole history of samples with the load in place.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let planned = plan(&app).await;
    assert_eq!(planned.moves.len(), 1, "{planned:?}");
    let m = planned.moves[0].clone();
    assert!(["a", "b", "c"].contains(&m.tenant_id.as_str()), "{m:?}");
    assert_eq!(
        (m.from_pool_id.as_str(), m.to_pool_id.as_str()),
        ("shared", "cold")
    );
    assert!(m.reason.contains("above 85%"), "{}", m.reason);
    let by_id = |id: &str| {
        planned
            .pools
            .iter()
            .find(|p| p.pool_id == id)
            .unwrap()
            .clone()
    };
    let (hot, cold) = (by_id("shared"), by_id("cold"));
    assert_eq!(
        (hot.capacity_per_window, cold.capacity_per_window),
        (95, 95)
    );
    assert!((hot.utilization - 90.0 / 95.0).abs() < 0.02, "{hot:?}");
    assert!(
        (hot.utilization_after - 60.0 / 95.0).abs() < 0.02,
        "{hot:?}"
    );
    assert!(
        (cold.utilization_after - 35.0 / 95.0).abs() < 0.02,
        "{cold:?}"
    );
    assert_eq!((hot.guaranteed_after, cold.guaranteed_after), (20, 20));
    assert!(planned.history.unwrap().seconds >= 0 && planned.note.is_empty());

    let watch = pb::WatchEventsRequest::default();
    let mut events = app
        .lease()
        .await
        .watch_events(authed(watch, &key))
        .await
        .unwrap()
        .into_inner();
    let apply = pb::ApplyRebalanceRequest {
        upstream_id: "up".into(),
        moves: planned.moves.clone(),
    };
    let applied = admin
        .apply_rebalance(authed(apply.clone(), &key))
        .await
        .unwrap()
        .into_inner();
    assert!(applied.skipped.is_empty(), "{applied:?}");
    let [record] = &applied.applied[..] else {
        panic!("{applied:?}")
    };
    assert_eq!(record.tenant_id, m.tenant_id);
    assert_eq!(
        (record.from_pool_id.as_str(), record.to_pool_id.as_str()),
        ("shared", "cold")
    );
    assert_eq!(record.mode, pb::MoveMode::Manual as i32);
    assert!(record.actor.starts_with("admin key "), "{}", record.actor);
    assert_eq!(record.reason, m.reason);
    let tenant = admin
        .get_tenant(authed(
            pb::GetTenantRequest {
                id: m.tenant_id.clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(tenant.pool_id, "cold");
    let (seen, _) = drain_events(&mut events, Duration::from_millis(500)).await;
    let moved: Vec<_> = seen
        .iter()
        .filter_map(|e| match e.kind.as_ref()? {
            pb::event::Kind::TenantMoved(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(moved.len(), 1, "{seen:?}");
    assert_eq!(
        (
            moved[0].tenant_id.as_str(),
            moved[0].from_id.as_str(),
            moved[0].to_id.as_str()
        ),
        (m.tenant_id.as_str(), "shared", "cold")
    );
    assert_eq!(moved[0].cause, m.reason);

    // The same plan again: stale, skipped with why.
    let again = admin
        .apply_rebalance(authed(apply, &key))
        .await
        .unwrap()
        .into_inner();
    assert!(again.applied.is_empty());
    assert!(again.skipped[0].reason.contains("plan again"), "{again:?}");
    // A move to a pool that does not exist.
    let crowd = pb::RebalanceMove {
        tenant_id: "d".into(),
        from_pool_id: "cold".into(),
        to_pool_id: "nowhere".into(),
        ..Default::default()
    };
    let apply = pb::ApplyRebalanceRequest {
        upstream_id: "up".into(),
        moves: vec![crowd],
    };
    let refused = admin
        .apply_rebalance(authed(apply, &key))
        .await
        .unwrap()
        .into_inner();
    assert!(
        refused.skipped[0]
            .reason
            .contains("'nowhere' does not exist"),
        "{refused:?}"
    );

    // Both pools are inside the band now: nothing to plan, nothing applied.
    let after = plan(&app).await;
    assert!(after.moves.is_empty(), "{after:?}");
    let empty = pb::ApplyRebalanceRequest {
        upstream_id: "up".into(),
        moves: vec![],
    };
    let none = admin
        .apply_rebalance(authed(empty, &key))
        .await
        .unwrap()
        .into_inner();
    assert!(
        none.applied.is_empty() && none.skipped.is_empty(),
        "{none:?}"
    );

    let list = pb::ListTenantMovesRequest {
        upstream_id: "up".into(),
        ..Default::default()
    };
    let audit = admin
        .list_tenant_moves(authed(list, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.moves, vec![record.clone()]);
    let unknown = pb::PlanRebalanceRequest {
        upstream_id: "nope".into(),
    };
    let status = admin
        .plan_rebalance(authed(unknown, &key))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}
