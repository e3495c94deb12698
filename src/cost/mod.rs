//! Cost allocation, pure: what each token costs over a time range, and who it is
//! charged to. No I/O, no clock: the range, the tokens and the grants are inputs.
//!
//! # The rules
//! - A token's cost over a range is its monthly cost prorated over each calendar
//!   month (UTC) the range touches ([`prorate`]): a whole month costs exactly the
//!   monthly cost. The exact sum is rounded once, half up, to a minor unit.
//! - A **dedicated** token's whole cost goes to its owner tenant.
//! - A **pool** token's cost is shared by the tenants granted leases on it, each in
//!   proportion to its grants against the token's usable capacity over the range
//!   (`usable_per_window × range / window`): a tenant that used a third of the
//!   capacity pays a third of the cost. What nobody used is the pool's **unused**
//!   cost. When grants exceed that capacity (the limit was raised during the range),
//!   the grants themselves are the denominator, so the shares never exceed the cost.
//! - The current configuration (cost, owner, limit) applies to the whole range.
//!
//! # Rounding (largest remainder)
//! Shares are exact fractions; the allocation must be whole minor units that add up
//! to the token's cost exactly. Per token: every party (each tenant, then the pool's
//! unused part) gets the floor of its exact share; the few units left over (fewer
//! than the parties) go one each to the parties with the largest fractional parts,
//! ties to tenants in id order, then to unused. So every party gets its exact share
//! rounded down or up, and per token `Σ tenants + unused == cost` holds exactly, hence
//! also per pool and overall: `Σ per_tenant + Σ unused_per_pool == total`.

mod months;
mod split;

use std::collections::BTreeMap;
use std::ops::Range;

pub use months::prorate;

/// The largest monthly cost of one token, in minor units (10 billion in major units):
/// keeps every step of the arithmetic inside `i128` (see [`prorate`]).
pub const MAX_MONTHLY_COST_MINOR: i64 = 1_000_000_000_000;

/// Grants above this per tenant and token are counted as this many (2^50, far beyond
/// any real history), so `cost × grants × window` stays inside `i128`.
const MAX_GRANTS: u64 = 1 << 50;

/// Who a token's cost is charged to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CostOwner {
    /// A member of this shared pool: shared by grants, the rest unused.
    Pool(String),
    /// Dedicated to this tenant: all of it to the tenant.
    Dedicated(String),
}

/// A token as allocation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCost {
    pub token_id: String,
    pub owner: CostOwner,
    /// Cost per calendar month in the currency's minor unit (e.g. cents), 0 to
    /// [`MAX_MONTHLY_COST_MINOR`].
    pub monthly_cost_minor: i64,
    /// Requests per window that leases may use (the upstream's limit minus its margin).
    pub usable_per_window: u32,
    /// The upstream's window, in ms (at least 1).
    pub window_ms: i64,
}

/// Leases granted to a tenant on a token over the range (from the usage history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub tenant_id: String,
    pub token_id: String,
    pub granted: u64,
}

/// One token's cost over the range and how it was split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAllocation {
    pub token_id: String,
    pub owner: CostOwner,
    /// The token's cost over the range ([`prorate`] of its monthly cost).
    pub cost: i64,
    /// Each granted tenant's part (for a dedicated token: the owner's, all of it).
    pub per_tenant: BTreeMap<String, i64>,
    /// The part nobody used (always 0 for a dedicated token).
    pub unused: i64,
    /// Leases granted on the token over the range, all tenants.
    pub granted: u64,
    /// Usable requests over the range: `usable_per_window × range / window`, rounded
    /// down.
    pub capacity: u64,
}

/// The allocation of every token's cost over a range. Exact:
/// `Σ per_tenant + Σ unused_per_pool == total`, and per token
/// `Σ per_tenant + unused == cost`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Each tenant's cost: its dedicated tokens' whole cost plus its shares of pool
    /// tokens. Every tenant that owns a token or was granted a lease is listed.
    pub per_tenant: BTreeMap<String, i64>,
    /// Leases granted to each tenant on the given tokens (same keys as `per_tenant`).
    pub granted_per_tenant: BTreeMap<String, u64>,
    /// Each pool's cost: the sum of its tokens' costs.
    pub cost_per_pool: BTreeMap<String, i64>,
    /// The part of each pool's cost that no tenant used.
    pub unused_per_pool: BTreeMap<String, i64>,
    /// Per token, in the order of the input.
    pub per_token: Vec<TokenAllocation>,
    /// Every token's cost over the range.
    pub total: i64,
}

