//! AcquireLease + ReleaseLease throughput and latency over real gRPC (loopback TCP),
//! against a release build with local Redis. Not a test: it prints numbers.
//!
//!     cargo bench --bench lease_pairs                 # both modes, 15 s each
//!     cargo bench --bench lease_pairs -- saturated 30 # one mode, 30 s
//!
//! Setup: 1,000 tenants in one pool of 100 tokens, 64 callers in flight, each calling
//! AcquireLease for a random tenant and, when granted, ReleaseLease(SUCCESS).
//! - `decision`: limits so high nothing is denied, so the decision path is measured;
//! - `saturated`: 100 per 60 s per token (95 usable), so after the first 9,500 grants
//!   nearly every call is denied (pacing off, so that the warm-up takes every slot).
//!
//! `PACE_BURST_PERCENT=100` (or any 1–100) overrides `lease.pace_burst_percent`.
//!
//! The server and this load generator run in one process and share the machine's cores
//! (2 on the reference machine): the numbers are for both together. The generator is a
//! compiled tonic client doing nothing but calls and a latency record per call.
//! Needs Redis at `REDIS_URL` (default redis://127.0.0.1:6379); keys are removed after.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use tokenlease::admin::issue_api_key;
use tokenlease::config::Settings;
use tokenlease::crypto::KeyRing;
use tokenlease::domain::ApiKeyRole;
use tokenlease::grpc::pb::{
    self, admin_service_client::AdminServiceClient, lease_service_client::LeaseServiceClient,
};
use tokenlease::startup::App;
use tonic::Request;
use tonic::transport::Channel;

const TENANTS: usize = 1_000;
const TOKENS: usize = 100;
const CALLERS: usize = 64;

fn authed<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

struct Run {
    pairs: u64,
    grants: u64,
    denials: u64,
    latencies_us: Vec<u64>,
    elapsed: Duration,
}

async fn setup(admin: &mut AdminServiceClient<Channel>, key: &str, limit: u32) {
    let upstream = pb::Upstream {
        id: "bench".into(),
        limit_per_window: limit,
        window: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        safety_margin: 0.05,
        ..Default::default()
    };
    admin
        .create_upstream(authed(
            pb::CreateUpstreamRequest {
                upstream: Some(upstream),
            },
            key,
        ))
        .await
        .unwrap();
    let pool = pb::Pool {
        id: "p".into(),
        upstream_id: "bench".into(),
        ..Default::default()
    };
    admin
        .create_pool(authed(pb::CreatePoolRequest { pool: Some(pool) }, key))
        .await
        .unwrap();
    for i in 0..TOKENS {
        let token = pb::Token {
            id: format!("tok-{i}"),
            upstream_id: "bench".into(),
            secret: format!("bench-secret-{i}"),
            owner: Some(pb::token::Owner::PoolId("p".into())),
            ..Default::default()
        };
        admin
            .create_token(authed(pb::CreateTokenRequest { token: Some(token) }, key))
            .await
            .unwrap();
    }
    let tier = pb::Tier {
        id: "bench".into(),
        burst_per_window: 1_000_000,
        shared_access: 2,
        weight: 1.0,
        ..Default::default()
    };
    admin
        .create_tier(authed(pb::CreateTierRequest { tier: Some(tier) }, key))
        .await
        .unwrap();
    for i in 0..TENANTS {
        let tenant = pb::Tenant {
            id: format!("t{i}"),
            tier_id: "bench".into(),
            pool_id: "p".into(),
            ..Default::default()
        };
        admin
            .create_tenant(authed(
                pb::CreateTenantRequest {
                    tenant: Some(tenant),
                },
                key,
            ))
            .await
            .unwrap();
    }
}

async fn caller(
    mut client: LeaseServiceClient<Channel>,
    key: String,
    until: Instant,
    seed: u64,
) -> Run {
    use pb::acquire_lease_response::Result as Answer;
    let mut run = Run {
        pairs: 0,
        grants: 0,
        denials: 0,
        latencies_us: Vec::with_capacity(100_000),
        elapsed: Duration::ZERO,
    };
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    while Instant::now() < until {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let tenant = format!("t{}", (state >> 33) as usize % TENANTS);
        let started = Instant::now();
        let req = pb::AcquireLeaseRequest {
            tenant_id: tenant,
            ..Default::default()
        };
        let answer = client
            .acquire_lease(authed(req, &key))
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap();
        match answer {
            Answer::Lease(lease) => {
                let release = pb::ReleaseLeaseRequest {
                    lease_id: lease.lease_id,
                    outcome: pb::ReleaseOutcome::Success as i32,
                    ..Default::default()
                };
                client.release_lease(authed(release, &key)).await.unwrap();
                run.grants += 1;
            }
            Answer::Denial(_) => run.denials += 1,
        }
        run.pairs += 1;
        run.latencies_us.push(started.elapsed().as_micros() as u64);
    }
    run
}

