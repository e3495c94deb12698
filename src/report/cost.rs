//! The report's cost column: `crate::cost::allocate` on the configuration's tokens (their
//! monthly cost, disabled ones included: they are paid for all the same) and the
//! range's grants per tenant and pool, as GetCostReport computes it. Pure.

use std::collections::BTreeMap;

use crate::cost::{Granted, TokenCost, allocate};
use crate::domain::ConfigView;

use super::Report;

/// What the range cost, in minor units of `currency`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportCost {
    pub currency: String,
    pub total: i64,
    /// Per pool: (its tokens' cost, the part nobody used).
    pub per_pool: BTreeMap<String, (i64, i64)>,
    /// Whether any token has a monthly cost (else every amount is 0 by default).
    pub any_priced: bool,
}

/// Every token of `view` as the allocation sees it.
fn token_costs(view: &ConfigView) -> Vec<TokenCost> {
    let mut tokens: Vec<TokenCost> = (view.tokens.iter())
        .filter_map(|t| {
            let upstream = view.upstreams.iter().find(|u| u.id == t.upstream_id)?;
            Some(TokenCost::of(t, upstream))
        })
        .collect();
    tokens.sort_by(|a, b| a.token_id.cmp(&b.token_id));
    tokens
}

impl Report {
    /// Adds each tenant's cost over the report's range and the pools' cost and unused
    /// part, from `granted` (leases per tenant and pool over the range).
    pub fn add_cost(&mut self, view: &ConfigView, granted: &[Granted], currency: &str) {
        let tokens = token_costs(view);
        let allocation = allocate(self.from_ms..self.to_ms, &tokens, granted);
        for tenant in &mut self.tenants {
            tenant.cost_minor = Some(allocation.per_tenant.get(&tenant.id).copied().unwrap_or(0));
        }
        let per_pool = (allocation.cost_per_pool.iter())
            .map(|(pool, cost)| {
                let unused = allocation.unused_per_pool.get(pool).copied().unwrap_or(0);
                (pool.clone(), (*cost, unused))
            })
            .collect();
        self.cost = Some(ReportCost {
            currency: currency.to_owned(),
            total: allocation.total,
            per_pool,
            any_priced: tokens.iter().any(|t| t.monthly_cost_minor > 0),
        });
    }
}

/// Minor units as an amount with two decimals (cents, as for EUR, USD or PLN).
pub fn amount(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}