/// Allocates the cost of `tokens` over `range` (ms since the epoch, end exclusive) to
/// tenants by their `granted` leases (grants on tokens not in `tokens` are ignored).
/// See the module documentation for the rules and the rounding.
pub fn allocate(range: Range<i64>, tokens: &[TokenCost], granted: &[Granted]) -> Allocation {
    let mut grants: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for g in granted {
        let count = grants
            .entry(&g.token_id)
            .or_default()
            .entry(&g.tenant_id)
            .or_default();
        *count = count.saturating_add(g.granted);
    }
    let mut allocation = Allocation::default();
    for token in tokens {
        let empty = BTreeMap::new();
        let token_grants = grants.get(token.token_id.as_str()).unwrap_or(&empty);
        let line = allocate_token(&range, token, token_grants);
        allocation.add(line, token_grants);
    }
    allocation
}

impl Allocation {
    fn add(&mut self, line: TokenAllocation, grants: &BTreeMap<&str, u64>) {
        for (tenant, granted) in grants {
            let count = self
                .granted_per_tenant
                .entry((*tenant).to_owned())
                .or_default();
            *count = count.saturating_add(*granted);
            self.per_tenant.entry((*tenant).to_owned()).or_default();
        }
        for (tenant, part) in &line.per_tenant {
            *self.per_tenant.entry(tenant.clone()).or_default() += part;
            self.granted_per_tenant.entry(tenant.clone()).or_default();
        }
        if let CostOwner::Pool(pool) = &line.owner {
            *self.cost_per_pool.entry(pool.clone()).or_default() += line.cost;
            *self.unused_per_pool.entry(pool.clone()).or_default() += line.unused;
        }
        self.total += line.cost;
        self.per_token.push(line);
    }
}

fn allocate_token(
    range: &Range<i64>,
    token: &TokenCost,
    grants: &BTreeMap<&str, u64>,
) -> TokenAllocation {
    let monthly = token.monthly_cost_minor.clamp(0, MAX_MONTHLY_COST_MINOR);
    let cost = prorate(monthly, range.clone());
    let range_ms = i128::from(range.end.saturating_sub(range.start).max(0));
    let window_ms = i128::from(token.window_ms.max(1));
    let usable = i128::from(token.usable_per_window) * range_ms;
    let capacity = u64::try_from(usable / window_ms).unwrap_or(u64::MAX);
    let granted = grants.values().fold(0u64, |sum, g| sum.saturating_add(*g));
    let mut line = TokenAllocation {
        token_id: token.token_id.clone(),
        owner: token.owner.clone(),
        cost,
        per_tenant: BTreeMap::new(),
        unused: 0,
        granted,
        capacity,
    };
    match &token.owner {
        CostOwner::Dedicated(tenant) => {
            line.per_tenant.insert(tenant.clone(), cost);
        }
        CostOwner::Pool(_) => {
            // Each tenant's weight is its grants in "ms of one request per window";
            // the whole is the capacity in the same unit, or the grants if more.
            let weights: Vec<(&str, i128)> = grants
                .iter()
                .map(|(t, g)| (*t, i128::from((*g).min(MAX_GRANTS)) * window_ms))
                .collect();
            let used: i128 = weights.iter().map(|(_, w)| w).sum();
            let whole = usable.max(used);
            let mut shares: Vec<i128> = weights.iter().map(|(_, w)| *w).collect();
            shares.push(whole - used);
            let parts = split::largest_remainder(cost, &shares);
            line.unused = parts[weights.len()];
            for ((tenant, _), part) in weights.iter().zip(parts) {
                line.per_tenant.insert((*tenant).to_owned(), part);
            }
        }
    }
    line
}

#[cfg(test)]
mod tests;
