//! The configuration objects as the rest of the service sees them. Each `new`-style
//! constructor checks the object's own rules (ranges, lengths); rules that span objects
//! (references, the 80 % guarantee rule) are in `validate.rs` and the store.

use std::time::Duration;

use super::{Id, InvalidField};

/// Longest display name accepted, in characters.
pub const MAX_NAME_LEN: usize = 200;
/// Upper bound on any per-window number (requests per window), to keep arithmetic safe.
pub const MAX_PER_WINDOW: u32 = 1_000_000;

/// Checks a display name: optional, at most 200 characters, no control characters.
pub fn check_display_name(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.chars().count() > MAX_NAME_LEN {
        return Err(InvalidField::new(
            field,
            format!("is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(InvalidField::new(field, "contains control characters"));
    }
    Ok(())
}

fn check_per_window(field: &str, value: u32, min: u32) -> Result<(), InvalidField> {
    if value < min || value > MAX_PER_WINDOW {
        return Err(InvalidField::new(
            field,
            format!("is {value}; it must be between {min} and {MAX_PER_WINDOW}"),
        ));
    }
    Ok(())
}

/// An upstream API and the shape of its limit: `limit_per_window` requests per token in
/// any sliding window of length `window`, of which `safety_margin` is kept unused.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub id: Id,
    pub display_name: String,
    pub limit_per_window: u32,
    pub window: Duration,
    pub safety_margin: f64,
    pub block_duration: Duration,
    /// The longest quarantine one rate-limit report may set; `None`: 4 × the block
    /// duration (see `quarantine_max`).
    pub max_block: Option<Duration>,
    pub rate_limit_error_codes: Vec<String>,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

impl Upstream {
    /// The longest quarantine one rate-limit report may set on a token of this upstream.
    pub fn max_block(&self) -> Duration {
        crate::domain::quarantine_max(self.block_duration, self.max_block)
    }

    /// Requests per token per window that leases may use: floor(limit × (1 − margin)).
    pub fn usable_per_window(&self) -> u32 {
        // The margin is validated to [0, 0.5], so this never exceeds the limit.
        ((self.limit_per_window as f64) * (1.0 - self.safety_margin)).floor() as u32
    }

    /// Checks the profile's own rules.
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_display_name("upstream.display_name", &self.display_name)?;
        check_per_window("upstream.limit_per_window", self.limit_per_window, 1)?;
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(86_400) {
            return Err(InvalidField::new(
                "upstream.window",
                format!("is {:?}; it must be between 1s and 1 day", self.window),
            ));
        }
        if !(0.0..=0.5).contains(&self.safety_margin) || self.safety_margin.is_nan() {
            return Err(InvalidField::new(
                "upstream.safety_margin",
                format!("is {}; it must be between 0 and 0.5", self.safety_margin),
            ));
        }
        if self.usable_per_window() == 0 {
            return Err(InvalidField::new(
                "upstream.safety_margin",
                "leaves no usable request per window; lower it or raise the limit",
            ));
        }
        if self.block_duration > Duration::from_secs(86_400) {
            return Err(InvalidField::new(
                "upstream.block_duration",
                "must be at most 1 day",
            ));
        }
        if let Some(max) = self.max_block
            && (max < self.block_duration || max > Duration::from_secs(86_400))
        {
            return Err(InvalidField::new(
                "upstream.max_block",
                "must be at least block_duration and at most 1 day (or absent: 4 × block_duration)",
            ));
        }
        for (i, code) in self.rate_limit_error_codes.iter().enumerate() {
            if code.is_empty() || code.len() > 100 || code.chars().any(char::is_control) {
                return Err(InvalidField::new(
                    format!("upstream.rate_limit_error_codes[{i}]"),
                    "must be 1 to 100 printable characters",
                ));
            }
        }
        Ok(())
    }

    /// The safety margin of an upstream created or updated without one.
    pub const DEFAULT_SAFETY_MARGIN: f64 = 0.05;

    /// The BaseLinker profile seeded on first start: 100 per 60 s, 5 % margin, 10 min block.
    pub fn baselinker(now_ms: i64) -> Self {
        Self {
            id: Id::from_trusted("baselinker".into()),
            display_name: "BaseLinker API".into(),
            limit_per_window: 100,
            window: Duration::from_secs(60),
            safety_margin: Self::DEFAULT_SAFETY_MARGIN,
            block_duration: Duration::from_secs(600),
            max_block: None,
            rate_limit_error_codes: vec![
                "ERROR_BLOCKED_TOKEN".into(),
                "ERROR_USER_ACCOUNT_BLOCKED".into(),
            ],
            create_time_ms: now_ms,
            update_time_ms: now_ms,
        }
    }
}

/// Who may use a token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenOwner {
    /// A member of this shared pool.
    Pool(Id),
    /// Dedicated to this tenant.
    Dedicated(Id),
}

impl TokenOwner {
    /// The shared pool the token belongs to; None for a dedicated token.
    pub fn pool(&self) -> Option<&Id> {
        match self {
            Self::Pool(pool) => Some(pool),
            Self::Dedicated(_) => None,
        }
    }
}

/// A token as stored: metadata plus the sealed secret (see `crypto.rs`).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: Id,
    pub upstream_id: Id,
    pub display_name: String,
    pub owner: TokenOwner,
    pub disabled: bool,
    /// The master key the secret is sealed with.
    pub key_id: String,
    /// Nonce followed by AES-256-GCM ciphertext and tag.
    pub sealed_secret: Vec<u8>,
    /// Cost per calendar month in the currency's minor unit (`crate::cost`), 0 to
    /// [`crate::cost::MAX_MONTHLY_COST_MINOR`].
    pub monthly_cost_minor: i64,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

impl std::fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRecord")
            .field("id", &self.id)
            .field("upstream_id", &self.upstream_id)
            .field("owner", &self.owner)
            .field("disabled", &self.disabled)
            .field("monthly_cost_minor", &self.monthly_cost_minor)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Checks a token's monthly cost: 0 to [`crate::cost::MAX_MONTHLY_COST_MINOR`].
pub fn check_monthly_cost(field: &str, value: i64) -> Result<(), InvalidField> {
    let max = crate::cost::MAX_MONTHLY_COST_MINOR;
    if !(0..=max).contains(&value) {
        return Err(InvalidField::new(
            field,
            format!("is {value}; it must be between 0 and {max} (minor units per month)"),
        ));
    }
    Ok(())
}

/// A shared pool of tokens of one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub id: Id,
    pub upstream_id: Id,
    pub display_name: String,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

/// A tier's claim on a pool's spare capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SharedAccess {
    Priority,
    Normal,
    Limited,
}

