//! The service on Redis Cluster, end to end: replicas whose `redis_url` lists the masters
//! of a throwaway three-master cluster (started by this test, killed at its end) lease
//! over gRPC with the same guarantees as on one Redis server.

use tokenlease::config::CountersMode;
use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};

use super::fixtures::{PoolSetup, create_tenant, token_secret};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed};

// The counters' unit tests use the rest of the helper (moving slots).
#[allow(dead_code)]
#[path = "../../src/store/counters/tests/throwaway_cluster.rs"]
pub mod throwaway_cluster;

use throwaway_cluster::ThrowawayCluster;

async fn acquire(app: &TestApp, key: &str, tenant: &str) -> Answer {
    let req = pb::AcquireLeaseRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    app.lease()
        .await
        .acquire_lease(authed(req, key))
        .await
        .expect("AcquireLease answered")
        .into_inner()
        .result
        .expect("a lease or a denial")
}

async fn release(app: &TestApp, key: &str, lease_id: &str, outcome: pb::ReleaseOutcome) {
    let req = pb::ReleaseLeaseRequest {
        lease_id: lease_id.into(),
        outcome: outcome as i32,
        ..Default::default()
    };
    let answer = app.lease().await.release_lease(authed(req, key)).await;
    let answer = answer.expect("ReleaseLease answered").into_inner();
    assert!(!answer.already_released, "{lease_id} released once");
}

async fn token_used(app: &TestApp, key: &str) -> u32 {
    let req = pb::GetUsageRequest {
        token_id: "tok-0".into(),
        ..Default::default()
    };
    let usage = app.admin().await.get_usage(authed(req, key)).await;
    let usage = usage.expect("GetUsage answered").into_inner();
    assert_eq!(usage.tokens.len(), 1, "{usage:?}");
    usage.tokens[0].used_in_window
}