async fn measure(mode: &str, seconds: u64) {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("tlbench-{}", uuid::Uuid::new_v4().simple());
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        redis_url: Some(redis_url.clone()),
        ..Settings::default()
    };
    settings.redis.key_prefix = prefix.clone();
    settings.metrics.listen = "127.0.0.1:0".into();
    // `saturated` needs the warm-up to take every slot, so no pacing there; otherwise
    // the service's default, or PACE_BURST_PERCENT to compare.
    if mode == "saturated" {
        settings.lease.pace_burst_percent = 100;
    }
    if let Some(percent) = std::env::var("PACE_BURST_PERCENT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        settings.lease.pace_burst_percent = percent;
    }
    settings.encryption.keys = BTreeMap::from([("k1".to_string(), KeyRing::generate_key_base64())]);
    let app = App::build(settings).await.unwrap();
    let addr = app.local_addr();
    let key = issue_api_key(&app.leaser.config, "bench", ApiKeyRole::Admin, vec![])
        .await
        .unwrap();
    let key = key.expose_secret().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let limit = if mode == "decision" { 1_000_000 } else { 100 };
    setup(&mut AdminServiceClient::new(channel.clone()), &key, limit).await;

    // Warm up, then measure. Saturated: warm up long enough to use all 9,500 slots of the
    // 100 tokens (about 4 s at the decision path's rate here), so the measurement sees
    // denials only.
    let warm_up = if mode == "decision" { 3 } else { 8 };
    let warm_until = Instant::now() + Duration::from_secs(warm_up);
    let warm = (0..CALLERS).map(|i| {
        tokio::spawn(caller(
            LeaseServiceClient::new(channel.clone()),
            key.clone(),
            warm_until,
            i as u64,
        ))
    });
    futures::future::join_all(warm).await;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks = (0..CALLERS).map(|i| {
        tokio::spawn(caller(
            LeaseServiceClient::new(channel.clone()),
            key.clone(),
            until,
            1000 + i as u64,
        ))
    });
    let runs: Vec<Run> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let elapsed = started.elapsed();
    report(mode, merge(runs, elapsed));

    let _ = stop.send(());
    let _ = server.await;
    delete_prefix(&redis_url, &prefix);
}

fn merge(runs: Vec<Run>, elapsed: Duration) -> Run {
    let mut all = Run {
        pairs: 0,
        grants: 0,
        denials: 0,
        latencies_us: vec![],
        elapsed,
    };
    for run in runs {
        all.pairs += run.pairs;
        all.grants += run.grants;
        all.denials += run.denials;
        all.latencies_us.extend(run.latencies_us);
    }
    all.latencies_us.sort_unstable();
    all
}

fn report(mode: &str, run: Run) {
    let pct = |p: f64| {
        run.latencies_us
            [((run.latencies_us.len() as f64 * p) as usize).min(run.latencies_us.len() - 1)]
            as f64
            / 1000.0
    };
    let secs = run.elapsed.as_secs_f64();
    println!(
        "{mode:>9}: {:>8.0} calls/s ({:.0} granted pairs/s, {:.0} denials/s) | latency per call p50 {:.2} ms, p99 {:.2} ms | {} calls in {:.1} s, {} callers, {} tenants, {} tokens",
        run.pairs as f64 / secs,
        run.grants as f64 / secs,
        run.denials as f64 / secs,
        pct(0.50),
        pct(0.99),
        run.pairs,
        secs,
        CALLERS,
        TENANTS,
        TOKENS,
    );
}

fn delete_prefix(url: &str, prefix: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without
    // it, where a 30 s load run in a debug build would only waste CI time.
    if !std::env::args().any(|a| a == "--bench") {
        println!("lease_pairs: run with `cargo bench --bench lease_pairs`");
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let modes: Vec<&str> = match args.first().map(String::as_str) {
        Some(m @ ("decision" | "saturated")) => vec![m],
        _ => vec!["decision", "saturated"],
    };
    let seconds = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(15);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "lease_pairs: {} core(s) shared by server and load generator",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for mode in modes {
        runtime.block_on(measure(mode, seconds));
    }
}
