//! Settings, layered: built-in defaults → a TOML file (`--config` or
//! `TOKENLEASE_CONFIG`) → `TOKENLEASE_*` environment variables (nested keys joined by
//! `__`, e.g. `TOKENLEASE_LEASE__TTL_MS=3000`), plus the conventional `DATABASE_URL` and
//! `REDIS_URL`. Validated once at start; every error names the setting and what would
//! be accepted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::crypto::KeyRing;
use crate::domain::BreakerPolicy;

/// Every setting of the service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Folder for the embedded mode's SQLite file and generated keys.
    pub data_dir: PathBuf,
    /// `postgres://…` for replicas; unset: the embedded SQLite file in `data_dir`.
    #[serde(skip_serializing, default)]
    pub database_url: Option<String>,
    /// `redis://…` (comma-separated for a Redis Cluster); unset: in-process counters.
    #[serde(skip_serializing, default)]
    pub redis_url: Option<String>,
    /// Where the lease counters live: see `CountersMode`.
    #[serde(default)]
    pub counters: CountersMode,
    pub redis: RedisSection,
    pub lease: LeaseSection,
    pub breaker: BreakerSection,
    pub rebalance: RebalanceSection,
    pub history: HistorySection,
    pub cost: CostSection,
    pub encryption: EncryptionSection,
    pub tls: Option<TlsSection>,
    pub metrics: MetricsSection,
    /// How often a replica checks the database for configuration changes.
    pub config_refresh_ms: u64,
    /// How long an admin call waits for the configuration database: a write fails
    /// UNAVAILABLE after it, a read is answered from the configuration loaded last.
    pub database_timeout_ms: u64,
    /// Priority by request kind for calls that name none, overriding the seed's
    /// mapping, e.g. `priorities.analytics = "normal"`.
    #[serde(default)]
    pub priorities: BTreeMap<String, String>,
    /// `text` or `json` logs.
    pub log_format: String,
    /// Which spans are exported over OTLP (an `EnvFilter`, like `RUST_LOG`, and apart
    /// from it: quieting the logs does not silence the traces).
    pub traces_filter: String,
    /// How long in-flight calls may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace_ms: u64,
    /// How long a new connection may stay silent before it is closed.
    pub handshake_timeout_ms: u64,
}

/// Where the lease counters live. With `auto`, in Redis when `REDIS_URL` is set, else in
/// process, except that a replica sharing a Postgres configuration refuses to count on
/// its own: replicas that each count alone grant a token's limit once per replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CountersMode {
    #[default]
    Auto,
    /// In process, also with `DATABASE_URL`: this replica is the only one.
    Memory,
    /// In Redis: `REDIS_URL` is required.
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Upper bound on one Redis call; past it the call fails closed (UNAVAILABLE).
    pub timeout_ms: u64,
    /// Set only when Redis keeps every acknowledged write across restarts and failovers
    /// (`appendonly yes` with `appendfsync always`): a new Redis process then does not
    /// hold leasing. With the default (false) every Redis restart or failover that kept
    /// the keys holds each upstream once for W + TTL + grace, since the last writes
    /// (grants) may be missing.
    #[serde(default)]
    pub durable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSection {
    /// How long a lease stays valid. Each lease occupies its slot for window + TTL
    /// when it is never released, so keep it short.
    pub ttl_ms: u64,
    /// How long after a lease expires its call may still arrive at the upstream; the
    /// slot stays counted that much longer when the lease is not released.
    pub use_grace_ms: u64,
    /// The longest `max_wait` a caller may ask for.
    pub max_wait_ms: u64,
    /// How many callers of one tenant may wait at once on one replica; more get
    /// RESOURCE_EXHAUSTED.
    pub max_waiters_per_tenant: usize,
    /// Pacing: the share of a token's per-window limit it may grant back to back;
    /// beyond it the token grants one slot per window / limit. Keeps a saturated token
    /// from spending its window in one burst (so waits stay short and priorities
    /// decide who gets each slot as it frees). 100 turns pacing off.
    pub pace_burst_percent: u32,
}

