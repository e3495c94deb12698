//! Events across replicas over Redis pub/sub: every replica publishes the events it
//! makes on one channel (`<key_prefix>:events`, so deployments sharing a Redis stay
//! apart) and subscribes to it, feeding what others made into its local `EventBus`.
//!
//! Two tasks per replica, each using one node of `REDIS_URL` at a time: the only one for
//! a single server; for a Redis Cluster (a comma-separated list of nodes) whichever
//! answers, starting with the first. Classic PUBLISH on any node of a cluster is
//! broadcast over the cluster bus to subscribers on every node (even while the cluster
//! itself is down for keys), so one live node on each side is enough.
//! - the **publisher** drains the bus's outbox, one PUBLISH per event, over a connection
//!   per node that reconnects by itself with backoff. When its node fails, the next node
//!   of the list takes over. An event it cannot publish (no node answers, the node failed
//!   while it was being sent, or the outbox is full) is counted, and the next successful
//!   publish is preceded by a `Resync` with that count, so other replicas' watchers learn
//!   that they missed something. An event is sent again through the next node only when
//!   the failed node refused the connection (so it was never sent): otherwise it may have
//!   been published, and sending it again could deliver it twice.
//! - the **subscriber** holds a dedicated pub/sub connection (a subscribed connection
//!   can do nothing else). It notices a lost connection by the stream ending (a node that
//!   dies closes it at once) or by a PING going unanswered, and then subscribes again,
//!   trying every node once from the one after the lost node; when none answers it
//!   retries with backoff. On every new subscription after a loss it tells local
//!   watchers to `Resync`, since events may have been published meanwhile.
//!
//! So when a cluster node dies, each side moves to the next node: watchers on other
//! replicas get a `Resync` (from their own subscriber, or as the publisher's count of
//! dropped events), then every later event. Pub/sub delivers at most once and only to
//! current subscribers: the guarantee is "each event once, or a Resync".

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot, watch};

use crate::events::{Event, EventBus};

/// How often the subscriber checks that its connection still answers.
const PING_EVERY: Duration = Duration::from_secs(5);
/// The first pause before subscribing again.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
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
    /// `redis://…`; a comma-separated cluster list: each node of it, one at a time.
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

/// One node of `REDIS_URL`: its client, and its address for logs (without a password).
#[derive(Clone)]
struct Node {
    client: redis::Client,
    addr: String,
}

/// The nodes of a URL list, in its order; at least one.
fn nodes_of(url: &str) -> Result<Vec<Node>, RelayError> {
    let nodes = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            let client =
                redis::Client::open(u).map_err(|e| RelayError::InvalidUrl(e.to_string()))?;
            let addr = client.get_connection_info().addr().to_string();
            Ok(Node { client, addr })
        })
        .collect::<Result<Vec<_>, RelayError>>()?;
    if nodes.is_empty() {
        return Err(RelayError::InvalidUrl("no URL given".into()));
    }
    Ok(nodes)
}

/// Starts relaying `bus` until `shutdown` fires (or its sender is dropped). Returns once
/// the first subscription attempt (every node tried once) has finished, so that a
/// replica that answers calls is already receiving other replicas' events — unless no
/// node answers, in which case the subscriber keeps trying in the background.
pub async fn start(
    settings: RelaySettings,
    bus: EventBus,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let nodes = nodes_of(&settings.url)?;
    let publisher = Publisher::new(&nodes, settings.timeout)?;
    let outbox = bus.relay_outbox().ok_or(RelayError::AlreadyRunning)?;
    tokio::spawn(publish_loop(
        publisher,
        bus.clone(),
        settings.channel.clone(),
        outbox,
        shutdown.clone(),
    ));
    let (ready_tx, ready_rx) = oneshot::channel();
    let subscriber = Subscriber::new(nodes, settings, bus);
    tokio::spawn(subscriber.run(shutdown, ready_tx));
    let _ = ready_rx.await;
    Ok(())
}

async fn publish_loop(
    mut publisher: Publisher,
    bus: EventBus,
    channel: String,
    mut outbox: mpsc::Receiver<Arc<Event>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            event = outbox.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let undelivered = bus.take_undelivered();
        let mut command = redis::pipe();
        if undelivered > 0 {
            let notice = bus.undelivered_notice(undelivered);
            command.publish(&channel, notice.to_json()).ignore();
        }
        command.publish(&channel, event.to_json()).ignore();
        if !publisher.publish(&command).await {
            // Not published (or unknown): other replicas will be told to resync.
            bus.count_undelivered(undelivered + 1);
        }
    }
}

/// The publishing side: a connection per node, and the node in use.
struct Publisher {
    /// Each node's address and connection (lazy; it reconnects by itself, with backoff).
    conns: Vec<(String, ConnectionManager)>,
    current: usize,
    timeout: Duration,
    /// Whether the last attempt failed, so that only changes are logged.
    failing: bool,
}

