//! Backend faults: Redis stopping mid-test (a throwaway Redis this test starts, not the
//! shared one) makes calls fail closed with UNAVAILABLE, and leasing resumes by itself.

use std::time::{Duration, Instant};

use tokenlease::config::CountersMode;
use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tonic::Code;
use tonic_types::StatusExt;

use super::fixtures::{PoolSetup, create_tenant, tenant_usage_on};
use super::helpers::{
    Counters, Db, TestEnv, authed, drain_events, eventually, granted_at, lease_request, ms, timed,
    ts_ms,
};
use super::throwaway::{ThrowawayRedis, free_port};

/// Redis stops: AcquireLease answers UNAVAILABLE with a RetryInfo within the configured
/// timeout and grants nothing; Redis comes back empty (no persistence): the counters
/// were lost, so the replica denies COUNTERS_RECOVERING until W + TTL + grace after it
/// noticed (the leases granted before may still be in use), announces the hold once as
/// a `CountersRecovering` event whose `until` is the retry-after's instant, then leasing
/// resumes by itself, no earlier than the retry-after said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_and_recovers() {
    let mut redis = ThrowawayRedis::start(free_port());
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let mut settings = env.settings();
    settings.redis_url = Some(redis.url());
    settings.counters = CountersMode::Redis;
    settings.redis.timeout_ms = 300;
    let app = env.spawn_with(settings).await;
    let mut admin = app.admin().await;
    let pool = PoolSetup {
        window_ms: 2_000,
        ..Default::default()
    };
    pool.create(&mut admin, &app.admin_key).await;
    create_tenant(&mut admin, &app.admin_key, "acme", "flex").await;
    let mut lease = app.lease().await;
    let request = || lease_request("acme", &app.admin_key);
    let watch = pb::WatchEventsRequest::default();
    let mut events = lease
        .watch_events(authed(watch, &app.admin_key))
        .await
        .unwrap()
        .into_inner();
    let answer = lease
        .acquire_lease(request())
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert!(matches!(answer, Answer::Lease(_)));

    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let err = lease
            .acquire_lease(request())
            .await
            .expect_err("no lease may be granted while Redis is down");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        assert!(
            err.get_details_retry_info().is_some(),
            "UNAVAILABLE carries a retry-after"
        );
        // Answered, not hung: bounded by the 300 ms timeout plus a reconnect attempt,
        // with room for a loaded machine's scheduling (how tight the bound is belongs to
        // the fault suite's server-side measurement, not to a wall clock here).
        assert!(
            started.elapsed() < Duration::from_millis(3_000),
            "took {:?}",
            started.elapsed()
        );
    }

    let _redis = ThrowawayRedis::start(redis.port);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut resume_at = None;
    let mut first_hold = None;
    loop {
        let (answer, span) = timed(lease.acquire_lease(request())).await;
        match answer.map(|a| a.into_inner().result.unwrap()) {
            Ok(Answer::Lease(granted)) => {
                let resume_at = resume_at.expect("a lease without the hold of lost counters");
                let granted_at = granted_at(&granted);
                assert!(
                    granted_at + 1 >= resume_at,
                    "granted at {granted_at}, the hold ended at {resume_at}"
                );
                break;
            }
            Ok(Answer::Denial(denial)) => {
                assert_eq!(
                    denial.reason,
                    pb::DenialReason::CountersRecovering as i32,
                    "{}",
                    denial.message
                );
                let retry_ms = ms(&denial.retry_after.unwrap());
                // Window 2 s + TTL 1 s + grace 0, from the first decision that noticed.
                assert!(retry_ms <= 3_000, "{retry_ms} ms");
                resume_at.get_or_insert(span.before + retry_ms);
                first_hold.get_or_insert((span, retry_ms));
            }
            Err(err) => assert_eq!(err.code(), Code::Unavailable),
        }
        assert!(
            Instant::now() < deadline,
            "leasing did not resume after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let announced = holds_announced(&mut events).await;
    assert_eq!(
        announced.len(),
        1,
        "one announcement per loss: {announced:?}"
    );
    let (upstream, until) = &announced[0];
    assert_eq!(upstream, "up");
    let (span, retry_ms) = first_hold.unwrap();
    span.assert_points_at(retry_ms, *until, "the announced end of the hold");
}

/// The `CountersRecovering` events (upstream, until in Unix ms) among those that arrive
/// on `events` until none has for 300 ms.
pub async fn holds_announced(
    events: &mut tonic::Streaming<pb::WatchEventsResponse>,
) -> Vec<(String, i64)> {
    let (received, ended) = drain_events(events, Duration::from_millis(300)).await;
    assert!(ended.is_none(), "the stream ended: {ended:?}");
    received
        .into_iter()
        .filter_map(|event| match event.kind {
            Some(pb::event::Kind::CountersRecovering(hold)) => {
                Some((hold.upstream_id, ts_ms(&hold.until.unwrap())))
            }
            _ => None,
        })
        .collect()
}

/// Property 12 and issue 10, point 2: Redis frozen (SIGSTOP: connected but silent) while
/// 5 AcquireLease calls fail. Each fails UNAVAILABLE within `redis.timeout_ms` + 50 ms
/// (one budget for the decision and the health admission), and once Redis thaws and runs
/// the 5 scripts it had queued, after their deadlines, they take no slot: the tenant's
/// used slots stay 0, and leasing goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_failed_while_redis_was_frozen_take_no_slot() {
    const TIMEOUT_MS: u64 = 250;
    let redis = ThrowawayRedis::start(free_port());
    let env = TestEnv::new(Db::Sqlite, Counters::Memory).await;
    let mut settings = env.settings();
    settings.redis_url = Some(redis.url());
    settings.counters = CountersMode::Redis;
    settings.redis.timeout_ms = TIMEOUT_MS;
    let app = env.spawn_with(settings).await;
    let mut admin = app.admin().await;
    PoolSetup::default()
        .create(&mut admin, &app.admin_key)
        .await;
    create_tenant(&mut admin, &app.admin_key, "acme", "flex").await;
    let mut lease = app.lease().await;
    let request = || lease_request("acme", &app.admin_key);
    // One lease given back: its scripts are loaded, so the frozen calls send EVALSHA.
    let Some(Answer::Lease(first)) = lease
        .acquire_lease(request())
        .await
        .unwrap()
        .into_inner()
        .result
    else {
        panic!("the first call is granted");
    };
    let release = pb::ReleaseLeaseRequest {
        lease_id: first.lease_id,
        outcome: pb::ReleaseOutcome::NotUsed as i32,
        ..Default::default()
    };
    lease
        .release_lease(authed(release, &app.admin_key))
        .await
        .unwrap();
    let used =
        |usage: pb::GetUsageResponse| usage.tenants.iter().map(|t| t.used_in_window).sum::<u32>();
    assert_eq!(
        used(tenant_usage_on(&mut admin, &app.admin_key, "acme").await),
        0
    );

    redis.signal("-STOP");
    for call in 0..5 {
        let (answer, span) = timed(lease.acquire_lease(request())).await;
        let err = answer.expect_err("no lease while Redis is frozen");
        assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
        assert!(
            err.get_details_retry_info().is_some(),
            "UNAVAILABLE carries a retry-after"
        );
        let took = span.after - span.before;
        assert!(
            took <= (TIMEOUT_MS + 50) as i64,
            "call {call} took {took} ms, the bound is {TIMEOUT_MS} ms + 50 ms"
        );
    }
    redis.signal("-CONT");

    // GetUsage reads Redis after the 5 queued scripts have run.
    let usage = eventually(
        Duration::from_secs(10),
        "GetUsage answers after the thaw",
        || {
            let mut admin = admin.clone();
            let key = app.admin_key.clone();
            async move {
                let request = pb::GetUsageRequest {
                    tenant_id: "acme".into(),
                    ..Default::default()
                };
                admin
                    .get_usage(authed(request, &key))
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            }
        },
    )
    .await;
    assert_eq!(used(usage), 0, "a call that was told no holds no slot");
    let again = lease
        .acquire_lease(request())
        .await
        .unwrap()
        .into_inner()
        .result;
    assert!(matches!(again, Some(Answer::Lease(_))), "{again:?}");
    assert_eq!(
        used(tenant_usage_on(&mut admin, &app.admin_key, "acme").await),
        1
    );
}