/// Property 1 on Redis Cluster, through gRPC: three replicas (Postgres configuration,
/// `redis_url` = the cluster's three masters, comma-separated) and one token of 100 per
/// window with a 5 % margin → 300 concurrent AcquireLease calls over the replicas grant
/// exactly 95, each with the decrypted token, the rest denied NO_TOKEN_CAPACITY with a
/// retry-after; a NOT_USED release gives a slot back (granted again on another replica),
/// a SUCCESS release keeps it; GetUsage counts 95 on every replica; and the counters'
/// keys are on the master serving upstream "up"'s hash slot, and on no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_redis_cluster_grant_exactly_the_usable_limit() {
    let cluster = ThrowawayCluster::start();
    let env = TestEnv::new(Db::Postgres, Counters::Memory).await;
    let mut settings = env.settings();
    settings.redis_url = Some(cluster.url_list());
    settings.counters = CountersMode::Redis;
    // Lease hashes expire after their TTL; the test counts them at the end, which a
    // loaded machine may reach many seconds later.
    settings.lease.ttl_ms = 120_000;
    let replicas = [
        env.spawn_with(settings.clone()).await,
        env.spawn_with(settings.clone()).await,
        env.spawn_with(settings).await,
    ];
    let key = replicas[0].admin_key.clone();
    let mut admin = replicas[0].admin().await;
    PoolSetup::default().create(&mut admin, &key).await;
    let tenants: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    for t in &tenants {
        create_tenant(&mut admin, &key, t, "flex").await;
    }
    for r in &replicas {
        r.leaser.config.refresh().await.expect("refresh");
        r.leaser.allocator.refresh().await.expect("quotas");
    }

    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(r.lease().await);
    }
    let calls = (0..300).map(|i| {
        let mut client = clients[i % replicas.len()].clone();
        let req = pb::AcquireLeaseRequest {
            tenant_id: tenants[i % tenants.len()].clone(),
            ..Default::default()
        };
        let key = key.clone();
        tokio::spawn(async move {
            let answer = client.acquire_lease(authed(req, &key)).await;
            answer.expect("AcquireLease answered").into_inner().result
        })
    });
    let mut leases = Vec::new();
    for answer in futures::future::join_all(calls).await {
        match answer.expect("task").expect("a lease or a denial") {
            Answer::Lease(lease) => {
                assert_eq!(lease.token, token_secret(0));
                leases.push(lease);
            }
            Answer::Denial(d) => {
                // Ten tenants share the token fairly: either limit may bind.
                let binding = [
                    pb::DenialReason::NoTokenCapacity as i32,
                    pb::DenialReason::TenantQuota as i32,
                ];
                assert!(binding.contains(&d.reason), "{}", d.message);
                assert!(d.retry_after.is_some(), "{}", d.message);
            }
        }
    }
    assert_eq!(leases.len(), 95, "exactly the usable limit on the cluster");
    for r in &replicas {
        assert_eq!(token_used(r, &key).await, 95);
    }

    release(
        &replicas[1],
        &key,
        &leases[0].lease_id,
        pb::ReleaseOutcome::NotUsed,
    )
    .await;
    // The slot is free again on the token, seen from every replica...
    for r in &replicas {
        assert_eq!(token_used(r, &key).await, 94, "NOT_USED gave the slot back");
    }
    // ...and a tenant below its fair share takes it. Which tenant that is depends on
    // the quotas of the moment (they follow measured demand), so each is asked in turn.
    let mut holder = None;
    for t in &tenants {
        if let Answer::Lease(lease) = acquire(&replicas[2], &key, t).await {
            holder = Some(t.as_str());
            assert_eq!(lease.token_id, "tok-0");
            break;
        }
    }
    let holder = holder.expect("no tenant could take the slot NOT_USED gave back");
    release(
        &replicas[2],
        &key,
        &leases[1].lease_id,
        pb::ReleaseOutcome::Success,
    )
    .await;
    assert!(
        matches!(acquire(&replicas[0], &key, "t1").await, Answer::Denial(_)),
        "a SUCCESS release keeps its slot"
    );
    assert_eq!(token_used(&replicas[1], &key).await, 95);

    // A window per tenant granted, 1 token window and its health record (the full
    // token names the pool index holding it out), 96 lease hashes, the demand
    // counters: all on one master.
    let mut granted: Vec<&str> = leases
        .iter()
        .map(|l| l.lease_id.split('.').nth(1).expect("<upstream>.<tenant>.…"))
        .chain([holder])
        .collect();
    granted.sort_unstable();
    granted.dedup();
    let owner = cluster.owner_of(&format!("{}:{{up.shared}}:kw:tok-0", env.key_prefix));
    // Pool "shared"'s counters space (upstream "up" and the seeded "baselinker" have
    // their own fences elsewhere).
    let pattern = format!("{}:{{up.shared}}:*", env.key_prefix);
    for port in cluster.ports() {
        let keys = cluster.keys_on(port, &pattern);
        if port == owner {
            // Plus one demand counter per tenant that called (fair sharing's input), the
            // upstream's fence and its pool's index (5 keys).
            let expected = granted.len() + 2 + 96 + tenants.len() + 1 + 5;
            assert_eq!(keys.len(), expected, "on the owner {port}: {keys:?}");
        } else {
            assert!(keys.is_empty(), "keys on {port}, not the owner: {keys:?}");
        }
    }
    for r in replicas {
        r.stop().await;
    }
}

