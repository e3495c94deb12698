//! Building and running the server: `App::build(settings)` wires the store, the counters
//! and the services onto an already-bound listener; `run_until_stopped(shutdown)` serves
//! until the shutdown future resolves, then drains in-flight calls.
//!
//! Graceful shutdown: on the signal, health flips to NOT_SERVING (load balancers stop
//! sending), the server stops accepting, in-flight calls finish (bounded by
//! `shutdown_grace_ms`), and background tasks are told to stop through a watch channel.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::admin::ensure_admin_key;
use crate::clock::Clock;
use crate::config::{Settings, write_private_file};
use crate::domain::Id;
use crate::events::EventBus;
use crate::grpc::admin_api::AdminApi;
use crate::grpc::auth::AuthInterceptor;
use crate::grpc::lease_api::LeaseApi;
use crate::grpc::pb::{
    self, admin_service_server::AdminServiceServer, lease_service_server::LeaseServiceServer,
};
use crate::lease::{Allocator, Leaser, Lines, LiveConfig, Rebalancer, TokenHealth};
use crate::metrics;
use crate::store::ConfigStore;
use crate::store::counters::{self, Counters, MemoryCounters, RedisCounters, RedisSettings};
use crate::store::event_relay::{self, RelaySettings};

mod incoming;
mod waiting;

/// HTTP/2 PINGs on a connection idle this long, to find peers that went away, and how
/// long a PING may stay unanswered before the connection is closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls in flight on one connection (HTTP/2 streams); a client wanting more opens
/// another connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The services' names, as health checks ask for them.
const LEASE_SERVICE: &str = <LeaseServiceServer<LeaseApi> as tonic::server::NamedService>::NAME;
const ADMIN_SERVICE: &str = <AdminServiceServer<AdminApi> as tonic::server::NamedService>::NAME;

/// A built, not yet running, server.
pub struct App {
    listener: TcpListener,
    /// The `/metrics` listener and the recorder's handle; `None` when metrics are off.
    metrics: Option<(TcpListener, metrics_exporter_prometheus::PrometheusHandle)>,
    settings: Settings,
    pub leaser: Leaser,
    pub events: EventBus,
    /// Tells background tasks to stop; they also stop when it is dropped.
    stop: watch::Sender<bool>,
}

/// Connects to the configuration database, applies migrations and seeds defaults;
/// returns the store and the upstream the seeding created, if it did.
pub async fn open_store(settings: &Settings) -> anyhow::Result<(ConfigStore, Option<Id>)> {
    if settings.database_url.is_none() {
        crate::config::create_private_dir(&settings.data_dir)?;
        let database = settings.data_dir.join(crate::config::EMBEDDED_DATABASE);
        crate::config::create_private_file_if_missing(&database)?;
    }
    let store = ConfigStore::connect(&settings.effective_database_url())
        .await
        .context("cannot open the configuration database")?;
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    let seeded = store
        .seed_defaults()
        .await
        .context("cannot seed the default tiers and upstream")?;
    Ok((store, seeded))
}

async fn open_counters(settings: &Settings) -> anyhow::Result<Counters> {
    let Some(url) = settings.counters_redis_url()? else {
        return Ok(Counters::Memory(MemoryCounters::new(Clock::System)));
    };
    let redis = RedisSettings {
        url: url.to_owned(),
        key_prefix: settings.redis.key_prefix.clone(),
        timeout: Duration::from_millis(settings.redis.timeout_ms),
        durable: settings.redis.durable,
    };
    let counters = RedisCounters::connect(&redis)
        .await
        .context("cannot set up the Redis lease counters")?;
    Ok(Counters::Redis(counters))
}

