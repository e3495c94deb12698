//! Events about the configuration and leasing, fanned out to `WatchEvents` streams.
//!
//! Policy for slow watchers: the bus is a bounded `broadcast` channel. A watcher that
//! falls more than `CAPACITY` events behind loses the oldest ones and is told so with a
//! `Resync` event (how many it missed) instead of silently skipping them.
//!
//! Across replicas: with Redis, `store::event_relay` sends every event published here to
//! the other replicas (a Redis pub/sub channel) and delivers theirs to this bus with
//! `deliver_remote`. An event is delivered to local watchers once, when it is published
//! on its own replica; the copy the shared channel echoes back is dropped by replica id.
//! When the relay loses its subscription it cannot know what it missed, so on
//! reconnecting it tells local watchers to `Resync`. Without Redis there is one replica
//! and the local bus is all there is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::clock::system_now_ms;
use crate::domain::{Id, TokenState};

/// Events kept for slow watchers before they must resync.
pub const CAPACITY: usize = 1024;

/// Events queued for other replicas while the relay is slow (or Redis away); past it
/// they are dropped, counted, and the other replicas' watchers told to resync.
pub const OUTBOX_CAPACITY: usize = 4096;

/// What kind of object an admin changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Upstream,
    Token,
    Pool,
    Tier,
    Tenant,
    ApiKey,
}

/// How it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Created,
    Updated,
    Deleted,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ConfigChanged {
        resource: Resource,
        id: String,
        change: Change,
        version: i64,
    },
    QuotaChanged {
        tenant_id: String,
        upstream_id: String,
        previous: u32,
        new: u32,
        cause: String,
    },
    /// A token's breaker or quarantine changed, or an admin disabled or enabled it.
    TokenStateChanged {
        token_id: String,
        previous: TokenState,
        new: TokenState,
        /// For BREAKER_OPEN and QUARANTINED: when that state ends (Unix ms).
        until_ms: Option<i64>,
        /// Why, for people.
        cause: String,
    },
    /// An upstream's lease counters were lost: no grant on it until `until_ms` (Unix
    /// ms). Published once, by the replica whose decision noticed the loss.
    CountersRecovering {
        upstream_id: String,
        until_ms: i64,
        cause: String,
    },
    /// Rebalancing moved a tenant from one pool to another.
    TenantMoved {
        tenant_id: String,
        from_pool_id: String,
        to_pool_id: String,
        cause: String,
    },
    /// Watchers may have missed events: this replica's feed from the others was
    /// interrupted (local), or another replica could not send `missed` of its events
    /// (relayed by that replica once it can).
    Resync { missed: u64 },
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub occurred_at_ms: i64,
    pub replica_id: String,
    pub kind: EventKind,
}

impl Event {
    /// The tenant the event is about, if any (for filters and scopes).
    pub fn tenant_id(&self) -> Option<&str> {
        match &self.kind {
            EventKind::ConfigChanged {
                resource: Resource::Tenant,
                id,
                ..
            } => Some(id),
            EventKind::ConfigChanged { .. }
            | EventKind::TokenStateChanged { .. }
            | EventKind::CountersRecovering { .. }
            | EventKind::Resync { .. } => None,
            EventKind::QuotaChanged { tenant_id, .. }
            | EventKind::TenantMoved { tenant_id, .. } => Some(tenant_id),
        }
    }

    /// The token the event is about, if any.
    pub fn token_id(&self) -> Option<&str> {
        match &self.kind {
            EventKind::ConfigChanged {
                resource: Resource::Token,
                id,
                ..
            }
            | EventKind::TokenStateChanged { token_id: id, .. } => Some(id),
            EventKind::ConfigChanged { .. }
            | EventKind::Resync { .. }
            | EventKind::CountersRecovering { .. }
            | EventKind::TenantMoved { .. }
            | EventKind::QuotaChanged { .. } => None,
        }
    }

