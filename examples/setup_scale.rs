//! How long a large configuration takes to set up through the admin API, and what it
//! costs the server (issue 12, point 5: "10,000 tenants × 1,000 tokens: setup through
//! the admin API < 60 s, a quota recompute ≤ 50 ms, RSS ≤ 300 MB").
//!
//! Starts `tokenlease serve` as its own process (embedded: SQLite and in-process
//! counters; or Postgres + Redis in a fresh database and key prefix), then creates one
//! upstream, pool and tier, `--tokens` pool tokens, `--tenants` tenants and `--keys`
//! worker keys (key i scoped to tenant i mod tenants), with `--in-flight` admin calls
//! at once. Prints the time of each phase, the rate of the first and the last 1,000
//! writes of each phase, the server's RSS (now and peak), and then the time of one
//! quota recompute and of one full snapshot build on the configuration as stored,
//! measured in this process with the library (memory counters, no demand).
//!
//! ```text
//! cargo build --release --bin tokenlease --example setup_scale
//! target/release/examples/setup_scale --mode sqlite
//! target/release/examples/setup_scale --mode postgres
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use secrecy::SecretString;
use tokenlease::clock::Clock;
use tokenlease::crypto::KeyRing;
use tokenlease::domain::BreakerPolicy;
use tokenlease::events::EventBus;
use tokenlease::grpc::pb::{self, admin_service_client::AdminServiceClient};
use tokenlease::lease::{Allocator, LiveConfig, Snapshot, TokenHealth};
use tokenlease::store::ConfigStore;
use tokenlease::store::counters::{Counters, MemoryCounters};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

/// A fixed master key (base64 of 32 bytes): the measurement opens the tokens itself.
const MASTER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const POSTGRES_BASE_URL: &str = "postgres://postgres@127.0.0.1:5432";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Sqlite,
    Postgres,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum, default_value_t = Mode::Sqlite)]
    mode: Mode,
    #[arg(long, default_value_t = 1_000)]
    tokens: usize,
    #[arg(long, default_value_t = 10_000)]
    tenants: usize,
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// The server binary [default: `tokenlease` beside this example's folder].
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Give up a phase after this many seconds (prints how far it got).
    #[arg(long, default_value_t = 900)]
    max_phase_secs: u64,
}

struct Server {
    child: Child,
    addr: std::net::SocketAddr,
    admin_key: String,
    database_url: String,
    _data_dir: tempfile::TempDir,
    database: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

fn binary(args: &Args) -> PathBuf {
    args.binary.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        me.parent()
            .and_then(|examples| examples.parent())
            .expect("target/<profile>/examples")
            .join("tokenlease")
    })
}

async fn start(args: &Args) -> anyhow::Result<Server> {
    let data_dir = tempfile::tempdir()?;
    let addr = free_address();
    let mut database = None;
    let database_url = match args.mode {
        Mode::Sqlite => format!(
            "sqlite://{}",
            data_dir.path().join("tokenlease.db").display()
        ),
        Mode::Postgres => {
            let name = format!("setup_scale_{}", uuid::Uuid::new_v4().simple());
            let admin = ConfigStore::connect(POSTGRES_ADMIN_URL).await?;
            drop(admin);
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(POSTGRES_ADMIN_URL).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await?;
            pool.close().await;
            database = Some(name.clone());
            format!("{POSTGRES_BASE_URL}/{name}")
        }
    };
    let log = std::fs::File::create(data_dir.path().join("server.log"))?;
    let mut command = Command::new(binary(args));
    command
        .arg("serve")
        .env_remove("REDIS_URL")
        .env("DATABASE_URL", &database_url)
        .env("TOKENLEASE_LISTEN", addr.to_string())
        .env("TOKENLEASE_DATA_DIR", data_dir.path())
        .env("TOKENLEASE_ENCRYPTION__KEYS__K1", MASTER_KEY)
        .env("TOKENLEASE_METRICS__LISTEN", free_address().to_string())
        .env("RUST_LOG", "warn")
        .env("OTEL_SDK_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if args.mode == Mode::Postgres {
        let prefix = format!("setupscale-{}", uuid::Uuid::new_v4().simple());
        command
            .env("REDIS_URL", "redis://127.0.0.1:6379")
            .env("TOKENLEASE_REDIS__KEY_PREFIX", prefix);
    }
    let child = command.spawn()?;
    let mut server = Server {
        child,
        addr,
        admin_key: String::new(),
        database_url,
        _data_dir: data_dir,
        database,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            anyhow::bail!("server exited: {status}");
        }
        // The listener is bound before the bootstrap admin key is written.
        let key_written =
            args.mode == Mode::Postgres || server._data_dir.path().join("admin.key").exists();
        if key_written && connect(&server).await.is_ok() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.admin_key = match args.mode {
        Mode::Sqlite => std::fs::read_to_string(server._data_dir.path().join("admin.key"))?
            .trim()
            .to_owned(),
        Mode::Postgres => {
            let out = Command::new(binary(args))
                .args(["create-api-key", "--name", "setup-scale"])
                .env("DATABASE_URL", &server.database_url)
                .env("REDIS_URL", "redis://127.0.0.1:6379")
                .env("TOKENLEASE_ENCRYPTION__KEYS__K1", MASTER_KEY)
                .env("RUST_LOG", "warn")
                .env("OTEL_SDK_DISABLED", "true")
                .stderr(Stdio::null())
                .output()?;
            anyhow::ensure!(out.status.success(), "create-api-key failed");
            String::from_utf8(out.stdout)?.trim().to_owned()
        }
    };
    Ok(server)
}

