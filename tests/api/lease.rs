//! The lease path over gRPC, on both counter backends (in-process with the embedded
//! store; Redis with Postgres), plus several replicas sharing one Redis.

use std::time::Duration;

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tonic::Code;

use super::fixtures::{PoolSetup, app_with, create_tenant, tenant_usage, token_secret};
use super::helpers::{
    Counters, Db, Span, TestApp, TestEnv, authed, eventually, millis, ms, now_ms, timed, ts_ms,
};

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $name() { super::$name(super::Db::Sqlite, super::Counters::Memory).await } )* }
        mod redis { $( #[tokio::test] async fn $name() { super::$name(super::Db::Postgres, super::Counters::Redis).await } )* }
    };
}

for_each_backend!(
    grants_until_the_usable_limit_then_denies_with_retry_after,
    tenant_quota_binds_before_the_token,
    release_outcomes,
    waiting_caller_is_granted_when_a_slot_frees,
    waiting_caller_is_granted_when_its_quota_rises,
    pacing_spreads_a_tokens_grants,
    bad_lease_requests,
);

async fn acquire(app: &TestApp, key: &str, tenant: &str) -> Answer {
    let req = pb::AcquireLeaseRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    app.lease()
        .await
        .acquire_lease(authed(req, key))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
}

async fn release(
    app: &TestApp,
    key: &str,
    lease_id: &str,
    outcome: pb::ReleaseOutcome,
) -> Result<bool, tonic::Status> {
    let req = pb::ReleaseLeaseRequest {
        lease_id: lease_id.into(),
        outcome: outcome as i32,
        ..Default::default()
    };
    app.lease()
        .await
        .release_lease(authed(req, key))
        .await
        .map(|r| r.into_inner().already_released)
}

/// 100 per window with a 5 % margin: exactly 95 leases, each with the decrypted token,
/// then NO_TOKEN_CAPACITY with a retry-after that ends when the first slot frees
/// (first lease's expiry + window), to the millisecond of the answer.
async fn grants_until_the_usable_limit_then_denies_with_retry_after(db: Db, counters: Counters) {
    let (_env, app) = app_with(db, counters, PoolSetup::default(), &["acme"]).await;
    let key = app.admin_key.clone();
    let mut first_expiry = None;
    for i in 0..95 {
        let Answer::Lease(lease) = acquire(&app, &key, "acme").await else {
            panic!("lease {i} denied")
        };
        assert_eq!(lease.token, token_secret(0));
        let quota = lease.quota.unwrap();
        // One active tenant: its fair share is the whole pool, below its tier's
        // guaranteed + burst (0 + 10,000).
        assert_eq!(
            (
                quota.token_remaining,
                quota.tenant_limit,
                quota.tenant_ceiling
            ),
            (94 - i, 95, 10_000)
        );
        first_expiry.get_or_insert(ts_ms(&lease.expires_at.unwrap()));
    }
    for _ in 0..20 {
        let (answer, span) = timed(acquire(&app, &key, "acme")).await;
        let Answer::Denial(denial) = answer else {
            panic!("96th lease granted")
        };
        assert_eq!(
            denial.reason,
            pb::DenialReason::NoTokenCapacity as i32,
            "{}",
            denial.message
        );
        let expected = first_expiry.unwrap() + 10_000;
        let retry_after = ms(&denial.retry_after.unwrap());
        span.assert_points_at(retry_after, expected, "the first slot frees");
    }
}

/// A tenant at its quota is denied TENANT_QUOTA while another tenant on the same token
/// is still granted.
async fn tenant_quota_binds_before_the_token(db: Db, counters: Counters) {
    let pool = PoolSetup {
        guaranteed: 5,
        burst: 5,
        ..Default::default()
    };
    let (_env, app) = app_with(db, counters, pool, &["small", "other"]).await;
    let key = app.admin_key.clone();
    for _ in 0..10 {
        assert!(matches!(
            acquire(&app, &key, "small").await,
            Answer::Lease(_)
        ));
    }
    let Answer::Denial(denial) = acquire(&app, &key, "small").await else {
        panic!("over quota")
    };
    assert_eq!(denial.reason, pb::DenialReason::TenantQuota as i32);
    assert!(denial.message.contains("small"), "{}", denial.message);
    assert!(ms(&denial.retry_after.unwrap()) > 0);
    assert!(matches!(
        acquire(&app, &key, "other").await,
        Answer::Lease(_)
    ));
}

