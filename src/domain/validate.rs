//! Rules that span several objects, checked on the whole configuration after every
//! admin write (inside the write's transaction, so a refused write changes nothing).
//!
//! The 80 % rule (PRODUCT.md property 2, seed §1 `initializeQuotas`): in every shared
//! pool, the guarantees its tenants draw from the pool may not exceed 80 % of the pool's
//! usable capacity. A tenant draws from its pool whatever part of its guarantee its own
//! dedicated tokens do not cover. Tenants without a pool are served by dedicated tokens
//! only and are not subject to the rule (the seed's dedicated strategy reserves 90 %).

use std::collections::HashMap;

use super::{Id, InvalidField, Pool, Tenant, Tier, TokenOwner, TokenRecord, Upstream};

/// The share of a pool's usable capacity that guarantees may take.
pub const MAX_GUARANTEED_SHARE: f64 = 0.8;

/// The whole configuration, as read in one transaction.
#[derive(Debug, Clone, Default)]
pub struct ConfigView {
    pub upstreams: Vec<Upstream>,
    pub tokens: Vec<TokenRecord>,
    pub pools: Vec<Pool>,
    pub tiers: Vec<Tier>,
    pub tenants: Vec<Tenant>,
}

/// A pool's usable capacity and the guarantees drawn from it, per upstream window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityReport {
    pub capacity_per_window: u32,
    pub guaranteed_per_window: u32,
}

impl ConfigView {
    /// Capacity (of the enabled tokens) and drawn guarantees of every pool: what
    /// leasing can serve now.
    pub fn pool_reports(&self) -> HashMap<Id, CapacityReport> {
        self.reports(false)
    }

    /// The same counting disabled tokens too: what the pool is provisioned with. The
    /// guarantee rule is checked against this, so disabling a token (an emergency: a
    /// leaked or blocked token) is always allowed; quotas then fall back as for an
    /// open breaker until it is enabled or replaced.
    pub fn provisioned_reports(&self) -> HashMap<Id, CapacityReport> {
        self.reports(true)
    }

    /// One pass over the tokens, one over the tenants: O(tokens + tenants).
    fn reports(&self, with_disabled: bool) -> HashMap<Id, CapacityReport> {
        let upstreams: HashMap<&Id, &Upstream> =
            self.upstreams.iter().map(|u| (&u.id, u)).collect();
        let tiers: HashMap<&Id, &Tier> = self.tiers.iter().map(|t| (&t.id, t)).collect();
        let mut tokens: HashMap<(&TokenOwner, &Id), u64> = HashMap::new();
        for token in self.tokens.iter().filter(|t| with_disabled || !t.disabled) {
            *tokens
                .entry((&token.owner, &token.upstream_id))
                .or_default() += 1;
        }
        let mut drawn: HashMap<&Id, u64> = HashMap::new();
        let pools: HashMap<&Id, &Upstream> = self
            .pools
            .iter()
            .filter_map(|p| Some((&p.id, *upstreams.get(&p.upstream_id)?)))
            .collect();
        for tenant in &self.tenants {
            let Some(pool_id) = &tenant.pool_id else {
                continue;
            };
            let (Some(upstream), Some(tier)) = (pools.get(pool_id), tiers.get(&tenant.tier_id))
            else {
                continue;
            };
            let owner = TokenOwner::Dedicated(tenant.id.clone());
            let dedicated = tokens.get(&(&owner, &upstream.id)).copied().unwrap_or(0);
            let share = drawn_guarantee(tenant.guaranteed(tier), dedicated, upstream);
            let sum = drawn.entry(pool_id).or_default();
            *sum = sum.saturating_add(share);
        }
        let mut reports = HashMap::new();
        for pool in &self.pools {
            let Some(upstream) = pools.get(&pool.id) else {
                continue;
            };
            let owner = TokenOwner::Pool(pool.id.clone());
            let count = tokens.get(&(&owner, &upstream.id)).copied().unwrap_or(0);
            let capacity = count * upstream.usable_per_window() as u64;
            let drawn = drawn.get(&pool.id).copied().unwrap_or(0);
            reports.insert(pool.id.clone(), CapacityReport::saturating(capacity, drawn));
        }
        reports
    }
}

impl CapacityReport {
    /// A report from exact sums, each capped at `u32::MAX`.
    pub fn saturating(capacity_per_window: u64, guaranteed_per_window: u64) -> Self {
        Self {
            capacity_per_window: capacity_per_window.min(u32::MAX as u64) as u32,
            guaranteed_per_window: guaranteed_per_window.min(u32::MAX as u64) as u32,
        }
    }
}

/// What a tenant with guarantee `guaranteed` and `dedicated_tokens` tokens of its own
/// on the pool's `upstream` draws from the pool: the part its own tokens do not cover.
pub fn drawn_guarantee(guaranteed: u32, dedicated_tokens: u64, upstream: &Upstream) -> u64 {
    let dedicated = dedicated_tokens.saturating_mul(upstream.usable_per_window() as u64);
    (guaranteed as u64).saturating_sub(dedicated)
}

/// Checks every cross-object rule on the whole configuration; the error names the
/// field and the numbers involved. The store checks only the pools a write can affect
/// (`store::sql::guarantees`), with the same two steps and messages; this is the
/// reference it is tested against.
pub fn check_guarantees(view: &ConfigView) -> Result<(), InvalidField> {
    check_token_upstreams(view)?;
    let mut reports: Vec<_> = view.provisioned_reports().into_iter().collect();
    reports.sort_by(|a, b| a.0.cmp(&b.0));
    for (pool_id, report) in reports {
        check_pool_report(&pool_id, report)?;
    }
    Ok(())
}

