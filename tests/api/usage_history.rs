//! Usage history (AdminService.GetUsageHistory) end to end: leases and releases made
//! over gRPC show up per tenant and token, a worker key reads only its tenants, bad
//! requests name their field, and what a replica counted survives its restart.

use std::time::Duration;

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};

use super::fixtures::{PoolSetup, create_tenant};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed, eventually, lease_request, now_ms};

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: 0,
    }
}

/// The last and the next hour: the bucket of now, whatever the hour.
fn around_now() -> pb::GetUsageHistoryRequest {
    pb::GetUsageHistoryRequest {
        start_time: Some(timestamp(now_ms() - 3_600_000)),
        end_time: Some(timestamp(now_ms() + 3_600_000)),
        ..Default::default()
    }
}

async fn history(
    app: &TestApp,
    key: &str,
    request: pb::GetUsageHistoryRequest,
) -> Result<pb::GetUsageHistoryResponse, tonic::Status> {
    let answer = app
        .admin()
        .await
        .get_usage_history(authed(request, key))
        .await;
    answer.map(tonic::Response::into_inner)
}

/// The tenant's rows summed (the range may hold two hourly buckets).
fn tenant_sum(rows: &[pb::UsageHistoryRow], tenant: &str) -> (u64, u64, u64, u64, u64) {
    rows.iter()
        .filter(|r| r.subject_kind == pb::UsageSubjectKind::Tenant as i32 && r.subject_id == tenant)
        .fold((0, 0, 0, 0, 0), |s, r| {
            (
                s.0 + r.asked,
                s.1 + r.granted,
                s.2 + r.denied_tenant_quota,
                s.3 + r.released_success,
                s.4 + r.upstream_errors,
            )
        })
}

/// Two grants (one beyond the guarantee of 1) and a denial at the quota of 2, one
/// release of each outcome: the tenant's and the token's rows count them, once the
/// replica flushed; a worker key sees its tenant only; a bad range is INVALID_ARGUMENT
/// naming the field; after a restart the counts remain, and a replica's last flush as
/// it stops is among them.
#[tokio::test]
async fn history_counts_leases_per_tenant_and_token() {
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let mut settings = env.settings();
    settings.history.flush_ms = 100;
    let app = env.spawn_with(settings).await;
    let key = app.admin_key.clone();
    let mut admin = app.admin().await;
    let pool = PoolSetup {
        guaranteed: 1,
        burst: 1,
        ..Default::default()
    };
    pool.create(&mut admin, &key).await;
    create_tenant(&mut admin, &key, "acme", "flex").await;
    create_tenant(&mut admin, &key, "beta", "flex").await;

    let mut lease = app.lease().await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        let answer = lease
            .acquire_lease(lease_request("acme", &key))
            .await
            .unwrap();
        match answer.into_inner().result {
            Some(Answer::Lease(l)) => leases.push(l.lease_id),
            Some(Answer::Denial(d)) => {
                assert_eq!(d.reason, pb::DenialReason::TenantQuota as i32)
            }
            None => panic!("no answer"),
        }
    }
    assert_eq!(leases.len(), 2, "a quota of 2 per window");
    for (lease_id, outcome) in leases.iter().zip([
        pb::ReleaseOutcome::Success,
        pb::ReleaseOutcome::UpstreamError,
    ]) {
        let release = pb::ReleaseLeaseRequest {
            lease_id: lease_id.clone(),
            outcome: outcome as i32,
            ..Default::default()
        };
        lease.release_lease(authed(release, &key)).await.unwrap();
    }
    lease
        .acquire_lease(lease_request("beta", &key))
        .await
        .unwrap();

    // Until every grant is flushed: acme's calls and the token's three grants (acme's
    // 2, beta's 1) may come in two flushes.
    let token_rows = |rows: &[pb::UsageHistoryRow]| -> Vec<pb::UsageHistoryRow> {
        rows.iter()
            .filter(|r| r.subject_kind == pb::UsageSubjectKind::Token as i32)
            .cloned()
            .collect()
    };
    let rows = eventually(Duration::from_secs(10), "history flushed", || async {
        let rows = history(&app, &key, around_now()).await.unwrap().rows;
        let granted: u64 = token_rows(&rows).iter().map(|r| r.granted).sum();
        (tenant_sum(&rows, "acme") == (3, 2, 1, 1, 1) && granted >= 3).then_some(rows)
    })
    .await;
    let token = token_rows(&rows);
    assert_eq!(
        token.iter().map(|r| r.granted).sum::<u64>(),
        3,
        "acme's 2, beta's 1"
    );
    assert!(
        token
            .iter()
            .all(|r| r.subject_id == "tok-0" && r.upstream_id == "up")
    );
    let acme = rows.iter().find(|r| r.subject_id == "acme").unwrap();
    assert!(acme.wait_p50.is_some() && acme.wait_p99.is_some());
    assert!(
        acme.borrowed >= 1,
        "the second grant was beyond the guarantee of 1"
    );

    // A worker key of acme: its tenant only; beta and tokens are refused.
    let worker = app.worker_key(&["acme"]).await;
    let own = history(&app, &worker, around_now()).await.unwrap().rows;
    assert!(!own.is_empty());
    assert!(own.iter().all(|r| r.subject_id == "acme"), "{own:?}");
    let mut other = around_now();
    other.tenant_ids = vec!["beta".into()];
    let refused = history(&app, &worker, other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let mut tokens = around_now();
    tokens.token_ids = vec!["tok-0".into()];
    let refused = history(&app, &worker, tokens).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Bad requests name their field.
    let mut reversed = around_now();
    std::mem::swap(&mut reversed.start_time, &mut reversed.end_time);
    let bad = history(&app, &key, reversed).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("end_time"), "{}", bad.message());
    let mut odd_bucket = around_now();
    odd_bucket.bucket = Some(prost_types::Duration {
        seconds: 90,
        nanos: 0,
    });
    let bad = history(&app, &key, odd_bucket).await.unwrap_err();
    assert!(bad.message().starts_with("bucket"), "{}", bad.message());
    let mut no_start = around_now();
    no_start.start_time = None;
    let bad = history(&app, &key, no_start).await.unwrap_err();
    assert!(bad.message().starts_with("start_time"), "{}", bad.message());

    // A restart: what the replica flushed is there for the next one.
    app.stop().await;
    let mut settings = env.settings();
    settings.history.flush_ms = 3_000_000; // no flush of its own during the test
    let again = env.spawn_with(settings.clone()).await;
    let key = again.admin_key.clone();
    let rows = history(&again, &key, around_now()).await.unwrap().rows;
    assert_eq!(tenant_sum(&rows, "acme"), (3, 2, 1, 1, 1));
    assert_eq!(tenant_sum(&rows, "beta").1, 1);

    // This replica never flushes on its own: its call reaches the store only through
    // the flush it makes as it stops.
    let mut lease = again.lease().await;
    lease
        .acquire_lease(lease_request("beta", &key))
        .await
        .unwrap();
    again.stop().await;
    let third = env.spawn_with(settings).await;
    let rows = history(&third, &third.admin_key, around_now())
        .await
        .unwrap()
        .rows;
    // Asked, not granted: a restarted embedded replica holds leasing for a window, so
    // that call was most likely denied.
    assert_eq!(
        tenant_sum(&rows, "beta").0,
        2,
        "the call made just before stopping"
    );
}

