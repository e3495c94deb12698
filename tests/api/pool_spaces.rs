//! Counters spaces per pool (issue 12, point 6) end to end: a token moved to another
//! pool is handed over, so neither a replica still on the old configuration nor the new
//! pool grants its slots twice; and on a Redis Cluster, pools spread over the masters.

use std::time::{Duration, Instant};

use tokenlease::config::CountersMode;
use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};

use super::fixtures::{PoolSetup, create_tenant};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed};

use super::cluster::throwaway_cluster;

async fn acquire(app: &TestApp, tenant: &str) -> Answer {
    let req = pb::AcquireLeaseRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    let answer = app
        .lease()
        .await
        .acquire_lease(authed(req, &app.admin_key))
        .await;
    answer
        .expect("AcquireLease answered")
        .into_inner()
        .result
        .expect("an answer")
}

async fn create_pool(app: &TestApp, id: &str) {
    let pool = pb::Pool {
        id: id.into(),
        upstream_id: "up".into(),
        ..Default::default()
    };
    let request = pb::CreatePoolRequest { pool: Some(pool) };
    let mut admin = app.admin().await;
    admin
        .create_pool(authed(request, &app.admin_key))
        .await
        .unwrap();
}

async fn create_tenant_in(app: &TestApp, id: &str, pool: &str) {
    let tenant = pb::Tenant {
        id: id.into(),
        tier_id: "flex".into(),
        pool_id: pool.into(),
        ..Default::default()
    };
    let request = pb::CreateTenantRequest {
        tenant: Some(tenant),
    };
    let mut admin = app.admin().await;
    admin
        .create_tenant(authed(request, &app.admin_key))
        .await
        .unwrap();
}

/// Pool "shared" holds tok-0, which `t1` uses 5 times through replica S; S then stops
/// reloading its configuration (as if cut off from the database) while replica M moves
/// tok-0 to pool "other". S, still planning with tok-0 in "shared", is refused it there,
/// reloads, and finds no token; `t2` in "other" finds tok-0 full until the leases from
/// "shared" can no longer be used and have left the window (TTL + grace + W), and is
/// granted after that. Without the handover, S would grant tok-0 in its old pool's
/// window and M in the new one's: twice the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_moved_to_another_pool_is_not_granted_twice() {
    let env = TestEnv::new(Db::Postgres, Counters::Redis).await;
    let mut settings = env.settings();
    settings.lease.ttl_ms = 200;
    settings.lease.use_grace_ms = 100;
    let m = env.spawn_with(settings.clone()).await;
    settings.config_refresh_ms = 600_000;
    let s = env.spawn_with(settings).await;
    let key = m.admin_key.clone();
    let pool = PoolSetup {
        window_ms: 2_000,
        ..PoolSetup::default()
    };
    pool.create(&mut m.admin().await, &key).await;
    create_tenant(&mut m.admin().await, &key, "t1", "flex").await;
    create_pool(&m, "other").await;
    create_tenant_in(&m, "t2", "other").await;
    s.leaser.config.refresh().await.unwrap();
    s.leaser.allocator.refresh().await.unwrap();
    for i in 0..5 {
        let answer = acquire(&s, "t1").await;
        assert!(matches!(answer, Answer::Lease(_)), "lease {i}: {answer:?}");
    }

    let mut admin = m.admin().await;
    let get = pb::GetTokenRequest { id: "tok-0".into() };
    let mut token = admin
        .get_token(authed(get, &key))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    token.owner = Some(pb::token::Owner::PoolId("other".into()));
    let update = pb::UpdateTokenRequest {
        token: Some(token),
        update_mask: None,
    };
    admin.update_token(authed(update, &key)).await.unwrap();
    let moved_at = Instant::now();

    let stale = acquire(&s, "t1").await;
    let Answer::Denial(denial) = stale else {
        panic!("the stale replica granted the moved token in its old pool: {stale:?}")
    };
    assert_eq!(
        denial.reason,
        pb::DenialReason::NoUsableToken as i32,
        "{denial:?}"
    );
    assert_eq!(
        s.leaser.config.current().version,
        m.leaser.config.current().version,
        "the stale replica reloaded"
    );
    let Answer::Denial(full) = acquire(&m, "t2").await else {
        panic!("tok-0 granted in its new pool while leases from the old one may be in use")
    };
    assert_eq!(
        full.reason,
        pb::DenialReason::NoTokenCapacity as i32,
        "{full:?}"
    );
    // TTL + grace + W after the handover, the new pool grants it.
    let free_after = Duration::from_millis(200 + 100 + 2_000);
    tokio::time::sleep(free_after.saturating_sub(moved_at.elapsed()) + Duration::from_millis(100))
        .await;
    let answer = acquire(&m, "t2").await;
    let Answer::Lease(lease) = answer else {
        panic!("tok-0 still refused in its new pool: {answer:?}")
    };
    assert_eq!(lease.token_id, "tok-0");
    assert!(lease.lease_id.ends_with(".other"), "{}", lease.lease_id);
    m.stop().await;
    s.stop().await;
}

/// On a three-master cluster, three pools of one upstream whose counters spaces hash to
/// different masters lease on those masters: an upstream is no longer bound to one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_spread_over_the_cluster_masters() {
    let cluster = throwaway_cluster::ThrowawayCluster::start();
    let env = TestEnv::new(Db::Postgres, Counters::Memory).await;
    let mut settings = env.settings();
    settings.redis_url = Some(cluster.url_list());
    settings.counters = CountersMode::Redis;
    let app = env.spawn_with(settings).await;
    let key = app.admin_key.clone();
    // Three pools on three different masters ("shared" is PoolSetup's).
    let owner = |pool: &str| cluster.owner_of_slot(cluster.keyslot(&format!("{{up.{pool}}}")));
    let mut pools = vec!["shared".to_owned()];
    for i in 0..500 {
        let candidate = format!("p{i}");
        let owners: Vec<u16> = pools.iter().map(|p| owner(p)).collect();
        if !owners.contains(&owner(&candidate)) {
            pools.push(candidate);
        }
        if pools.len() == 3 {
            break;
        }
    }
    assert_eq!(pools.len(), 3);
    PoolSetup::default()
        .create(&mut app.admin().await, &key)
        .await;
    let mut admin = app.admin().await;
    for (i, pool) in pools.iter().enumerate().skip(1) {
        create_pool(&app, pool).await;
        let token = pb::Token {
            id: format!("tok-{pool}"),
            upstream_id: "up".into(),
            secret: super::fixtures::token_secret(10 + i),
            owner: Some(pb::token::Owner::PoolId(pool.clone())),
            ..Default::default()
        };
        let request = pb::CreateTokenRequest { token: Some(token) };
        admin.create_token(authed(request, &key)).await.unwrap();
    }
    for pool in &pools {
        create_tenant_in(&app, &format!("t-{pool}"), pool).await;
        let answer = acquire(&app, &format!("t-{pool}")).await;
        assert!(matches!(answer, Answer::Lease(_)), "{pool}: {answer:?}");
    }
    let masters: std::collections::BTreeSet<u16> = pools.iter().map(|p| owner(p)).collect();
    assert_eq!(masters.len(), 3, "{pools:?} on {masters:?}");
    for pool in &pools {
        let keys = cluster.keys_on(owner(pool), &format!("{}:{{up.{pool}}}:*", env.key_prefix));
        assert!(
            keys.iter().any(|k| k.contains(":tw:")) && keys.iter().any(|k| k.contains(":lease:")),
            "pool {pool}'s window and lease on its master: {keys:?}"
        );
    }
    app.stop().await;
}