/// NOT_USED gives the slot back; SUCCESS keeps it; releasing twice is idempotent for the
/// same outcome and FAILED_PRECONDITION for another; unknown leases are NOT_FOUND.
async fn release_outcomes(db: Db, counters: Counters) {
    let pool = PoolSetup {
        guaranteed: 1,
        burst: 1,
        ..Default::default()
    };
    let (_env, app) = app_with(db, counters, pool, &["acme"]).await;
    let key = app.admin_key.clone();
    let Answer::Lease(a) = acquire(&app, &key, "acme").await else {
        panic!()
    };
    let Answer::Lease(b) = acquire(&app, &key, "acme").await else {
        panic!()
    };
    assert!(
        matches!(acquire(&app, &key, "acme").await, Answer::Denial(_)),
        "quota of 2 used"
    );

    assert!(
        !release(&app, &key, &a.lease_id, pb::ReleaseOutcome::NotUsed)
            .await
            .unwrap()
    );
    assert!(
        release(&app, &key, &a.lease_id, pb::ReleaseOutcome::NotUsed)
            .await
            .unwrap(),
        "same outcome twice is idempotent"
    );
    let conflict = release(&app, &key, &a.lease_id, pb::ReleaseOutcome::Success)
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition);
    let Answer::Lease(c) = acquire(&app, &key, "acme").await else {
        panic!("NOT_USED gave the slot back")
    };

    assert!(
        !release(&app, &key, &b.lease_id, pb::ReleaseOutcome::Success)
            .await
            .unwrap()
    );
    assert!(
        matches!(acquire(&app, &key, "acme").await, Answer::Denial(_)),
        "a used slot stays counted"
    );
    let _ = c;

    let unknown = format!("up.acme.tok-0.{}", "0".repeat(32));
    assert_eq!(
        release(&app, &key, &unknown, pb::ReleaseOutcome::Success)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        release(&app, &key, "garbage", pb::ReleaseOutcome::Success)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let missing = release(&app, &key, "", pb::ReleaseOutcome::Success)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let no_outcome = release(&app, &key, &b.lease_id, pb::ReleaseOutcome::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(no_outcome.code(), Code::InvalidArgument);
    assert!(no_outcome.message().contains("outcome"));
}

/// A caller that may wait is held and granted once the slot frees, instead of denied.
async fn waiting_caller_is_granted_when_a_slot_frees(db: Db, counters: Counters) {
    let pool = PoolSetup {
        limit: 2,
        window_ms: 1_000,
        ..Default::default()
    };
    let (_env, app) = app_with(db, counters, pool, &["acme"]).await;
    let key = app.admin_key.clone();
    let Answer::Lease(first) = acquire(&app, &key, "acme").await else {
        panic!("usable = floor(2 × 0.95) = 1")
    };
    // Never released: the slot frees at expiry + window.
    let slot_frees_at = ts_ms(first.expires_at.as_ref().unwrap()) + 1_000;
    let req = pb::AcquireLeaseRequest {
        tenant_id: "acme".into(),
        max_wait: Some(millis(5_000)),
        ..Default::default()
    };
    let answer = app
        .lease()
        .await
        .acquire_lease(authed(req, &key))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let Answer::Lease(second) = answer else {
        panic!("the waiting caller was denied: {answer:?}")
    };
    let granted_at = ts_ms(second.expires_at.as_ref().unwrap()) - 1_000;
    assert!(
        granted_at >= slot_frees_at,
        "granted at {granted_at}, before the slot freed at {slot_frees_at}"
    );

    let short = pb::AcquireLeaseRequest {
        tenant_id: "acme".into(),
        max_wait: Some(millis(100)),
        ..Default::default()
    };
    let answer = app
        .lease()
        .await
        .acquire_lease(authed(short, &key))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let Answer::Denial(denial) = answer else {
        panic!("no slot within 100 ms")
    };
    assert!(denial.retry_after.is_some());
}

/// A caller waiting at its tenant's quota is granted as soon as the quota rises (here:
/// the tier's burst is raised), not only when the tenant's own slot frees a window later.
async fn waiting_caller_is_granted_when_its_quota_rises(db: Db, counters: Counters) {
    // A window long enough that the slot does not free while a slow machine runs the
    // test, short enough that the caller waits for it (within its `max_wait`; a caller
    // whose slot frees later is answered at once).
    let pool = PoolSetup {
        window_ms: 3_000,
        guaranteed: 1,
        burst: 0,
        ..Default::default()
    };
    let (_env, app) = app_with(db, counters, pool, &["acme"]).await;
    let key = app.admin_key.clone();
    let Answer::Lease(first) = acquire(&app, &key, "acme").await else {
        panic!("acme's guarantee of 1 is free")
    };
    // Never released: the slot frees at expiry + window.
    let slot_frees_at = ts_ms(first.expires_at.as_ref().unwrap()) + 3_000;
    let mut client = app.lease().await;
    let waiting = pb::AcquireLeaseRequest {
        tenant_id: "acme".into(),
        max_wait: Some(millis(6_000)),
        ..Default::default()
    };
    let (waiter_key, request) = (key.clone(), waiting);
    let waiter = tokio::spawn(async move {
        let answer = client.acquire_lease(authed(request, &waiter_key)).await;
        answer.unwrap().into_inner().result.unwrap()
    });
    // The quota rises only once the caller is seen waiting: otherwise it would be
    // granted on arrival and the wake-up would go untested.
    eventually(Duration::from_secs(4), "the caller waits", || async {
        let usage = tenant_usage(&app, &key, "acme").await.expect("GetUsage");
        (usage.tenants[0].waiting_callers == 1).then_some(())
    })
    .await;
    let tier = pb::Tier {
        id: "flex".into(),
        guaranteed_per_window: 1,
        burst_per_window: 10,
        shared_access: pb::SharedAccess::Normal as i32,
        weight: 1.0,
        ..Default::default()
    };
    app.admin()
        .await
        .update_tier(authed(
            pb::UpdateTierRequest {
                tier: Some(tier),
                update_mask: None,
            },
            &key,
        ))
        .await
        .unwrap();
    let Answer::Lease(second) = waiter.await.unwrap() else {
        panic!("the waiter was not granted")
    };
    let granted_at = ts_ms(second.expires_at.as_ref().unwrap()) - 1_000;
    assert!(
        granted_at < slot_frees_at,
        "granted at {granted_at}, only when the first slot freed ({slot_frees_at})"
    );
    assert!(second.quota.unwrap().tenant_limit > 1);
}

/// With `lease.pace_burst_percent` = 25, a token of 95 usable per 300 s grants 24 leases
/// back to back, then denies NO_TOKEN_CAPACITY pointing at its next paced slot (one per
/// 300 s / 95 ≈ 3,158 ms after the first grant), and grants it then, not before. The
/// window is long so that 24 calls on a loaded machine stay well inside one step.
async fn pacing_spreads_a_tokens_grants(db: Db, counters: Counters) {
    const WINDOW_MS: u64 = 300_000;
    let env = TestEnv::new(db, counters).await;
    let mut settings = env.settings();
    settings.lease.pace_burst_percent = 25;
    let app = env.spawn_with(settings).await;
    let key = app.admin_key.clone();
    let pool = PoolSetup {
        window_ms: WINDOW_MS,
        ..Default::default()
    };
    pool.create(&mut app.admin().await, &key).await;
    create_tenant(&mut app.admin().await, &key, "acme", "flex").await;
    let granted_at = |lease: &pb::Lease| ts_ms(lease.expires_at.as_ref().unwrap()) - 1_000;
    let mut first = None;
    for i in 0..24 {
        let Answer::Lease(lease) = acquire(&app, &key, "acme").await else {
            panic!("lease {i} of the 24 back to back denied")
        };
        first.get_or_insert(granted_at(&lease));
    }
    let (answer, span) = timed(acquire(&app, &key, "acme")).await;
    let Answer::Denial(denial) = answer else {
        panic!("the 25th lease was granted at once")
    };
    assert_eq!(denial.reason, pb::DenialReason::NoTokenCapacity as i32);
    assert!(denial.message.contains("pace"), "{}", denial.message);
    // 24 slots spent from the first grant: the next is allowed one step after it.
    let step = WINDOW_MS as f64 / 95.0;
    let next = first.unwrap() + step.ceil() as i64;
    let retry_after = ms(denial.retry_after.as_ref().unwrap());
    span.assert_points_at(retry_after, next, "the next paced slot");
    let lease = eventually(Duration::from_secs(10), "the paced slot", || async {
        match acquire(&app, &key, "acme").await {
            Answer::Lease(lease) => Some(lease),
            Answer::Denial(_) => None,
        }
    })
    .await;
    assert!(
        granted_at(&lease) >= next,
        "granted at {}, before the pace allowed it at {next}",
        granted_at(&lease)
    );
}

/// Bad AcquireLease input gets INVALID_ARGUMENT or NOT_FOUND naming the field.
async fn bad_lease_requests(db: Db, counters: Counters) {
    let (_env, app) = app_with(db, counters, PoolSetup::default(), &["acme"]).await;
    let mut lease = app.lease().await;
    let base = || pb::AcquireLeaseRequest {
        tenant_id: "acme".into(),
        ..Default::default()
    };
    let cases = vec![
        (
            pb::AcquireLeaseRequest {
                tenant_id: "".into(),
                ..base()
            },
            Code::InvalidArgument,
            "tenant_id",
        ),
        (
            pb::AcquireLeaseRequest {
                tenant_id: "ghost".into(),
                ..base()
            },
            Code::NotFound,
            "tenant_id",
        ),
        (
            pb::AcquireLeaseRequest {
                upstream_id: "nope".into(),
                ..base()
            },
            Code::NotFound,
            "upstream_id",
        ),
        (
            pb::AcquireLeaseRequest {
                cost: 101,
                ..base()
            },
            Code::InvalidArgument,
            "cost",
        ),
        (
            pb::AcquireLeaseRequest { cost: 96, ..base() },
            Code::InvalidArgument,
            "cost",
        ),
        (
            pb::AcquireLeaseRequest {
                priority: 42,
                ..base()
            },
            Code::InvalidArgument,
            "priority",
        ),
        (
            pb::AcquireLeaseRequest {
                request_kind: 42,
                ..base()
            },
            Code::InvalidArgument,
            "request_kind",
        ),
        (
            pb::AcquireLeaseRequest {
                max_wait: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..base()
            },
            Code::InvalidArgument,
            "max_wait",
        ),
    ];
    for (req, code, needle) in cases {
        let err = lease
            .acquire_lease(authed(req.clone(), &app.admin_key))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{:?} should name {needle}",
            err.message()
        );
    }
}

