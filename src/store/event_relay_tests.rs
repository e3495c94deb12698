//! The event relay between two replicas ("a" and "b", two relays in this process): on one
//! Redis server, and on a throwaway three-master Redis Cluster (started by each test,
//! killed and removed at its end) whose first node dies, before or after the relays
//! start. "Delivered" is what `b`'s watchers see of the events `a` publishes.

use std::time::Instant;

use tokio::sync::broadcast;

use super::*;
use crate::events::{Change, EventKind, Resource};

// The counters' tests' cluster helper.
use crate::store::counters::behaviour::throwaway_cluster::ThrowawayCluster;

/// The relays' bound on one Redis call.
const TIMEOUT: Duration = Duration::from_millis(500);
/// How long the other replica may take to get events again after a node died.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// How long one event may take between two replicas while Redis answers.
const DELIVERY_BOUND: Duration = Duration::from_secs(3);

/// A replica's relay, the bus it feeds and a watcher of that bus. Dropping it stops the
/// relay (the shutdown sender goes).
struct Replica {
    bus: EventBus,
    watcher: broadcast::Receiver<Arc<Event>>,
    _stop: watch::Sender<bool>,
}

async fn replica(name: &str, url: &str, channel: &str) -> Replica {
    let bus = EventBus::new(name);
    let watcher = bus.subscribe();
    let (stop, stop_rx) = watch::channel(false);
    let settings = RelaySettings {
        url: url.into(),
        channel: channel.into(),
        timeout: TIMEOUT,
    };
    let started = tokio::time::timeout(RECOVERY_BOUND, start(settings, bus.clone(), stop_rx));
    started
        .await
        .expect("start returns in bounded time")
        .expect("the relay starts");
    Replica {
        bus,
        watcher,
        _stop: stop,
    }
}

/// A channel no other test (or deployment on the shared Redis) uses.
fn unique_channel() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    RelaySettings::channel_for(&format!("tl-relay-test-{}", &id[..12]))
}

/// Event number `n` (its version).
fn numbered(n: i64) -> EventKind {
    EventKind::ConfigChanged {
        resource: Resource::Tenant,
        id: format!("t-{n}"),
        change: Change::Updated,
        version: n,
    }
}

/// What a watcher saw, reduced: `Some(n)` for event `n`, `None` for a Resync.
fn seen(event: &Event) -> Option<i64> {
    match event.kind {
        EventKind::ConfigChanged { version, .. } => Some(version),
        EventKind::Resync { .. } => None,
        ref other => panic!("unexpected event {other:?}"),
    }
}

/// Waits up to `bound` for the next event `to`'s watchers see.
async fn next_seen(to: &mut Replica, bound: Duration) -> Option<Option<i64>> {
    match tokio::time::timeout(bound, to.watcher.recv()).await {
        Ok(Ok(event)) => Some(seen(&event)),
        Ok(Err(error)) => panic!("watcher: {error}"),
        Err(_) => None,
    }
}

/// Publishes events `first..` on `from`, one every 100 ms, until `to` delivers one of
/// them (within `RECOVERY_BOUND`); returns what `to` saw and the next number to publish.
async fn publish_until_delivered(
    from: &Replica,
    to: &mut Replica,
    first: i64,
) -> (Vec<Option<i64>>, i64) {
    let deadline = Instant::now() + RECOVERY_BOUND;
    let (mut saw, mut n) = (Vec::new(), first);
    while !saw.iter().any(Option::is_some) {
        assert!(
            Instant::now() < deadline,
            "no event of {first}..{n} reached the other replica within {RECOVERY_BOUND:?}; \
             it saw {saw:?} (None = Resync)"
        );
        from.bus.publish(numbered(n));
        n += 1;
        while let Some(event) = next_seen(to, Duration::from_millis(100)).await {
            saw.push(event);
        }
    }
    (saw, n)
}

