//! One run of a scenario: the emulator with the scenario's limit and (scaled) window,
//! one in-process service on an embedded store, configured through the admin gRPC API,
//! and open-loop workers asking for leases at each tenant's demand rate. Each granted
//! lease is used at once against the emulator and released with the outcome.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng, rngs::StdRng};
use secrecy::ExposeSecret;
use tonic::Code;
use tonic::transport::Channel;

use super::scenario::{Scenario, parse_priority};
use super::setup::{authed, configure, millis, scaled, tokens_of};
use crate::admin::issue_api_key;
use crate::baselinker::{BaseLinkerClient, Outcome};
use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::domain::ApiKeyRole;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::grpc::pb::{
    self, acquire_lease_response::Result as Answer, admin_service_client::AdminServiceClient,
    lease_service_client::LeaseServiceClient,
};
use crate::startup::App;

/// What one tenant saw. Per-window counts are by the window the request was asked in.
#[derive(Clone, Debug, Default)]
pub struct TenantResult {
    pub id: String,
    pub guaranteed: u32,
    /// The share of its demand it should get.
    pub target_share: f64,
    pub asked: u64,
    pub granted: u64,
    pub denied: u64,
    /// Upstream refusals (rate-limited answers) on this tenant's calls.
    pub upstream_refusals: u64,
    /// Waits of granted requests, in real (unscaled) ms.
    pub waits_ms: Vec<u64>,
    pub asked_per_window: Vec<u64>,
    pub granted_per_window: Vec<u64>,
}

/// What the emulator saw for one token.
#[derive(Clone, Debug, Default)]
pub struct TokenResult {
    pub id: String,
    pub accepted: u64,
    pub violations: u64,
    pub accepted_per_window: Vec<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub windows: u32,
    /// The upstream's window, seconds of simulated time (rates are reported per
    /// simulated minute: the upstream's clock).
    pub window_secs: f64,
    /// How much faster than the upstream's clock the run went (`Scenario::time_scale`).
    pub time_scale: f64,
    /// The upstream limit per window per token.
    pub limit: u32,
    /// What the service may lease per window per token (limit minus margin).
    pub usable: u32,
    /// Tokens in the first (planned) pool.
    pub pool_tokens: u32,
    pub tenants: Vec<TenantResult>,
    pub tokens: Vec<TokenResult>,
    /// When the workers started, Unix ms.
    pub start_ms: i64,
    /// Set when the service refused the configuration (e.g. the 80 % rule).
    pub refused: Option<String>,
}

impl RunResult {
    /// How long the run took on the wall clock, seconds.
    pub fn run_secs(&self) -> f64 {
        f64::from(self.windows) * self.window_secs / self.time_scale.max(1.0)
    }
}

/// Where several replicas keep their shared state (when not from the environment).
#[derive(Clone, Debug)]
pub struct SharedStore {
    /// A `postgres://` URL.
    pub database_url: String,
    pub redis_url: String,
}

/// Runs `scenario`, with `pool_tokens` tokens in its first pool when given. Progress
/// lines go to stderr when `progress` is set. Several replicas take their shared store
/// from `DATABASE_URL` and `REDIS_URL`.
pub async fn run(
    scenario: &Scenario,
    pool_tokens: Option<u32>,
    progress: bool,
) -> anyhow::Result<RunResult> {
    run_on(scenario, pool_tokens, progress, None).await
}