async fn connect(server: &Server) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("a URI")
        .tcp_nodelay(true)
        .connect()
        .await
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Clone)]
struct Admin {
    client: AdminServiceClient<Channel>,
    auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Admin {
    fn req<M>(&self, message: M) -> Request<M> {
        let mut r = Request::new(message);
        r.metadata_mut().insert("authorization", self.auth.clone());
        r
    }
}

/// Runs `make(i)` for `0..count` with `in_flight` at once, retrying a call answered
/// UNAVAILABLE (the server's database timeout ran out while the write queued; the
/// write may have landed, so ALREADY_EXISTS counts as done), and prints the rates.
async fn phase<F, Fut>(name: &str, count: usize, in_flight: usize, max: Duration, make: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let retries = std::sync::atomic::AtomicU64::new(0);
    let make = |i: usize| {
        let (make, retries) = (&make, &retries);
        async move {
            loop {
                match make(i).await {
                    Err(s) if s.code() == Code::Unavailable => {
                        retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => return other,
                }
            }
        }
    };
    let started = Instant::now();
    let mut done_at = Vec::with_capacity(count);
    let mut latencies = Vec::with_capacity(count);
    let mut calls = futures::stream::iter(0..count)
        .map(|i| {
            let call = make(i);
            async move {
                let t = Instant::now();
                let r = call.await;
                (r, t.elapsed())
            }
        })
        .buffer_unordered(in_flight.max(1));
    let mut last_report = Instant::now();
    while let Some((result, latency)) = calls.next().await {
        if let Err(status) = result {
            panic!("{name}: {status}");
        }
        done_at.push(started.elapsed());
        latencies.push(latency);
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  … {name}: {} of {count} after {:.0?}",
                done_at.len(),
                started.elapsed()
            );
        }
        if started.elapsed() > max {
            eprintln!("  {name}: gave up after {:.0?}", started.elapsed());
            break;
        }
    }
    let total = started.elapsed().as_secs_f64();
    let n = done_at.len();
    let rate = |from: usize, to: usize| {
        let t0 = if from == 0 {
            0.0
        } else {
            done_at[from - 1].as_secs_f64()
        };
        (to - from) as f64 / (done_at[to - 1].as_secs_f64() - t0).max(1e-9)
    };
    let window = n.min(1_000);
    latencies.sort();
    let pct = |p: f64| latencies[((n as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3;
    if n > 0 {
        println!(
            "{name:<8} {n:>6} in {total:>7.2} s = {:>7.0}/s; first {window}: {:>7.0}/s, last {window}: {:>7.0}/s; latency p50 {:.1} ms p99 {:.1} ms; {} retried",
            n as f64 / total,
            rate(0, window),
            rate(n - window, n),
            pct(0.5),
            pct(0.99),
            retries.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
}

fn ok<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(s),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = start(&args).await?;
    let admin = Admin {
        client: AdminServiceClient::new(connect(&server).await?),
        auth: format!("Bearer {}", server.admin_key).parse()?,
    };
    let max = Duration::from_secs(args.max_phase_secs);
    println!(
        "{:?}: {} tokens, {} tenants, {} worker keys, {} calls in flight",
        args.mode, args.tokens, args.tenants, args.keys, args.in_flight
    );
    let mut c = admin.client.clone();
    // A key made by `create-api-key` reaches the server's snapshot at its next poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(status) = c
        .list_tiers(admin.req(pb::ListTiersRequest::default()))
        .await
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the admin key never worked: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.create_upstream(admin.req(pb::CreateUpstreamRequest {
        upstream: Some(pb::Upstream {
            id: "scale".into(),
            limit_per_window: 100,
            window: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            safety_margin: Some(0.05),
            ..Default::default()
        }),
    }))
    .await?;
    c.create_pool(admin.req(pb::CreatePoolRequest {
        pool: Some(pb::Pool {
            id: "p".into(),
            upstream_id: "scale".into(),
            ..Default::default()
        }),
    }))
    .await?;
    // 10,000 × 5 guaranteed = 50,000 ≤ 80 % of 1,000 × 95.
    c.create_tier(admin.req(pb::CreateTierRequest {
        tier: Some(pb::Tier {
            id: "scale".into(),
            guaranteed_per_window: 5,
            burst_per_window: 50,
            shared_access: pb::SharedAccess::Normal as i32,
            weight: 1.0,
            ..Default::default()
        }),
    }))
    .await?;
    let all = Instant::now();
    phase("tokens", args.tokens, args.in_flight, max, |i| {
        let (mut c, r) = (
            admin.client.clone(),
            admin.req(pb::CreateTokenRequest {
                token: Some(pb::Token {
                    id: format!("tok-{i}"),
                    upstream_id: "scale".into(),
                    secret: format!("secret-{i}"),
                    owner: Some(pb::token::Owner::PoolId("p".into())),
                    ..Default::default()
                }),
            }),
        );
        async move { ok(c.create_token(r).await) }
    })
    .await;
    phase("tenants", args.tenants, args.in_flight, max, |i| {
        let (mut c, r) = (
            admin.client.clone(),
            admin.req(pb::CreateTenantRequest {
                tenant: Some(pb::Tenant {
                    id: format!("t{i}"),
                    tier_id: "scale".into(),
                    pool_id: "p".into(),
                    ..Default::default()
                }),
            }),
        );
        async move { ok(c.create_tenant(r).await) }
    })
    .await;
    let tenants = args.tenants.max(1);
    phase("keys", args.keys, args.in_flight, max, |i| {
        let (mut c, r) = (
            admin.client.clone(),
            admin.req(pb::CreateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    display_name: format!("worker {i}"),
                    role: pb::ApiKeyRole::Worker as i32,
                    tenant_ids: vec![format!("t{}", i % tenants)],
                    ..Default::default()
                }),
            }),
        );
        async move { ok(c.create_api_key(r).await) }
    })
    .await;
    let setup = all.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, peak) = rss_kib(server.child.id());
    println!(
        "setup (tokens + tenants + keys): {setup:.1} s; server RSS {} MB, peak {} MB",
        rss / 1024,
        peak / 1024
    );