/// Per-token circuit breaker (seed §3), shared by all replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSection {
    /// Consecutive UPSTREAM_ERROR releases on a token that open its breaker.
    pub failures_to_open: u32,
    /// How long an open breaker keeps the token out before half-opening.
    pub open_ms: u64,
    /// Consecutive successful probe leases (one at a time) that close it again.
    pub successes_to_close: u32,
}

/// Rebalancing tenants between the pools of one upstream (the seed's §6; see
/// `AdminService.PlanRebalance`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebalanceSection {
    /// Plan and apply on its own every `check_ms`, on every replica that has it on (the
    /// store keeps two replicas from applying two plans at once). Off: only
    /// `ApplyRebalance` moves tenants.
    pub automatic: bool,
    /// A pool whose tokens run above this share of their usable capacity is hot.
    pub high: f64,
    /// A pool below this share is cold: it may take load.
    pub low: f64,
    /// A tenant moved less than this long ago is not moved again.
    pub cooldown_ms: u64,
    /// Loads are averaged over this span, so a shorter spike moves nobody.
    pub history_ms: u64,
    /// How often each replica samples the counters (upstreams with two pools or more).
    pub sample_ms: u64,
    /// How often the automatic mode plans.
    pub check_ms: u64,
}

/// Usage history (`crate::history`, `AdminService.GetUsageHistory`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySection {
    /// The finest bucket history keeps: at least a minute, and dividing a day evenly so
    /// that buckets line up with days (and coarser reads are whole buckets).
    pub bucket_ms: u64,
    /// How often each replica writes what it counted: a restart loses at most this
    /// much (less than one bucket).
    pub flush_ms: u64,
    /// Rows of buckets older than this are deleted.
    pub retention_days: u64,
    /// How often each replica recomputes the pools' capacity forecast for the gauge
    /// `tokenlease_pool_capacity_forecast_days` (`crate::history::Forecaster`): a few
    /// reads of the store each time. Only while metrics are served.
    pub forecast_interval_ms: u64,
    /// Whole days of history the gauge's forecast is fitted on.
    pub forecast_days: u64,
}

