//! Proto ⇄ domain conversions. Parsing errors name the field path (`tenant.tier_id`),
//! and never echo a secret.

use std::time::Duration;

use secrecy::SecretString;

use super::pb;
use crate::clock::system_now_ms;
use crate::domain::{
    ApiKeyRecord, ApiKeyRole, CapacityReport, Id, InvalidField, Pool, SharedAccess, Tenant, Tier,
    TokenOwner, TokenRecord, Upstream, check_display_name, check_monthly_cost,
};
use crate::lease::Snapshot;

/// Longest upstream token accepted, in bytes.
pub const MAX_SECRET_LEN: usize = 4096;

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A required, non-negative duration.
pub fn parse_duration(
    field: &str,
    value: Option<prost_types::Duration>,
) -> Result<Duration, InvalidField> {
    let value = value.ok_or_else(|| InvalidField::new(field, "is required"))?;
    // Checked by hand: prost's conversion normalises first, which overflows (a panic in
    // debug builds) on seconds = i64::MIN.
    match (u64::try_from(value.seconds), u32::try_from(value.nanos)) {
        (Ok(seconds), Ok(nanos)) if nanos < 1_000_000_000 => Ok(Duration::new(seconds, nanos)),
        _ => Err(InvalidField::new(
            field,
            "must be a non-negative duration (seconds ≥ 0, nanos 0 to 999,999,999)",
        )),
    }
}

/// An optional duration: absent means zero.
pub fn parse_optional_duration(
    field: &str,
    value: Option<prost_types::Duration>,
) -> Result<Duration, InvalidField> {
    value.map_or(Ok(Duration::ZERO), |v| parse_duration(field, Some(v)))
}

/// A message field that must be set.
pub fn required<T>(field: &str, value: Option<T>) -> Result<T, InvalidField> {
    value.ok_or_else(|| InvalidField::new(field, "is required"))
}

pub fn upstream_from_proto(message: Option<pb::Upstream>) -> Result<Upstream, InvalidField> {
    let u = required("upstream", message)?;
    let upstream = Upstream {
        id: Id::parse("upstream.id", &u.id)?,
        display_name: u.display_name,
        limit_per_window: u.limit_per_window,
        window: parse_duration("upstream.window", u.window)?,
        safety_margin: u.safety_margin.unwrap_or(Upstream::DEFAULT_SAFETY_MARGIN),
        block_duration: parse_optional_duration("upstream.block_duration", u.block_duration)?,
        max_block: match u.max_block {
            Some(max) => Some(parse_duration("upstream.max_block", Some(max))?),
            None => None,
        },
        rate_limit_error_codes: u.rate_limit_error_codes,
        create_time_ms: 0,
        update_time_ms: 0,
    };
    upstream.validate()?;
    Ok(upstream)
}

pub fn upstream_to_proto(u: &Upstream) -> pb::Upstream {
    pb::Upstream {
        id: u.id.to_string(),
        display_name: u.display_name.clone(),
        limit_per_window: u.limit_per_window,
        window: Some(duration(u.window)),
        safety_margin: Some(u.safety_margin),
        block_duration: Some(duration(u.block_duration)),
        max_block: u.max_block.map(duration),
        rate_limit_error_codes: u.rate_limit_error_codes.clone(),
        usable_per_window: u.usable_per_window(),
        create_time: Some(timestamp(u.create_time_ms)),
        update_time: Some(timestamp(u.update_time_ms)),
    }
}