/// [`run`], with several replicas on `store` when given.
pub async fn run_on(
    scenario: &Scenario,
    pool_tokens: Option<u32>,
    progress: bool,
    store: Option<SharedStore>,
) -> anyhow::Result<RunResult> {
    let mut scenario = scenario.clone();
    if let Some(k) = pool_tokens {
        scenario.pools[0].tokens = k;
    }
    let dir = std::env::temp_dir().join(format!("tokenlease-sim-{}", uuid::Uuid::new_v4()));
    let result = run_in(&scenario, &dir, progress, store).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    s: &Scenario,
    dir: &std::path::Path,
    progress: bool,
    store: Option<SharedStore>,
) -> anyhow::Result<RunResult> {
    let window_ms = s.scaled_window_ms();
    let tokens = tokens_of(s);
    let emulator = Emulator::start(
        EmulatorConfig {
            limit: s.upstream.limit,
            window: Duration::from_millis(window_ms),
            block: scaled(s, 600.0),
            ..EmulatorConfig::default()
        }
        .with_tokens(tokens.iter().map(|t| t.1.clone())),
    )
    .await
    .context("cannot start the emulator")?;

    let shared = shared_backends(s, store)?;
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse().expect("an address"),
        data_dir: dir.to_path_buf(),
        database_url: shared.as_ref().map(|b| b.database_url.clone()),
        redis_url: shared.as_ref().map(|b| b.redis_url.clone()),
        config_refresh_ms: 200,
        shutdown_grace_ms: 500,
        ..Settings::default()
    };
    // Ids are prefixed per run on a shared database, so runs never collide.
    let prefix = match &shared {
        Some(b) => {
            settings.redis.key_prefix = format!("tlsim-{}", b.run);
            settings.encryption.keys =
                BTreeMap::from([("k1".to_owned(), KeyRing::generate_key_base64())]);
            format!("{}-", b.run)
        }
        None => String::new(),
    };
    settings.metrics.listen = String::new();
    // Short leases: a lease used late wastes part of its slot; ~2 % of the window.
    settings.lease.ttl_ms = (window_ms / 50).max(10);
    settings.lease.use_grace_ms = (window_ms / 20).max(10);
    settings.lease.max_wait_ms = window_ms.max(1_000);
    settings.lease.max_waiters_per_tenant = 100_000;
    let mut replicas = vec![];
    let mut key = String::new();
    for _ in 0..s.replicas {
        let app = App::build(settings.clone())
            .await
            .context("cannot build the service")?;
        if key.is_empty() {
            key = issue_api_key(&app.leaser.config, "simulate", ApiKeyRole::Admin, vec![])
                .await?
                .expose_secret()
                .to_owned();
        }
        let addr = app.local_addr();
        let leaser = app.leaser.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .context("cannot connect to the in-process service")?;
        replicas.push((leaser, channel, stop, server));
    }
    let channels: Vec<Channel> = replicas.iter().map(|r| r.1.clone()).collect();

    let mut result = RunResult {
        windows: s.windows,
        window_secs: s.upstream.window_secs,
        time_scale: s.time_scale,
        limit: s.upstream.limit,
        usable: s.upstream.usable(),
        pool_tokens: s.pools[0].tokens,
        ..RunResult::default()
    };
    match configure(
        s,
        &AdminServiceClient::new(channels[0].clone()),
        &key,
        window_ms,
        &prefix,
    )
    .await
    {
        Ok(()) => {}
        Err(status)
            if matches!(
                status.code(),
                Code::InvalidArgument | Code::FailedPrecondition
            ) =>
        {
            result.refused = Some(status.message().to_owned());
        }
        Err(status) => return Err(anyhow::anyhow!("configuring the service failed: {status}")),
    }
    if result.refused.is_none() {
        for (leaser, ..) in &replicas {
            leaser.config.refresh().await?;
            leaser.allocator.refresh().await?;
        }
        let upstream = emulator.client();
        drive(
            s,
            &mut result,
            &channels,
            &key,
            &prefix,
            &upstream,
            progress,
        )
        .await;
    }
    let stats = emulator.all_stats();
    let start_ms = result.start_ms;
    for (id, secret, _) in &tokens {
        let st = stats.get(secret).cloned().unwrap_or_default();
        let mut per = vec![0u64; s.windows as usize];
        for t in &st.accepted_at_ms {
            let w = ((t - start_ms).max(0) as u64 / window_ms) as usize;
            if let Some(slot) = per.get_mut(w) {
                *slot += 1;
            }
        }
        result.tokens.push(TokenResult {
            id: id.clone(),
            accepted: st.accepted,
            violations: st.violations,
            accepted_per_window: per,
        });
    }
    for (_, _, stop, server) in replicas {
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
    }
    emulator.stop().await;
    Ok(result)
}