impl SharedAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Priority => "priority",
            Self::Normal => "normal",
            Self::Limited => "limited",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "priority" => Some(Self::Priority),
            "normal" => Some(Self::Normal),
            "limited" => Some(Self::Limited),
            _ => None,
        }
    }
}

/// A service level, in requests per upstream window.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub id: Id,
    pub display_name: String,
    pub guaranteed_per_window: u32,
    pub burst_per_window: u32,
    pub shared_access: SharedAccess,
    pub weight: f64,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

/// Largest weight accepted for a tier or tenant.
pub const MAX_WEIGHT: f64 = 1000.0;

pub(crate) fn check_weight(field: &str, weight: f64) -> Result<(), InvalidField> {
    if !(weight > 0.0 && weight <= MAX_WEIGHT) {
        return Err(InvalidField::new(
            field,
            format!("is {weight}; it must be greater than 0 and at most {MAX_WEIGHT}"),
        ));
    }
    Ok(())
}

impl Tier {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_display_name("tier.display_name", &self.display_name)?;
        check_per_window("tier.guaranteed_per_window", self.guaranteed_per_window, 0)?;
        check_per_window("tier.burst_per_window", self.burst_per_window, 0)?;
        check_weight("tier.weight", self.weight)
    }

    /// The seed's hybrid strategy: premium 150+50, standard 50+30, basic 20+10 per minute.
    pub fn seed_defaults(now_ms: i64) -> Vec<Tier> {
        let tier = |id: &str, name: &str, g, b, access, weight| Tier {
            id: Id::from_trusted(id.into()),
            display_name: name.into(),
            guaranteed_per_window: g,
            burst_per_window: b,
            shared_access: access,
            weight,
            create_time_ms: now_ms,
            update_time_ms: now_ms,
        };
        vec![
            tier("premium", "Premium", 150, 50, SharedAccess::Priority, 3.0),
            tier("standard", "Standard", 50, 30, SharedAccess::Normal, 2.0),
            tier("basic", "Basic", 20, 10, SharedAccess::Limited, 1.0),
        ]
    }
}

