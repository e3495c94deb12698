//! Shared access classes against the emulator (issue 13, point 2): three replicas, W =
//! 2 s, tiers PRIORITY / NORMAL / LIMITED competing for spare capacity. The quotas
//! follow the class order, each class's tenant is granted in that order, the LIMITED
//! tenant still gets its guarantee, and the upstream counts no violation.

use std::time::Duration;

use tokenlease::grpc::pb;

use super::emulator::{Scenario, demand, id};
use super::helpers::authed;
use super::workers::now_ms;

/// Per tenant: its id and its tier's shared access.
const TENANTS: [(&str, pb::SharedAccess); 3] = [
    ("p", pb::SharedAccess::Priority),
    ("n", pb::SharedAccess::Normal),
    ("l", pb::SharedAccess::Limited),
];

/// Two tokens (190 usable per window); each tenant 30 guaranteed + 60 burst, all
/// flooding. Guarantees take 90; of the 100 spare, PRIORITY takes its 60 first, NORMAL
/// the 40 left, LIMITED none: quotas 90 / 70 / 30.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spare_capacity_goes_class_by_class() {
    let tenants: Vec<(&str, f64)> = TENANTS.iter().map(|(t, _)| (*t, 1.0)).collect();
    let s = Scenario::start(2, 30, &tenants).await;
    let mut admin = s.replicas[0].admin().await;
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
        admin.create_tier(authed(request, &s.key)).await.unwrap();
        let get = pb::GetTenantRequest { id: tenant.into() };
        let answer = admin.get_tenant(authed(get, &s.key)).await.unwrap();
        let mut stored = answer.into_inner().tenant.unwrap();
        stored.tier_id = format!("tier-{tenant}");
        let update = pb::UpdateTenantRequest {
            tenant: Some(stored),
            update_mask: None,
        };
        admin.update_tenant(authed(update, &s.key)).await.unwrap();
    }
    for r in &s.replicas {
        r.leaser.config.refresh().await.unwrap();
    }
    let demands: Vec<_> = TENANTS
        .iter()
        .map(|(t, _)| demand(t, pb::Priority::Normal, 8, 1_000, None))
        .collect();
    let started = now_ms();
    let tallies = s.run(&demands, Duration::from_secs(10)).await;
    let (from, to) = (started + 2_000, started + 10_000);
    let windows = (to - from) as f64 / 2_000.0;
    let used: Vec<f64> = TENANTS
        .iter()
        .map(|(t, _)| tallies[*t].used_between(from, to) as f64 / windows)
        .collect();
    for r in &s.replicas {
        let quotas = r.leaser.allocator.current();
        let q: Vec<u32> = TENANTS
            .iter()
            .map(|(t, _)| quotas.by_tenant[&(id(t), id("up"))])
            .collect();
        assert_eq!(q, vec![90, 70, 30], "quotas of p / n / l on a replica");
    }
    println!(
        "used per window: p {:.1}, n {:.1}, l {:.1}",
        used[0], used[1], used[2]
    );
    assert!(
        used[0] > used[1] && used[1] > used[2],
        "granted in class order: {used:?}"
    );
    // A used slot counts from its grant to W after its release: a guarantee of 30
    // serves a little under 30 calls per window (the hold), less one in flight.
    assert!(used[2] >= 25.0, "LIMITED kept its guarantee: {used:?}");
    s.assert_no_violation();
}
