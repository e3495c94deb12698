//! Cost (AdminService.GetCostReport, Token.monthly_cost_minor) end to end, on SQLite
//! and on Postgres: costs set through the admin API, real leases, the history flushed,
//! and the report read back adds up to the configured cost exactly; a worker key sees
//! only its tenants; bad input names its field.

use std::time::Duration;

use jiff::ToSpan;
use jiff::civil::Time;
use jiff::tz::TimeZone;
use prost_types::{FieldMask, Timestamp};
use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tonic::Code;

use super::fixtures::{PoolSetup, create_tenant};
use super::helpers::{Counters, Db, TestApp, TestEnv, authed, eventually, lease_request, now_ms};

/// The pool token's monthly cost: the largest accepted, so that a few grants out of
/// millions of requests of capacity still cost whole units.
const POOL_MONTHLY: i64 = 1_000_000_000_000;
/// The dedicated token's monthly cost.
const DEDICATED_MONTHLY: i64 = 50_000;
/// PoolSetup's upstream: 100 per 10 s with a 5 % margin.
const USABLE_PER_WINDOW: i64 = 95;
const WINDOW_MS: i64 = 10_000;

/// The start of the UTC calendar month `offset` months from the current one, in ms.
fn month_start(offset: i32) -> i64 {
    let now = jiff::Timestamp::from_millisecond(now_ms()).unwrap();
    let first = TimeZone::UTC.to_datetime(now).date().first_of_month();
    let month = first.checked_add(offset.months()).unwrap();
    let midnight = month.to_datetime(Time::midnight());
    TimeZone::UTC
        .to_timestamp(midnight)
        .unwrap()
        .as_millisecond()
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: 0,
    }
}

/// This month and the next: two whole months, which cost exactly twice the monthly
/// cost, and hold every grant the test makes.
fn two_months() -> pb::GetCostReportRequest {
    pb::GetCostReportRequest {
        start_time: Some(timestamp(month_start(0))),
        end_time: Some(timestamp(month_start(2))),
        ..Default::default()
    }
}

async fn report(
    app: &TestApp,
    key: &str,
    request: pb::GetCostReportRequest,
) -> Result<pb::GetCostReportResponse, tonic::Status> {
    let answer = app
        .admin()
        .await
        .get_cost_report(authed(request, key))
        .await;
    answer.map(tonic::Response::into_inner)
}

fn granted_of(report: &pb::GetCostReportResponse, tenant: &str) -> u64 {
    let line = report.tenants.iter().find(|t| t.tenant_id == tenant);
    line.map_or(0, |t| t.granted)
}

fn cost_of(report: &pb::GetCostReportResponse, tenant: &str) -> i64 {
    let line = report.tenants.iter().find(|t| t.tenant_id == tenant);
    line.map_or(0, |t| t.cost_minor)
}

/// Grants `n` leases to `tenant`; returns how many were granted.
async fn lease_n(app: &TestApp, key: &str, tenant: &str, n: usize) -> u64 {
    let mut lease = app.lease().await;
    let mut granted = 0;
    for _ in 0..n {
        let answer = lease.acquire_lease(lease_request(tenant, key)).await;
        if let Some(Answer::Lease(_)) = answer.unwrap().into_inner().result {
            granted += 1;
        }
    }
    granted
}

async fn update_token(
    app: &TestApp,
    key: &str,
    token: pb::Token,
    paths: &[&str],
) -> Result<pb::Token, tonic::Status> {
    let request = pb::UpdateTokenRequest {
        token: Some(token),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
    };
    let answer = app.admin().await.update_token(authed(request, key)).await;
    answer.map(|r| r.into_inner().token.unwrap())
}