impl Publisher {
    fn new(nodes: &[Node], timeout: Duration) -> Result<Self, RelayError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conns = nodes
            .iter()
            .map(|node| {
                ConnectionManager::new_lazy_with_config(node.client.clone(), config.clone())
                    .map(|conn| (node.addr.clone(), conn))
                    .map_err(|e| RelayError::InvalidUrl(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            conns,
            current: 0,
            timeout,
            failing: false,
        })
    }

    /// Sends `command` through the node in use; returns whether it was published. A
    /// node that fails hands over to the next one, which gets `command` too only when
    /// the failed node refused the connection (nothing was sent), each node once.
    async fn publish(&mut self, command: &redis::Pipeline) -> bool {
        for _ in 0..self.conns.len() {
            let conn = &mut self.conns[self.current].1;
            let sent = tokio::time::timeout(self.timeout, command.query_async::<()>(conn)).await;
            let error = match sent {
                Ok(Ok(())) => {
                    self.resumed();
                    return true;
                }
                Ok(Err(error)) => error,
                Err(_) => {
                    self.failed(format!("no answer within {:?}", self.timeout));
                    return false;
                }
            };
            let refused = error.is_connection_refusal();
            self.failed(error.to_string());
            if !refused {
                return false;
            }
        }
        false
    }

    /// The node in use failed: the next node of the list takes over.
    fn failed(&mut self, reason: String) {
        if !self.failing {
            self.failing = true;
            let node = &self.conns[self.current].0;
            tracing::warn!(%node, %reason, "cannot publish events to other replicas through this Redis node; moving to the next node, and events are dropped until one answers");
        }
        self.current = (self.current + 1) % self.conns.len();
    }

    fn resumed(&mut self) {
        if self.failing {
            self.failing = false;
            let node = &self.conns[self.current].0;
            tracing::info!(%node, "event publishing to other replicas resumed");
        }
    }
}

/// Tells `start` that the first attempt to subscribe has finished (once).
fn tell_ready(ready: &mut Option<oneshot::Sender<()>>) {
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
}

/// Why a subscription ended.
enum Ended {
    Shutdown,
    Lost(String),
}

/// The subscribing side, between subscriptions.
struct Subscriber {
    nodes: Vec<Node>,
    settings: RelaySettings,
    bus: EventBus,
    /// The node to try first: the one after the node whose subscription was lost.
    next: usize,
    /// Whether events may have been missed: after a lost subscription, or a failed first
    /// attempt (other replicas may have published since this one started).
    may_have_missed: bool,
    /// Whether the last attempt failed on every node, so that only changes are logged.
    failing: bool,
    backoff: Duration,
}

impl Subscriber {
    fn new(nodes: Vec<Node>, settings: RelaySettings, bus: EventBus) -> Self {
        Self {
            nodes,
            settings,
            bus,
            next: 0,
            may_have_missed: false,
            failing: false,
            backoff: MIN_BACKOFF,
        }
    }

    /// Subscribes, forwards, and subscribes again when lost, until shutdown. `ready`
    /// fires after the first attempt, whether a node answered or not.
    async fn run(mut self, mut shutdown: watch::Receiver<bool>, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        loop {
            let attempt = tokio::select! {
                attempt = self.subscribe_any() => attempt,
                _ = shutdown.changed() => return,
            };
            match attempt {
                Ok((node, pubsub)) => {
                    self.subscribed(node);
                    tell_ready(&mut ready);
                    let ended = forward(pubsub, &self.bus, &self.settings, &mut shutdown);
                    match ended.await {
                        Ended::Shutdown => return,
                        Ended::Lost(reason) => self.lost(node, &reason),
                    }
                }
                Err(reason) => {
                    self.failed(&reason);
                    tell_ready(&mut ready);
                }
            }
            self.may_have_missed = true;
            tokio::select! {
                _ = tokio::time::sleep(self.backoff) => {}
                _ = shutdown.changed() => return,
            }
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Subscribes through the first node that answers, trying each once from `next`;
    /// returns which node, or why none answered.
    async fn subscribe_any(&self) -> Result<(usize, redis::aio::PubSub), String> {
        let mut reasons = Vec::new();
        for step in 0..self.nodes.len() {
            let i = (self.next + step) % self.nodes.len();
            match subscribe(&self.nodes[i].client, &self.settings).await {
                Ok(pubsub) => return Ok((i, pubsub)),
                Err(reason) => reasons.push(format!("{}: {reason}", self.nodes[i].addr)),
            }
        }
        Err(reasons.join("; "))
    }

    fn subscribed(&mut self, node: usize) {
        let node_addr = &self.nodes[node].addr;
        if self.may_have_missed {
            tracing::info!(node = %node_addr, "event subscription restored; telling watchers to resync");
            self.bus.resync();
        } else if node != 0 {
            tracing::info!(node = %node_addr, "subscribed to other replicas' events through a later node of the list; the ones before it did not answer");
        }
        self.failing = false;
        self.backoff = MIN_BACKOFF;
    }

    fn lost(&mut self, node: usize, reason: &str) {
        let node_addr = &self.nodes[node].addr;
        tracing::warn!(node = %node_addr, %reason, "lost the event subscription; subscribing again, from the next node");
        self.next = (node + 1) % self.nodes.len();
    }

    fn failed(&mut self, reason: &str) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(%reason, "cannot subscribe to other replicas' events on any node; retrying");
        }
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

#[cfg(test)]
#[path = "event_relay_tests.rs"]
mod tests;