/// Cost allocation (`crate::cost`, `AdminService.GetCostReport`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostSection {
    /// The ISO 4217 code of the currency tokens' monthly costs are in (three uppercase
    /// letters); reports say it, nothing converts.
    pub currency: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionSection {
    /// Master keys by id, each base64 of 32 random bytes (`tokenlease gen-master-key`).
    #[serde(skip_serializing, default)]
    pub keys: BTreeMap<String, SecretString>,
    /// A file of `id=base64` lines, merged with `keys`.
    pub key_file: Option<PathBuf>,
    /// The key that seals new tokens; may be omitted when there is only one key.
    pub active_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus `/metrics` HTTP endpoint; empty disables metrics.
    pub listen: String,
    /// Tenants with their own `tenant` label value; the rest are `tenant="_other"`.
    pub max_tenant_series: usize,
    /// How often token utilization is read from the counters into the gauges.
    pub refresh_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain.
    pub cert_path: PathBuf,
    /// PEM private key.
    pub key_path: PathBuf,
    /// PEM certificate(s) of the authority that signs client certificates: when set,
    /// every client must present one it signed (mutual TLS), before any API key.
    #[serde(default)]
    pub client_ca_path: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".parse().expect("valid literal"),
            data_dir: PathBuf::from("tokenlease-data"),
            database_url: None,
            redis_url: None,
            counters: CountersMode::Auto,
            redis: RedisSection {
                key_prefix: "tl".into(),
                timeout_ms: 250,
                durable: false,
            },
            lease: LeaseSection {
                ttl_ms: 5_000,
                use_grace_ms: 1_000,
                max_wait_ms: 60_000,
                max_waiters_per_tenant: 100,
                pace_burst_percent: 25,
            },
            breaker: BreakerSection {
                failures_to_open: 5,
                open_ms: 30_000,
                successes_to_close: 2,
            },
            rebalance: RebalanceSection {
                automatic: false,
                high: 0.85,
                low: 0.30,
                cooldown_ms: 3_600_000,
                history_ms: 900_000,
                sample_ms: 10_000,
                check_ms: 60_000,
            },
            history: HistorySection {
                bucket_ms: 3_600_000,
                flush_ms: 10_000,
                retention_days: 90,
                forecast_interval_ms: 3_600_000,
                forecast_days: 14,
            },
            cost: CostSection {
                currency: "EUR".into(),
            },
            encryption: EncryptionSection::default(),
            tls: None,
            metrics: MetricsSection {
                listen: "127.0.0.1:9464".into(),
                max_tenant_series: 500,
                refresh_ms: 5_000,
            },
            config_refresh_ms: 1_000,
            database_timeout_ms: 1_000,
            priorities: BTreeMap::new(),
            log_format: "text".into(),
            traces_filter: "info".into(),
            shutdown_grace_ms: 10_000,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl Settings {
    /// Loads defaults → file → environment, then validates.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("TOKENLEASE_CONFIG").map(PathBuf::from));
        if let Some(path) = file {
            if !path.exists() {
                bail!("configuration file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(Env::prefixed("TOKENLEASE_").ignore(&["config"]).split("__"))
            .merge(Env::raw().only(&["database_url", "redis_url"]));
        let settings: Settings = figment.extract().map_err(|e| {
            anyhow::anyhow!("invalid setting: {e} (settings come from defaults, the config file and TOKENLEASE_* variables)")
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        check_range("lease.ttl_ms", self.lease.ttl_ms, 10, 300_000)?;
        check_range("lease.use_grace_ms", self.lease.use_grace_ms, 0, 60_000)?;
        check_range("lease.max_wait_ms", self.lease.max_wait_ms, 0, 600_000)?;
        check_range(
            "lease.max_waiters_per_tenant",
            self.lease.max_waiters_per_tenant as u64,
            1,
            100_000,
        )?;
        check_range(
            "lease.pace_burst_percent",
            self.lease.pace_burst_percent.into(),
            1,
            100,
        )?;
        check_range("redis.timeout_ms", self.redis.timeout_ms, 10, 30_000)?;
        check_range("config_refresh_ms", self.config_refresh_ms, 100, 600_000)?;
        check_range("database_timeout_ms", self.database_timeout_ms, 50, 60_000)?;
        let breaker = &self.breaker;
        check_range(
            "breaker.failures_to_open",
            breaker.failures_to_open.into(),
            1,
            1_000,
        )?;
        check_range("breaker.open_ms", breaker.open_ms, 100, 3_600_000)?;
        check_range(
            "breaker.successes_to_close",
            breaker.successes_to_close.into(),
            1,
            100,
        )?;
        self.check_rebalance()?;
        self.check_history()?;
        let currency = &self.cost.currency;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            bail!(
                "invalid setting cost.currency = {currency:?}: it must be an ISO 4217 code, \
                 three uppercase letters such as EUR, PLN or USD"
            );
        }
        check_range("shutdown_grace_ms", self.shutdown_grace_ms, 0, 600_000)?;
        check_range(
            "handshake_timeout_ms",
            self.handshake_timeout_ms,
            100,
            600_000,
        )?;
        check_range("metrics.refresh_ms", self.metrics.refresh_ms, 100, 600_000)?;
        check_range(
            "metrics.max_tenant_series",
            self.metrics.max_tenant_series as u64,
            0,
            100_000,
        )?;
        self.metrics_addr()?;
        self.priority_map()
            .map_err(|e| anyhow::anyhow!("invalid setting {e}"))?;
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.traces_filter) {
            bail!(
                "invalid setting traces_filter = {:?}: {error} (use RUST_LOG's syntax, e.g. \"info\")",
                self.traces_filter
            );
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!(
                "invalid setting log_format = {:?}: use \"text\" or \"json\"",
                self.log_format
            );
        }
        let prefix_ok = !self.redis.key_prefix.is_empty()
            && self.redis.key_prefix.len() <= 64
            && self
                .redis
                .key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_:".contains(c));
        if !prefix_ok {
            bail!(
                "invalid setting redis.key_prefix = {:?}: use 1 to 64 letters, digits, '-', '_' or ':'",
                self.redis.key_prefix
            );
        }
        if let Some(url) = &self.database_url
            && !url.starts_with("postgres://")
            && !url.starts_with("postgresql://")
            && !url.starts_with("sqlite:")
        {
            bail!("invalid setting DATABASE_URL: expected postgres://… or sqlite:…");
        }
        if let Some(url) = &self.redis_url
            && !url
                .split(',')
                .all(|u| u.trim().starts_with("redis://") || u.trim().starts_with("rediss://"))
        {
            bail!(
                "invalid setting REDIS_URL: expected redis://host:port (comma-separated for a cluster)"
            );
        }
        self.counters_redis_url()?;
        Ok(())
    }

    /// The Redis the lease counters live in, or `None` for in-process counters; an
    /// error when the settings would make replicas count alone, or contradict.
    pub fn counters_redis_url(&self) -> anyhow::Result<Option<&str>> {
        let redis = self.redis_url.as_deref();
        match (self.counters, redis) {
            (CountersMode::Auto, None) if self.is_distributed() => bail!(
                "DATABASE_URL points at Postgres, so replicas share one configuration, but \
                 REDIS_URL is not set: each replica would count leases on its own, and N \
                 replicas would grant up to N times each token's limit. Set REDIS_URL to \
                 the Redis every replica shares, or, if this replica is the only one, set \
                 counters = \"memory\" (TOKENLEASE_COUNTERS=memory)."
            ),
            (CountersMode::Auto | CountersMode::Redis, Some(url)) => Ok(Some(url)),
            (CountersMode::Auto | CountersMode::Memory, None) => Ok(None),
            (CountersMode::Redis, None) => {
                bail!("counters = \"redis\" needs REDIS_URL (redis://host:port)")
            }
            (CountersMode::Memory, Some(_)) => bail!(
                "counters = \"memory\" and REDIS_URL are both set: unset REDIS_URL to count \
                 in this process alone, or set counters = \"auto\" to count in Redis"
            ),
        }
    }

    /// The `/metrics` address; `None` when `metrics.listen` is empty (metrics off).
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        let listen = self.metrics.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "invalid setting metrics.listen = {listen:?}: use host:port, e.g. 0.0.0.0:9464, or \"\" to turn metrics off"
            )
        })
    }

    /// The request-kind → priority mapping with this configuration's overrides.
    pub fn priority_map(&self) -> Result<crate::domain::PriorityMap, String> {
        crate::domain::PriorityMap::with_overrides(
            self.priorities
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease.ttl_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Every setting with its default, one per line: its TOML key, its environment
    /// variable and the default (for `serve --help`). Secrets have no default to show.
    pub fn defaults_help() -> String {
        fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match value {
                serde_json::Value::Object(map) if !map.is_empty() => {
                    for (key, inner) in map {
                        let path = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        flatten(&path, inner, out);
                    }
                }
                serde_json::Value::Object(_) => out.push((prefix.to_owned(), "{}".into())),
                serde_json::Value::Null => out.push((prefix.to_owned(), "unset".into())),
                other => out.push((prefix.to_owned(), other.to_string())),
            }
        }
        let defaults = serde_json::to_value(Settings::default()).unwrap_or_default();
        let mut lines = Vec::new();
        flatten("", &defaults, &mut lines);
        let mut help = String::from(
            "Settings: defaults, then a TOML file (--config or TOKENLEASE_CONFIG), then \
             environment variables (nested keys joined by __); DATABASE_URL and REDIS_URL \
             as is. The README's Settings table says what each one means.\n\n",
        );
        for (key, default) in lines {
            let env = match key.as_str() {
                "database_url" => "DATABASE_URL".to_owned(),
                "redis_url" => "REDIS_URL".to_owned(),
                _ => format!("TOKENLEASE_{}", key.replace('.', "__").to_uppercase()),
            };
            help.push_str(&format!("  {key} = {default}    ({env})\n"));
        }
        help.push_str(
            "\nAlso, unset by default: DATABASE_URL, REDIS_URL, encryption.keys.<id> (master \
             keys, base64 of 32 bytes), tls.cert_path, tls.key_path, tls.client_ca_path.\n",
        );
        help
    }

    fn check_rebalance(&self) -> anyhow::Result<()> {
        let r = &self.rebalance;
        if !(r.high > 0.0 && r.high <= 1.0 && r.low >= 0.0 && r.low < r.high) {
            bail!(
                "invalid settings rebalance.low = {} and rebalance.high = {}: they must satisfy \
                 0 <= low < high <= 1",
                r.low,
                r.high
            );
        }
        check_range("rebalance.cooldown_ms", r.cooldown_ms, 0, 30 * 86_400_000)?;
        check_range("rebalance.history_ms", r.history_ms, 100, 7 * 86_400_000)?;
        check_range("rebalance.sample_ms", r.sample_ms, 100, r.history_ms)?;
        check_range("rebalance.check_ms", r.check_ms, 100, 86_400_000)
    }

    fn check_history(&self) -> anyhow::Result<()> {
        let h = &self.history;
        const DAY_MS: u64 = 86_400_000;
        check_range("history.bucket_ms", h.bucket_ms, 60_000, DAY_MS)?;
        if !DAY_MS.is_multiple_of(h.bucket_ms) {
            bail!(
                "invalid setting history.bucket_ms = {}: it must divide a day (86400000 ms) \
                 evenly, e.g. 60000, 300000, 900000, 3600000 or 86400000",
                h.bucket_ms
            );
        }
        check_range("history.flush_ms", h.flush_ms, 100, h.bucket_ms - 1)?;
        check_range("history.retention_days", h.retention_days, 1, 36_500)?;
        check_range(
            "history.forecast_interval_ms",
            h.forecast_interval_ms,
            100,
            DAY_MS,
        )?;
        // One read of every replica's tenant rows of these days (and today): with
        // hourly buckets, 24 rows per tenant, replica and day.
        check_range("history.forecast_days", h.forecast_days, 1, 365)
    }

    pub fn history(&self) -> crate::history::HistorySettings {
        let h = &self.history;
        crate::history::HistorySettings {
            bucket_ms: h.bucket_ms as i64,
            flush_every: Duration::from_millis(h.flush_ms),
            retention: Duration::from_secs(h.retention_days * 86_400),
        }
    }

    /// The capacity forecast gauge's settings (`[history]` forecast_*).
    pub fn forecast(&self) -> crate::history::ForecastSettings {
        let h = &self.history;
        crate::history::ForecastSettings {
            bucket_ms: h.bucket_ms as i64,
            every: Duration::from_millis(h.forecast_interval_ms),
            days: h.forecast_days as i64,
        }
    }

    pub fn rebalance(&self) -> crate::lease::RebalanceSettings {
        let r = &self.rebalance;
        crate::lease::RebalanceSettings {
            band: crate::quota::rebalance::Band {
                high: r.high,
                low: r.low,
                cooldown_ms: r.cooldown_ms as i64,
            },
            history: Duration::from_millis(r.history_ms),
            sample_every: Duration::from_millis(r.sample_ms),
            automatic_every: r.automatic.then(|| Duration::from_millis(r.check_ms)),
        }
    }

    pub fn breaker_policy(&self) -> BreakerPolicy {
        BreakerPolicy {
            failures_to_open: self.breaker.failures_to_open,
            open_for: Duration::from_millis(self.breaker.open_ms),
            successes_to_close: self.breaker.successes_to_close,
        }
    }

    /// The database URL to use: the configured one, or the embedded SQLite file.
    pub fn effective_database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.data_dir.join(EMBEDDED_DATABASE).display()
            ),
        }
    }

    /// True when running as one of many replicas (Postgres configured).
    pub fn is_distributed(&self) -> bool {
        self.database_url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres"))
    }

    /// Builds the key ring from `keys` and `key_file`. In the embedded mode with no key
    /// configured, a key file is generated in `data_dir` on first start.
    pub fn key_ring(&self) -> anyhow::Result<KeyRing> {
        let mut keys = self.encryption.keys.clone();
        let mut key_file = self.encryption.key_file.clone();
        if keys.is_empty() && key_file.is_none() {
            if self.is_distributed() {
                bail!(
                    "no master key configured: set TOKENLEASE_ENCRYPTION__KEYS__K1=<base64 of 32 bytes> \
                     (generate one with `tokenlease gen-master-key`) or encryption.key_file"
                );
            }
            key_file = Some(ensure_embedded_key_file(&self.data_dir)?);
        }
        let mut file_active = None;
        if let Some(path) = &key_file {
            let file = read_key_file(path)?;
            keys.extend(file.keys);
            file_active = file.active;
        }
        let active = match (self.encryption.active_key.clone(), file_active) {
            (Some(active), _) | (None, Some(active)) => active,
            (None, None) if keys.len() == 1 => keys.keys().next().expect("one key").clone(),
            (None, None) => bail!(
                "several master keys are configured: set encryption.active_key (or an \
                 `active=<id>` line in the key file) to the one that seals new tokens"
            ),
        };
        KeyRing::from_base64(&keys, &active).context("invalid encryption settings")
    }
}

