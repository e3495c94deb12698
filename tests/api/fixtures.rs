//! Configuration built through the admin API, shared by the tests.

use tokenlease::grpc::pb::{self, admin_service_client::AdminServiceClient};
use tonic::transport::Channel;

use super::helpers::{Counters, Db, TestApp, TestEnv, authed, millis};

/// A test upstream "up" with `limit` per `window_ms` and 5 % margin, a pool "shared"
/// holding `tokens` tokens ("tok-0", …), and a tier "flex" (`guaranteed` + `burst`).
pub struct PoolSetup {
    pub limit: u32,
    pub window_ms: u64,
    pub tokens: usize,
    pub guaranteed: u32,
    pub burst: u32,
}

impl Default for PoolSetup {
    fn default() -> Self {
        Self {
            limit: 100,
            window_ms: 10_000,
            tokens: 1,
            guaranteed: 0,
            burst: 10_000,
        }
    }
}

/// The plaintext secret of test token `i`.
pub fn token_secret(i: usize) -> String {
    format!("1-23-SECRET-TOKEN-{i}-{}", "x".repeat(8))
}

impl PoolSetup {
    pub async fn create(&self, admin: &mut AdminServiceClient<Channel>, key: &str) {
        let upstream = pb::Upstream {
            id: "up".into(),
            display_name: "test upstream".into(),
            limit_per_window: self.limit,
            window: Some(millis(self.window_ms)),
            safety_margin: Some(0.05),
            block_duration: Some(millis(60_000)),
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
            id: "shared".into(),
            upstream_id: "up".into(),
            ..Default::default()
        };
        admin
            .create_pool(authed(pb::CreatePoolRequest { pool: Some(pool) }, key))
            .await
            .unwrap();
        for i in 0..self.tokens {
            let token = pb::Token {
                id: format!("tok-{i}"),
                upstream_id: "up".into(),
                secret: token_secret(i),
                owner: Some(pb::token::Owner::PoolId("shared".into())),
                ..Default::default()
            };
            admin
                .create_token(authed(pb::CreateTokenRequest { token: Some(token) }, key))
                .await
                .unwrap();
        }
        let tier = pb::Tier {
            id: "flex".into(),
            guaranteed_per_window: self.guaranteed,
            burst_per_window: self.burst,
            shared_access: pb::SharedAccess::Normal as i32,
            weight: 1.0,
            ..Default::default()
        };
        admin
            .create_tier(authed(pb::CreateTierRequest { tier: Some(tier) }, key))
            .await
            .unwrap();
    }
}

/// A fresh environment and replica with `pool` configured and `tenants` in it (tier
/// "flex"); keep the environment alive as long as the replica.
pub async fn app_with(
    db: Db,
    counters: Counters,
    pool: PoolSetup,
    tenants: &[&str],
) -> (TestEnv, TestApp) {
    let env = TestEnv::new(db, counters).await;
    let app = env.spawn().await;
    let mut admin = app.admin().await;
    pool.create(&mut admin, &app.admin_key).await;
    for t in tenants {
        create_tenant(&mut admin, &app.admin_key, t, "flex").await;
    }
    (env, app)
}

/// AdminService.GetUsage for `tenant`.
pub async fn tenant_usage(
    app: &TestApp,
    key: &str,
    tenant: &str,
) -> Result<pb::GetUsageResponse, tonic::Status> {
    let request = pb::GetUsageRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    let answer = app.admin().await.get_usage(authed(request, key)).await;
    answer.map(tonic::Response::into_inner)
}

/// AdminService.GetUsage for `tenant` through `admin` (a server in another process).
pub async fn tenant_usage_on(
    admin: &mut AdminServiceClient<Channel>,
    key: &str,
    tenant: &str,
) -> pb::GetUsageResponse {
    let request = pb::GetUsageRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    let answer = admin.get_usage(authed(request, key)).await;
    answer.expect("GetUsage answered").into_inner()
}

/// Creates tenant `id` in tier `tier` and pool "shared".
pub async fn create_tenant(
    admin: &mut AdminServiceClient<Channel>,
    key: &str,
    id: &str,
    tier: &str,
) {
    let tenant = pb::Tenant {
        id: id.into(),
        tier_id: tier.into(),
        pool_id: "shared".into(),
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