/// Pool "shared" with tok-0 (cost set by UpdateToken), tenants acme and beta in it,
/// and tenant solo owning the dedicated token own-1 (cost set by CreateToken).
async fn configure(app: &TestApp) {
    let key = &app.admin_key;
    let mut admin = app.admin().await;
    PoolSetup::default().create(&mut admin, key).await;
    for tenant in ["acme", "beta", "solo"] {
        create_tenant(&mut admin, key, tenant, "flex").await;
    }
    let own = pb::Token {
        id: "own-1".into(),
        upstream_id: "up".into(),
        secret: "solo-secret".into(),
        owner: Some(pb::token::Owner::DedicatedTenantId("solo".into())),
        monthly_cost_minor: DEDICATED_MONTHLY,
        ..Default::default()
    };
    let created = admin
        .create_token(authed(pb::CreateTokenRequest { token: Some(own) }, key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.token.unwrap().monthly_cost_minor, DEDICATED_MONTHLY);
    let cost = pb::Token {
        id: "tok-0".into(),
        monthly_cost_minor: POOL_MONTHLY,
        ..Default::default()
    };
    let updated = update_token(app, key, cost, &["monthly_cost_minor"]).await;
    assert_eq!(updated.unwrap().monthly_cost_minor, POOL_MONTHLY);
    // A masked update of another field keeps the cost.
    let renamed = pb::Token {
        id: "tok-0".into(),
        display_name: "renamed".into(),
        ..Default::default()
    };
    let renamed = update_token(app, key, renamed, &["display_name"]).await;
    assert_eq!(renamed.unwrap().monthly_cost_minor, POOL_MONTHLY);
}

/// `part` is `cost × granted / capacity` rounded down or up (exact, in i128).
fn assert_share(part: i64, cost: i64, granted: u64, capacity: u64) {
    let exact = i128::from(cost) * i128::from(granted);
    let (floor, rem) = (exact / i128::from(capacity), exact % i128::from(capacity));
    let ceil = floor + i128::from(rem != 0);
    assert!(
        (floor..=ceil).contains(&i128::from(part)),
        "share {part} of {cost} for {granted} of {capacity}: expected {floor} or {ceil}"
    );
}

/// Costs set on a pool token and a dedicated token, leases granted to two tenants,
/// the history flushed: over two whole months, each token costs exactly twice its
/// monthly cost; the dedicated one all to its owner (who leased nothing); the pool
/// pool's (its one token's) to acme and beta by their grants against the pool's
/// capacity, the rest
/// unused; tenants plus unused add up to the total exactly. A worker key sees its
/// tenant's line only; filters select tokens; bad input names its field.
async fn cost_report_adds_up(db: Db, counters: Counters) {
    let env = TestEnv::new(db, counters).await;
    let mut settings = env.settings();
    settings.history.flush_ms = 100;
    let app = env.spawn_with(settings).await;
    let key = app.admin_key.clone();
    configure(&app).await;
    let acme = lease_n(&app, &key, "acme", 3).await;
    let beta = lease_n(&app, &key, "beta", 1).await;
    assert_eq!((acme, beta), (3, 1), "an idle pool grants every call");

    let admin_view = eventually(Duration::from_secs(10), "history flushed", || async {
        let view = report(&app, &key, two_months()).await.unwrap();
        (granted_of(&view, "acme") == 3 && granted_of(&view, "beta") == 1).then_some(view)
    })
    .await;
    assert_eq!(admin_view.currency, "EUR");
    assert_eq!(admin_view.start_time, Some(timestamp(month_start(0))));
    assert_eq!(admin_view.end_time, Some(timestamp(month_start(2))));
    let (pool_cost, dedicated_cost) = (2 * POOL_MONTHLY, 2 * DEDICATED_MONTHLY);
    assert_eq!(admin_view.total_cost_minor, pool_cost + dedicated_cost);
    assert_eq!(cost_of(&admin_view, "solo"), dedicated_cost);
    assert_eq!(granted_of(&admin_view, "solo"), 0);
    let pool_token = admin_view
        .tokens
        .iter()
        .find(|t| t.token_id == "tok-0")
        .unwrap();
    let range_ms = month_start(2) - month_start(0);
    let capacity = (USABLE_PER_WINDOW * range_ms / WINDOW_MS) as u64;
    assert_eq!(
        (pool_token.cost_minor, pool_token.capacity),
        (pool_cost, capacity)
    );
    assert_eq!(pool_token.upstream_id, "up");
    assert_share(cost_of(&admin_view, "acme"), pool_cost, 3, capacity);
    assert_share(cost_of(&admin_view, "beta"), pool_cost, 1, capacity);
    assert!(cost_of(&admin_view, "acme") > 0);
    let tenants: i64 = admin_view.tenants.iter().map(|t| t.cost_minor).sum();
    assert_eq!(
        tenants + admin_view.unused_cost_minor,
        admin_view.total_cost_minor,
        "tenants plus unused add up to the total exactly"
    );
    let shared = &admin_view.pools[0];
    assert_eq!(
        (shared.pool_id.as_str(), shared.cost_minor),
        ("shared", pool_cost)
    );
    assert_eq!(
        shared.unused_cost_minor,
        pool_cost - cost_of(&admin_view, "acme") - cost_of(&admin_view, "beta")
    );

    // A worker key of acme: its line only, and its own total; no pool, no token.
    let worker = app.worker_key(&["acme"]).await;
    let own = report(&app, &worker, two_months()).await.unwrap();
    assert_eq!(own.tenants.len(), 1, "{own:?}");
    assert_eq!(own.tenants[0].tenant_id, "acme");
    assert_eq!(own.total_cost_minor, cost_of(&admin_view, "acme"));
    assert!(own.pools.is_empty() && own.tokens.is_empty());
    assert_eq!(own.unused_cost_minor, 0);

    check_filters(&app, &key, pool_cost).await;
    check_bad_input(&app, &key).await;
}

/// A pool filter counts that pool's tokens only; an upstream filter its tokens.
async fn check_filters(app: &TestApp, key: &str, pool_cost: i64) {
    let pool_only = pb::GetCostReportRequest {
        pool_id: "shared".into(),
        ..two_months()
    };
    let view = report(app, key, pool_only).await.unwrap();
    assert_eq!(view.total_cost_minor, pool_cost);
    assert!(view.tenants.iter().all(|t| t.tenant_id != "solo"));
    let upstream = pb::GetCostReportRequest {
        upstream_id: "up".into(),
        ..two_months()
    };
    let view = report(app, key, upstream).await.unwrap();
    assert_eq!(view.tokens.len(), 2);
    let unknown = pb::GetCostReportRequest {
        pool_id: "nowhere".into(),
        ..two_months()
    };
    let status = report(app, key, unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().starts_with("pool_id"), "{status:?}");
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with(field), "{status:?}");
}

