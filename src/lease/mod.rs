//! The lease use cases: acquire and release over the configuration snapshot and the
//! lease counters. No gRPC types here; `grpc/lease_api.rs` converts.

mod live;
mod snapshot;
mod usage;

pub use live::LiveConfig;
pub use snapshot::{LiveToken, Route, Snapshot};
pub use usage::{TenantUsage, TokenUsage, Usage};

use std::time::Duration;

use secrecy::SecretString;

use crate::auth::Caller;
use crate::domain::{Id, InvalidField, Priority, Tenant, TokenOwner, Upstream};
use crate::error::ServiceError;
use crate::store::counters::{
    AcquireOutcome, AcquireRequest, Counters, DenyReason, Grant, LeaseKey, ReleaseOutcome,
    ReleaseResult,
};

/// The largest `cost` one lease may cover.
pub const MAX_COST: u32 = 100;

/// A validated AcquireLease.
#[derive(Debug, Clone)]
pub struct AcquireInput {
    pub tenant_id: Id,
    pub upstream_id: Option<Id>,
    pub priority: Priority,
    pub cost: u32,
    pub max_wait: Duration,
}

/// Why no lease was granted, for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialReason {
    TenantQuota,
    NoTokenCapacity,
    NoUsableToken,
    WaitTimeout,
}

/// A granted lease, with the opened secret.
pub struct LeaseGrant {
    pub lease_id: String,
    pub token_id: Id,
    pub secret: SecretString,
    pub expires_at_ms: i64,
    pub valid_for: Duration,
    pub tenant_remaining: u32,
    pub tenant_limit: u32,
    pub token_remaining: u32,
    pub window: Duration,
}

/// The answer to AcquireLease.
pub enum AcquireAnswer {
    Granted(LeaseGrant),
    Denied {
        reason: DenialReason,
        retry_after: Option<Duration>,
        message: String,
    },
}

/// The lease service: cheap to clone.
#[derive(Clone)]
pub struct Leaser {
    pub config: LiveConfig,
    pub counters: Counters,
    pub lease_ttl: Duration,
    pub max_wait: Duration,
}

/// One acquire decision prepared from the snapshot.
struct Plan {
    request: AcquireRequest,
    upstream: Upstream,
}

impl Leaser {
    /// Grants a lease or explains why not, waiting up to `max_wait` for a slot.
    #[tracing::instrument(name = "lease.acquire", skip_all, fields(tenant_id = %input.tenant_id, token_id))]
    pub async fn acquire(
        &self,
        caller: &Caller,
        input: AcquireInput,
    ) -> Result<AcquireAnswer, ServiceError> {
        caller.require_tenant(&input.tenant_id)?;
        let deadline = tokio::time::Instant::now() + input.max_wait.min(self.max_wait);
        let mut waited = false;
        loop {
            let snapshot = self.config.current();
            let plan = match self.plan(&snapshot, &input)? {
                Ok(plan) => plan,
                Err(denial) => return Ok(denial),
            };
            match self.counters.acquire(&plan.request).await? {
                AcquireOutcome::Granted(grant) => {
                    crate::metrics::lease_granted(&snapshot, &plan.request, &grant);
                    tracing::Span::current().record("token_id", grant.token_id.as_str());
                    return Ok(self.granted(&snapshot, &plan, grant));
                }
                AcquireOutcome::Denied(denied) => {
                    let now = tokio::time::Instant::now();
                    // Wait only when the slot frees before the deadline; otherwise answer now.
                    if now + denied.retry_after <= deadline && !denied.retry_after.is_zero() {
                        waited = true;
                        let _waiting = crate::metrics::waiting(&input.tenant_id);
                        tokio::time::sleep(denied.retry_after).await;
                        continue;
                    }
                    let reason = match denied.reason {
                        _ if waited => DenialReason::WaitTimeout,
                        DenyReason::TenantQuota => DenialReason::TenantQuota,
                        DenyReason::NoTokenCapacity => DenialReason::NoTokenCapacity,
                    };
                    crate::metrics::acquire_denied(&snapshot, &plan.request, reason, denied.reason);
                    let message = denial_message(denied.reason, &input.tenant_id, &plan);
                    return Ok(AcquireAnswer::Denied {
                        reason,
                        retry_after: Some(denied.retry_after),
                        message,
                    });
                }
            }
        }
    }

