//! Shared access classes (issue 13, point 2): spare capacity goes to unmet demand class
//! by class — tiers with PRIORITY first, NORMAL next, LIMITED last — weighted max-min
//! within a class, bursts capping, guarantees untouched. On both counter backends.

use std::time::{Duration, Instant};

use tokenlease::domain::Id;
use tokenlease::grpc::pb;

use super::fixtures::{PoolSetup, create_tenant};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed};

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $name() { super::$name(super::Db::Sqlite, super::Counters::Memory).await } )* }
        mod redis { $( #[tokio::test] async fn $name() { super::$name(super::Db::Postgres, super::Counters::Redis).await } )* }
    };
}

for_each_backend!(spare_capacity_goes_class_by_class);

/// The tenants and their tiers' shared access.
const TENANTS: [(&str, pb::SharedAccess); 4] = [
    ("lim", pb::SharedAccess::Limited),
    ("norm-a", pb::SharedAccess::Normal),
    ("prio", pb::SharedAccess::Priority),
    ("norm-b", pb::SharedAccess::Normal),
];

fn quotas(app: &TestApp) -> Vec<u32> {
    let current = app.leaser.allocator.current();
    let up = Id::parse("u", "up").unwrap();
    TENANTS
        .iter()
        .map(|(t, _)| {
            let key = (Id::parse("t", t).unwrap(), up.clone());
            current.by_tenant.get(&key).copied().unwrap_or(0)
        })
        .collect()
}

/// Asks for leases for `tenant` until `until`, releasing each at once ("not used"), so
/// its demand stays far above its ceiling while it holds nothing.
async fn keep_asking(app: &TestApp, tenant: &str, until: Instant) {
    let mut lease = app.lease().await;
    while Instant::now() < until {
        let req = pb::AcquireLeaseRequest {
            tenant_id: tenant.into(),
            ..Default::default()
        };
        let answer = lease.acquire_lease(authed(req, &app.admin_key)).await;
        let answer = answer.unwrap().into_inner().result.unwrap();
        if let pb::acquire_lease_response::Result::Lease(l) = answer {
            let release = pb::ReleaseLeaseRequest {
                lease_id: l.lease_id,
                outcome: pb::ReleaseOutcome::NotUsed as i32,
                ..Default::default()
            };
            lease
                .release_lease(authed(release, &app.admin_key))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Three tokens (285 usable per 2 s), four tenants of 30 guaranteed + 60 burst, all
/// asking far more: 120 is drawn for guarantees, 165 is spare. PRIORITY takes its 60
/// first, the two NORMAL tenants share the 105 left (53 / 52), LIMITED gets none of it
/// and keeps its guarantee: quotas 30 / 83 / 90 / 82. Before classes were applied, all
/// four shared the spare alike (71 or 72 each).
async fn spare_capacity_goes_class_by_class(db: Db, counters: Counters) {
    let env = TestEnv::new(db, counters).await;
    let app = env.spawn().await;
    let mut admin = app.admin().await;
    let key = app.admin_key.clone();
    let pool = PoolSetup {
        window_ms: 2_000,
        tokens: 3,
        ..PoolSetup::default()
    };
    pool.create(&mut admin, &key).await;
    for (tenant, access) in TENANTS {
        let tier = pb::Tier {
            id: format!("tier-{tenant}"),
            guaranteed_per_window: 30,
            burst_per_window: 60,
            shared_access: access as i32,
            weight: 1.0,
            ..Default::default()
        };
        let request = pb::CreateTierRequest { tier: Some(tier) };
        admin.create_tier(authed(request, &key)).await.unwrap();
        create_tenant(&mut admin, &key, tenant, &format!("tier-{tenant}")).await;
    }
    let until = Instant::now() + Duration::from_secs(10);
    let askers = TENANTS.map(|(t, _)| keep_asking(&app, t, until));
    let expected = vec![30, 83, 90, 82];
    let watch = async {
        while quotas(&app) != expected && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        quotas(&app)
    };
    let seen = tokio::select! {
        _ = futures::future::join_all(askers) => quotas(&app),
        seen = watch => seen,
    };
    assert_eq!(seen, expected, "quotas of {TENANTS:?}");
}
