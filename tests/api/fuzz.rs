//! Issue 11: a fuzzer against a running server, on both backends. Random well-formed
//! requests with extreme values (ids with NUL, 10 KB strings, whole API keys where ids
//! go, i64 extremes in timestamps and durations, unknown enum numbers) and random raw
//! bytes to several methods. Every answer must be a status a person can act on: never
//! INTERNAL or UNKNOWN; the server stays healthy and still grants a valid lease.
//!
//! `.ci/run` runs `FUZZ_REQUESTS` (default 300) requests per backend; the seed is
//! printed and can be replayed with `FUZZ_SEED`. The longer run's result is in
//! BENCHMARKS.md.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenlease::grpc::pb;
use tonic::{Code, Status};

use super::fixtures::{PoolSetup, app_with};
use super::helpers::{Counters, Db, TestApp, authed, lease_request, run_watching_panics};
use super::hostile::raw_call;

fn requests() -> usize {
    std::env::var("FUZZ_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random)
}

/// A string a careless or hostile caller might send where an id goes.
fn nasty_string(rng: &mut StdRng, key: &str) -> String {
    match rng.random_range(0..9) {
        0 => String::new(),
        1 => "acme".into(),
        2 => "tok-0".into(),
        3 => "a\0b".into(),
        4 => "x".repeat(rng.random_range(65..10_000)),
        5 => key.to_owned(),
        6 => "up.acme.tok-0.0123456789abcdef0123456789abcdef".into(),
        7 => (0..rng.random_range(1..40))
            .map(|_| rng.random::<char>())
            .collect(),
        _ => format!("t-{}", rng.random::<u16>()),
    }
}

fn nasty_i64(rng: &mut StdRng) -> i64 {
    match rng.random_range(0..6) {
        0 => i64::MIN,
        1 => i64::MAX,
        2 => 0,
        3 => -rng.random_range(1..1_000_000),
        4 => rng.random_range(0..4_000_000_000),
        _ => rng.random(),
    }
}

fn nasty_duration(rng: &mut StdRng) -> Option<prost_types::Duration> {
    rng.random_bool(0.8).then(|| prost_types::Duration {
        seconds: nasty_i64(rng),
        nanos: rng.random(),
    })
}

fn nasty_timestamp(rng: &mut StdRng) -> Option<prost_types::Timestamp> {
    rng.random_bool(0.8).then(|| prost_types::Timestamp {
        seconds: nasty_i64(rng),
        nanos: rng.random(),
    })
}

fn nasty_enum(rng: &mut StdRng) -> i32 {
    match rng.random_range(0..3) {
        0 => rng.random_range(0..6),
        1 => -1,
        _ => rng.random(),
    }
}

/// One random call; its status code (OK as `Code::Ok`).
async fn one_call(app: &TestApp, rng: &mut StdRng) -> Code {
    let key = app.admin_key.as_str();
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    let mut lease = app.lease().await;
    let mut admin = app.admin().await;
    match rng.random_range(0..9) {
        8 => {
            let path = *[
                "/tokenlease.v1.LeaseService/AcquireLease",
                "/tokenlease.v1.LeaseService/ReleaseLease",
                "/tokenlease.v1.AdminService/CreateTenant",
                "/tokenlease.v1.AdminService/UpdateUpstream",
                "/tokenlease.v1.AdminService/GetUsage",
            ]
            .get(rng.random_range(0..5))
            .unwrap();
            let body: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            raw_call(app, path, body)
                .await
                .err()
                .map_or(Code::Ok, |s| s.code())
        }
        0 => {
            let request = pb::AcquireLeaseRequest {
                tenant_id: nasty_string(rng, key),
                upstream_id: nasty_string(rng, key),
                priority: nasty_enum(rng),
                request_kind: nasty_enum(rng),
                cost: rng.random_range(0..3u32).pow(rng.random_range(0..20)),
                max_wait: nasty_duration(rng).map(|mut d| {
                    d.seconds = d.seconds.rem_euclid(2); // a test must not wait long
                    d
                }),
            };
            code(lease.acquire_lease(authed(request, key)).await.map(|_| ()))
        }
        1 => {
            let request = pb::ReleaseLeaseRequest {
                lease_id: nasty_string(rng, key),
                outcome: nasty_enum(rng),
                blocked_until: nasty_timestamp(rng),
                upstream_latency: nasty_duration(rng),
            };
            code(lease.release_lease(authed(request, key)).await.map(|_| ()))
        }
        2 => {
            let request = pb::WatchEventsRequest {
                tenant_ids: (0..rng.random_range(0..4))
                    .map(|_| nasty_string(rng, key))
                    .collect(),
                token_ids: (0..rng.random_range(0..4))
                    .map(|_| nasty_string(rng, key))
                    .collect(),
            };
            code(lease.watch_events(authed(request, key)).await.map(|_| ()))
        }
        3 => {
            let tenant = pb::Tenant {
                id: nasty_string(rng, key),
                display_name: nasty_string(rng, key),
                tier_id: nasty_string(rng, key),
                pool_id: nasty_string(rng, key),
                weight_override: rng.random_bool(0.5).then(|| f64::from_bits(rng.random())),
                guaranteed_override: rng.random_bool(0.5).then(|| rng.random()),
                burst_override: rng.random_bool(0.5).then(|| rng.random()),
                ..Default::default()
            };
            let request = pb::CreateTenantRequest {
                tenant: Some(tenant),
            };
            code(admin.create_tenant(authed(request, key)).await.map(|_| ()))
        }
        4 => {
            let upstream = pb::Upstream {
                id: nasty_string(rng, key),
                display_name: nasty_string(rng, key),
                limit_per_window: rng.random(),
                window: nasty_duration(rng),
                safety_margin: Some(f64::from_bits(rng.random())),
                block_duration: nasty_duration(rng),
                ..Default::default()
            };
            let request = pb::UpdateUpstreamRequest {
                upstream: Some(upstream),
                update_mask: None,
            };
            code(
                admin
                    .update_upstream(authed(request, key))
                    .await
                    .map(|_| ()),
            )
        }
        5 => {
            let request = pb::GetUsageRequest {
                tenant_id: nasty_string(rng, key),
                token_id: nasty_string(rng, key),
            };
            code(admin.get_usage(authed(request, key)).await.map(|_| ()))
        }
        6 => {
            let request = pb::ResetTokenHealthRequest {
                token_id: nasty_string(rng, key),
            };
            code(
                admin
                    .reset_token_health(authed(request, key))
                    .await
                    .map(|_| ()),
            )
        }
        _ => {
            let request = pb::GetApiKeyRequest {
                id: nasty_string(rng, key),
            };
            code(admin.get_api_key(authed(request, key)).await.map(|_| ()))
        }
    }
}

/// Runs the fuzzer against one backend and returns the codes it saw.
async fn fuzz(db: Db, counters: Counters, seed: u64) -> BTreeMap<String, usize> {
    let (_env, app) = app_with(db, counters, PoolSetup::default(), &["acme"]).await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut codes = BTreeMap::new();
    for i in 0..requests() {
        let answer = tokio::time::timeout(Duration::from_secs(10), one_call(&app, &mut rng)).await;
        let code = answer.unwrap_or_else(|_| panic!("seed {seed}, request {i}: no answer in 10 s"));
        // CANCELLED is what a client sees when a server task panicked.
        assert!(
            !matches!(code, Code::Internal | Code::Unknown | Code::Cancelled),
            "seed {seed}, request {i}: {code:?}"
        );
        *codes.entry(format!("{code:?}")).or_insert(0) += 1;
    }
    // Still serving, and still right.
    let request = lease_request("acme", &app.admin_key);
    let answer = app.lease().await.acquire_lease(request).await;
    let answer = answer
        .expect("a valid call after the fuzzing")
        .into_inner()
        .result;
    assert!(
        matches!(answer, Some(pb::acquire_lease_response::Result::Lease(_))),
        "seed {seed}: {answer:?}"
    );
    codes
}

/// The fuzzer on the embedded backends (SQLite, in-process counters) and on Postgres
/// with Redis; a panic in any server task fails it.
#[test]
fn fuzzed_requests_get_actionable_statuses() {
    let seed = seed();
    eprintln!("fuzz seed {seed} (replay: FUZZ_SEED={seed})");
    run_watching_panics("fuzz", async move {
        let backends = [
            (Db::Sqlite, Counters::Memory),
            (Db::Postgres, Counters::Redis),
        ];
        for (db, counters) in backends {
            let started = std::time::Instant::now();
            let codes = fuzz(db, counters, seed).await;
            eprintln!(
                "{db:?}/{counters:?}: {} requests in {:?}, codes {codes:?}, RSS {} kB",
                requests(),
                started.elapsed(),
                rss_kb()
            );
        }
    });
}

/// This process's resident memory (server and client together), kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}
