//! Setting up a run's service through the admin gRPC API, and the small helpers the
//! workers share with it.

use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Request};

use super::scenario::{Scenario, TenantSpec, parse_access};
use crate::grpc::pb::{self, admin_service_client::AdminServiceClient};

/// (token id, secret, owner) of every token of the scenario.
pub(super) fn tokens_of(s: &Scenario) -> Vec<(String, String, pb::token::Owner)> {
    let mut tokens = vec![];
    for pool in &s.pools {
        for i in 0..pool.tokens {
            tokens.push((
                format!("{}-{i}", pool.id),
                format!("1-{}-{i}-SIM", pool.id),
                pb::token::Owner::PoolId(pool.id.clone()),
            ));
        }
    }
    for tenant in &s.tenants {
        for i in 0..tenant.dedicated_tokens {
            tokens.push((
                format!("{}-own-{i}", tenant.id),
                format!("2-{}-{i}-SIM", tenant.id),
                pb::token::Owner::DedicatedTenantId(tenant.id.clone()),
            ));
        }
    }
    tokens
}

pub(super) fn scaled(s: &Scenario, real_secs: f64) -> Duration {
    Duration::from_secs_f64(real_secs / s.time_scale)
}

pub(super) fn authed<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ASCII"),
    );
    request
}

pub(super) fn millis(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Upstream "sim", pools, pool tokens, tiers, tenants (with no guarantee at first, so
/// that dedicated tokens can exist before their tenant's guarantee counts), dedicated
/// tokens, then each tenant's guarantee. A refusal comes back as the gRPC status.
pub(super) async fn configure(
    s: &Scenario,
    admin: &AdminServiceClient<Channel>,
    key: &str,
    window_ms: u64,
    prefix: &str,
) -> Result<(), tonic::Status> {
    let mut admin = admin.clone();
    let px = |id: &str| format!("{prefix}{id}");
    let upstream = pb::Upstream {
        id: px("sim"),
        limit_per_window: s.upstream.limit,
        window: Some(millis(window_ms)),
        safety_margin: Some(s.upstream.safety_margin),
        block_duration: Some(millis(scaled(s, 600.0).as_millis() as u64)),
        ..Default::default()
    };
    let upstream = Some(upstream);
    admin
        .create_upstream(authed(pb::CreateUpstreamRequest { upstream }, key))
        .await?;
    for pool in &s.pools {
        let pool = Some(pb::Pool {
            id: px(&pool.id),
            upstream_id: px("sim"),
            ..Default::default()
        });
        admin
            .create_pool(authed(pb::CreatePoolRequest { pool }, key))
            .await?;
    }
    let all_tokens = tokens_of(s);
    let (pooled, dedicated): (Vec<_>, Vec<_>) = all_tokens
        .into_iter()
        .partition(|t| matches!(t.2, pb::token::Owner::PoolId(_)));
    create_tokens(&mut admin, key, pooled, prefix).await?;
    for tier in &s.tiers {
        let tier = pb::Tier {
            id: px(&tier.id),
            guaranteed_per_window: tier.guaranteed,
            burst_per_window: tier.burst,
            shared_access: parse_access(&tier.shared_access).expect("validated") as i32,
            weight: tier.weight,
            ..Default::default()
        };
        let created = admin
            .create_tier(authed(
                pb::CreateTierRequest {
                    tier: Some(tier.clone()),
                },
                key,
            ))
            .await;
        if let Err(status) = created {
            if status.code() != Code::AlreadyExists {
                return Err(status);
            }
            // The seeded tiers (premium, standard, basic) take the scenario's values.
            admin
                .update_tier(authed(
                    pb::UpdateTierRequest {
                        tier: Some(tier),
                        update_mask: None,
                    },
                    key,
                ))
                .await?;
        }
    }
    let tenant_of = |t: &TenantSpec, guaranteed: u32| pb::Tenant {
        id: px(&t.id),
        tier_id: px(&t.tier),
        pool_id: px(s.pool_of(t)),
        weight_override: t.weight,
        guaranteed_override: Some(guaranteed),
        ..Default::default()
    };
    for t in &s.tenants {
        let tenant = Some(tenant_of(t, 0));
        admin
            .create_tenant(authed(pb::CreateTenantRequest { tenant }, key))
            .await?;
    }
    create_tokens(&mut admin, key, dedicated, prefix).await?;
    for t in &s.tenants {
        let tenant = Some(tenant_of(t, s.guaranteed(t)));
        admin
            .update_tenant(authed(
                pb::UpdateTenantRequest {
                    tenant,
                    update_mask: None,
                },
                key,
            ))
            .await?;
    }
    Ok(())
}

async fn create_tokens(
    admin: &mut AdminServiceClient<Channel>,
    key: &str,
    tokens: Vec<(String, String, pb::token::Owner)>,
    prefix: &str,
) -> Result<(), tonic::Status> {
    for (id, secret, owner) in tokens {
        let owner = match owner {
            pb::token::Owner::PoolId(p) => pb::token::Owner::PoolId(format!("{prefix}{p}")),
            pb::token::Owner::DedicatedTenantId(t) => {
                pb::token::Owner::DedicatedTenantId(format!("{prefix}{t}"))
            }
        };
        let token = Some(pb::Token {
            id: format!("{prefix}{id}"),
            upstream_id: format!("{prefix}sim"),
            secret,
            owner: Some(owner),
            ..Default::default()
        });
        admin
            .create_token(authed(pb::CreateTokenRequest { token }, key))
            .await?;
    }
    Ok(())
}
