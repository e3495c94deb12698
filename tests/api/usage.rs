//! The usage read-out (AdminService.GetUsage): per tenant and per token.

use std::time::Duration;

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};

use super::fixtures::{PoolSetup, app_with, tenant_usage};
use super::helpers::{Counters, Db, authed};

/// After 8 grants (3 above a guarantee of 5) and 5 upstream errors: the tenant's slots,
/// its quota back at its guarantee (its pool's only token is out of service), rate per
/// minute, utilisation of that quota, borrowed share, demand over the last window; the
/// token's slots and its breaker, open until a stated instant.
#[tokio::test]
async fn usage_reports_tenants_and_tokens() {
    let pool = PoolSetup {
        guaranteed: 5,
        burst: 100,
        ..Default::default()
    };
    let (_env, app) = app_with(Db::Sqlite, Counters::Memory, pool, &["acme"]).await;
    let key = app.admin_key.clone();
    let mut lease = app.lease().await;
    let mut leases = vec![];
    for _ in 0..8 {
        let request = pb::AcquireLeaseRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        };
        let Some(Answer::Lease(l)) = lease
            .acquire_lease(authed(request, &key))
            .await
            .unwrap()
            .into_inner()
            .result
        else {
            panic!("lease")
        };
        leases.push(l.lease_id);
    }
    for lease_id in leases.iter().take(5) {
        let release = pb::ReleaseLeaseRequest {
            lease_id: lease_id.clone(),
            outcome: pb::ReleaseOutcome::UpstreamError as i32,
            ..Default::default()
        };
        lease.release_lease(authed(release, &key)).await.unwrap();
    }
    // Demand is read over completed buckets (W/10 = 1 s here). A fixed pause, not a
    // wait for a condition: the bucket holding these calls has ended once 1.1 s have
    // passed, however slow the machine (the window of 10 s leaves room for that).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let usage = tenant_usage(&app, &key, "acme").await.unwrap();
    let tenant = &usage.tenants[0];
    assert_eq!(
        (tenant.used_in_window, tenant.guaranteed_per_window),
        (8, 5)
    );
    assert_eq!(
        tenant.limit_per_window, 5,
        "the pool's only token has its breaker open: with no capacity in service, the \
         quota falls back to the guarantee"
    );
    assert!(
        (tenant.requests_per_minute - 48.0).abs() < 1e-9,
        "8 per 10 s"
    );
    assert!((tenant.utilization - 8.0 / 5.0).abs() < 1e-9);
    assert!((tenant.borrowed_share - 3.0 / 8.0).abs() < 1e-9);
    assert_eq!(
        (
            tenant.asked_in_window,
            tenant.denied_in_window,
            tenant.waiting_callers
        ),
        (8, 0, 0)
    );
    let token = &usage.tokens[0];
    assert_eq!(
        (token.token_id.as_str(), token.used_in_window),
        ("tok-0", 8)
    );
    assert_eq!(
        token.state,
        pb::TokenState::BreakerOpen as i32,
        "5 upstream errors open the breaker"
    );
    assert!(token.state_until.is_some());
    let err = tenant_usage(&app, &key, "ghost").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