/// Three replicas against one Redis and one token (100 per window, 5 % margin): 500
/// concurrent AcquireLease calls from tenants whose quotas do not bind → exactly 95
/// granted; every denial's retry-after points at the first slot's release (±100 ms,
/// measured from some instant during the call: the answer is computed between the
/// call's start and its reply, and under load that span alone can exceed 100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_grant_exactly_the_usable_limit() {
    let env = TestEnv::new(Db::Postgres, Counters::Redis).await;
    let replicas = [env.spawn().await, env.spawn().await, env.spawn().await];
    let key = replicas[0].admin_key.clone();
    let mut admin = replicas[0].admin().await;
    PoolSetup::default().create(&mut admin, &key).await;
    let tenants: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
    for t in &tenants {
        create_tenant(&mut admin, &key, t, "flex").await;
    }
    for r in &replicas {
        r.leaser.config.refresh().await.unwrap();
        r.leaser.allocator.refresh().await.unwrap();
    }
    let mut clients = vec![];
    for r in &replicas {
        clients.push(r.lease().await);
    }
    let calls = (0..500).map(|i| {
        let mut client = clients[i % 3].clone();
        let req = pb::AcquireLeaseRequest {
            tenant_id: tenants[i % tenants.len()].clone(),
            ..Default::default()
        };
        let key = key.clone();
        tokio::spawn(async move {
            let tenant = req.tenant_id.clone();
            let sent = now_ms();
            let answer = client
                .acquire_lease(authed(req, &key))
                .await
                .unwrap()
                .into_inner()
                .result
                .unwrap();
            (tenant, answer, sent, now_ms())
        })
    });
    let answers: Vec<(String, Answer, i64, i64)> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut first_by_tenant: std::collections::HashMap<&str, i64> = Default::default();
    let mut granted = 0;
    for (tenant, answer, _, _) in &answers {
        if let Answer::Lease(l) = answer {
            granted += 1;
            let expiry = ts_ms(l.expires_at.as_ref().unwrap());
            let first = first_by_tenant.entry(tenant.as_str()).or_insert(expiry);
            *first = (*first).min(expiry);
        }
    }
    assert_eq!(
        granted, 95,
        "exactly the usable limit is granted across replicas"
    );
    let first_frees = first_by_tenant.values().min().unwrap() + 10_000;
    for (tenant, answer, sent, received) in &answers {
        let Answer::Denial(d) = answer else { continue };
        // Ten tenants share the token fairly (9 or 10 each), so a denial names either
        // limit; its retry-after points at when that limit's first slot frees, seen from
        // some instant between sending the call and getting the answer.
        let expected = if d.reason == pb::DenialReason::TenantQuota as i32 {
            first_by_tenant[tenant.as_str()] + 10_000
        } else {
            assert_eq!(
                d.reason,
                pb::DenialReason::NoTokenCapacity as i32,
                "{}",
                d.message
            );
            first_frees
        };
        let span = Span {
            before: *sent,
            after: *received,
        };
        let retry = ms(d.retry_after.as_ref().unwrap());
        span.assert_points_at(retry, expected, "the binding limit's first slot frees");
    }
}