/// The 80 % rule on one pool's provisioned report.
pub fn check_pool_report(pool_id: &Id, report: CapacityReport) -> Result<(), InvalidField> {
    let allowed = (report.capacity_per_window as f64 * MAX_GUARANTEED_SHARE).floor() as u32;
    if report.guaranteed_per_window > allowed {
        return Err(InvalidField::new(
            "guaranteed_per_window",
            format!(
                "pool '{pool_id}' would owe its tenants {} guaranteed requests per window, \
                 but its tokens (disabled ones included) serve {} per window and at most \
                 80% of that ({allowed}) may be guaranteed; add tokens to the pool, lower \
                 the guarantees, or move tenants to another pool (to take a token out of \
                 service at once, disable it: that is always allowed)",
                report.guaranteed_per_window, report.capacity_per_window
            ),
        ));
    }
    Ok(())
}

/// A pool holds tokens of its own upstream only.
fn check_token_upstreams(view: &ConfigView) -> Result<(), InvalidField> {
    let pools: HashMap<&Id, &Pool> = view.pools.iter().map(|p| (&p.id, p)).collect();
    for token in &view.tokens {
        if let TokenOwner::Pool(pool_id) = &token.owner
            && let Some(pool) = pools.get(pool_id)
            && pool.upstream_id != token.upstream_id
        {
            return Err(token_of_another_upstream(
                &token.id,
                &token.upstream_id,
                pool_id,
                &pool.upstream_id,
            ));
        }
    }
    Ok(())
}

/// The error for a pool token whose upstream is not its pool's.
pub fn token_of_another_upstream(
    token_id: &Id,
    token_upstream: &Id,
    pool_id: &Id,
    pool_upstream: &Id,
) -> InvalidField {
    InvalidField::new(
        "token.upstream_id",
        format!(
            "token '{token_id}' is for upstream '{token_upstream}' but pool '{pool_id}' holds \
             tokens of '{pool_upstream}'"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse("t", s).unwrap()
    }

    fn view(pool_tokens: usize, tenants: &[(&str, u32)]) -> ConfigView {
        let upstream = Upstream::baselinker(0);
        let tier = Tier::seed_defaults(0).remove(2); // basic: 20 guaranteed
        let token = |i: usize| TokenRecord {
            id: id(&format!("tok{i}")),
            upstream_id: upstream.id.clone(),
            display_name: String::new(),
            owner: TokenOwner::Pool(id("shared")),
            disabled: false,
            key_id: "k".into(),
            sealed_secret: vec![],
            monthly_cost_minor: 0,
            create_time_ms: 0,
            update_time_ms: 0,
        };
        ConfigView {
            tokens: (0..pool_tokens).map(token).collect(),
            pools: vec![Pool {
                id: id("shared"),
                upstream_id: upstream.id.clone(),
                display_name: String::new(),
                create_time_ms: 0,
                update_time_ms: 0,
            }],
            tenants: tenants
                .iter()
                .map(|(name, g)| Tenant {
                    id: id(name),
                    display_name: String::new(),
                    tier_id: tier.id.clone(),
                    pool_id: Some(id("shared")),
                    weight_override: None,
                    guaranteed_override: Some(*g),
                    burst_override: None,
                    create_time_ms: 0,
                    update_time_ms: 0,
                })
                .collect(),
            tiers: vec![tier],
            upstreams: vec![upstream],
        }
    }

    /// Seed strategy 2 (3 tokens, 4 × 30 guaranteed) fits; 80 % of 285 is 228.
    #[test]
    fn seed_shared_pool_fits() {
        let v = view(3, &[("c", 30), ("d", 30), ("e", 30), ("f", 30)]);
        assert!(check_guarantees(&v).is_ok());
        assert_eq!(
            v.pool_reports()[&id("shared")],
            CapacityReport {
                capacity_per_window: 285,
                guaranteed_per_window: 120
            }
        );
    }

    /// 228 guaranteed on 285 usable is allowed; 229 is refused with the numbers named.
    #[test]
    fn eighty_percent_boundary() {
        assert!(check_guarantees(&view(3, &[("a", 228)])).is_ok());
        let err = check_guarantees(&view(3, &[("a", 229)])).unwrap_err();
        assert!(
            err.reason.contains("229") && err.reason.contains("285"),
            "{err}"
        );
        assert!(err.reason.contains("shared"), "{err}");
    }

    /// Dedicated tokens cover part of a pool tenant's guarantee.
    #[test]
    fn dedicated_tokens_reduce_drawn_guarantee() {
        let mut v = view(1, &[("a", 150)]);
        assert!(check_guarantees(&v).is_err());
        let mut dedicated = v.tokens[0].clone();
        dedicated.id = id("ded");
        dedicated.owner = TokenOwner::Dedicated(id("a"));
        v.tokens.push(dedicated);
        // 150 − 95 = 55 drawn, 80 % of 95 = 76.
        assert!(check_guarantees(&v).is_ok());
        assert_eq!(v.pool_reports()[&id("shared")].guaranteed_per_window, 55);
    }

    /// Disabled tokens add no capacity to what leasing can serve now, but the guarantee
    /// rule counts them (disabling is the always-allowed emergency switch); removing a
    /// token is what the rule refuses.
    #[test]
    fn disabled_tokens_count_as_provisioned_not_live() {
        let mut v = view(2, &[("a", 100)]);
        assert!(check_guarantees(&v).is_ok());
        v.tokens[1].disabled = true;
        assert!(check_guarantees(&v).is_ok());
        let shared = id("shared");
        assert_eq!(v.pool_reports()[&shared].capacity_per_window, 95);
        assert_eq!(v.provisioned_reports()[&shared].capacity_per_window, 190);
        v.tokens.pop();
        assert!(check_guarantees(&v).is_err());
    }
}