/// Checks a plaintext upstream token without ever echoing it.
fn parse_secret(value: String) -> Result<SecretString, InvalidField> {
    if value.len() > MAX_SECRET_LEN {
        return Err(InvalidField::new(
            "token.secret",
            format!("is longer than {MAX_SECRET_LEN} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidField::new(
            "token.secret",
            "contains control characters (a stray newline?)",
        ));
    }
    Ok(SecretString::from(value))
}

/// A token from a request: metadata plus, when given, the plaintext secret to seal.
pub struct TokenInput {
    pub record: TokenRecord,
    pub secret: Option<SecretString>,
}

pub fn token_from_proto(
    message: Option<pb::Token>,
    secret_required: bool,
) -> Result<TokenInput, InvalidField> {
    let t = required("token", message)?;
    check_display_name("token.display_name", &t.display_name)?;
    let owner = match t.owner {
        Some(pb::token::Owner::PoolId(p)) => TokenOwner::Pool(Id::parse("token.pool_id", &p)?),
        Some(pb::token::Owner::DedicatedTenantId(d)) => {
            TokenOwner::Dedicated(Id::parse("token.dedicated_tenant_id", &d)?)
        }
        None => {
            return Err(InvalidField::new(
                "token.owner",
                "set either pool_id or dedicated_tenant_id",
            ));
        }
    };
    let secret = match t.secret.is_empty() {
        true if secret_required => return Err(InvalidField::new("token.secret", "is required")),
        true => None,
        false => Some(parse_secret(t.secret)?),
    };
    check_monthly_cost("token.monthly_cost_minor", t.monthly_cost_minor)?;
    let record = TokenRecord {
        id: Id::parse("token.id", &t.id)?,
        upstream_id: Id::parse("token.upstream_id", &t.upstream_id)?,
        display_name: t.display_name,
        owner,
        disabled: t.disabled,
        key_id: String::new(),
        sealed_secret: Vec::new(),
        monthly_cost_minor: t.monthly_cost_minor,
        create_time_ms: 0,
        update_time_ms: 0,
    };
    Ok(TokenInput { record, secret })
}

pub fn token_to_proto(t: &TokenRecord) -> pb::Token {
    pb::Token {
        id: t.id.to_string(),
        upstream_id: t.upstream_id.to_string(),
        display_name: t.display_name.clone(),
        secret: String::new(),
        owner: Some(match &t.owner {
            TokenOwner::Pool(p) => pb::token::Owner::PoolId(p.to_string()),
            TokenOwner::Dedicated(d) => pb::token::Owner::DedicatedTenantId(d.to_string()),
        }),
        disabled: t.disabled,
        key_id: t.key_id.clone(),
        create_time: Some(timestamp(t.create_time_ms)),
        update_time: Some(timestamp(t.update_time_ms)),
        monthly_cost_minor: t.monthly_cost_minor,
    }
}

pub fn pool_from_proto(message: Option<pb::Pool>) -> Result<Pool, InvalidField> {
    let p = required("pool", message)?;
    check_display_name("pool.display_name", &p.display_name)?;
    Ok(Pool {
        id: Id::parse("pool.id", &p.id)?,
        upstream_id: Id::parse("pool.upstream_id", &p.upstream_id)?,
        display_name: p.display_name,
        create_time_ms: 0,
        update_time_ms: 0,
    })
}

pub fn pool_to_proto(p: &Pool, report: CapacityReport) -> pb::Pool {
    pb::Pool {
        id: p.id.to_string(),
        upstream_id: p.upstream_id.to_string(),
        display_name: p.display_name.clone(),
        capacity_per_window: report.capacity_per_window,
        guaranteed_per_window: report.guaranteed_per_window,
        create_time: Some(timestamp(p.create_time_ms)),
        update_time: Some(timestamp(p.update_time_ms)),
    }
}

fn shared_access_from_proto(value: i32) -> Result<SharedAccess, InvalidField> {
    match pb::SharedAccess::try_from(value) {
        Ok(pb::SharedAccess::Priority) => Ok(SharedAccess::Priority),
        Ok(pb::SharedAccess::Normal) => Ok(SharedAccess::Normal),
        Ok(pb::SharedAccess::Limited) => Ok(SharedAccess::Limited),
        _ => Err(InvalidField::new(
            "tier.shared_access",
            "must be PRIORITY, NORMAL or LIMITED",
        )),
    }
}

pub fn tier_from_proto(message: Option<pb::Tier>) -> Result<Tier, InvalidField> {
    let t = required("tier", message)?;
    let tier = Tier {
        id: Id::parse("tier.id", &t.id)?,
        display_name: t.display_name,
        guaranteed_per_window: t.guaranteed_per_window,
        burst_per_window: t.burst_per_window,
        shared_access: shared_access_from_proto(t.shared_access)?,
        weight: t.weight,
        create_time_ms: 0,
        update_time_ms: 0,
    };
    tier.validate()?;
    Ok(tier)
}

pub fn tier_to_proto(t: &Tier) -> pb::Tier {
    let access = match t.shared_access {
        SharedAccess::Priority => pb::SharedAccess::Priority,
        SharedAccess::Normal => pb::SharedAccess::Normal,
        SharedAccess::Limited => pb::SharedAccess::Limited,
    };
    pb::Tier {
        id: t.id.to_string(),
        display_name: t.display_name.clone(),
        guaranteed_per_window: t.guaranteed_per_window,
        burst_per_window: t.burst_per_window,
        shared_access: access as i32,
        weight: t.weight,
        create_time: Some(timestamp(t.create_time_ms)),
        update_time: Some(timestamp(t.update_time_ms)),
    }
}

pub fn tenant_from_proto(message: Option<pb::Tenant>) -> Result<Tenant, InvalidField> {
    let t = required("tenant", message)?;
    let tenant = Tenant {
        id: Id::parse("tenant.id", &t.id)?,
        display_name: t.display_name,
        tier_id: Id::parse("tenant.tier_id", &t.tier_id)?,
        pool_id: Id::parse_optional("tenant.pool_id", &t.pool_id)?,
        weight_override: t.weight_override,
        guaranteed_override: t.guaranteed_override,
        burst_override: t.burst_override,
        create_time_ms: 0,
        update_time_ms: 0,
    };
    tenant.validate()?;
    Ok(tenant)
}

pub fn tenant_to_proto(t: &Tenant, snapshot: &Snapshot) -> pb::Tenant {
    let mut dedicated: Vec<String> = snapshot
        .tokens
        .values()
        .filter(|tok| tok.record.owner == TokenOwner::Dedicated(t.id.clone()))
        .map(|tok| tok.record.id.to_string())
        .collect();
    dedicated.sort();
    pb::Tenant {
        id: t.id.to_string(),
        display_name: t.display_name.clone(),
        tier_id: t.tier_id.to_string(),
        pool_id: t.pool_id.as_ref().map(Id::to_string).unwrap_or_default(),
        weight_override: t.weight_override,
        guaranteed_override: t.guaranteed_override,
        burst_override: t.burst_override,
        dedicated_token_ids: dedicated,
        create_time: Some(timestamp(t.create_time_ms)),
        update_time: Some(timestamp(t.update_time_ms)),
    }
}

/// An API key from a request; the id and hash are filled in by the caller.
pub fn api_key_from_proto(message: Option<pb::ApiKey>) -> Result<ApiKeyRecord, InvalidField> {
    let k = required("api_key", message)?;
    let role = match pb::ApiKeyRole::try_from(k.role) {
        Ok(pb::ApiKeyRole::Admin) => ApiKeyRole::Admin,
        Ok(pb::ApiKeyRole::Worker) => ApiKeyRole::Worker,
        _ => return Err(InvalidField::new("api_key.role", "must be ADMIN or WORKER")),
    };
    let tenant_ids = k
        .tenant_ids
        .iter()
        .enumerate()
        .map(|(i, t)| Id::parse(&format!("api_key.tenant_ids[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    let record = ApiKeyRecord {
        id: k.id,
        display_name: k.display_name,
        role,
        tenant_ids,
        secret_hash: Vec::new(),
        create_time_ms: system_now_ms(),
    };
    record.validate()?;
    Ok(record)
}

pub fn api_key_to_proto(k: &ApiKeyRecord) -> pb::ApiKey {
    let role = match k.role {
        ApiKeyRole::Admin => pb::ApiKeyRole::Admin,
        ApiKeyRole::Worker => pb::ApiKeyRole::Worker,
    };
    pb::ApiKey {
        id: k.id.clone(),
        display_name: k.display_name.clone(),
        role: role as i32,
        tenant_ids: k.tenant_ids.iter().map(Id::to_string).collect(),
        create_time: Some(timestamp(k.create_time_ms)),
    }
}

pub fn token_state_to_proto(state: crate::domain::TokenState) -> pb::TokenState {
    use crate::domain::TokenState;
    match state {
        TokenState::Active => pb::TokenState::Active,
        TokenState::BreakerOpen => pb::TokenState::BreakerOpen,
        TokenState::BreakerHalfOpen => pb::TokenState::BreakerHalfOpen,
        TokenState::Quarantined => pb::TokenState::Quarantined,
        TokenState::Disabled => pb::TokenState::Disabled,
    }
}