fn check_range(name: &str, value: u64, min: u64, max: u64) -> anyhow::Result<()> {
    if value < min || value > max {
        bail!("invalid setting {name} = {value}: it must be between {min} and {max}");
    }
    Ok(())
}

/// A key file: its keys, and the one it names active (`active=<id>`), if it does.
struct KeyFile {
    keys: BTreeMap<String, SecretString>,
    active: Option<String>,
}

/// Reads `id=base64` lines and an optional `active=<id>` line; blank lines and `#`
/// comments are skipped.
fn read_key_file(path: &Path) -> anyhow::Result<KeyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the master key file {}", path.display()))?;
    let mut keys = BTreeMap::new();
    let mut active = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((id, key)) = line.split_once('=') else {
            bail!("{} line {}: expected id=base64key", path.display(), n + 1);
        };
        if id.trim() == "active" {
            active = Some(key.trim().to_owned());
            continue;
        }
        keys.insert(
            id.trim().to_owned(),
            SecretString::from(key.trim().to_owned()),
        );
    }
    Ok(KeyFile { keys, active })
}

/// Creates `data_dir/master.key` (mode 0600) with one random key if it is missing.
fn ensure_embedded_key_file(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("master.key");
    if path.exists() {
        return Ok(path);
    }
    create_private_dir(data_dir)?;
    let key = KeyRing::generate_key_base64();
    let body = format!(
        "# tokenlease master keys, generated on first start. Keep them: tokens sealed with\n\
         # a key cannot be read without it. To rotate: add a line k2=<tokenlease\n\
         # gen-master-key>, point `active` at it, send SIGHUP to the running server (or\n\
         # restart it), then run `tokenlease rotate-keys`; drop k1 once no token uses it.\n\
         active=k1\nk1={}\n",
        secrecy::ExposeSecret::expose_secret(&key)
    );
    write_private_file(&path, &body)?;
    tracing::info!(path = %path.display(), "generated a master key for the embedded store");
    Ok(path)
}

