//! Writes the replica's history to the configuration store every `flush_every`, and
//! once more when the replica stops; deletes rows past the retention once per bucket.
//!
//! A write that fails (the database away) leaves the rows pending in the recorder:
//! the next flush writes their newer cumulative values, so an outage loses nothing
//! while the replica runs. A crash loses what was recorded since the last flush:
//! at most `flush_every`, less than one bucket.

use std::time::Duration;

use tokio::sync::watch;

use crate::clock::system_now_ms;
use crate::store::{ConfigStore, StoreError};

use super::recorder::Recorder;
use super::tally::bucket_start;

/// The `[history]` settings as the flusher uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    /// The stored bucket.
    pub bucket_ms: i64,
    pub flush_every: Duration,
    /// Rows of buckets that started longer ago are deleted.
    pub retention: Duration,
}

/// One replica's writer of history.
#[derive(Clone)]
pub struct Flusher {
    pub recorder: Recorder,
    pub store: ConfigStore,
    pub replica_id: String,
    pub settings: HistorySettings,
}

impl Flusher {
    /// Writes every row changed since the last write (tallies, then grants per tenant
    /// and token); returns how many.
    pub async fn flush(&self, now_ms: i64) -> Result<usize, StoreError> {
        let rows = self.recorder.pending();
        self.store
            .write_history(&self.replica_id, &rows, now_ms)
            .await?;
        self.recorder.written(&rows, now_ms);
        let grants = self.recorder.grants.pending();
        self.store
            .write_grants(&self.replica_id, &grants, now_ms)
            .await?;
        self.recorder.grants.written(&grants, now_ms);
        Ok(rows.len() + grants.len())
    }

    /// Deletes every replica's rows past the retention; returns how many.
    pub async fn prune(&self, now_ms: i64) -> Result<u64, StoreError> {
        let keep_from = now_ms.saturating_sub(self.settings.retention.as_millis() as i64);
        self.store.prune_history(keep_from).await
    }

    /// Flushes every `flush_every` until `stop`, then once more. The returned task
    /// ends after that last flush (the caller bounds how long it waits for it).
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(self.settings.flush_every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pruned_bucket = None;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                let now = system_now_ms();
                if let Err(error) = self.flush(now).await {
                    tracing::warn!(%error, held = self.recorder.held(), "cannot write usage history; retrying at the next flush");
                }
                let bucket = bucket_start(now, self.settings.bucket_ms);
                if pruned_bucket != Some(bucket) {
                    match self.prune(now).await {
                        Ok(_) => pruned_bucket = Some(bucket),
                        Err(error) => {
                            tracing::debug!(%error, "cannot delete old usage history; retrying later")
                        }
                    }
                }
            }
            if let Err(error) = self.flush(system_now_ms()).await {
                tracing::warn!(%error, "usage history since the last flush is lost: cannot write it while stopping");
            }
        })
    }
}
