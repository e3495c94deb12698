//! Starting while the configuration database is away. A replica with `DATABASE_URL`
//! keeps trying to open and load it (exponential backoff with jitter, 200 ms to 10 s,
//! for as long as it takes) instead of exiting, logs each failure with the next delay,
//! and meanwhile answers gRPC health checks on its own listener with NOT_SERVING: an
//! orchestrator sees it alive but not ready, and sends it no traffic. Errors that
//! waiting cannot fix (a bad URL, a failed migration) still stop it at once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::{load_tls, open_store};
use crate::config::Settings;
use crate::crypto::KeyRing;
use crate::domain::Id;
use crate::lease::LiveConfig;
use crate::store::StoreError;

/// How long a health check connection may stay once the database is reached (a
/// `Watch` stream would otherwise keep the interim server running).
const HANDOVER: Duration = Duration::from_secs(1);

/// Opens the configuration store and loads it; with Postgres, waits for it as above.
pub(super) async fn open_config(
    settings: &Settings,
    ring: Arc<KeyRing>,
    listener: &TcpListener,
) -> anyhow::Result<(LiveConfig, Option<Id>)> {
    let open = || async {
        let (store, seeded) = open_store(settings).await?;
        let config = LiveConfig::load(store, ring.clone())
            .await
            .context("cannot load the configuration")?;
        Ok::<_, anyhow::Error>((config, seeded))
    };
    if settings.database_url.is_none() {
        return open().await;
    }
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let opened = open
        .retry(backoff)
        .when(database_away)
        .notify(|error, next| {
            tracing::warn!(
                error = format!("{error:#}"),
                retry_in = ?next,
                "configuration database unreachable at start; retrying (health says NOT_SERVING until then)"
            );
        });
    let (ready, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let health = serve_not_serving(settings, listener, async move {
        let _ = ready_rx.await;
    });
    tokio::pin!(health);
    let opened = tokio::select! {
        opened = opened => opened,
        served = &mut health => {
            served?;
            anyhow::bail!("the interim health server stopped before the database was reached");
        }
    };
    let _ = ready.send(());
    if tokio::time::timeout(HANDOVER, health).await.is_err() {
        tracing::debug!("a health watch outlived the handover; it was cut");
    }
    if opened.is_ok() {
        tracing::info!("configuration database reached");
    }
    opened
}

/// Whether an error is the database being away (worth waiting for).
fn database_away(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| matches!(cause.downcast_ref(), Some(StoreError::Unavailable(_))))
}

/// Serves only gRPC health, NOT_SERVING for everything, on `listener` until `until`.
async fn serve_not_serving(
    settings: &Settings,
    listener: &TcpListener,
    until: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (reporter, service) = tonic_health::server::health_reporter();
    for name in ["", super::LEASE_SERVICE, super::ADMIN_SERVICE] {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let mut builder = Server::builder();
    if let Some(tls) = &settings.tls {
        builder = builder.tls_config(load_tls(tls)?)?;
    }
    let incoming = super::incoming::incoming(listener, settings.handshake_timeout());
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, until)
        .await?;
    Ok(())
}
