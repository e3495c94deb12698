//! Events across replicas over Redis pub/sub: every replica publishes the events it
//! makes on one channel (`<key_prefix>:events`, so deployments sharing a Redis stay
//! apart) and subscribes to it, feeding what others made into its local `EventBus`.
//!
//! Two tasks per replica:
//! - the **publisher** drains the bus's outbox, one PUBLISH per event, over a connection
//!   that reconnects by itself. An event it cannot publish (Redis away, or the outbox
//!   full) is counted, and the next successful publish is preceded by a `Resync` with
//!   that count, so other replicas' watchers learn that they missed something.
//! - the **subscriber** holds a dedicated pub/sub connection (a subscribed connection
//!   can do nothing else). It notices a lost connection by the stream ending or by a
//!   PING going unanswered, reconnects with backoff, and on every reconnection tells
//!   local watchers to `Resync`, since events may have been published meanwhile.
//!
//! Pub/sub delivers at most once and only to current subscribers: the guarantee is
//! "each event once, or a Resync". With a Redis Cluster both tasks use the first node of
//! the list: classic PUBLISH is broadcast to every node of a cluster, so any one node
//! sees every event.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot, watch};

use crate::events::{Event, EventBus};

/// How often the subscriber checks that its connection still answers.
const PING_EVERY: Duration = Duration::from_secs(5);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("invalid Redis URL for the event relay: {0}")]
    InvalidUrl(String),
    #[error("an event relay is already running for this event bus")]
    AlreadyRunning,
}

/// Where the relay runs.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// `redis://…`; a comma-separated cluster list uses its first node.
    pub url: String,
    /// The channel, e.g. `tl:events`.
    pub channel: String,
    /// Bound on one Redis call or connection attempt.
    pub timeout: Duration,
}

impl RelaySettings {
    /// The channel of a deployment: its key prefix plus `:events`.
    pub fn channel_for(key_prefix: &str) -> String {
        format!("{key_prefix}:events")
    }
}

/// Starts relaying `bus` until `shutdown` fires (or its sender is dropped). Returns once
/// the first subscription attempt has finished, so that a replica that answers calls is
/// already receiving other replicas' events — unless Redis is away, in which case the
/// subscriber keeps trying in the background.
pub async fn start(
    settings: RelaySettings,
    bus: EventBus,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let first_url = settings
        .url
        .split(',')
        .map(str::trim)
        .find(|u| !u.is_empty())
        .unwrap_or_default();
    let client =
        redis::Client::open(first_url).map_err(|e| RelayError::InvalidUrl(e.to_string()))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.timeout))
        .set_response_timeout(Some(settings.timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let publisher = ConnectionManager::new_lazy_with_config(client.clone(), config)
        .map_err(|e| RelayError::InvalidUrl(e.to_string()))?;
    let outbox = bus.relay_outbox().ok_or(RelayError::AlreadyRunning)?;
    tokio::spawn(publish_loop(
        publisher,
        bus.clone(),
        settings.clone(),
        outbox,
        shutdown.clone(),
    ));
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(subscribe_loop(client, settings, bus, shutdown, ready_tx));
    let _ = ready_rx.await;
    Ok(())
}

async fn publish_loop(
    mut conn: ConnectionManager,
    bus: EventBus,
    settings: RelaySettings,
    mut outbox: mpsc::Receiver<Arc<Event>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        let event = tokio::select! {
            event = outbox.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let mut command = redis::pipe();
        let undelivered = bus.take_undelivered();
        if undelivered > 0 {
            let notice = bus.undelivered_notice(undelivered);
            command
                .publish(&settings.channel, notice.to_json())
                .ignore();
        }
        command.publish(&settings.channel, event.to_json()).ignore();
        let publish = command.query_async::<()>(&mut conn);
        let result = tokio::time::timeout(settings.timeout, publish).await;
        if !matches!(result, Ok(Ok(()))) {
            // Not published (or unknown): other replicas will be told to resync.
            bus.count_undelivered(undelivered + 1);
        }
        match result {
            Ok(Ok(_)) if failing => {
                failing = false;
                tracing::info!("event publishing to other replicas resumed");
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) if !failing => {
                failing = true;
                tracing::warn!(%error, "cannot publish events to other replicas; they are dropped until Redis answers");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!(timeout = ?settings.timeout, "publishing an event to other replicas timed out; events are dropped until Redis answers");
            }
            _ => {}
        }
    }
}

/// Why a subscription ended.
enum Ended {
    Shutdown,
    Lost(String),
}

async fn subscribe_loop(
    client: redis::Client,
    settings: RelaySettings,
    bus: EventBus,
    mut shutdown: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    // Whether events may have been missed: after a lost subscription, or a failed first
    // attempt (other replicas may have published since this one started).
    let mut may_have_missed = false;
    let mut failing = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        match subscribe(&client, &settings).await {
            Ok(pubsub) => {
                if may_have_missed {
                    tracing::info!("event subscription restored; telling watchers to resync");
                    bus.resync();
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                failing = false;
                backoff = Duration::from_millis(100);
                match forward(pubsub, &bus, &settings, &mut shutdown).await {
                    Ended::Shutdown => return,
                    Ended::Lost(reason) => {
                        tracing::warn!(%reason, "lost the event subscription; reconnecting");
                    }
                }
            }
            Err(reason) => {
                if !failing {
                    failing = true;
                    tracing::warn!(%reason, "cannot subscribe to other replicas' events; retrying");
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
        }
        may_have_missed = true;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(
    client: &redis::Client,
    settings: &RelaySettings,
) -> Result<redis::aio::PubSub, String> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&settings.channel).await?;
        redis::RedisResult::Ok(pubsub)
    };
    match tokio::time::timeout(settings.timeout * 4, attempt).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {:?}", settings.timeout * 4)),
    }
}

/// Feeds other replicas' events into `bus` until the subscription is lost or shutdown.
async fn forward(
    pubsub: redis::aio::PubSub,
    bus: &EventBus,
    settings: &RelaySettings,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Ended::Lost("the connection closed".into());
                };
                let payload: String = match message.get_payload() {
                    Ok(payload) => payload,
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a non-text message on the event channel");
                        continue;
                    }
                };
                match Event::from_json(&payload) {
                    Ok(event) => {
                        bus.deliver_remote(event);
                    }
                    // A newer replica during a rolling upgrade may send kinds this one
                    // does not know: skip them rather than stop listening.
                    Err(error) => tracing::warn!(%error, "ignoring an event this replica cannot read"),
                }
            }
            _ = ping.tick() => {
                let answered = tokio::time::timeout(settings.timeout * 4, sink.ping::<redis::Value>()).await;
                match answered {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Ended::Lost(error.to_string()),
                    Err(_) => return Ended::Lost("PING went unanswered".into()),
                }
            }
            _ = shutdown.changed() => return Ended::Shutdown,
        }
    }
}