/// An upstream `id` with pool `<id>-pool`, token `<id>-tok` (100 per 10 s, 5 % margin)
/// and tenant `<id>-t` in tier "flex" (created by `PoolSetup`).
async fn upstream_with_tenant(app: &TestApp, key: &str, id: &str) {
    let mut admin = app.admin().await;
    let upstream = pb::Upstream {
        id: id.into(),
        limit_per_window: 100,
        window: Some(super::helpers::millis(10_000)),
        safety_margin: Some(0.05),
        block_duration: Some(super::helpers::millis(60_000)),
        ..Default::default()
    };
    let request = pb::CreateUpstreamRequest {
        upstream: Some(upstream),
    };
    admin.create_upstream(authed(request, key)).await.unwrap();
    let pool = pb::Pool {
        id: format!("{id}-pool"),
        upstream_id: id.into(),
        ..Default::default()
    };
    let request = pb::CreatePoolRequest { pool: Some(pool) };
    admin.create_pool(authed(request, key)).await.unwrap();
    let token = pb::Token {
        id: format!("{id}-tok"),
        upstream_id: id.into(),
        secret: token_secret(7),
        owner: Some(pb::token::Owner::PoolId(format!("{id}-pool"))),
        ..Default::default()
    };
    let request = pb::CreateTokenRequest { token: Some(token) };
    admin.create_token(authed(request, key)).await.unwrap();
    let tenant = pb::Tenant {
        id: format!("{id}-t"),
        tier_id: "flex".into(),
        pool_id: format!("{id}-pool"),
        ..Default::default()
    };
    let request = pb::CreateTenantRequest {
        tenant: Some(tenant),
    };
    admin.create_tenant(authed(request, key)).await.unwrap();
}

/// Issue 12 (6): a replica started while the first node of `REDIS_URL` is down (the
/// cluster serving on without it, `cluster-require-full-coverage no`) leases on the
/// upstreams whose slots the other masters hold, at their fair share, and answers
/// UNAVAILABLE with a retry on the upstream whose master is gone. Before, one upstream
/// it could not read made it compute no quota at all: tenants got only their
/// guarantees (here 0, so every call was denied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_with_the_first_node_down_leases_on_the_others() {
    let cluster = ThrowawayCluster::start();
    let first = cluster.ports()[0];
    for port in cluster.ports() {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-require-full-coverage")
            .arg("no")
            .query(&mut cluster.node(port))
            .expect("CONFIG SET");
    }
    // Where a test upstream's pool (`<id>-pool`) keeps its counters.
    let owner = |id: &str| cluster.owner_of_slot(cluster.keyslot(&format!("{{{id}.{id}-pool}}")));
    let candidates: Vec<String> = (0..500).map(|i| format!("u{i}")).collect();
    let alive = candidates
        .iter()
        .find(|u| owner(u) != first)
        .unwrap()
        .clone();
    let dead = candidates
        .iter()
        .find(|u| owner(u) == first)
        .unwrap()
        .clone();

    let env = TestEnv::new(Db::Postgres, Counters::Memory).await;
    let mut settings = env.settings();
    settings.redis_url = Some(cluster.url_list());
    settings.counters = CountersMode::Redis;
    let before = env.spawn_with(settings.clone()).await;
    let key = before.admin_key.clone();
    PoolSetup::default()
        .create(&mut before.admin().await, &key)
        .await;
    upstream_with_tenant(&before, &key, &alive).await;
    upstream_with_tenant(&before, &key, &dead).await;

    cluster.kill_node(first);
    let after = env.spawn_with(settings).await;
    after.leaser.config.refresh().await.expect("configuration");
    // The upstream on the dead master cannot be read; the others are allocated.
    let refreshed = after.leaser.allocator.refresh().await;
    println!("allocation with the first node down: {refreshed:?}");
    let req = |tenant: String, upstream: &str| pb::AcquireLeaseRequest {
        tenant_id: tenant,
        upstream_id: upstream.into(),
        ..Default::default()
    };
    let mut lease = after.lease().await;
    let granted = lease
        .acquire_lease(authed(req(format!("{alive}-t"), &alive), &key))
        .await
        .expect("AcquireLease answered")
        .into_inner()
        .result;
    assert!(
        matches!(granted, Some(Answer::Lease(_))),
        "the upstream on a live master leases: {granted:?}"
    );
    let refused = lease
        .acquire_lease(authed(req(format!("{dead}-t"), &dead), &key))
        .await
        .expect_err("no lease on the dead master's upstream");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    after.stop().await;
    before.stop().await;
}