impl App {
    /// Opens everything and binds the listener. Nothing is served yet.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        // Settings that can be wrong are checked before anything is written (the data
        // folder, a generated master key, the database).
        if let Some(tls) = &settings.tls {
            load_tls(tls)?;
        }
        let ring = Arc::new(settings.key_ring()?);
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let (config, seeded) = waiting::open_config(&settings, ring, &listener).await?;
        if !settings.is_distributed() {
            bootstrap_admin_key(&settings, &config).await?;
        }
        if settings.database_url.is_none() {
            for path in crate::config::tighten_data_files(&settings.data_dir)? {
                tracing::warn!(path = %path.display(), "the file was readable by others: made it private (mode 0600)");
            }
        }
        let counters = open_counters(&settings).await?;
        install_token_mover(&config, &counters, &settings);
        if let Some(upstream) = seeded {
            counters
                .mark_created(crate::store::counters::Space::upstream(&upstream))
                .await;
        }
        let metrics = match settings.metrics_addr()? {
            Some(addr) => {
                let idle = Duration::from_millis(settings.metrics.refresh_ms.saturating_mul(3))
                    .max(Duration::from_secs(30));
                let handle = metrics::install(settings.metrics.max_tenant_series, idle)?;
                Some((metrics::bind(addr).await?, handle))
            }
            None => None,
        };
        // Unique per App, even for several in one process: replicas drop their own
        // events when the shared channel echoes them back, by this id.
        let replica_id = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let events = EventBus::new(&replica_id);
        let (stop, stop_rx) = watch::channel(false);
        if let Some(url) = &settings.redis_url {
            let relay = RelaySettings {
                url: url.clone(),
                channel: RelaySettings::channel_for(&settings.redis.key_prefix),
                timeout: Duration::from_millis(settings.redis.timeout_ms),
            };
            event_relay::start(relay, events.clone(), stop_rx.clone())
                .await
                .context("cannot start the event relay")?;
        }
        let health = TokenHealth::new(settings.breaker_policy(), events.clone());
        health.spawn_follower(stop_rx);
        let allocator = Allocator::new(
            config.clone(),
            counters.clone(),
            events.clone(),
            health.clone(),
        );
        if let Err(error) = allocator.refresh().await {
            tracing::warn!(%error, "cannot compute the quotas of an upstream yet; its tenants get their guarantees until its counters answer");
        }
        let leaser = Leaser {
            config,
            counters,
            allocator,
            lease_ttl: settings.lease_ttl(),
            use_grace: Duration::from_millis(settings.lease.use_grace_ms),
            max_wait: Duration::from_millis(settings.lease.max_wait_ms),
            max_waiters_per_tenant: settings.lease.max_waiters_per_tenant,
            pace_burst_percent: settings.lease.pace_burst_percent,
            lines: Lines::default(),
            health,
            stopping: stop.subscribe(),
            history: crate::history::Recorder::new(settings.history().bucket_ms),
        };
        Ok(App {
            listener,
            metrics,
            settings,
            leaser,
            events,
            stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where `/metrics` is served, when metrics are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .map(|(l, _)| l.local_addr().expect("a bound listener has an address"))
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop_tx = self.stop.clone();
        let stop_rx = stop_tx.subscribe();
        self.leaser.allocator.spawn(stop_rx.clone());
        match &self.leaser.counters {
            Counters::Redis(redis) => counters::spawn_eviction_watch(
                redis.clone(),
                counters::EVICTION_CHECK_EVERY,
                metrics::redis_may_evict,
                stop_rx.clone(),
            ),
            // Counters in this process's memory: nothing can evict them.
            Counters::Memory(_) => metrics::redis_may_evict(false),
        }
        self.leaser.config.spawn_refresher(
            Duration::from_millis(self.settings.config_refresh_ms),
            stop_rx.clone(),
        );
        let key_keeper = spawn_key_keeper(
            self.settings.clone(),
            self.leaser.config.clone(),
            self.events.replica_id().to_owned(),
            stop_rx.clone(),
        )?;
        let history = crate::history::Flusher {
            recorder: self.leaser.history.clone(),
            store: self.leaser.config.store().clone(),
            replica_id: self.events.replica_id().to_owned(),
            settings: self.settings.history(),
        }
        .spawn(stop_rx.clone());
        if let Some((listener, handle)) = self.metrics.take() {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            let leaser = self.leaser.clone();
            let read = move || {
                let leaser = leaser.clone();
                async move {
                    let tokens = leaser.tokens_usage().await?;
                    let snapshot = leaser.config.current();
                    let reading = |t| token_reading(t, &snapshot);
                    Ok::<_, crate::error::ServiceError>(tokens.into_iter().map(reading).collect())
                }
            };
            crate::history::Forecaster {
                store: self.leaser.config.store().clone(),
                settings: self.settings.forecast(),
            }
            .spawn(stop_rx.clone());
            metrics::spawn_refresher(
                read,
                handle.clone(),
                Duration::from_millis(self.settings.metrics.refresh_ms),
                stop_rx.clone(),
            );
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                if let Err(error) = metrics::serve(listener, handle, stop).await {
                    tracing::error!(error = format!("{error:#}"), "metrics endpoint stopped");
                }
            });
        }

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<LeaseServiceServer<LeaseApi>>().await;
        health.set_serving::<AdminServiceServer<AdminApi>>().await;
        // The error details (google.rpc.BadRequest, RetryInfo…) too, so that grpcurl
        // prints them.
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let auth = AuthInterceptor {
            config: self.leaser.config.clone(),
        };
        let lease = LeaseApi {
            leaser: self.leaser.clone(),
            events: self.events.clone(),
            priorities: self.settings.priority_map().map_err(anyhow::Error::msg)?,
            streams: Default::default(),
        };
        let rebalancer = Rebalancer::new(
            self.leaser.clone(),
            self.events.clone(),
            self.settings.rebalance(),
            Duration::from_millis(self.settings.database_timeout_ms),
        );
        rebalancer.spawn(stop_rx.clone());
        let admin = AdminApi {
            leaser: self.leaser.clone(),
            events: self.events.clone(),
            rebalancer,
            database_timeout: Duration::from_millis(self.settings.database_timeout_ms),
            currency: self.settings.cost.currency.clone(),
        };

