//! Events about the configuration and leasing, fanned out to `WatchEvents` streams.
//!
//! Policy for slow watchers: the bus is a bounded `broadcast` channel. A watcher that
//! falls more than `CAPACITY` events behind loses the oldest ones and is told so with a
//! `Resync` event (how many it missed) instead of silently skipping them.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::clock::system_now_ms;
use crate::domain::Id;

/// Events kept for slow watchers before they must resync.
pub const CAPACITY: usize = 1024;

/// What kind of object an admin changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Upstream,
    Token,
    Pool,
    Tier,
    Tenant,
    ApiKey,
}

/// How it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Deleted,
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
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
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
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
            EventKind::ConfigChanged { .. } => None,
            EventKind::QuotaChanged { tenant_id, .. } => Some(tenant_id),
        }
    }

    /// The token the event is about, if any.
    pub fn token_id(&self) -> Option<&str> {
        match &self.kind {
            EventKind::ConfigChanged {
                resource: Resource::Token,
                id,
                ..
            } => Some(id),
            EventKind::ConfigChanged { .. } | EventKind::QuotaChanged { .. } => None,
        }
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
}

impl EventBus {
    pub fn new(replica_id: &str) -> Self {
        let (sender, _) = broadcast::channel(CAPACITY);
        Self {
            sender,
            replica_id: replica_id.into(),
        }
    }

    /// Publishes an event made on this replica.
    pub fn publish(&self, kind: EventKind) {
        let event = Event {
            occurred_at_ms: system_now_ms(),
            replica_id: self.replica_id.to_string(),
            kind,
        };
        // No receivers is fine: nobody is watching.
        let _ = self.sender.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }
}