/// A negative or too large cost, a reversed or missing range and a malformed filter
/// are INVALID_ARGUMENT, each message naming its field.
async fn check_bad_input(app: &TestApp, key: &str) {
    let negative = pb::Token {
        id: "cheap".into(),
        upstream_id: "up".into(),
        secret: "s".into(),
        owner: Some(pb::token::Owner::PoolId("shared".into())),
        monthly_cost_minor: -1,
        ..Default::default()
    };
    let request = pb::CreateTokenRequest {
        token: Some(negative),
    };
    let created = app.admin().await.create_token(authed(request, key)).await;
    assert_invalid(created, "token.monthly_cost_minor");
    let huge = pb::Token {
        id: "tok-0".into(),
        monthly_cost_minor: tokenlease::cost::MAX_MONTHLY_COST_MINOR + 1,
        ..Default::default()
    };
    let updated = update_token(app, key, huge, &["monthly_cost_minor"]).await;
    assert_invalid(updated, "token.monthly_cost_minor");

    let mut reversed = two_months();
    std::mem::swap(&mut reversed.start_time, &mut reversed.end_time);
    assert_invalid(report(app, key, reversed).await, "end_time");
    let no_start = pb::GetCostReportRequest {
        start_time: None,
        ..two_months()
    };
    assert_invalid(report(app, key, no_start).await, "start_time");
    let malformed = pb::GetCostReportRequest {
        upstream_id: "Not An Id".into(),
        ..two_months()
    };
    assert_invalid(report(app, key, malformed).await, "upstream_id");
}

/// The embedded store: SQLite and in-process counters.
#[tokio::test]
async fn cost_report_adds_up_on_sqlite() {
    cost_report_adds_up(Db::Sqlite, Counters::Memory).await;
}

/// Postgres and Redis.
#[tokio::test]
async fn cost_report_adds_up_on_postgres() {
    cost_report_adds_up(Db::Postgres, Counters::Redis).await;
}