        // One server span per call, child of the caller's `traceparent` (see telemetry).
        let mut builder = Server::builder()
            .trace_fn(crate::telemetry::grpc_request_span)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
        if let Some(tls) = &self.settings.tls {
            builder = builder
                .tls_config(load_tls(tls)?)
                .context("invalid TLS configuration")?;
        }
        let addr = self.local_addr();
        let scheme = if self.settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!(%addr, scheme, distributed = self.settings.is_distributed(), "tokenlease serving");
        if self.settings.tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "listening beyond this host without TLS: API keys and the decrypted upstream \
                 tokens in AcquireLease answers cross the network in clear. Set tls.cert_path \
                 and tls.key_path, or listen on 127.0.0.1 behind a TLS-terminating proxy"
            );
        }

        let grace = Duration::from_millis(self.settings.shutdown_grace_ms);
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight calls");
            health
                .set_not_serving::<LeaseServiceServer<LeaseApi>>()
                .await;
            health
                .set_not_serving::<AdminServiceServer<AdminApi>>()
                .await;
            let _ = stop_tx.send(true);
        };
        let serve = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(LeaseServiceServer::with_interceptor(lease, auth.clone()))
            .add_service(AdminServiceServer::with_interceptor(admin, auth))
            .serve_with_incoming_shutdown(
                incoming::incoming(&self.listener, self.settings.handshake_timeout()),
                signal,
            );
        let mut stopped = stop_rx;
        tokio::select! {
            result = serve => result.context("the gRPC server failed")?,
            _ = async { let _ = stopped.wait_for(|s| *s).await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "in-flight calls did not finish within the grace period");
            }
        }
        // The keeper removes this replica's master keys record as it stops.
        if tokio::time::timeout(Duration::from_secs(1), key_keeper)
            .await
            .is_err()
        {
            tracing::debug!("could not remove this replica's master keys record; it goes stale");
        }
        // The flusher writes the usage history counted since its last flush as it stops.
        if tokio::time::timeout(Duration::from_secs(2), history)
            .await
            .is_err()
        {
            tracing::warn!(
                "usage history since the last flush could not be written in time; it is lost"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Keeps this replica's master keys current and known, until `stop`: on SIGHUP it reads
/// them again (the key file; keys set in the environment need a restart) and puts them
/// in force (a bad key file is logged and the keys in force stay); at start, after a
/// reload and every `KEYS_ANNOUNCE_EVERY` it records in the configuration store which
/// keys it holds, for `rotate-keys` to check; when it stops, it removes that record (a
/// stopped replica holds no key).
/// A write that moves tokens to another counters space hands their counters over
/// before it commits (`Counters::prepare_moves`).
fn install_token_mover(config: &LiveConfig, counters: &Counters, settings: &Settings) {
    let (live, counters) = (config.clone(), counters.clone());
    let hold = settings.lease_ttl() + Duration::from_millis(settings.lease.use_grace_ms);
    config
        .store()
        .set_token_mover(Arc::new(move |version, moves| {
            let (live, counters) = (live.clone(), counters.clone());
            Box::pin(async move {
                let snapshot = live.current();
                let limits = |upstream: &crate::domain::Id| {
                    let upstream = snapshot.upstreams.get(upstream)?;
                    Some((upstream.usable_per_window(), upstream.window))
                };
                (counters.prepare_moves(&moves, version, hold, limits).await)
                    .map_err(|e| e.to_string())
            })
        }));
}

fn spawn_key_keeper(
    settings: Settings,
    config: LiveConfig,
    replica_id: String,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    Ok(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(crate::admin::KEYS_ANNOUNCE_EVERY);
        loop {
            let hangup = tokio::select! {
                _ = ticker.tick() => false,
                received = hangups.recv() => match received {
                    Some(()) => true,
                    None => break,
                },
                _ = stop.wait_for(|s| *s) => break,
            };
            if hangup {
                let reloaded = match settings.key_ring() {
                    Ok(ring) => config.reload_keys(ring).await.map_err(anyhow::Error::from),
                    Err(error) => Err(error),
                };
                if let Err(error) = reloaded {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "SIGHUP: master keys not reloaded; the keys in force stay"
                    );
                }
            }
            if let Err(error) = crate::admin::announce_keys(&config, &replica_id).await {
                tracing::debug!(%error, "cannot record this replica's master keys; retrying later");
            }
        }
        crate::admin::forget_replica_keys(&config, &replica_id).await;
    }))
}

