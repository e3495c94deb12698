//! A release that comes after its lease's expiry (a slow upstream call that started at
//! the last instant) is accepted for as long as the lease's slot is counted, expiry +
//! the upstream window: its outcome still reaches the token's breaker and quarantine,
//! and it frees nothing. After that the lease is unknown. On both counter backends.

use std::time::Duration;

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tonic::Code;

use super::fixtures::{PoolSetup, app_with};
use super::helpers::{Counters, Db, TestApp, authed, now_ms, ts_ms};

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $name() { super::$name(super::Db::Sqlite, super::Counters::Memory).await } )* }
        mod redis { $( #[tokio::test] async fn $name() { super::$name(super::Db::Postgres, super::Counters::Redis).await } )* }
    };
}

for_each_backend!(late_release_is_recorded_until_the_slot_frees);

const WINDOW_MS: u64 = 2_000;

async fn acquire(app: &TestApp, key: &str) -> Answer {
    let req = pb::AcquireLeaseRequest {
        tenant_id: "acme".into(),
        ..Default::default()
    };
    let answer = app.lease().await.acquire_lease(authed(req, key)).await;
    answer.unwrap().into_inner().result.unwrap()
}

async fn release(
    app: &TestApp,
    key: &str,
    lease: &pb::Lease,
    outcome: pb::ReleaseOutcome,
) -> Result<bool, tonic::Status> {
    let req = pb::ReleaseLeaseRequest {
        lease_id: lease.lease_id.clone(),
        outcome: outcome as i32,
        ..Default::default()
    };
    let answer = app.lease().await.release_lease(authed(req, key)).await;
    answer.map(|r| r.into_inner().already_released)
}

/// Sleeps until `ms` (Unix ms, this machine's clock, which the service shares).
async fn sleep_until(ms: i64) {
    let ahead = (ms - now_ms()).max(0);
    tokio::time::sleep(Duration::from_millis(ahead as u64)).await;
}

fn lease(answer: Answer, what: &str) -> pb::Lease {
    match answer {
        Answer::Lease(lease) => lease,
        Answer::Denial(denial) => panic!("{what}: denied {denial:?}"),
    }
}

/// One token serving 1 request per 2 s window (limit 2, 5 % margin), leases of 1 s and
/// no grace (the test settings).
async fn late_release_is_recorded_until_the_slot_frees(db: Db, counters: Counters) {
    let pool = PoolSetup {
        limit: 2,
        window_ms: WINDOW_MS,
        ..PoolSetup::default()
    };
    let (_env, app) = app_with(db, counters, pool, &["acme"]).await;
    let key = app.admin_key.clone();
    use pb::ReleaseOutcome::{NotUsed, UpstreamRateLimited};

    // A "not used" that comes late frees nothing: the call may have run until expiry.
    let first = lease(acquire(&app, &key).await, "first lease");
    let expiry = ts_ms(first.expires_at.as_ref().unwrap());
    sleep_until(expiry + 200).await;
    let late = release(&app, &key, &first, NotUsed).await;
    assert_eq!(
        late.map_err(|s| s.code()),
        Ok(false),
        "accepted after expiry"
    );
    let Answer::Denial(full) = acquire(&app, &key).await else {
        panic!("a late NOT_USED gave the slot back")
    };
    assert_eq!(full.reason(), pb::DenialReason::NoTokenCapacity);
    let again = release(&app, &key, &first, NotUsed).await;
    assert_eq!(
        again.map_err(|s| s.code()),
        Ok(true),
        "repeat is idempotent"
    );

    // Past expiry + W the slot is free and the lease unknown.
    sleep_until(expiry + WINDOW_MS as i64 + 100).await;
    let gone = release(&app, &key, &first, NotUsed).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(gone.message().contains("window"), "{}", gone.message());

    // A late rate-limit report still quarantines the token.
    let second = lease(acquire(&app, &key).await, "lease after the window");
    let expiry = ts_ms(second.expires_at.as_ref().unwrap());
    sleep_until(expiry + 200).await;
    let late = release(&app, &key, &second, UpstreamRateLimited).await;
    assert_eq!(
        late.map_err(|s| s.code()),
        Ok(false),
        "accepted after expiry"
    );
    sleep_until(expiry + WINDOW_MS as i64 + 100).await;
    let Answer::Denial(quarantined) = acquire(&app, &key).await else {
        panic!("the late rate-limit report was lost: the token was leased again")
    };
    assert_eq!(
        quarantined.reason(),
        pb::DenialReason::NoUsableToken,
        "{quarantined:?}"
    );
}
