//! The forecast's token count asked again of `simulate::plan`: the pool's busiest
//! observed bucket becomes a scenario (one pool, each tenant with its tier's guarantee,
//! burst, weight and own tokens, asking at its observed rate scaled to the demand the
//! forecast projects), and the plan runs it through real leases against the emulator
//! at a compressed time scale, trying token counts from the 80 % rule's lower bound up.
//!
//! The two answers may differ by one: the plan is satisfied when each tenant gets
//! `target_share` (95 %) of its demand and its guarantee, the forecast asks for all of
//! the demand; and the plan's open-loop workers ask at random moments, the forecast
//! counts an even spread.

use super::{Forecast, PoolDemand, tokens_for};
use crate::simulate::scenario::{DemandSpec, PoolSpec, TenantSpec, TierSpec, UpstreamSpec};
use crate::simulate::{self, Scenario};

/// How much faster than the upstream's clock the plan's runs go: BaseLinker's minute
/// lasts one second, so a plan of a few token counts takes seconds.
pub const TIME_SCALE: f64 = 60.0;
/// Windows each run lasts.
pub const WINDOWS: u32 = 5;

/// The pool's busiest bucket (the latest among equals) and its demand, per window.
pub fn busiest_bucket(pool: &PoolDemand) -> Option<(i64, f64)> {
    (pool.per_bucket().into_iter()).max_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
}

/// A scenario of `pool` asking what its tenants asked in the bucket starting at
/// `bucket_start_ms` (each capped at its guarantee + burst), times `scale`.
pub fn scenario(pool: &PoolDemand, bucket_start_ms: i64, scale: f64) -> Scenario {
    // One tier per tenant, named by position (a tenant id of the longest allowed
    // length leaves no room for a prefix).
    let tiers = (pool.tenants.iter().enumerate())
        .map(|(i, t)| TierSpec {
            id: format!("tier-{i}"),
            guaranteed: t.guaranteed,
            burst: t.burst,
            shared_access: t.shared_access.as_str().to_owned(),
            weight: t.weight,
        })
        .collect();
    let tenants = (pool.tenants.iter().enumerate())
        .map(|(i, t)| {
            let asked = t.asked.get(&bucket_start_ms).copied().unwrap_or(0);
            let rate = asked as f64 * pool.window_ms as f64 / pool.bucket_ms as f64;
            let ceiling = f64::from(t.guaranteed) + f64::from(t.burst);
            TenantSpec {
                id: t.id.clone(),
                tier: format!("tier-{i}"),
                pool: None,
                dedicated_tokens: t.dedicated_tokens,
                weight: None,
                guaranteed: None,
                target_share: None,
                demand: vec![DemandSpec {
                    priority: "normal".into(),
                    per_window: (rate.min(ceiling) * scale).min(ceiling),
                    from_window: 0.0,
                    to_window: None,
                }],
            }
        })
        .collect();
    Scenario {
        time_scale: TIME_SCALE,
        windows: WINDOWS,
        target_share: 0.95,
        replicas: 1,
        max_wait_fraction: 0.25,
        upstream: UpstreamSpec {
            limit: pool.limit_per_window,
            window_secs: pool.window_ms as f64 / 1000.0,
            safety_margin: pool.safety_margin,
        },
        pools: vec![PoolSpec {
            id: pool.pool.clone(),
            tokens: pool.tokens.max(1),
        }],
        tiers,
        tenants,
        plan_max_tokens: 20,
    }
}

/// What the forecast and the plan each say the pool needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossCheck {
    /// The forecast's rule ([`tokens_for`]) on the scenario's demand.
    pub forecast_tokens: u32,
    /// The plan's answer; `None` if no count up to 20 met its goals.
    pub plan_tokens: Option<u32>,
}

impl CrossCheck {
    /// Whether they agree within one token.
    pub fn agrees(&self) -> bool {
        self.plan_tokens
            .is_some_and(|p| p.abs_diff(self.forecast_tokens) <= 1)
    }
}

/// Runs the plan on the pool's busiest bucket scaled to the forecast's peak then (or
/// its peak now when the pool does not fill); `None` without history.
pub async fn cross_check(
    pool: &PoolDemand,
    forecast: &Forecast,
) -> anyhow::Result<Option<CrossCheck>> {
    let Some((bucket, observed)) = busiest_bucket(pool) else {
        return Ok(None);
    };
    let target = forecast.peak_then.or(forecast.peak_now).unwrap_or(observed);
    let scale = if observed > 0.0 {
        target / observed
    } else {
        1.0
    };
    let scenario = scenario(pool, bucket, scale);
    scenario.validate()?;
    let drawn: f64 = (scenario.tenants.iter())
        .zip(&pool.tenants)
        .map(|(spec, t)| {
            let own = f64::from(t.dedicated_tokens) * f64::from(pool.usable_per_token);
            (spec.demand[0].per_window - own).max(0.0)
        })
        .sum();
    let forecast_tokens = tokens_for(drawn, pool.drawn_guarantees(), pool.usable_per_token);
    let answer = simulate::plan(&scenario, false).await?;
    Ok(Some(CrossCheck {
        forecast_tokens,
        plan_tokens: answer.tokens,
    }))
}