    /// The compact JSON form sent between replicas.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event always serialises")
    }

    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Whether only admins may see it (API key changes).
    pub fn admin_only(&self) -> bool {
        matches!(
            self.kind,
            EventKind::ConfigChanged {
                resource: Resource::ApiKey,
                ..
            }
        )
    }
}

/// A watcher's filter: empty lists match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant_ids: Vec<Id>,
    pub token_ids: Vec<Id>,
}

impl Filter {
    pub fn matches(&self, event: &Event) -> bool {
        let tenant_ok = self.tenant_ids.is_empty()
            || event
                .tenant_id()
                .is_none_or(|t| self.tenant_ids.iter().any(|f| f.as_str() == t));
        let token_ok = self.token_ids.is_empty()
            || event
                .token_id()
                .is_none_or(|t| self.token_ids.iter().any(|f| f.as_str() == t));
        tenant_ok && token_ok
    }
}

/// The fan-out point; cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    replica_id: Arc<str>,
    /// Set once a relay to other replicas runs: events published here are queued for it.
    outbox: Arc<OnceLock<mpsc::Sender<Arc<Event>>>>,
    /// Events other replicas never got (queue full, or publishing failed) since the
    /// relay last said so.
    undelivered: Arc<AtomicU64>,
}

impl EventBus {
    pub fn new(replica_id: &str) -> Self {
        let (sender, _) = broadcast::channel(CAPACITY);
        Self {
            sender,
            replica_id: replica_id.into(),
            outbox: Arc::default(),
            undelivered: Arc::default(),
        }
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Publishes an event made on this replica, now.
    pub fn publish(&self, kind: EventKind) {
        self.publish_at(system_now_ms(), kind);
    }

    /// Publishes an event made on this replica that happened at `occurred_at_ms` (the
    /// store's clock for token state changes). Local watchers get it now; other
    /// replicas through the relay, when one runs.
    pub fn publish_at(&self, occurred_at_ms: i64, kind: EventKind) {
        let event = Arc::new(Event {
            occurred_at_ms,
            replica_id: self.replica_id.to_string(),
            kind,
        });
        if let Some(outbox) = self.outbox.get()
            // Resyncs are about this replica's feed; quota changes are computed alike on
            // every replica from shared inputs, so each replica tells its own watchers.
            && !matches!(event.kind, EventKind::Resync { .. } | EventKind::QuotaChanged { .. })
            && outbox.try_send(event.clone()).is_err()
            && self.undelivered.fetch_add(1, Ordering::Relaxed) == 0
        {
            tracing::warn!("event relay queue full; other replicas will be told to resync");
        }
        // No receivers is fine: nobody is watching.
        let _ = self.sender.send(event);
    }

    /// Starts relaying this replica's events: returns the queue the relay drains, or
    /// `None` if a relay was started already.
    pub fn relay_outbox(&self) -> Option<mpsc::Receiver<Arc<Event>>> {
        let (sender, receiver) = mpsc::channel(OUTBOX_CAPACITY);
        self.outbox.set(sender).ok()?;
        Some(receiver)
    }

    /// Counts events that other replicas did not get (the relay could not publish them).
    pub fn count_undelivered(&self, events: u64) {
        self.undelivered.fetch_add(events, Ordering::Relaxed);
    }

    /// The events other replicas did not get since the last call; the relay sends
    /// them a `Resync { missed }` saying so.
    pub fn take_undelivered(&self) -> u64 {
        self.undelivered.swap(0, Ordering::Relaxed)
    }

    /// This replica's `Resync` for other replicas' watchers (see `take_undelivered`).
    pub fn undelivered_notice(&self, missed: u64) -> Event {
        Event {
            occurred_at_ms: system_now_ms(),
            replica_id: self.replica_id.to_string(),
            kind: EventKind::Resync { missed },
        }
    }

    /// Delivers an event from another replica to local watchers. Returns false (and
    /// drops it) when it is this replica's own, echoed back by the shared channel: it
    /// was delivered when it was published.
    pub fn deliver_remote(&self, event: Event) -> bool {
        if *event.replica_id == *self.replica_id {
            return false;
        }
        let _ = self.sender.send(Arc::new(event));
        true
    }

    /// Tells local watchers they may have missed events (not relayed).
    pub fn resync(&self) {
        let event = Event {
            occurred_at_ms: system_now_ms(),
            replica_id: self.replica_id.to_string(),
            kind: EventKind::Resync { missed: 0 },
        };
        let _ = self.sender.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_event() -> EventKind {
        EventKind::TokenStateChanged {
            token_id: "tok-1".into(),
            previous: TokenState::Active,
            new: TokenState::BreakerOpen,
            until_ms: Some(1_750_000_030_000),
            cause: "circuit breaker opened".into(),
        }
    }

    /// Every relayed event kind survives the JSON form replicas exchange.
    #[test]
    fn events_roundtrip_through_json() {
        for kind in [
            token_event(),
            EventKind::ConfigChanged {
                resource: Resource::ApiKey,
                id: "k".into(),
                change: Change::Deleted,
                version: 7,
            },
        ] {
            let event = Event {
                occurred_at_ms: 1_750_000_000_000,
                replica_id: "a-1".into(),
                kind,
            };
            let json = event.to_json();
            assert_eq!(Event::from_json(&json).unwrap(), event, "{json}");
        }
    }

    /// An event echoed back from the shared channel is not delivered twice; another
    /// replica's is delivered once; a resync is never queued for other replicas.
    #[tokio::test]
    async fn own_events_are_not_delivered_twice() {
        let bus = EventBus::new("a");
        let mut outbox = bus.relay_outbox().expect("first relay");
        assert!(bus.relay_outbox().is_none(), "one relay per bus");
        let mut watcher = bus.subscribe();
        bus.publish(token_event());
        let mine = outbox.try_recv().expect("queued for other replicas");
        assert_eq!(watcher.try_recv().unwrap(), mine);
        assert!(!bus.deliver_remote((*mine).clone()), "own echo dropped");
        let theirs = Event {
            replica_id: "b".into(),
            ..(*mine).clone()
        };
        assert!(bus.deliver_remote(theirs.clone()));
        assert_eq!(*watcher.try_recv().unwrap(), theirs);
        bus.resync();
        assert!(matches!(
            watcher.try_recv().unwrap().kind,
            EventKind::Resync { .. }
        ));
        assert!(outbox.try_recv().is_err(), "resync is local only");
        assert!(watcher.try_recv().is_err());
    }

    /// Events the relay cannot take are counted, to be announced to other replicas as
    /// a resync, and the count restarts once taken.
    #[test]
    fn events_the_relay_cannot_take_are_counted() {
        let bus = EventBus::new("a");
        let _outbox = bus.relay_outbox().expect("first relay");
        for _ in 0..OUTBOX_CAPACITY + 7 {
            bus.publish(token_event());
        }
        bus.count_undelivered(1);
        assert_eq!(bus.take_undelivered(), 8);
        assert_eq!(bus.take_undelivered(), 0);
        let notice = bus.undelivered_notice(8);
        assert_eq!(
            (notice.replica_id.as_str(), notice.kind),
            ("a", EventKind::Resync { missed: 8 })
        );
    }

    /// A token filter selects token state changes of that token only.
    #[test]
    fn token_filter_matches_token_state_changes() {
        let event = Event {
            occurred_at_ms: 0,
            replica_id: "a".into(),
            kind: token_event(),
        };
        let id = |v: &str| Id::parse("t", v).unwrap();
        let only = |t: &str| Filter {
            tenant_ids: vec![],
            token_ids: vec![id(t)],
        };
        assert!(only("tok-1").matches(&event));
        assert!(!only("tok-2").matches(&event));
    }
}