/// Creates `dir` (and parents) readable only by its owner when it is new: it holds the
/// database with sealed tokens and the generated keys.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))
}

/// The embedded store's files in `data_dir`: the SQLite database (sealed tokens, API
/// key hashes) with its WAL and shared-memory files, the master keys, the first admin
/// key.
pub const DATA_FILES: &[&str] = &[
    EMBEDDED_DATABASE,
    "tokenlease.db-wal",
    "tokenlease.db-shm",
    "master.key",
    "admin.key",
];

/// The embedded SQLite database's file name in `data_dir`.
pub const EMBEDDED_DATABASE: &str = "tokenlease.db";

/// Creates an empty file readable only by its owner unless it exists (SQLite then
/// opens it, and gives its WAL and shared-memory files the same mode).
pub fn create_private_file_if_missing(path: &Path) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Makes each of the embedded store's files in `data_dir` that exists readable by its
/// owner only (0600), whoever made it and however: a data folder that pre-exists with
/// 0755 (made by hand, by an image, by a volume) says nothing of the files in it, and
/// a database created with the process's umask is world-readable. Returns the files
/// whose mode it changed.
pub fn tighten_data_files(data_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut tightened = Vec::new();
    #[cfg(unix)]
    for name in DATA_FILES {
        use std::os::unix::fs::PermissionsExt;
        let path = data_dir.join(name);
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !metadata.is_file() || metadata.permissions().mode() & 0o077 == 0 {
            continue;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private (mode 0600)", path.display()))?;
        tightened.push(path);
    }
    Ok(tightened)
}

/// Writes a file readable only by its owner.
pub fn write_private_file(path: &Path, body: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(body.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defaults validate; a bad value is refused with the setting named and no panic.
    #[test]
    fn defaults_and_bad_values() {
        assert!(Settings::default().validate().is_ok());
        let mut s = Settings::default();
        s.lease.ttl_ms = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("lease.ttl_ms") && err.contains("between"),
            "{err}"
        );
        let mut s = Settings::default();
        s.lease.pace_burst_percent = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("lease.pace_burst_percent"), "{err}");
        let s = Settings {
            redis_url: Some("http://x".into()),
            ..Settings::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("REDIS_URL"));
        let mut s = Settings::default();
        s.metrics.listen = "9464".into();
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        s.metrics.listen = String::new();
        assert_eq!(s.metrics_addr().unwrap(), None);
        s.metrics.refresh_ms = 0;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("metrics.refresh_ms")
        );
    }

    /// The breaker section defaults to the seed's thresholds (5 errors, 30 s, 2 probes)
    /// and refuses a zero threshold, naming the setting.
    #[test]
    fn breaker_settings() {
        assert_eq!(
            Settings::default().breaker_policy(),
            BreakerPolicy::default()
        );
        let mut s = Settings::default();
        s.breaker.failures_to_open = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("breaker.failures_to_open"), "{err}");
        let mut s = Settings::default();
        s.breaker.open_ms = 10;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("breaker.open_ms"), "{err}");
    }

    /// History buckets are hourly by default, at least a minute and a divisor of a day;
    /// the flush is shorter than a bucket; each refusal names its setting; the
    /// settings reach `serve --help` with their environment variables.
    #[test]
    fn history_settings() {
        let defaults = Settings::default().history();
        assert_eq!(defaults.bucket_ms, 3_600_000);
        assert_eq!(defaults.flush_every, Duration::from_secs(10));
        assert_eq!(defaults.retention, Duration::from_secs(90 * 86_400));
        let refused = |change: fn(&mut HistorySection)| {
            let mut s = Settings::default();
            change(&mut s.history);
            s.validate().unwrap_err().to_string()
        };
        assert!(refused(|h| h.bucket_ms = 30_000).contains("history.bucket_ms"));
        let err = refused(|h| h.bucket_ms = 7 * 60_000);
        assert!(
            err.contains("history.bucket_ms") && err.contains("divide a day"),
            "{err}"
        );
        assert!(refused(|h| h.flush_ms = 3_600_000).contains("history.flush_ms"));
        assert!(refused(|h| h.retention_days = 0).contains("history.retention_days"));
        let forecast = Settings::default().forecast();
        assert_eq!(forecast.every, Duration::from_secs(3_600));
        assert_eq!(forecast.days, 14);
        assert!(refused(|h| h.forecast_interval_ms = 0).contains("history.forecast_interval_ms"));
        assert!(refused(|h| h.forecast_days = 0).contains("history.forecast_days"));
        assert!(refused(|h| h.forecast_days = 366).contains("history.forecast_days"));
        let mut s = Settings::default();
        s.history.bucket_ms = 60_000;
        s.history.flush_ms = 5_000;
        assert!(s.validate().is_ok());
        let help = Settings::defaults_help();
        assert!(
            help.contains("history.bucket_ms = 3600000    (TOKENLEASE_HISTORY__BUCKET_MS)"),
            "{help}"
        );
        assert!(help.contains("history.retention_days = 90"), "{help}");
    }

    /// The currency defaults to EUR, shows in the settings help, and must be three
    /// uppercase letters.
    #[test]
    fn cost_currency() {
        assert_eq!(Settings::default().cost.currency, "EUR");
        let help = Settings::defaults_help();
        assert!(help.contains("cost.currency = \"EUR\""), "{help}");
        for bad in ["eur", "EURO", "", "E1R"] {
            let mut s = Settings::default();
            s.cost.currency = bad.into();
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("cost.currency"), "{err}");
        }
        let mut s = Settings::default();
        s.cost.currency = "PLN".into();
        assert!(s.validate().is_ok());
    }

    /// The file layer and the environment layer override defaults, in that order.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn layering() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "tl.toml",
                "config_refresh_ms = 2000\n[lease]\nttl_ms = 3000\nmax_wait_ms = 1000\n",
            )?;
            jail.set_env("TOKENLEASE_LEASE__TTL_MS", "4000");
            jail.set_env("REDIS_URL", "redis://127.0.0.1:6379");
            let s = Settings::load(Some(Path::new("tl.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.config_refresh_ms, 2000);
            assert_eq!(s.lease.ttl_ms, 4000);
            assert_eq!(s.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
            jail.set_env("TOKENLEASE_LEASE__TTL_MS", "soon");
            let err = Settings::load(Some(Path::new("tl.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.to_lowercase().contains("lease.ttl_ms"), "{err}");
            Ok(())
        });
    }

    /// A replica on a shared Postgres with no Redis refuses to count alone, saying why
    /// and what to set; `counters = "memory"` says it is alone.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn no_accidental_single_replica_counting() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "postgres://db/tokenlease");
            let err = Settings::load(None).unwrap_err().to_string();
            for part in ["REDIS_URL is not set", "N times", "counters = \"memory\""] {
                assert!(err.contains(part), "{part}: {err}");
            }
            jail.set_env("TOKENLEASE_COUNTERS", "memory");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.counters_redis_url().unwrap(), None);
            jail.set_env("REDIS_URL", "redis://127.0.0.1:6379");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("both set"), "{err}");
            jail.set_env("TOKENLEASE_COUNTERS", "auto");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                s.counters_redis_url().unwrap(),
                Some("redis://127.0.0.1:6379")
            );
            jail.set_env("TOKENLEASE_COUNTERS", "sometimes");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("counters"), "{err}");
            assert!(err.contains("`auto`, `memory`, `redis`"), "{err}");
            Ok(())
        });
        let embedded = Settings::default();
        assert_eq!(embedded.counters_redis_url().unwrap(), None);
        let redis_without_url = Settings {
            counters: CountersMode::Redis,
            ..Settings::default()
        };
        assert!(redis_without_url.counters_redis_url().is_err());
    }

    /// The embedded mode generates a private key file once and reuses it.
    #[test]
    fn embedded_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings {
            data_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        let ring = s.key_ring().unwrap();
        let again = s.key_ring().unwrap();
        assert_eq!(ring.active_key_id(), again.active_key_id());
        let (kid, sealed) = ring.seal("t", &SecretString::from("x"));
        assert!(again.open("t", &kid, &sealed).is_ok());
        let distributed = Settings {
            database_url: Some("postgres://x".into()),
            ..s
        };
        assert!(
            distributed
                .key_ring()
                .unwrap_err()
                .to_string()
                .contains("gen-master-key")
        );
    }
}
