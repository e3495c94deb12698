//! Property 12, a replica that dies: two replicas on one Postgres and one Redis; one is
//! killed while holding leases it never releases, and the other sees exactly those slots
//! held until expiry + window, then free.

use std::time::Duration;

use tokenlease::grpc::pb::{self, acquire_lease_response::Result as Answer};
use tonic::transport::Channel;

use super::fixtures::{PoolSetup, create_tenant};
use super::helpers::{
    Counters, Db, Span, TestApp, TestEnv, authed, ms, now_ms, run_watching_panics, timed, ts_ms,
};

const WINDOW_MS: i64 = 2_000;
/// Leases replica A holds when it dies, of the token's 9 usable slots.
const HELD_BY_A: usize = 5;
const USABLE: usize = 9;

async fn acquire(app: &TestApp, key: &str) -> Answer {
    let req = pb::AcquireLeaseRequest {
        tenant_id: "acme".into(),
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

/// (grant instant, expiry) of a lease, on the service's clock (Redis TIME).
fn instants(lease: &pb::Lease) -> (i64, i64) {
    let expires = ts_ms(lease.expires_at.as_ref().expect("expires_at"));
    (
        expires - ms(lease.valid_for.as_ref().expect("valid_for")),
        expires,
    )
}

/// A denial for lack of token capacity, answered within `span`: asserts that its
/// retry-after points at `frees_at`.
fn no_capacity_until(answer: Answer, span: Span, frees_at: i64, what: &str) {
    match answer {
        Answer::Denial(d) => {
            assert_eq!(
                d.reason,
                pb::DenialReason::NoTokenCapacity as i32,
                "{what}: {d:?}"
            );
            let retry_after = ms(d.retry_after.as_ref().expect("retry_after"));
            span.assert_points_at(retry_after, frees_at, what);
        }
        Answer::Lease(lease) => panic!("{what}: granted over the limit: {lease:?}"),
    }
}

async fn token_used(app: &TestApp, key: &str) -> u32 {
    let req = pb::GetUsageRequest {
        token_id: "tok-0".into(),
        ..Default::default()
    };
    let usage = app.admin().await.get_usage(authed(req, key)).await;
    usage.expect("GetUsage answered").into_inner().tokens[0].used_in_window
}

/// Property 12, a replica that dies leaks no capacity (and over-grants none): replica A
/// grants 5 of the 9 usable slots of a token (10 per 2 s window, 5 % margin; 1 s lease
/// TTL) and is killed without releasing them; replica B grants exactly the 4 left, and
/// its denials point at A's first expiry + window; polling B, each of A's 5 slots is
/// granted again no earlier than its lease's expiry + window + 1 ms (no over-grant),
/// all 5 before B's own slots free (no leak), each grant leaving exactly A's slots freed
/// by then less those taken; then B is denied until its own first slot frees. GetUsage
/// on B counts 9 before and after. Nothing panics.
#[test]
fn a_dead_replicas_leases_hold_until_expiry_plus_window_then_free() {
    run_watching_panics("dead-replica", dead_replica());
}

async fn dead_replica() {
    let env = TestEnv::new(Db::Postgres, Counters::Redis).await;
    let a = env.spawn().await;
    let b = env.spawn().await;
    let pool = PoolSetup {
        limit: 10,
        window_ms: WINDOW_MS as u64,
        ..Default::default()
    };
    let mut admin = a.admin().await;
    pool.create(&mut admin, &a.admin_key).await;
    create_tenant(&mut admin, &a.admin_key, "acme", "flex").await;
    b.leaser.config.refresh().await.expect("refresh B");
    let key = b.admin_key.clone();

    // A grants 5 leases and dies holding them.
    let mut a_expiries = Vec::new();
    for i in 0..HELD_BY_A {
        match acquire(&a, &a.admin_key).await {
            Answer::Lease(lease) => a_expiries.push(instants(&lease).1),
            Answer::Denial(d) => panic!("A's lease {i} denied: {d:?}"),
        }
    }
    a_expiries.sort_unstable();
    let a_addr = a.addr;
    a.kill().await;
    let connect = Channel::from_shared(format!("http://{a_addr}")).unwrap();
    assert!(connect.connect().await.is_err(), "replica A is gone");
    // A fixed pause, not a wait for a condition: B's own leases come 1.5 s later, so
    // their slots free 1.5 s after A's and cannot be mistaken for A's coming back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // B: exactly the slots A did not take; A's stay held, until A's first expiry + W.
    let mut b_expiries = Vec::new();
    for i in 0..USABLE - HELD_BY_A {
        match acquire(&b, &key).await {
            Answer::Lease(lease) => b_expiries.push(instants(&lease).1),
            Answer::Denial(d) => panic!("B's lease {i} denied: {d:?}"),
        }
    }
    b_expiries.sort_unstable();
    let (answer, span) = timed(acquire(&b, &key)).await;
    let first_a_free = a_expiries[0] + WINDOW_MS + 1;
    no_capacity_until(
        answer,
        span,
        first_a_free,
        "B, token full: A's first slot frees",
    );
    assert_eq!(token_used(&b, &key).await as usize, USABLE);

    // A's slots come back one by one at expiry + W, and only A's, all of them before
    // B's own first slot frees.
    let b_first_free = b_expiries[0] + WINDOW_MS + 1;
    let mut regained = Vec::new();
    while regained.len() < HELD_BY_A {
        assert!(
            now_ms() < b_first_free,
            "only {} of A's {HELD_BY_A} slots came back before B's own freed: leaked",
            regained.len()
        );
        match acquire(&b, &key).await {
            Answer::Lease(lease) => {
                let granted = instants(&lease).0;
                regained.push(granted);
                // At the grant instant (the store's clock), exactly A's slots whose
                // expiry + W has passed are free, less those granted again already.
                let freed = a_expiries
                    .iter()
                    .filter(|&&e| e + WINDOW_MS < granted)
                    .count();
                assert!(
                    regained.len() <= freed,
                    "granted at {granted} with only {freed} of A's slots free: over-granted"
                );
                let remaining = lease.quota.as_ref().expect("quota").token_remaining;
                assert_eq!(remaining as usize, freed - regained.len(), "at {granted}");
                continue; // take every slot that is free now
            }
            Answer::Denial(d) => {
                assert_eq!(d.reason, pb::DenialReason::NoTokenCapacity as i32, "{d:?}")
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, (&granted, &expiry)) in regained.iter().zip(&a_expiries).enumerate() {
        let frees = expiry + WINDOW_MS + 1;
        assert!(
            granted >= frees,
            "A's slot {i} granted again at {granted}, before it freed at {frees}"
        );
    }
    let (answer, span) = timed(acquire(&b, &key)).await;
    assert!(span.after < b_first_free, "B's own slots still held");
    no_capacity_until(
        answer,
        span,
        b_first_free,
        "B, full again: its first slot frees",
    );
    assert_eq!(token_used(&b, &key).await as usize, USABLE);
    b.stop().await;
}
