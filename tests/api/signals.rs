//! Metrics that say what their names say (issue 14, signals): token exhaustion apart
//! from pacing, and token gauges labelled with their pool and whether the token is in
//! service. The metrics recorder is one per test process, so these tests use upstream,
//! pool and token ids no other test uses.

use std::net::SocketAddr;
use std::time::Duration;

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tokenlease::metrics::names;

use super::helpers::{
    Counters, Db, TestApp, TestEnv, authed, eventually, lease_request, sample, scrape, secs,
};

/// Creates upstream `upstream` (`limit` per 60 s, 5 % margin), pool `pool` with one
/// token `token`, a tier with room to borrow everything, and tenant `tenant` in it.
async fn one_token_pool(
    app: &TestApp,
    upstream: &str,
    limit: u32,
    pool: &str,
    token: &str,
    tenant: &str,
) {
    let mut admin = app.admin().await;
    let key = &app.admin_key;
    let u = pb::Upstream {
        id: upstream.into(),
        limit_per_window: limit,
        window: Some(secs(60)),
        ..Default::default()
    };
    let request = pb::CreateUpstreamRequest { upstream: Some(u) };
    admin.create_upstream(authed(request, key)).await.unwrap();
    let p = pb::Pool {
        id: pool.into(),
        upstream_id: upstream.into(),
        ..Default::default()
    };
    let request = pb::CreatePoolRequest { pool: Some(p) };
    admin.create_pool(authed(request, key)).await.unwrap();
    let t = pb::Token {
        id: token.into(),
        upstream_id: upstream.into(),
        secret: format!("secret-of-{token}"),
        owner: Some(pb::token::Owner::PoolId(pool.into())),
        ..Default::default()
    };
    let request = pb::CreateTokenRequest { token: Some(t) };
    admin.create_token(authed(request, key)).await.unwrap();
    let tier = pb::Tier {
        id: format!("{tenant}-tier"),
        guaranteed_per_window: 0,
        burst_per_window: 10_000,
        shared_access: pb::SharedAccess::Normal as i32,
        weight: 1.0,
        ..Default::default()
    };
    let request = pb::CreateTierRequest { tier: Some(tier) };
    admin.create_tier(authed(request, key)).await.unwrap();
    let t = pb::Tenant {
        id: tenant.into(),
        tier_id: format!("{tenant}-tier"),
        pool_id: pool.into(),
        ..Default::default()
    };
    let request = pb::CreateTenantRequest { tenant: Some(t) };
    admin.create_tenant(authed(request, key)).await.unwrap();
}

async fn granted(app: &TestApp, tenant: &str) -> bool {
    let answer = app
        .lease()
        .await
        .acquire_lease(lease_request(tenant, &app.admin_key))
        .await;
    matches!(
        answer.expect("AcquireLease answered").into_inner().result,
        Some(Answer::Lease(_))
    )
}

/// Waits until the token gauges show `token` (with its pool) holding `used` slots: the
/// refresher has read the window since.
async fn gauge_shows(metrics: SocketAddr, upstream: &str, pool: &str, token: &str, used: f64) {
    let labels = [("token", token), ("upstream", upstream), ("pool", pool)];
    eventually(
        Duration::from_secs(10),
        "the token gauges to be read",
        || async {
            let text = scrape(metrics).await;
            (sample(&text, names::TOKEN_USED_SLOTS, &labels) == Some(used)).then_some(())
        },
    )
    .await;
}

fn count(text: &str, name: &str, upstream: &str, pool: &str) -> f64 {
    sample(text, name, &[("upstream", upstream), ("pool", pool)]).unwrap_or(0.0)
}

/// Issue 14: a denial because a token's pace is spent while its window has room is
/// counted as pacing (`tokenlease_token_pacing_denials_total`), not as exhaustion (it
/// was: 6 exhaustion denials while the token held 24 of 95 slots); a denial because
/// the window is full is counted as exhaustion, not pacing. Each token gauge carries
/// its pool, and `tokenlease_token_in_service` is 1 for a token in service.
#[tokio::test]
async fn exhaustion_is_a_full_window_and_pacing_is_counted_apart() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let mut settings = env.settings();
    settings.lease.pace_burst_percent = 25;
    settings.metrics.refresh_ms = 50;
    let app = env.spawn_with(settings).await;
    let metrics = app.metrics_addr.expect("metrics are on");
    // 95 usable a minute: 24 back to back, then one per 632 ms.
    one_token_pool(
        &app,
        "sig-paced",
        100,
        "sig-paced-pool",
        "sig-paced-0",
        "sig-paced-t",
    )
    .await;
    // 1 usable a minute: its second call finds the window full.
    one_token_pool(
        &app,
        "sig-full",
        2,
        "sig-full-pool",
        "sig-full-0",
        "sig-full-t",
    )
    .await;
    gauge_shows(metrics, "sig-paced", "sig-paced-pool", "sig-paced-0", 0.0).await;
    let in_service = [
        ("token", "sig-paced-0"),
        ("upstream", "sig-paced"),
        ("pool", "sig-paced-pool"),
    ];
    assert_eq!(
        sample(&scrape(metrics).await, names::TOKEN_IN_SERVICE, &in_service),
        Some(1.0)
    );

    let mut grants = 0;
    let mut denials = 0;
    for _ in 0..30 {
        match granted(&app, "sig-paced-t").await {
            true => grants += 1,
            false => denials += 1,
        }
    }
    assert!(
        (24..30).contains(&grants),
        "{grants} grants: the pace should bind first"
    );
    let text = scrape(metrics).await;
    let (upstream, pool) = ("sig-paced", "sig-paced-pool");
    assert_eq!(
        count(&text, names::TOKEN_EXHAUSTION, upstream, pool),
        0.0,
        "pacing counted as exhaustion"
    );
    assert_eq!(
        count(&text, names::TOKEN_PACING, upstream, pool),
        f64::from(denials)
    );

    assert!(granted(&app, "sig-full-t").await);
    gauge_shows(metrics, "sig-full", "sig-full-pool", "sig-full-0", 1.0).await;
    assert!(!granted(&app, "sig-full-t").await);
    let text = scrape(metrics).await;
    let (upstream, pool) = ("sig-full", "sig-full-pool");
    assert_eq!(count(&text, names::TOKEN_EXHAUSTION, upstream, pool), 1.0);
    assert_eq!(count(&text, names::TOKEN_PACING, upstream, pool), 0.0);
    app.stop().await;
}
