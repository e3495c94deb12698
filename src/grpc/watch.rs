//! WatchEvents: one task per stream feeds the caller the events it may see.
//!
//! What a caller may see is decided per event, from its key's scope *now*: an admin key
//! sees everything; a worker key sees the events about its tenants, about the tokens and
//! pools those tenants may use, and about shared objects (upstreams, tiers, lost
//! counters), never API key changes. When the key is revoked the stream ends with
//! UNAUTHENTICATED; when its scope no longer covers the stream's tenant filter, with
//! PERMISSION_DENIED.
//!
//! Bounds, so that one key cannot exhaust a replica: at most `MAX_FILTER_IDS` ids per
//! filter list and `MAX_STREAMS_PER_KEY` open streams per key on one replica (a clear
//! RESOURCE_EXHAUSTED past it); a stream whose caller went away is freed at once, not
//! at its next event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use super::pb;
use crate::auth::Caller;
use crate::domain::Id;
use crate::error::ServiceError;
use crate::events::{Event, EventKind, Filter, Resource};
use crate::lease::{LiveConfig, Snapshot, tenants_reaching};

/// The most ids one filter list (`tenant_ids`, `token_ids`) may hold.
pub const MAX_FILTER_IDS: usize = 1000;
/// The most WatchEvents streams one API key may hold open on one replica.
pub const MAX_STREAMS_PER_KEY: usize = 16;

/// Open streams per API key on this replica. Cheap to clone.
#[derive(Clone, Default)]
pub struct Streams(Arc<Mutex<HashMap<String, usize>>>);

/// One open stream's place; gives it back when dropped.
pub struct StreamSlot {
    streams: Streams,
    key_id: String,
}

impl Streams {
    /// Takes a place for a stream of `key_id`, or says why not.
    pub fn open(&self, key_id: &str) -> Result<StreamSlot, ServiceError> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key_id.to_owned()).or_default();
        if *count >= MAX_STREAMS_PER_KEY {
            return Err(ServiceError::ResourceExhausted {
                message: format!(
                    "API key '{key_id}' already has {MAX_STREAMS_PER_KEY} WatchEvents streams \
                     open on this replica; close one (or filter one stream by several tenants)"
                ),
                retry_after: std::time::Duration::from_secs(1),
            });
        }
        *count += 1;
        Ok(StreamSlot {
            streams: self.clone(),
            key_id: key_id.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.key_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key_id);
            }
        }
    }
}

/// Parses and bounds one filter list.
pub fn parse_filter_ids(field: &str, ids: &[String]) -> Result<Vec<Id>, ServiceError> {
    if ids.len() > MAX_FILTER_IDS {
        return Err(crate::domain::InvalidField::new(
            field,
            format!(
                "names {} ids, at most {MAX_FILTER_IDS} are allowed",
                ids.len()
            ),
        )
        .into());
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| Id::parse(&format!("{field}[{i}]"), id).map_err(ServiceError::from))
        .collect()
}

/// The tenants an event is about, or `None` for an event about shared objects that
/// every caller may see.
fn concerned(event: &Event, snapshot: &Snapshot) -> Option<Vec<Id>> {
    let parse = |id: &str| Id::parse("id", id).ok();
    match &event.kind {
        EventKind::TokenStateChanged { token_id, .. } => Some(tenants_reaching(snapshot, token_id)),
        EventKind::QuotaChanged { tenant_id, .. } | EventKind::TenantMoved { tenant_id, .. } => {
            Some(parse(tenant_id).into_iter().collect())
        }
        EventKind::ConfigChanged { resource, id, .. } => match resource {
            Resource::Tenant => Some(parse(id).into_iter().collect()),
            Resource::Token => Some(tenants_reaching(snapshot, id)),
            Resource::Pool => Some(
                snapshot
                    .tenants
                    .values()
                    .filter(|t| t.pool_id.as_ref().is_some_and(|p| p.as_str() == id))
                    .map(|t| t.id.clone())
                    .collect(),
            ),
            // Admins only (see `Event::admin_only`).
            Resource::ApiKey => Some(Vec::new()),
            Resource::Upstream | Resource::Tier => None,
        },
        EventKind::CountersRecovering { .. } | EventKind::Resync { .. } => None,
    }
}

/// Whether `caller` may see `event` and it passes `filter`.
fn visible(caller: &Caller, filter: &Filter, event: &Event, snapshot: &Snapshot) -> bool {
    let admin = caller.require_admin().is_ok();
    if event.admin_only() && !admin {
        return false;
    }
    match concerned(event, snapshot) {
        None => filter.matches(event),
        Some(tenants) => {
            let in_scope = admin || tenants.iter().any(|t| caller.may_see_tenant(t));
            let tenant_ok = filter.tenant_ids.is_empty()
                || tenants.iter().any(|t| filter.tenant_ids.contains(t));
            // `matches` adds the token filter (the tenant part passes events with no
            // tenant of their own, such as token events).
            in_scope && tenant_ok && filter.matches(event)
        }
    }
}

/// The caller as its key stands in `snapshot`, or the status that ends its stream.
fn still_allowed(caller: &Caller, filter: &Filter, snapshot: &Snapshot) -> Result<Caller, Status> {
    let now = caller.as_it_stands(snapshot).map_err(Status::from)?;
    for tenant in &filter.tenant_ids {
        now.require_tenant(tenant).map_err(Status::from)?;
    }
    Ok(now)
}

/// What one watcher needs: its events, where to send them, and who it is.
pub struct Watcher {
    pub events: broadcast::Receiver<Arc<Event>>,
    pub out: mpsc::Sender<Result<pb::WatchEventsResponse, Status>>,
    pub caller: Caller,
    pub filter: Filter,
    pub config: LiveConfig,
    pub slot: StreamSlot,
}

impl Watcher {
    /// Feeds the watcher until it goes away, its key stops allowing the stream, or the
    /// event bus closes.
    pub async fn pump(mut self, to_proto: fn(&Event) -> pb::Event) {
        let mut snapshots = self.config.subscribe();
        loop {
            let message = tokio::select! {
                biased;
                _ = self.out.closed() => return,
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    match still_allowed(&self.caller, &self.filter, &snapshot) {
                        Ok(now) => {
                            self.caller = now;
                            continue;
                        }
                        Err(status) => Err(status),
                    }
                }
                received = self.events.recv() => match received {
                    Ok(event) if visible(&self.caller, &self.filter, &event, &self.config.current()) => {
                        Ok(pb::WatchEventsResponse { event: Some(to_proto(&event)) })
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => Ok(resync(missed)),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let ends = message.is_err();
            if self.out.send(message).await.is_err() || ends {
                return;
            }
        }
    }
}

fn resync(missed: u64) -> pb::WatchEventsResponse {
    let now = crate::clock::system_now_ms();
    let event = pb::Event {
        occurred_at: Some(super::convert::timestamp(now)),
        replica_id: String::new(),
        kind: Some(pb::event::Kind::Resync(pb::Resync { missed })),
    };
    pb::WatchEventsResponse { event: Some(event) }
}
