//! Rebalancing plans (the seed's §6), pure: no I/O, no clock but the `now` given.
//!
//! Pools of one upstream can drift apart: one runs hot (its tokens above `high` of their
//! usable capacity, 85 % by default) while another idles (below `low`, 30 %). A plan
//! moves tenants from hot pools to cold ones so that both end inside the band
//! `[low, high]`, or as close as moves allow without leaving it on the cold side:
//!
//! - a move never breaks the 80 % rule: the receiving pool's guarantees after the move
//!   stay within `MAX_GUARANTEED_SHARE` of its capacity (the giving pool's only shrink);
//! - a move never makes the receiving pool hot (`high`), so a plan cannot oscillate
//!   within one run;
//! - hysteresis across runs: a tenant moved within `cooldown_ms` stays where it is, and
//!   a pool is hot or cold only by its utilisation *over the history the caller
//!   measured* (the caller passes a long average, not the last window), so a short
//!   spike moves nobody. Load flipping back and forth faster than the cooldown moves
//!   each tenant at most once per cooldown.
//!
//! The greedy choice: the hottest pool first; from it, the tenant whose usage brings
//! the pool nearest below `high` without pushing the coldest pool that can take it
//! above `high`; repeat until no pool is hot or no move helps. Each move carries its
//! reason in words, for the dry-run answer and the audit row.

use std::collections::BTreeMap;

use crate::domain::MAX_GUARANTEED_SHARE;

/// Thresholds and hysteresis of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    /// A pool above this share of its capacity is hot (0.85).
    pub high: f64,
    /// A pool below this share is cold (0.30).
    pub low: f64,
    /// A tenant moved less than this long ago is not moved again.
    pub cooldown_ms: i64,
}

impl Default for Band {
    fn default() -> Self {
        Self {
            high: 0.85,
            low: 0.30,
            cooldown_ms: 3_600_000,
        }
    }
}

/// A pool as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolLoad {
    pub id: String,
    /// Usable requests per window of its tokens in service.
    pub capacity: u32,
}

/// A tenant as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLoad {
    pub id: String,
    pub pool: String,
    /// Requests per window guaranteed to it (drawn from its pool).
    pub guaranteed: u32,
    /// Requests per window it used, averaged over the measured history.
    pub used: f64,
    /// When it was last moved (Unix ms), if ever.
    pub moved_at_ms: Option<i64>,
}

/// One move of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub tenant: String,
    pub from: String,
    pub to: String,
    /// Why, for people: the utilisations before and after.
    pub reason: String,
}

/// Utilisation and guarantees of one pool while planning.
#[derive(Debug, Clone, Copy)]
struct Tally {
    capacity: f64,
    used: f64,
    guaranteed: u64,
}

impl Tally {
    fn share(&self) -> f64 {
        if self.capacity > 0.0 {
            self.used / self.capacity
        } else {
            f64::INFINITY
        }
    }

    fn may_guarantee(&self, more: u32) -> bool {
        let allowed = (self.capacity * MAX_GUARANTEED_SHARE).floor() as u64;
        self.guaranteed + u64::from(more) <= allowed
    }
}

/// The moves that bring hot pools into the band, in the order to apply them. Pools
/// must be of one upstream; tenants name pools of `pools` (others are ignored).
pub fn plan(pools: &[PoolLoad], tenants: &[TenantLoad], band: Band, now_ms: i64) -> Vec<Move> {
    let mut tally: BTreeMap<&str, Tally> = pools
        .iter()
        .map(|p| {
            let t = Tally {
                capacity: f64::from(p.capacity),
                used: 0.0,
                guaranteed: 0,
            };
            (p.id.as_str(), t)
        })
        .collect();
    let mut place: Vec<&str> = Vec::with_capacity(tenants.len());
    for t in tenants {
        place.push(t.pool.as_str());
        if let Some(pool) = tally.get_mut(t.pool.as_str()) {
            pool.used += t.used;
            pool.guaranteed += u64::from(t.guaranteed);
        }
    }
    let mut moves = Vec::new();
    let mut moved = vec![false; tenants.len()];
    while let Some(hot) = hottest(&tally, band) {
        let Some((i, to)) = best_move(&tally, tenants, &place, &moved, hot, band, now_ms) else {
            break;
        };
        let tenant = &tenants[i];
        let (before_from, before_to) = (tally[hot].share(), tally[to].share());
        for (pool, sign) in [(hot, -1.0), (to, 1.0)] {
            let t = tally.get_mut(pool).expect("known pool");
            t.used += sign * tenant.used;
            let g = u64::from(tenant.guaranteed);
            t.guaranteed = if sign > 0.0 {
                t.guaranteed + g
            } else {
                t.guaranteed - g
            };
        }
        moves.push(Move {
            tenant: tenant.id.clone(),
            from: hot.to_owned(),
            to: to.to_owned(),
            reason: format!(
                "pool '{hot}' ran at {:.0}% (above {:.0}%) and '{to}' at {:.0}% (below {:.0}%); \
                 moving '{}' ({:.1} requests per window) leaves them at {:.0}% and {:.0}%",
                before_from * 100.0,
                band.high * 100.0,
                before_to * 100.0,
                band.low * 100.0,
                tenant.id,
                tenant.used,
                tally[hot].share() * 100.0,
                tally[to].share() * 100.0
            ),
        });
        moved[i] = true;
        place[i] = to;
    }
    moves
}

/// The hottest pool above the band, if any pool is cold enough to take load.
fn hottest<'a>(tally: &BTreeMap<&'a str, Tally>, band: Band) -> Option<&'a str> {
    let any_cold = tally.values().any(|t| t.share() < band.low);
    let hot = tally
        .iter()
        .filter(|(_, t)| t.capacity > 0.0 && t.share() > band.high)
        .max_by(|a, b| a.1.share().total_cmp(&b.1.share()).then(b.0.cmp(a.0)))?;
    any_cold.then_some(*hot.0)
}

/// The tenant of `hot` and the cold pool to move it to that bring `hot` nearest below
/// `high` (or lowest, if no move gets it there), never making the receiver hot nor
/// breaking its 80 % rule; `None` when no move helps.
fn best_move<'a>(
    tally: &BTreeMap<&'a str, Tally>,
    tenants: &[TenantLoad],
    place: &[&str],
    moved: &[bool],
    hot: &str,
    band: Band,
    now_ms: i64,
) -> Option<(usize, &'a str)> {
    let from = tally[hot];
    let mut best: Option<(f64, usize, &'a str)> = None;
    for (i, t) in tenants.iter().enumerate() {
        let cooling = t
            .moved_at_ms
            .is_some_and(|at| now_ms - at < band.cooldown_ms);
        if place[i] != hot || moved[i] || cooling || t.used <= 0.0 {
            continue;
        }
        let left = (from.used - t.used) / from.capacity;
        for (&to, pool) in tally {
            let after = (pool.used + t.used) / pool.capacity;
            if to == hot || pool.share() >= band.low || after > band.high {
                continue;
            }
            if !pool.may_guarantee(t.guaranteed) {
                continue;
            }
            // Nearest below `high` is best; above it, the lower the better.
            let score = if left <= band.high {
                band.high - left
            } else {
                left + 1.0
            };
            if best.is_none_or(|(s, _, _)| score < s) {
                best = Some((score, i, to));
            }
        }
    }
    best.map(|(_, i, to)| (i, to))
}

#[cfg(test)]
#[path = "rebalance_tests.rs"]
mod tests;
