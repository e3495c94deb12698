//! Keeps the current configuration snapshot: reloads it after this replica's own admin
//! writes (read-your-writes) and polls the store's version for other replicas' writes.
//! When the database is away the last snapshot stays in force.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::snapshot::Snapshot;
use crate::crypto::KeyRing;
use crate::store::{ConfigStore, StoreError};

/// A cheap-clone handle on the live snapshot.
#[derive(Clone)]
pub struct LiveConfig {
    store: ConfigStore,
    /// Replaced whole when the master keys are reloaded (`reload_keys`).
    ring: Arc<std::sync::RwLock<Arc<KeyRing>>>,
    sender: Arc<watch::Sender<Arc<Snapshot>>>,
    /// Serialises reloads so an older load never replaces a newer one.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
}

impl LiveConfig {
    /// Loads the first snapshot.
    pub async fn load(store: ConfigStore, ring: Arc<KeyRing>) -> Result<Self, StoreError> {
        let snapshot = Snapshot::build(store.load().await?, &ring);
        let (sender, _) = watch::channel(snapshot);
        Ok(Self {
            store,
            ring: Arc::new(std::sync::RwLock::new(ring)),
            sender: Arc::new(sender),
            reload_lock: Arc::default(),
        })
    }

    /// The snapshot in force now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.sender.borrow().clone()
    }

    /// Wakes when a new snapshot is in force.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }

    pub fn store(&self) -> &ConfigStore {
        &self.store
    }

    /// The master keys in force now.
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts new master keys in force (a key file re-read on SIGHUP): new tokens are
    /// sealed with its active key, and the snapshot is rebuilt so that tokens sealed
    /// with a key this replica did not have open now.
    pub async fn reload_keys(&self, ring: KeyRing) -> Result<(), StoreError> {
        let active = ring.active_key_id().to_owned();
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
        let _guard = self.reload_lock.lock().await;
        let stored = self.store.load().await?;
        tracing::info!(active_key = %active, version = stored.version, "master keys reloaded");
        self.sender
            .send_replace(Snapshot::build(stored, &self.ring()));
        Ok(())
    }

    /// Makes the snapshot at least as new as `version` (a write this replica just
    /// made). Concurrent writes share reloads: a write whose version a reload made
    /// while it waited for its turn loads nothing, so a burst of N writes costs a few
    /// loads, not N.
    pub async fn refresh_to(&self, version: i64) -> Result<(), StoreError> {
        let _guard = self.reload_lock.lock().await;
        if self.current().version >= version {
            return Ok(());
        }
        self.reload_locked().await
    }

    /// Reloads if the store's version is newer than the snapshot's.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let _guard = self.reload_lock.lock().await;
        self.reload_locked().await
    }

    /// `refresh`, with `reload_lock` held: reads only what changed since the
    /// snapshot's version and patches a copy of it (`Snapshot::patched`); loads and
    /// builds everything only when the store's change log does not cover the versions
    /// in between.
    async fn reload_locked(&self) -> Result<(), StoreError> {
        let current = self.current();
        let version = self.store.version().await?;
        if version == current.version {
            return Ok(());
        }
        if let Some(delta) = self.store.changes_since(current.version).await? {
            if delta.version > current.version {
                tracing::debug!(
                    version = delta.version,
                    changed = delta.len(),
                    "configuration patched"
                );
                self.sender
                    .send_replace(current.patched(delta, &self.ring()));
            }
            return Ok(());
        }
        let stored = self.store.load().await?;
        if stored.version > current.version {
            tracing::info!(version = stored.version, "configuration reloaded");
            self.sender
                .send_replace(Snapshot::build(stored, &self.ring()));
        }
        Ok(())
    }

    /// Polls for other replicas' writes until `shutdown` fires.
    pub fn spawn_refresher(&self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let live = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = shutdown.changed() => return,
                }
                match live.refresh().await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("configuration database reachable again");
                    }
                    Ok(()) => {}
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "cannot refresh configuration; leasing goes on with the last one loaded");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
