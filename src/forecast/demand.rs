//! A pool's demand as the forecast counts it (see the module's model, steps 1–2), built
//! from the configuration and the history's tenant rows.

use std::collections::BTreeMap;

use crate::domain::{ConfigView, SharedAccess, TokenOwner};
use crate::history::{HistoryRow, SubjectKind, roll_up};

use super::DAY_MS;

/// One tenant of a pool: its tier's numbers and what it asked per bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantDemand {
    pub id: String,
    /// Requests per window (the override, else its tier's).
    pub guaranteed: u32,
    pub burst: u32,
    pub weight: f64,
    pub shared_access: SharedAccess,
    /// Its own tokens on the pool's upstream.
    pub dedicated_tokens: u32,
    /// Requests asked per bucket (every replica summed), by bucket start (ms).
    pub asked: BTreeMap<i64, u64>,
}

/// One shared pool: its tokens, its upstream's window and its tenants' demand.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolDemand {
    pub pool: String,
    pub upstream: String,
    /// Tokens of the pool, disabled ones included (what it is provisioned with).
    pub tokens: u32,
    /// The upstream's limit per window per token, and the share of it kept unused.
    pub limit_per_window: u32,
    pub safety_margin: f64,
    /// Requests per window one token serves (limit minus margin).
    pub usable_per_token: u32,
    /// The upstream's window, ms.
    pub window_ms: i64,
    /// The history's bucket, ms.
    pub bucket_ms: i64,
    pub tenants: Vec<TenantDemand>,
}

/// The busiest bucket of one UTC day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DayPeak {
    /// Days since the Unix epoch.
    pub day: i64,
    /// The pool's demand in that bucket, requests per window.
    pub peak: f64,
    /// The bucket's start, ms (the day's start when nothing was asked).
    pub bucket_start_ms: i64,
}

impl TenantDemand {
    /// Requests per window it draws from the pool in a bucket where it asked `asked`:
    /// spread over the bucket's windows, capped at guarantee + burst, less its own
    /// tokens' capacity.
    pub fn drawn_rate(&self, asked: u64, pool: &PoolDemand) -> f64 {
        let per_window = asked as f64 * pool.window_ms as f64 / pool.bucket_ms as f64;
        let ceiling = f64::from(self.guaranteed) + f64::from(self.burst);
        let own = f64::from(self.dedicated_tokens) * f64::from(pool.usable_per_token);
        (per_window.min(ceiling) - own).max(0.0)
    }

    /// Its guarantee less what its own tokens cover (`domain::drawn_guarantee`).
    pub fn drawn_guarantee(&self, usable_per_token: u32) -> u64 {
        let own = u64::from(self.dedicated_tokens) * u64::from(usable_per_token);
        u64::from(self.guaranteed).saturating_sub(own)
    }
}

impl PoolDemand {
    pub fn capacity_per_window(&self) -> u32 {
        self.tokens.saturating_mul(self.usable_per_token)
    }

    pub fn drawn_guarantees(&self) -> u64 {
        (self.tenants.iter())
            .map(|t| t.drawn_guarantee(self.usable_per_token))
            .sum()
    }

    /// Requests per window the pool is asked to serve, per bucket that has any row.
    pub fn per_bucket(&self) -> BTreeMap<i64, f64> {
        let mut sums: BTreeMap<i64, f64> = BTreeMap::new();
        for tenant in &self.tenants {
            for (start, asked) in &tenant.asked {
                *sums.entry(*start).or_default() += tenant.drawn_rate(*asked, self);
            }
        }
        sums
    }

    /// The peak of every whole UTC day in `from_ms..to_ms`, from the first day with
    /// demand on; days without any row peak at 0.
    pub fn daily_peaks(&self, from_ms: i64, to_ms: i64) -> Vec<DayPeak> {
        let buckets = self.per_bucket();
        let first_whole = from_ms.div_euclid(DAY_MS) + i64::from(from_ms.rem_euclid(DAY_MS) != 0);
        let Some(first_asked) = (buckets.iter())
            .find(|(start, rate)| **start >= first_whole * DAY_MS && **rate > 0.0)
            .map(|(start, _)| start.div_euclid(DAY_MS))
        else {
            return vec![];
        };
        let end = to_ms.div_euclid(DAY_MS); // days before this one are whole
        (first_asked..end)
            .map(|day| {
                let range = day * DAY_MS..(day + 1) * DAY_MS;
                let busiest =
                    (buckets.range(range)).max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)));
                match busiest {
                    Some((start, peak)) => DayPeak {
                        day,
                        peak: *peak,
                        bucket_start_ms: *start,
                    },
                    None => DayPeak {
                        day,
                        peak: 0.0,
                        bucket_start_ms: day * DAY_MS,
                    },
                }
            })
            .collect()
    }
}

/// Every shared pool of `view` (by id) with its tenants' demand from `rows` (history
/// rows of any replicas and stored buckets: they are summed into `bucket_ms` buckets).
pub fn pool_demands(view: &ConfigView, rows: Vec<HistoryRow>, bucket_ms: i64) -> Vec<PoolDemand> {
    let mut asked: BTreeMap<String, BTreeMap<i64, u64>> = BTreeMap::new();
    for row in roll_up(rows, bucket_ms) {
        if row.subject.kind == SubjectKind::Tenant {
            let tenant = asked.entry(row.subject.id).or_default();
            *tenant.entry(row.bucket_start_ms).or_default() += row.tally.asked;
        }
    }
    let mut pools: Vec<PoolDemand> = (view.pools.iter())
        .filter_map(|pool| {
            let upstream = view.upstreams.iter().find(|u| u.id == pool.upstream_id)?;
            let owned_by = |owner: &TokenOwner| {
                (view.tokens.iter())
                    .filter(|t| &t.owner == owner && t.upstream_id == upstream.id)
                    .count() as u32
            };
            let tenants = (view.tenants.iter())
                .filter(|t| t.pool_id.as_ref() == Some(&pool.id))
                .filter_map(|t| {
                    let tier = view.tiers.iter().find(|tier| tier.id == t.tier_id)?;
                    Some(TenantDemand {
                        id: t.id.to_string(),
                        guaranteed: t.guaranteed(tier),
                        burst: t.burst(tier),
                        weight: t.weight(tier),
                        shared_access: tier.shared_access,
                        dedicated_tokens: owned_by(&TokenOwner::Dedicated(t.id.clone())),
                        asked: asked.get(t.id.as_str()).cloned().unwrap_or_default(),
                    })
                })
                .collect();
            Some(PoolDemand {
                pool: pool.id.to_string(),
                upstream: upstream.id.to_string(),
                tokens: owned_by(&TokenOwner::Pool(pool.id.clone())),
                limit_per_window: upstream.limit_per_window,
                safety_margin: upstream.safety_margin,
                usable_per_token: upstream.usable_per_window(),
                window_ms: upstream.window.as_millis() as i64,
                bucket_ms,
                tenants,
            })
        })
        .collect();
    pools.sort_by(|a, b| a.pool.cmp(&b.pool));
    pools
}
