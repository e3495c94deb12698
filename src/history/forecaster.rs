//! Recomputes each pool's capacity forecast (`crate::forecast`) every
//! `history.forecast_interval_ms` for the gauge `tokenlease_pool_capacity_forecast_days`
//! (`metrics::pool_capacity_forecasts`), from the last `history.forecast_days` whole
//! days of history in the configuration store: two reads per interval (the
//! configuration and the tenants' history rows), hourly by default.
//!
//! Every replica computes the same numbers from the shared store (the alert takes the
//! `min`); a failed read (the database away) keeps the last values and is logged once
//! per outage.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::system_now_ms;
use crate::forecast::{self, DAY_MS, Forecast};
use crate::store::{ConfigStore, StoreError};

use super::Selection;

/// The `[history]` forecast settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForecastSettings {
    /// The stored bucket.
    pub bucket_ms: i64,
    /// How often the gauge is recomputed.
    pub every: Duration,
    /// Whole days of history the trend is fitted on (today's partial day is read too,
    /// and left out by the forecast).
    pub days: i64,
}

/// One replica's forecaster.
#[derive(Clone)]
pub struct Forecaster {
    pub store: ConfigStore,
    pub settings: ForecastSettings,
}

impl Forecaster {
    /// Every pool's forecast at `now_ms`.
    pub async fn forecasts(&self, now_ms: i64) -> Result<Vec<Forecast>, StoreError> {
        let from = (now_ms.div_euclid(DAY_MS) - self.settings.days) * DAY_MS;
        let config = self.store.load().await?;
        let tenants_only = Selection {
            tenants: None,
            tokens: Some(vec![]),
            upstream_id: None,
        };
        let rows = self.store.read_history(from, now_ms, &tenants_only).await?;
        let pools = forecast::pool_demands(&config.view, rows, self.settings.bucket_ms);
        Ok(pools
            .iter()
            .map(|pool| forecast::forecast(pool, from, now_ms, now_ms))
            .collect())
    }

    /// Publishes the gauge every `every` (at once, then on each tick) until `stop`.
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(self.settings.every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut published = HashSet::new();
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                match self.forecasts(system_now_ms()).await {
                    Ok(forecasts) => {
                        failing = false;
                        crate::metrics::pool_capacity_forecasts(
                            &forecasts.iter().map(gauge_value).collect::<Vec<_>>(),
                            &mut published,
                        );
                    }
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "cannot compute the pools' capacity forecast; keeping the last values");
                    }
                    Err(_) => {}
                }
            }
        })
    }
}

/// The gauge's value: days until full, +Inf when no token is needed within the
/// horizon, NaN without a whole day of history (unknown: `NaN < 14` is false, so the
/// alert stays quiet, and the series exists from the pool's creation on).
pub fn gauge_value(f: &Forecast) -> (String, f64) {
    let value = match (f.trend, f.days_until_full) {
        (None, _) => f64::NAN,
        (Some(_), Some(days)) => days,
        (Some(_), None) => f64::INFINITY,
    };
    (f.pool.clone(), value)
}