    // One write more, timed alone on the full configuration.
    let mut single = Vec::new();
    for i in 0..20 {
        let t = Instant::now();
        ok(c.create_tenant(admin.req(pb::CreateTenantRequest {
            tenant: Some(pb::Tenant {
                id: format!("extra{i}"),
                tier_id: "scale".into(),
                pool_id: "p".into(),
                ..Default::default()
            }),
        }))
        .await)?;
        single.push(t.elapsed().as_secs_f64() * 1e3);
    }
    single.sort_by(f64::total_cmp);
    println!(
        "one tenant create alone, on the full configuration: median {:.1} ms (of 20)",
        single[10]
    );

    measure_in_process(&server.database_url).await?;
    drop(admin);
    let database = server.database.clone();
    drop(server);
    if let Some(name) = database {
        let pool = sqlx::AnyPool::connect(POSTGRES_ADMIN_URL).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&pool)
        .await?;
    }
    Ok(())
}

/// The full load, the full snapshot build and a quota recompute, in this process.
async fn measure_in_process(url: &str) -> anyhow::Result<()> {
    let store = ConfigStore::connect(url).await?;
    let mut keys = BTreeMap::new();
    keys.insert("k1".to_owned(), SecretString::from(MASTER_KEY));
    let ring = Arc::new(KeyRing::from_base64(&keys, "k1")?);
    let t = Instant::now();
    let stored = store.load().await?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let snapshot = Snapshot::build(stored, &ring);
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(snapshot);
    println!("full load {load_ms:.0} ms; full snapshot build {build_ms:.0} ms");
    let live = LiveConfig::load(store, ring).await?;
    let events = EventBus::new("setup-scale");
    let health = TokenHealth::new(BreakerPolicy::default(), events.clone());
    let counters = Counters::Memory(MemoryCounters::new(Clock::System));
    let allocator = Allocator::new(live, counters, events, health);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        allocator.refresh().await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "quota recompute: median {:.1} ms, min {:.1} ms (of 5)",
        times[2], times[0]
    );
    Ok(())
}
