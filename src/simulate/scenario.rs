//! The scenario file (TOML). Times are *real* times (the upstream's window, e.g. 60 s);
//! `time_scale` compresses them for the run (30 → a 60 s window lasts 2 s).
//!
//! ```toml
//! time_scale = 30
//! windows = 8              # how long to run, in upstream windows
//! target_share = 0.95      # planning: share of each tenant's demand to serve
//! [upstream]
//! limit = 100
//! window_secs = 60
//! safety_margin = 0.05
//! [[pools]]
//! id = "shared"
//! tokens = 2
//! [[tiers]]
//! id = "standard"
//! guaranteed = 50
//! burst = 30
//! shared_access = "normal"   # priority | normal | limited
//! weight = 1.0
//! [[tenants]]
//! id = "acme"
//! tier = "standard"
//! pool = "shared"            # default: the first pool
//! dedicated_tokens = 0
//! target_share = 0.95      # default: the scenario's
//! [[tenants.demand]]
//! priority = "normal"        # critical | high | normal | low
//! per_window = 60            # requests asked per (real) window
//! from_window = 0            # phase start, in windows (default 0)
//! to_window = 8              # phase end (default: the end of the run)
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::grpc::pb;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// How much faster than real time the run goes (default 30).
    #[serde(default = "default_time_scale")]
    pub time_scale: f64,
    /// How long the run lasts, in upstream windows (default 6).
    #[serde(default = "default_windows")]
    pub windows: u32,
    /// Share of each tenant's demand a plan must serve (default 0.95).
    #[serde(default = "default_target_share")]
    pub target_share: f64,
    /// Service replicas (default 1). More than 1 need DATABASE_URL (Postgres) and
    /// REDIS_URL, which the replicas share.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// How long a request may wait for a lease, as a fraction of the window (default 0.25).
    #[serde(default = "default_max_wait")]
    pub max_wait_fraction: f64,
    #[serde(default)]
    pub upstream: UpstreamSpec,
    pub pools: Vec<PoolSpec>,
    pub tiers: Vec<TierSpec>,
    pub tenants: Vec<TenantSpec>,
    /// Planning: the largest number of pool tokens to try (default 20).
    #[serde(default = "default_max_tokens")]
    pub plan_max_tokens: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    pub limit: u32,
    pub window_secs: f64,
    pub safety_margin: f64,
}

impl Default for UpstreamSpec {
    fn default() -> Self {
        Self {
            limit: 100,
            window_secs: 60.0,
            safety_margin: 0.05,
        }
    }
}