/// Postgres and Redis shared by several replicas, and this run's id.
struct SharedBackends {
    database_url: String,
    redis_url: String,
    run: String,
}

/// `None` for one replica (embedded store, in-process counters); with several, the
/// `DATABASE_URL` (Postgres) and `REDIS_URL` they share.
fn shared_backends(
    s: &Scenario,
    store: Option<SharedStore>,
) -> anyhow::Result<Option<SharedBackends>> {
    if s.replicas <= 1 {
        return Ok(None);
    }
    let run = format!("sim{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    if let Some(store) = store {
        return Ok(Some(SharedBackends {
            database_url: store.database_url,
            redis_url: store.redis_url,
            run,
        }));
    }
    let var = |name: &str| {
        std::env::var(name).ok().filter(|v| !v.is_empty()).with_context(|| {
            format!(
                "replicas = {} needs {name}: several replicas share a Postgres database (DATABASE_URL) and Redis (REDIS_URL)",
                s.replicas
            )
        })
    };
    let database_url = var("DATABASE_URL")?;
    if !database_url.starts_with("postgres") {
        anyhow::bail!("replicas > 1 needs a postgres:// DATABASE_URL");
    }
    Ok(Some(SharedBackends {
        database_url,
        redis_url: var("REDIS_URL")?,
        run,
    }))
}

/// One observed request.
struct Record {
    tenant: usize,
    asked_ms: i64,
    granted: bool,
    wait_ms: u64,
    refused_upstream: bool,
}

/// Asks for leases at every demand's rate for the whole run, then fills `result`.
async fn drive(
    s: &Scenario,
    result: &mut RunResult,
    channels: &[Channel],
    key: &str,
    prefix: &str,
    upstream: &BaseLinkerClient,
    progress: bool,
) {
    let window_ms = s.scaled_window_ms();
    let run_ms = window_ms * u64::from(s.windows);
    let start = Instant::now();
    let start_ms = crate::clock::system_now_ms();
    result.start_ms = start_ms;
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let max_wait = millis((window_ms as f64 * s.max_wait_fraction) as u64);
    let mut generators = vec![];
    for (ti, tenant) in s.tenants.iter().enumerate() {
        for (di, d) in tenant.demand.iter().enumerate() {
            if d.per_window <= 0.0 {
                continue;
            }
            let interval = window_ms as f64 / d.per_window;
            let from = d.from_window * window_ms as f64;
            let to =
                (d.to_window.unwrap_or(f64::from(s.windows)) * window_ms as f64).min(run_ms as f64);
            let priority = parse_priority(&d.priority).expect("validated") as i32;
            let (client, key, upstream, records) = (
                // Round robin over the replicas, one per demand stream.
                LeaseServiceClient::new(channels[generators.len() % channels.len()].clone()),
                key.to_owned(),
                upstream.clone(),
                records.clone(),
            );
            let tenant_id = format!("{prefix}{}", tenant.id);
            let mut rng = StdRng::seed_from_u64((ti * 1000 + di) as u64);
            let offset = rng.random_range(0.0..interval);
            generators.push(tokio::spawn(async move {
                let mut calls = vec![];
                let mut at = from + offset;
                while at < to {
                    tokio::time::sleep_until((start + Duration::from_secs_f64(at / 1000.0)).into())
                        .await;
                    let call = one_request(
                        client.clone(),
                        key.clone(),
                        upstream.clone(),
                        tenant_id.clone(),
                        priority,
                        max_wait,
                    );
                    let records = records.clone();
                    calls.push(tokio::spawn(async move {
                        let mut record = call.await;
                        record.tenant = ti;
                        records.lock().expect("not poisoned").push(record);
                    }));
                    at += interval;
                }
                for call in calls {
                    let _ = call.await;
                }
            }));
        }
    }
    if progress {
        let records = records.clone();
        let windows = s.windows;
        generators.push(tokio::spawn(async move {
            // Requests are recorded when answered: a line counts those answered since
            // the previous one (a request asked late in a window may fall in the next).
            let (mut asked_before, mut granted_before) = (0, 0);
            for w in 1..=windows {
                tokio::time::sleep_until(
                    (start + Duration::from_millis(window_ms * u64::from(w))).into(),
                )
                .await;
                let (asked, granted) = {
                    let r = records.lock().expect("not poisoned");
                    (r.len(), r.iter().filter(|r| r.granted).count())
                };
                eprintln!(
                    "[simulate] window {w}/{windows} ({:.1} s): answered {} requests, granted {}",
                    start.elapsed().as_secs_f64(),
                    asked - asked_before,
                    granted - granted_before
                );
                (asked_before, granted_before) = (asked, granted);
            }
        }));
    }
    for g in generators {
        let _ = g.await;
    }
    let records = std::mem::take(&mut *records.lock().expect("not poisoned"));
    let n = s.windows as usize;
    result.tenants = s
        .tenants
        .iter()
        .map(|t| TenantResult {
            id: t.id.clone(),
            guaranteed: s.guaranteed(t),
            target_share: t.target_share.unwrap_or(s.target_share),
            asked_per_window: vec![0; n],
            granted_per_window: vec![0; n],
            ..TenantResult::default()
        })
        .collect();
    for r in records {
        let t = &mut result.tenants[r.tenant];
        let w = (((r.asked_ms - start_ms).max(0) as u64) / window_ms) as usize;
        let w = w.min(n - 1);
        t.asked += 1;
        t.asked_per_window[w] += 1;
        if r.granted {
            t.granted += 1;
            t.granted_per_window[w] += 1;
            t.waits_ms.push((r.wait_ms as f64 * s.time_scale) as u64);
        } else {
            t.denied += 1;
        }
        t.upstream_refusals += u64::from(r.refused_upstream);
    }
}

