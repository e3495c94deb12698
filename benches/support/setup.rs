//! What a configuration measures, created through the admin API as an operator would:
//! one upstream, P pools sharing its N tokens evenly (token i in pool i mod P), one
//! tier, M tenants spread round-robin over the pools (tenant i in pool i mod P). The
//! pool ids come from the caller (`backend`: on a cluster they are chosen by the
//! master their counters land on). Tokens and tenants are
//! created with a bounded number of admin calls in flight, and the time it takes is
//! reported (every admin write reloads the replica's configuration, so it grows with
//! what exists already).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokenlease::grpc::pb::{self, admin_service_client::AdminServiceClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::authed;
use super::cli::{Config, Limits};
use super::server::Server;

/// The one upstream; its pools' counters spaces are `{bench.<pool>}`.
pub const UPSTREAM: &str = "bench";
const TIER: &str = "bench";

/// The id of tenant `i`; the load generator picks among `0..tenants`.
pub fn tenant_id(i: usize) -> String {
    format!("t{i}")
}

/// How the setup went.
pub struct Setup {
    pub tokens_took: Duration,
    pub tenants_took: Duration,
    /// Tenants created; fewer than asked when the budget ran out.
    pub tenants_created: usize,
    /// Admin calls retried after UNAVAILABLE (a write that waited past the database
    /// timeout).
    pub retries: u64,
}

impl Setup {
    pub fn tenants_per_sec(&self) -> f64 {
        self.tenants_created as f64 / self.tenants_took.as_secs_f64().max(1e-9)
    }
}

/// Creates the configuration's upstream, the pools `pools`, the tokens, the tier and
/// the tenants. Stops creating tenants once `budget` has passed (the caller checks
/// `tenants_created`).
pub async fn create(
    server: &Server,
    config: &Config,
    pools: &[String],
    in_flight: usize,
    budget: Option<Duration>,
) -> Setup {
    assert!(!pools.is_empty(), "at least one pool");
    let admin = Admin::connect(server).await;
    let pool_of = |i: usize| pools[i % pools.len()].clone();
    let started = Instant::now();
    admin.upstream(config.limits).await;
    for pool in pools {
        admin.pool(pool).await;
    }
    admin.tier().await;
    create_many(config.tokens, in_flight, None, |i| {
        admin.token(i, pool_of(i))
    })
    .await;
    let tokens_took = started.elapsed();
    let started = Instant::now();
    let deadline = budget.map(|budget| started + budget);
    let tenants_created = create_many(config.tenants, in_flight, deadline, |i| {
        admin.tenant(i, pool_of(i))
    })
    .await;
    Setup {
        tokens_took,
        tenants_took: started.elapsed(),
        tenants_created,
        retries: admin.retries.load(Ordering::Relaxed),
    }
}

/// Runs `create(0..count)` with at most `in_flight` at once, printing progress every
/// 10 s; stops starting new ones after `deadline`. Returns how many were created.
async fn create_many<F, Fut>(
    count: usize,
    in_flight: usize,
    deadline: Option<Instant>,
    create: F,
) -> usize
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let started = Instant::now();
    let mut last_report = started;
    let mut calls = futures::stream::iter(0..count)
        .map(create)
        .buffer_unordered(in_flight.max(1));
    let mut created = 0;
    while calls.next().await.is_some() {
        created += 1;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!("    … {created} of {count} created after {secs:.0} s");
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            break;
        }
    }
    created
}

/// An admin client with the bootstrap key; retries a call answered UNAVAILABLE.
struct Admin {
    client: AdminServiceClient<Channel>,
    auth: MetadataValue<Ascii>,
    retries: AtomicU64,
}

impl Admin {
    async fn connect(server: &Server) -> Admin {
        let channel = server.channel().await.expect("an admin connection");
        Admin {
            client: AdminServiceClient::new(channel),
            auth: super::bearer(&server.admin_key),
            retries: AtomicU64::new(0),
        }
    }

    /// Sends `message` with `send`, retrying on UNAVAILABLE (the database did not answer
    /// within the server's `database_timeout_ms`, which concurrent SQLite writes exceed)
    /// for up to a minute; the write may have landed, so ALREADY_EXISTS after a retry is
    /// success. Panics on any other error: the bench cannot go on without its setup.
    async fn call<M, R, Fut>(
        &self,
        what: &str,
        message: M,
        send: impl Fn(AdminServiceClient<Channel>, Request<M>) -> Fut,
    ) where
        M: Clone,
        Fut: Future<Output = Result<R, Status>>,
    {
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut retried = false;
        loop {
            let request = authed(message.clone(), &self.auth);
            match send(self.client.clone(), request).await {
                Ok(_) => return,
                Err(status) if status.code() == Code::AlreadyExists && retried => return,
                Err(status) if status.code() == Code::Unavailable && Instant::now() < give_up => {
                    retried = true;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("{what}: {status}"),
            }
        }
    }

    /// The upstream: a 60 s window, 5 % margin, a limit per `limits`.
    async fn upstream(&self, limits: Limits) {
        let upstream = pb::Upstream {
            id: UPSTREAM.into(),
            limit_per_window: match limits {
                Limits::Decision => 1_000_000,
                Limits::Saturated => 100,
            },
            window: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            safety_margin: Some(0.05),
            ..Default::default()
        };
        let message = pb::CreateUpstreamRequest {
            upstream: Some(upstream),
        };
        self.call("CreateUpstream", message, |mut c, r| async move {
            c.create_upstream(r).await
        })
        .await;
    }

    async fn pool(&self, id: &str) {
        let pool = pb::Pool {
            id: id.into(),
            upstream_id: UPSTREAM.into(),
            ..Default::default()
        };
        let message = pb::CreatePoolRequest { pool: Some(pool) };
        self.call("CreatePool", message, |mut c, r| async move {
            c.create_pool(r).await
        })
        .await;
    }

    /// One tier with a burst so high that the fair share never binds.
    async fn tier(&self) {
        let tier = pb::Tier {
            id: TIER.into(),
            burst_per_window: 1_000_000,
            shared_access: pb::SharedAccess::Normal as i32,
            weight: 1.0,
            ..Default::default()
        };
        let message = pb::CreateTierRequest { tier: Some(tier) };
        self.call("CreateTier", message, |mut c, r| async move {
            c.create_tier(r).await
        })
        .await;
    }

    async fn token(&self, i: usize, pool: String) {
        let token = pb::Token {
            id: format!("tok-{i}"),
            upstream_id: UPSTREAM.into(),
            secret: format!("bench-secret-{i}"),
            owner: Some(pb::token::Owner::PoolId(pool)),
            ..Default::default()
        };
        let message = pb::CreateTokenRequest { token: Some(token) };
        self.call("CreateToken", message, |mut c, r| async move {
            c.create_token(r).await
        })
        .await;
    }

    async fn tenant(&self, i: usize, pool: String) {
        let tenant = pb::Tenant {
            id: tenant_id(i),
            tier_id: TIER.into(),
            pool_id: pool,
            ..Default::default()
        };
        let message = pb::CreateTenantRequest {
            tenant: Some(tenant),
        };
        self.call("CreateTenant", message, |mut c, r| async move {
            c.create_tenant(r).await
        })
        .await;
    }
}