impl UpstreamSpec {
    /// Requests per window the service lets through per token (limit minus margin).
    pub fn usable(&self) -> u32 {
        (f64::from(self.limit) * (1.0 - self.safety_margin)).floor() as u32
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub id: String,
    pub tokens: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    pub id: String,
    pub guaranteed: u32,
    pub burst: u32,
    #[serde(default = "default_access")]
    pub shared_access: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub id: String,
    pub tier: String,
    pub pool: Option<String>,
    #[serde(default)]
    pub dedicated_tokens: u32,
    pub weight: Option<f64>,
    pub guaranteed: Option<u32>,
    /// This tenant's share of demand to serve (default: the scenario's target_share;
    /// 0 for a tenant whose flood is not meant to be served).
    pub target_share: Option<f64>,
    #[serde(default)]
    pub demand: Vec<DemandSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemandSpec {
    #[serde(default = "default_priority")]
    pub priority: String,
    pub per_window: f64,
    #[serde(default)]
    pub from_window: f64,
    pub to_window: Option<f64>,
}

fn default_time_scale() -> f64 {
    30.0
}
fn default_windows() -> u32 {
    6
}
fn default_target_share() -> f64 {
    0.95
}
fn default_replicas() -> u32 {
    1
}
fn default_max_wait() -> f64 {
    0.25
}
fn default_max_tokens() -> u32 {
    20
}
fn default_access() -> String {
    "normal".into()
}
fn default_weight() -> f64 {
    1.0
}
fn default_priority() -> String {
    "normal".into()
}

pub fn parse_priority(name: &str) -> Option<pb::Priority> {
    Some(match name {
        "critical" => pb::Priority::Critical,
        "high" => pb::Priority::High,
        "normal" => pb::Priority::Normal,
        "low" => pb::Priority::Low,
        _ => return None,
    })
}

pub fn parse_access(name: &str) -> Option<pb::SharedAccess> {
    Some(match name {
        "priority" => pb::SharedAccess::Priority,
        "normal" => pb::SharedAccess::Normal,
        "limited" => pb::SharedAccess::Limited,
        _ => return None,
    })
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the scenario {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid scenario {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Scenario> {
        let scenario: Scenario = toml_from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// The window as it runs (real window / time scale), in ms.
    pub fn scaled_window_ms(&self) -> u64 {
        (self.upstream.window_secs * 1000.0 / self.time_scale).round() as u64
    }

    /// The pool a tenant draws from.
    pub fn pool_of<'a>(&'a self, tenant: &'a TenantSpec) -> &'a str {
        tenant.pool.as_deref().unwrap_or(&self.pools[0].id)
    }

    pub fn tier_of(&self, tenant: &TenantSpec) -> &TierSpec {
        self.tiers
            .iter()
            .find(|t| t.id == tenant.tier)
            .expect("validated")
    }

    /// A tenant's guarantee per window.
    pub fn guaranteed(&self, tenant: &TenantSpec) -> u32 {
        tenant
            .guaranteed
            .unwrap_or_else(|| self.tier_of(tenant).guaranteed)
    }

    /// What a tenant asks for during window `w` (all priorities).
    pub fn demand_in(&self, tenant: &TenantSpec, w: u32) -> f64 {
        let (from, to) = (f64::from(w), f64::from(w + 1));
        tenant
            .demand
            .iter()
            .map(|d| {
                let end = d.to_window.unwrap_or(f64::from(self.windows));
                let overlap = (to.min(end) - from.max(d.from_window)).max(0.0);
                d.per_window * overlap
            })
            .sum()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !(self.time_scale >= 1.0 && self.time_scale <= 10_000.0) {
            bail!("time_scale must be between 1 and 10000");
        }
        if self.windows == 0 || self.windows > 1000 {
            bail!("windows must be between 1 and 1000");
        }
        if !(self.target_share > 0.0 && self.target_share <= 1.0) {
            bail!("target_share must be in (0, 1]");
        }
        if self.replicas == 0 || self.replicas > 16 {
            bail!("replicas must be between 1 and 16");
        }
        if !(self.max_wait_fraction > 0.0 && self.max_wait_fraction <= 1.0) {
            bail!("max_wait_fraction must be in (0, 1]");
        }
        if self.upstream.limit == 0 {
            bail!("upstream.limit must be at least 1");
        }
        if !(self.upstream.safety_margin >= 0.0 && self.upstream.safety_margin < 1.0) {
            bail!("upstream.safety_margin must be in [0, 1)");
        }
        if self.scaled_window_ms() < 200 {
            bail!("upstream.window_secs / time_scale must be at least 0.2 s");
        }
        if self.pools.is_empty() {
            bail!("pools: at least one pool is required");
        }
        let mut ids = BTreeSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            check_id(&format!("pools[{i}].id"), &pool.id)?;
            if !ids.insert(pool.id.as_str()) {
                bail!("pools[{i}].id {:?} is used twice", pool.id);
            }
        }
        let mut tiers = BTreeSet::new();
        for (i, tier) in self.tiers.iter().enumerate() {
            check_id(&format!("tiers[{i}].id"), &tier.id)?;
            if !tiers.insert(tier.id.as_str()) {
                bail!("tiers[{i}].id {:?} is used twice", tier.id);
            }
            if parse_access(&tier.shared_access).is_none() {
                bail!("tiers[{i}].shared_access must be priority, normal or limited");
            }
            if !(tier.weight > 0.0 && tier.weight <= 1000.0) {
                bail!("tiers[{i}].weight must be in (0, 1000]");
            }
        }
        if self.tenants.is_empty() {
            bail!("tenants: at least one tenant is required");
        }
        let mut tenants = BTreeSet::new();
        for (i, tenant) in self.tenants.iter().enumerate() {
            check_id(&format!("tenants[{i}].id"), &tenant.id)?;
            if !tenants.insert(tenant.id.as_str()) {
                bail!("tenants[{i}].id {:?} is used twice", tenant.id);
            }
            if !tiers.contains(tenant.tier.as_str()) {
                bail!("tenants[{i}].tier {:?} is not a tier", tenant.tier);
            }
            if let Some(pool) = &tenant.pool
                && !ids.contains(pool.as_str())
            {
                bail!("tenants[{i}].pool {pool:?} is not a pool");
            }
            if tenant
                .target_share
                .is_some_and(|t| !(0.0..=1.0).contains(&t))
            {
                bail!("tenants[{i}].target_share must be in [0, 1]");
            }
            for (j, d) in tenant.demand.iter().enumerate() {
                let at = format!("tenants[{i}].demand[{j}]");
                if parse_priority(&d.priority).is_none() {
                    bail!("{at}.priority must be critical, high, normal or low");
                }
                if !(d.per_window >= 0.0 && d.per_window <= 100_000.0) {
                    bail!("{at}.per_window must be between 0 and 100000");
                }
                if d.from_window < 0.0 || d.to_window.is_some_and(|t| t <= d.from_window) {
                    bail!("{at}: from_window must be ≥ 0 and below to_window");
                }
            }
        }
        Ok(())
    }
}

fn check_id(field: &str, value: &str) -> anyhow::Result<()> {
    crate::domain::Id::parse(field, value).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn toml_from_str(text: &str) -> anyhow::Result<Scenario> {
    use figment::Figment;
    use figment::providers::{Format, Toml};
    Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| anyhow::anyhow!("{e}"))
}