fn load_tls(tls: &crate::config::TlsSection) -> anyhow::Result<ServerTlsConfig> {
    let cert = std::fs::read(&tls.cert_path)
        .with_context(|| format!("cannot read tls.cert_path {}", tls.cert_path.display()))?;
    let key = std::fs::read(&tls.key_path)
        .with_context(|| format!("cannot read tls.key_path {}", tls.key_path.display()))?;
    let config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    let Some(ca_path) = &tls.client_ca_path else {
        return Ok(config);
    };
    let ca = std::fs::read(ca_path)
        .with_context(|| format!("cannot read tls.client_ca_path {}", ca_path.display()))?;
    Ok(config.client_ca_root(tonic::transport::Certificate::from_pem(ca)))
}

/// Embedded mode, first start: creates an admin key and writes it to
/// `data_dir/admin.key` (mode 0600). The key is never logged; the log names the file.
async fn bootstrap_admin_key(settings: &Settings, config: &LiveConfig) -> anyhow::Result<()> {
    let Some(key) = ensure_admin_key(config, "bootstrap admin").await? else {
        return Ok(());
    };
    let path = settings.data_dir.join("admin.key");
    let _ = std::fs::remove_file(&path);
    write_private_file(&path, &format!("{}\n", crate::auth::reveal(&key)))?;
    tracing::info!(path = %path.display(), "created the first admin API key; read it from this file");
    Ok(())
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tokenlease".into())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
}

/// A token's usage as the metrics show it.
fn token_reading(
    t: crate::lease::TokenUsage,
    snapshot: &crate::lease::Snapshot,
) -> metrics::TokenReading {
    metrics::TokenReading {
        owner: (snapshot.tokens.get(&t.token_id)).map(|live| live.record.owner.clone()),
        token_id: t.token_id,
        upstream_id: t.upstream_id,
        state: t.state,
        used: t.used,
        usable: t.usable,
        disabled: t.disabled,
    }
}