async fn one_request(
    mut client: LeaseServiceClient<Channel>,
    key: String,
    upstream: BaseLinkerClient,
    tenant_id: String,
    priority: i32,
    max_wait: prost_types::Duration,
) -> Record {
    let asked_ms = crate::clock::system_now_ms();
    let started = Instant::now();
    let mut record = Record {
        tenant: 0,
        asked_ms,
        granted: false,
        wait_ms: 0,
        refused_upstream: false,
    };
    let request = pb::AcquireLeaseRequest {
        tenant_id,
        priority,
        max_wait: Some(max_wait),
        ..Default::default()
    };
    let answer = client.acquire_lease(authed(request, &key)).await;
    let Ok(Some(Answer::Lease(lease))) = answer.map(|a| a.into_inner().result) else {
        return record;
    };
    record.granted = true;
    record.wait_ms = started.elapsed().as_millis() as u64;
    let outcome = upstream
        .call(&lease.token, "getOrderStatusList", &serde_json::json!({}))
        .await;
    let (release, blocked_until) = match outcome {
        Ok(Outcome::Success(_)) => (pb::ReleaseOutcome::Success, None),
        Ok(Outcome::Blocked { until_unix_ms, .. }) => {
            record.refused_upstream = true;
            (
                pb::ReleaseOutcome::UpstreamRateLimited,
                until_unix_ms.map(|ms| prost_types::Timestamp {
                    seconds: ms / 1000,
                    nanos: (ms % 1000) as i32 * 1_000_000,
                }),
            )
        }
        _ => (pb::ReleaseOutcome::UpstreamError, None),
    };
    let request = pb::ReleaseLeaseRequest {
        lease_id: lease.lease_id,
        outcome: release as i32,
        blocked_until,
        ..Default::default()
    };
    let _ = client.release_lease(authed(request, &key)).await;
    record
}