/// A customer whose sync workers lease tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: Id,
    pub display_name: String,
    pub tier_id: Id,
    pub pool_id: Option<Id>,
    pub weight_override: Option<f64>,
    pub guaranteed_override: Option<u32>,
    pub burst_override: Option<u32>,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

impl Tenant {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_display_name("tenant.display_name", &self.display_name)?;
        if let Some(w) = self.weight_override {
            check_weight("tenant.weight_override", w)?;
        }
        if let Some(g) = self.guaranteed_override {
            check_per_window("tenant.guaranteed_override", g, 0)?;
        }
        if let Some(b) = self.burst_override {
            check_per_window("tenant.burst_override", b, 0)?;
        }
        Ok(())
    }

    /// Guaranteed requests per window: the override, else the tier's.
    pub fn guaranteed(&self, tier: &Tier) -> u32 {
        self.guaranteed_override
            .unwrap_or(tier.guaranteed_per_window)
    }

    /// Burst requests per window above the guarantee: the override, else the tier's.
    pub fn burst(&self, tier: &Tier) -> u32 {
        self.burst_override.unwrap_or(tier.burst_per_window)
    }

    /// Weight in fair sharing: the override, else the tier's.
    pub fn weight(&self, tier: &Tier) -> f64 {
        self.weight_override.unwrap_or(tier.weight)
    }
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKeyRole {
    Admin,
    Worker,
}

impl ApiKeyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Worker => "worker",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "admin" => Some(Self::Admin),
            "worker" => Some(Self::Worker),
            _ => None,
        }
    }
}

/// Most tenants one worker key may name. The scope is a set built once per key and
/// shared by every call (`Snapshot::scope`), so its size costs nothing per call; the
/// bound keeps a CreateApiKey request (up to 64 bytes per id) under gRPC's 4 MB.
pub const MAX_KEY_TENANTS: usize = 50_000;

/// An API key as stored: never the secret, only its SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Random, public part of the key (`tl_<id>_<secret>`), used to look it up.
    pub id: String,
    pub display_name: String,
    pub role: ApiKeyRole,
    /// Tenants a worker key may act for; empty for admin keys.
    pub tenant_ids: Vec<Id>,
    /// SHA-256 of the secret part.
    pub secret_hash: Vec<u8>,
    pub create_time_ms: i64,
}

impl std::fmt::Debug for ApiKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyRecord")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("tenant_ids", &self.tenant_ids)
            .finish_non_exhaustive()
    }
}

impl ApiKeyRecord {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_display_name("api_key.display_name", &self.display_name)?;
        match self.role {
            ApiKeyRole::Admin if !self.tenant_ids.is_empty() => Err(InvalidField::new(
                "api_key.tenant_ids",
                "must be empty for an admin key (admins may act for every tenant)",
            )),
            ApiKeyRole::Worker if self.tenant_ids.is_empty() => Err(InvalidField::new(
                "api_key.tenant_ids",
                "must name at least one tenant for a worker key",
            )),
            _ if self.tenant_ids.len() > MAX_KEY_TENANTS => Err(InvalidField::new(
                "api_key.tenant_ids",
                format!(
                    "names {} tenants; a key may name at most {MAX_KEY_TENANTS} (use an \
                     admin key or several keys)",
                    self.tenant_ids.len()
                ),
            )),
            _ => Ok(()),
        }
    }
}