/// The per-tenant bound on waiting callers: past it RESOURCE_EXHAUSTED with a
/// retry-after; callers that go away leave the line at once, making room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_callers_are_bounded_and_leave_when_gone() {
    use tonic_types::StatusExt;
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let mut settings = env.settings();
    settings.lease.max_waiters_per_tenant = 2;
    let app = env.spawn_with(settings).await;
    let key = app.admin_key.clone();
    let pool = PoolSetup {
        limit: 2,
        ..Default::default()
    }; // 1 usable per 10 s
    pool.create(&mut app.admin().await, &key).await;
    create_tenant(&mut app.admin().await, &key, "acme", "flex").await;
    assert!(matches!(
        acquire(&app, &key, "acme").await,
        Answer::Lease(_)
    ));
    let waiting = || pb::AcquireLeaseRequest {
        tenant_id: "acme".into(),
        max_wait: Some(millis(20_000)),
        ..Default::default()
    };
    let mut waiters = vec![];
    for _ in 0..2 {
        let mut client = app.lease().await;
        let (key, request) = (key.clone(), waiting());
        waiters.push(tokio::spawn(async move {
            client.acquire_lease(authed(request, &key)).await
        }));
    }
    let depth = async || {
        let usage = tenant_usage(&app, &key, "acme").await.unwrap();
        usage.tenants[0].waiting_callers
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while depth().await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two waiters never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let full = app
        .lease()
        .await
        .acquire_lease(authed(waiting(), &key))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{}", full.message());
    assert!(full.get_details_retry_info().is_some());
    for waiter in &waiters {
        waiter.abort();
    }
    while depth().await > 0 {
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(5),
            "aborted waiters stayed in line"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
