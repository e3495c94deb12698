//! Cost allocation, pure: what each token costs over a time range, and who it is
//! charged to. No I/O, no clock: the range, the tokens and the grants are inputs.
//!
//! # The rules
//! - A token's cost over a range is its monthly cost prorated over each calendar
//!   month (UTC) the range touches ([`prorate`]): a whole month costs exactly the
//!   monthly cost. The exact sum is rounded once, half up, to a minor unit.
//! - A **dedicated** token's whole cost goes to its owner tenant.
//! - A **pool**'s cost (its tokens' costs, summed) is shared by the tenants granted
//!   leases on its tokens, each in proportion to its grants against the pool's usable
//!   capacity over the range (Σ `usable_per_window × range / window` of its tokens): a
//!   tenant that used a third of the capacity pays a third of the cost. What nobody
//!   used is the pool's **unused** cost. When grants exceed that capacity (the limit
//!   was lowered during the range), the grants themselves are the denominator, so the
//!   shares never exceed the cost. Grants are counted per tenant and pool, not per
//!   token: the history then grows with tenants, not with tenants × tokens, and a
//!   pool's tokens are interchangeable to its tenants (which token a lease gets is
//!   the service's choice, not theirs).
//! - The current configuration (cost, owner, limit) applies to the whole range.
//!
//! # Rounding (largest remainder)
//! Shares are exact fractions; the allocation must be whole minor units that add up
//! to the pool's cost exactly. Per pool: every party (each tenant, then the pool's
//! unused part) gets the floor of its exact share; the few units left over (fewer
//! than the parties) go one each to the parties with the largest fractional parts,
//! ties to tenants in id order, then to unused. So every party gets its exact share
//! rounded down or up, and per pool `Σ tenants + unused == cost` holds exactly, hence
//! overall: `Σ per_tenant + Σ unused_per_pool == total`.

mod months;
mod split;

use std::collections::BTreeMap;
use std::ops::Range;

pub use months::prorate;

use crate::domain::{TokenOwner, TokenRecord, Upstream};

/// The largest monthly cost of one token, in minor units (10 billion in major units):
/// keeps every step of the arithmetic inside `i128` (see [`prorate`]).
pub const MAX_MONTHLY_COST_MINOR: i64 = 1_000_000_000_000;

/// Grants above this per tenant and pool are counted as this many (2^50, far beyond
/// any real history), so `cost × grants` stays far inside `i128`.
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

impl TokenCost {
    /// A configured token as allocation sees it: its monthly cost and owner, and its
    /// upstream's usable rate and window.
    pub fn of(token: &TokenRecord, upstream: &Upstream) -> Self {
        TokenCost {
            token_id: token.id.to_string(),
            owner: match &token.owner {
                TokenOwner::Pool(p) => CostOwner::Pool(p.to_string()),
                TokenOwner::Dedicated(d) => CostOwner::Dedicated(d.to_string()),
            },
            monthly_cost_minor: token.monthly_cost_minor,
            usable_per_window: upstream.usable_per_window(),
            window_ms: i64::try_from(upstream.window.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// Leases granted to a tenant on a pool's tokens over the range (from the usage
/// history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub tenant_id: String,
    pub pool_id: String,
    pub granted: u64,
}

/// One token's cost over the range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAllocation {
    pub token_id: String,
    pub owner: CostOwner,
    /// The token's cost over the range ([`prorate`] of its monthly cost).
    pub cost: i64,
    /// Usable requests over the range: `usable_per_window × range / window`, rounded
    /// down.
    pub capacity: u64,
}

/// The allocation of every token's cost over a range. Exact:
/// `Σ per_tenant + Σ unused_per_pool == total`, and per pool
/// `Σ its tenants' parts + unused == cost`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Each tenant's cost: its dedicated tokens' whole cost plus its shares of pools.
    /// Every tenant that owns a token or was granted a lease on a pool is listed.
    pub per_tenant: BTreeMap<String, i64>,
    /// Leases granted to each tenant on the given pools' tokens (same keys as
    /// `per_tenant`; grants on dedicated tokens are not counted here).
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
/// tenants by their `granted` leases on pools (grants on pools with no token in
/// `tokens` are ignored). See the module documentation for the rules and the rounding.
pub fn allocate(range: Range<i64>, tokens: &[TokenCost], granted: &[Granted]) -> Allocation {
    let mut allocation = Allocation::default();
    // Per pool: its cost, and its usable requests over the range (each token's rounded
    // down), which its tenants' grants are weighed against.
    let mut pools: BTreeMap<&str, PoolTotals> = BTreeMap::new();
    let range_ms = i128::from(range.end.saturating_sub(range.start).max(0));
    for token in tokens {
        let monthly = token.monthly_cost_minor.clamp(0, MAX_MONTHLY_COST_MINOR);
        let cost = prorate(monthly, range.clone());
        let window_ms = i128::from(token.window_ms.max(1));
        let usable = i128::from(token.usable_per_window) * range_ms;
        match &token.owner {
            CostOwner::Dedicated(tenant) => {
                *allocation.per_tenant.entry(tenant.clone()).or_default() += cost;
                allocation
                    .granted_per_tenant
                    .entry(tenant.clone())
                    .or_default();
            }
            CostOwner::Pool(pool) => {
                let totals = pools.entry(pool).or_default();
                totals.cost += cost;
                totals.capacity += usable / window_ms;
            }
        }
        allocation.total += cost;
        allocation.per_token.push(TokenAllocation {
            token_id: token.token_id.clone(),
            owner: token.owner.clone(),
            cost,
            capacity: u64::try_from(usable / window_ms).unwrap_or(u64::MAX),
        });
    }
    let mut grants: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for g in granted
        .iter()
        .filter(|g| pools.contains_key(g.pool_id.as_str()))
    {
        let count = grants
            .entry(&g.pool_id)
            .or_default()
            .entry(&g.tenant_id)
            .or_default();
        *count = count.saturating_add(g.granted);
    }
    for (pool, totals) in pools {
        let empty = BTreeMap::new();
        allocation.share_pool(pool, totals, grants.get(pool).unwrap_or(&empty));
    }
    allocation
}

/// A pool's cost over the range and its usable requests over it.
#[derive(Default)]
struct PoolTotals {
    cost: i64,
    capacity: i128,
}

impl Allocation {
    /// Shares `pool`'s cost among the tenants granted leases on it, by their grants
    /// against its capacity (or the grants, if more); the rest is its unused part.
    fn share_pool(&mut self, pool: &str, totals: PoolTotals, grants: &BTreeMap<&str, u64>) {
        let weights: Vec<i128> = grants
            .values()
            .map(|g| i128::from((*g).min(MAX_GRANTS)))
            .collect();
        let used: i128 = weights.iter().sum();
        let mut shares = weights.clone();
        shares.push(totals.capacity.max(used) - used);
        let parts = split::largest_remainder(totals.cost, &shares);
        for ((tenant, granted), part) in grants.iter().zip(&parts) {
            *self.per_tenant.entry((*tenant).to_owned()).or_default() += part;
            let count = self
                .granted_per_tenant
                .entry((*tenant).to_owned())
                .or_default();
            *count = count.saturating_add(*granted);
        }
        self.cost_per_pool.insert(pool.to_owned(), totals.cost);
        self.unused_per_pool
            .insert(pool.to_owned(), parts[weights.len()]);
    }
}

#[cfg(test)]
mod tests;