    /// Picks the upstream and candidate tokens; `Ok(Err(_))` is a denial without trying.
    #[tracing::instrument(name = "lease.plan", skip_all, fields(tenant_id = %input.tenant_id))]
    fn plan(
        &self,
        snapshot: &Snapshot,
        input: &AcquireInput,
    ) -> Result<Result<Plan, AcquireAnswer>, ServiceError> {
        let tenant = snapshot.tenants.get(&input.tenant_id).ok_or_else(|| {
            ServiceError::NotFound(format!(
                "tenant_id: tenant '{}' does not exist",
                input.tenant_id
            ))
        })?;
        let routes = snapshot
            .routes
            .get(&tenant.id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let route = match &input.upstream_id {
            Some(up) => {
                let upstream = snapshot.upstreams.get(up);
                if upstream.is_none() {
                    return Err(ServiceError::NotFound(format!(
                        "upstream_id: upstream '{up}' does not exist"
                    )));
                }
                routes.iter().find(|r| &r.upstream_id == up)
            }
            None if routes.len() > 1 => {
                let names: Vec<&str> = routes.iter().map(|r| r.upstream_id.as_str()).collect();
                return Err(InvalidField::new(
                    "upstream_id",
                    format!(
                        "is required: tenant '{}' has tokens on upstreams {}",
                        tenant.id,
                        names.join(", ")
                    ),
                )
                .into());
            }
            None => routes.first(),
        };
        let Some(route) = route else {
            return Ok(Err(no_usable_token(tenant, snapshot)));
        };
        let upstream = snapshot.upstreams[&route.upstream_id].clone();
        let tenant_limit = snapshot.tenant_limit(tenant);
        check_cost(input.cost, tenant, tenant_limit, &upstream)?;
        Ok(Ok(Plan {
            request: AcquireRequest {
                upstream_id: upstream.id.clone(),
                nonce: LeaseKey::new_nonce(),
                tenant_id: tenant.id.clone(),
                tenant_limit,
                token_limit: upstream.usable_per_window(),
                window: upstream.window,
                lease_ttl: self.lease_ttl,
                cost: input.cost,
                dedicated: route.dedicated.clone(),
                pooled: route.pooled.clone(),
            },
            upstream,
        }))
    }

    fn granted(&self, snapshot: &Snapshot, plan: &Plan, grant: Grant) -> AcquireAnswer {
        let secret = snapshot
            .tokens
            .get(&grant.token_id)
            .and_then(|t| t.secret.as_ref().ok())
            .cloned()
            .unwrap_or_else(|| SecretString::from(String::new()));
        let req = &plan.request;
        let key = LeaseKey {
            upstream_id: req.upstream_id.clone(),
            tenant_id: req.tenant_id.clone(),
            token_id: grant.token_id.clone(),
            nonce: req.nonce.clone(),
        };
        AcquireAnswer::Granted(LeaseGrant {
            lease_id: key.to_lease_id(),
            token_id: grant.token_id,
            secret,
            expires_at_ms: grant.expires_at_ms,
            valid_for: Duration::from_millis((grant.expires_at_ms - grant.now_ms).max(0) as u64),
            tenant_remaining: req.tenant_limit.saturating_sub(grant.tenant_used),
            tenant_limit: req.tenant_limit,
            token_remaining: req.token_limit.saturating_sub(grant.token_used),
            window: plan.upstream.window,
        })
    }

    /// Records how a lease went. Returns whether it had been released already.
    #[tracing::instrument(name = "lease.release", skip_all, fields(outcome = outcome.as_str()))]
    pub async fn release(
        &self,
        caller: &Caller,
        lease_id: &str,
        outcome: ReleaseOutcome,
    ) -> Result<bool, ServiceError> {
        if lease_id.is_empty() {
            return Err(InvalidField::new("lease_id", "is required").into());
        }
        let not_found = || {
            ServiceError::NotFound(format!(
                "lease_id: lease '{}' is unknown or expired",
                truncate(lease_id)
            ))
        };
        let key = LeaseKey::parse(lease_id).ok_or_else(not_found)?;
        caller.require_tenant(&key.tenant_id)?;
        match self.counters.release(&key, outcome).await? {
            ReleaseResult::Released => Ok(false),
            ReleaseResult::AlreadyReleased => Ok(true),
            ReleaseResult::NotFound => Err(not_found()),
            ReleaseResult::Conflict { previous } => Err(ServiceError::FailedPrecondition(format!(
                "outcome: lease was already released as '{}'; a lease has one outcome",
                previous.as_str()
            ))),
        }
    }
}

fn check_cost(
    cost: u32,
    tenant: &Tenant,
    tenant_limit: u32,
    upstream: &Upstream,
) -> Result<(), ServiceError> {
    let token_limit = upstream.usable_per_window();
    if cost > token_limit {
        return Err(InvalidField::new(
            "cost",
            format!(
                "is {cost}, more than a token of '{}' may serve per window ({token_limit})",
                upstream.id
            ),
        )
        .into());
    }
    if cost > tenant_limit {
        return Err(ServiceError::FailedPrecondition(format!(
            "cost: {cost} is more than tenant '{}' may use per window ({tenant_limit}); raise its tier or overrides",
            tenant.id
        )));
    }
    Ok(())
}

fn no_usable_token(tenant: &Tenant, snapshot: &Snapshot) -> AcquireAnswer {
    let reachable: Vec<&LiveToken> = snapshot
        .tokens
        .values()
        .filter(|t| match &t.record.owner {
            TokenOwner::Dedicated(owner) => owner == &tenant.id,
            TokenOwner::Pool(pool) => tenant.pool_id.as_ref() == Some(pool),
        })
        .collect();
    let sealed_shut = reachable
        .iter()
        .filter(|t| !t.record.disabled && t.secret.is_err())
        .count();
    let detail = if reachable.is_empty() {
        "no token is dedicated to it or in its pool".to_owned()
    } else if sealed_shut > 0 {
        format!(
            "{sealed_shut} of its tokens cannot be decrypted with the configured master keys (see the server log)"
        )
    } else {
        "all of its tokens are disabled".to_owned()
    };
    crate::metrics::lease_denied(&tenant.id, DenialReason::NoUsableToken);
    AcquireAnswer::Denied {
        reason: DenialReason::NoUsableToken,
        retry_after: None,
        message: format!("tenant '{}' has no usable token: {detail}", tenant.id),
    }
}

fn denial_message(reason: DenyReason, tenant: &Id, plan: &Plan) -> String {
    match reason {
        DenyReason::TenantQuota => format!(
            "tenant '{tenant}' has used its quota of {} requests per {:?}",
            plan.request.tenant_limit, plan.upstream.window
        ),
        DenyReason::NoTokenCapacity => format!(
            "every token tenant '{tenant}' may use is at its limit of {} requests per {:?}",
            plan.request.token_limit, plan.upstream.window
        ),
    }
}

/// Echoes at most 80 characters of caller input in messages.
fn truncate(value: &str) -> String {
    value.chars().take(80).collect()
}