/// Publishes `count` more events from `next` on `from`; `to` must deliver every one
/// of them, in order, and nothing else.
async fn assert_relays_each_once(from: &Replica, to: &mut Replica, next: i64, count: i64) {
    for n in next..next + count {
        from.bus.publish(numbered(n));
    }
    for n in next..next + count {
        let got = next_seen(to, DELIVERY_BOUND).await;
        assert_eq!(
            got,
            Some(Some(n)),
            "event {n} (None = nothing, Some(None) = Resync)"
        );
    }
    let extra = next_seen(to, Duration::from_millis(300)).await;
    assert_eq!(extra, None, "nothing else is delivered");
}

/// Makes every node declare a dead master failed after 500 ms instead of 15 s.
fn shorten_node_timeout(cluster: &ThrowawayCluster) {
    for port in cluster.ports() {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-node-timeout")
            .arg(500)
            .query::<()>(&mut cluster.node(port))
            .expect("CONFIG SET cluster-node-timeout");
    }
}

/// Waits until node `port` says `cluster_state:fail` (a master is gone and none replaces
/// it: keys are refused with CLUSTERDOWN, PUBLISH is still served and broadcast).
fn wait_cluster_down(cluster: &ThrowawayCluster, port: u16) {
    let deadline = Instant::now() + RECOVERY_BOUND;
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut cluster.node(port))
            .expect("CLUSTER INFO");
        if info.lines().any(|l| l.trim() == "cluster_state:fail") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {port} never saw the cluster fail"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One Redis server (`TOKENLEASE_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`): each
/// event of one replica reaches the other once, in order, without a Resync.
#[tokio::test]
async fn single_server_relays_each_event_once() {
    let url = std::env::var("TOKENLEASE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let channel = unique_channel();
    let a = replica("a", &url, &channel).await;
    let mut b = replica("b", &url, &channel).await;
    assert_relays_each_once(&a, &mut b, 1, 5).await;
}

/// Issue 12 (6): both replicas list the three masters; the first one is killed while
/// both relay through it. `b` delivers `a`'s events again within `RECOVERY_BOUND`: the
/// first it gets after the kill is either the first `a` published, or comes after a
/// Resync; from then on every event once, in order — also once the other masters have
/// declared the cluster down.
#[tokio::test]
async fn cluster_relay_survives_the_first_node_dying() {
    let cluster = ThrowawayCluster::start();
    shorten_node_timeout(&cluster);
    let channel = unique_channel();
    let a = replica("a", &cluster.url_list(), &channel).await;
    let mut b = replica("b", &cluster.url_list(), &channel).await;
    assert_relays_each_once(&a, &mut b, 1, 3).await;
    cluster.kill_node(cluster.ports()[0]);
    let (saw, next) = publish_until_delivered(&a, &mut b, 4).await;
    let first = saw.iter().position(Option::is_some).expect("delivered");
    assert!(
        saw[first] == Some(4) || saw[..first].contains(&None),
        "after the kill the other replica saw {saw:?} (None = Resync): events were \
         missed without a Resync"
    );
    let delivered: Vec<i64> = saw[first..].iter().map(|e| e.expect("no Resync")).collect();
    let expected: Vec<i64> = (delivered[0]..next).collect();
    assert_eq!(
        delivered, expected,
        "every event once, in order, after the first"
    );
    assert_relays_each_once(&a, &mut b, next, 5).await;
    wait_cluster_down(&cluster, cluster.ports()[1]);
    assert_relays_each_once(&a, &mut b, next + 5, 5).await;
}

/// The first master is down (and the cluster declared down) before the replicas start:
/// both relays start, and `b` delivers each of `a`'s events once, in order, without a
/// Resync (nothing was lost).
#[tokio::test]
async fn cluster_relay_starts_with_the_first_node_down() {
    let cluster = ThrowawayCluster::start();
    shorten_node_timeout(&cluster);
    cluster.kill_node(cluster.ports()[0]);
    wait_cluster_down(&cluster, cluster.ports()[1]);
    let channel = unique_channel();
    let a = replica("a", &cluster.url_list(), &channel).await;
    let mut b = replica("b", &cluster.url_list(), &channel).await;
    assert_relays_each_once(&a, &mut b, 1, 5).await;
}