/// Three replicas on one Postgres and one Redis, leasing at once and each flushing its
/// history every 100 ms: the history read from any of them counts every call and every
/// grant once, and keeps counting them once as the replicas flush again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_count_every_grant_once() {
    let env = TestEnv::new(Db::Postgres, Counters::Redis).await;
    let mut settings = env.settings();
    settings.history.flush_ms = 100;
    let first = env.spawn_with(settings.clone()).await;
    let key = first.admin_key.clone();
    let mut admin = first.admin().await;
    PoolSetup::default().create(&mut admin, &key).await;
    create_tenant(&mut admin, &key, "acme", "flex").await;
    let second = env.spawn_with(settings.clone()).await;
    let third = env.spawn_with(settings).await;
    let replicas = [&first, &second, &third];
    // Each replica loads the configuration on its own poll.
    for app in replicas {
        eventually(Duration::from_secs(10), "replica sees acme", || async {
            let mut lease = app.lease().await;
            let answer = lease.acquire_lease(lease_request("acme", &key)).await;
            answer.is_ok().then_some(())
        })
        .await;
    }

    let calls = replicas.map(|app| {
        let key = key.clone();
        async move {
            let mut lease = app.lease().await;
            let mut granted = 0_u64;
            for _ in 0..20 {
                let answer = lease.acquire_lease(lease_request("acme", &key)).await;
                if let Some(Answer::Lease(_)) = answer.unwrap().into_inner().result {
                    granted += 1;
                }
            }
            granted
        }
    });
    let [a, b, c] = calls;
    let (a, b, c) = tokio::join!(a, b, c);
    // The three probes above were calls too, and granted.
    let (asked, granted) = (63, a + b + c + 3);
    assert!(granted > 3, "some of the 60 calls were granted");

    let read = || async {
        let rows = history(&second, &key, around_now()).await.unwrap().rows;
        let tenant = tenant_sum(&rows, "acme");
        let token: u64 = rows
            .iter()
            .filter(|r| r.subject_kind == pb::UsageSubjectKind::Token as i32)
            .map(|r| r.granted)
            .sum();
        (tenant.0, tenant.1, token)
    };
    eventually(Duration::from_secs(10), "every replica flushed", || async {
        (read().await == (asked, granted, granted)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // three more flushes each
    assert_eq!(read().await, (asked, granted, granted));
}
