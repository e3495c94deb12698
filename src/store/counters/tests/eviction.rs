//! Whether Redis may evict the counters (`eviction.rs`), read from real servers: a
//! throwaway `redis-server`, and a throwaway three-master cluster, where `INFO` goes
//! to every master and one of them is set to evict.

use super::faults::{Throwaway, free_port, fresh, request};
use super::*;

async fn config_set(url: &str, name: &str, value: &str) {
    let mut conn = admin_connection(url).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
}

#[tokio::test]
async fn a_server_that_may_evict_is_named_until_it_may_not() {
    let server = Throwaway::start(free_port()).await;
    let url = server.url();
    let counters = redis_counters(&url, "tltest-eviction", Duration::from_secs(5)).await;
    // A fresh redis-server: no maxmemory, so no eviction whatever the policy.
    assert_eq!(counters.eviction_risk().await.expect("INFO"), None);
    config_set(&url, "maxmemory", "104857600").await;
    config_set(&url, "maxmemory-policy", "volatile-lru").await;
    let risk = counters.eviction_risk().await.expect("INFO");
    let risk = risk.expect("a limit with volatile-lru evicts keys with an expiry");
    assert!(
        risk.contains("maxmemory 104857600 bytes, maxmemory-policy volatile-lru"),
        "{risk}"
    );
    config_set(&url, "maxmemory-policy", "noeviction").await;
    assert_eq!(counters.eviction_risk().await.expect("INFO"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_names_the_master_that_may_evict() {
    let cluster = ThrowawayCluster::start();
    let counters = redis_counters(
        &cluster.url_list(),
        "tltest-eviction",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(counters.eviction_risk().await.expect("INFO"), None);
    let ports = cluster.ports();
    let evicting = format!("redis://127.0.0.1:{}", ports[1]);
    config_set(&evicting, "maxmemory", "1073741824").await;
    config_set(&evicting, "maxmemory-policy", "allkeys-lru").await;
    let risk = counters.eviction_risk().await.expect("INFO");
    let risk = risk.expect("one master evicts");
    assert!(
        risk.contains(&format!(":{} (maxmemory 1073741824 bytes", ports[1])),
        "{risk}"
    );
    for other in [ports[0], ports[2]] {
        assert!(!risk.contains(&format!(":{other} ")), "{risk}");
    }
}

/// The service's watch reads the policy at once, then every period, and reports each
/// answer: an operator's fix shows within a period. With Redis gone the read fails
/// (Unavailable) and nothing is reported: the last answer stands.
#[tokio::test]
async fn the_watch_reports_at_once_and_sees_a_fix() {
    let server = Throwaway::start(free_port()).await;
    let url = server.url();
    config_set(&url, "maxmemory", "104857600").await;
    config_set(&url, "maxmemory-policy", "allkeys-lfu").await;
    let counters = redis_counters(&url, "tltest-eviction", Duration::from_secs(5)).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let report = move |may: bool| {
        let _ = tx.send(may);
    };
    crate::store::counters::spawn_eviction_watch(
        counters.clone(),
        Duration::from_millis(100),
        report,
        stop_rx,
    );
    let next = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<bool>| {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report within 5 s")
            .expect("the watch runs")
    };
    assert!(next(&mut rx).await, "allkeys-lfu with a limit evicts");
    config_set(&url, "maxmemory-policy", "noeviction").await;
    let mut fixed = false;
    for _ in 0..20 {
        if !next(&mut rx).await {
            fixed = true;
            break;
        }
    }
    assert!(fixed, "the fix was never reported");
    drop(server);
    let gone = counters.eviction_risk().await;
    assert!(
        matches!(gone, Err(CounterError::Unavailable(_))),
        "{gone:?}"
    );
    // Reports of reads that began before the kill, then none over several periods.
    tokio::time::sleep(Duration::from_millis(150)).await;
    while rx.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "a report without Redis");
    stop_tx.send(true).expect("the watch listens");
    // Stopped: the channel closes once the task drops its sender.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while rx.recv().await.is_some() {}
    });
    closed.await.expect("the watch stops");
}

/// With `noeviction`, a Redis that is full refuses writes (OOM): the lease path fails
/// closed with Unavailable, as when Redis is down, not Internal.
#[tokio::test]
async fn a_full_redis_that_does_not_evict_fails_closed() {
    let server = Throwaway::start(free_port()).await;
    let url = server.url();
    let prefix = format!("tltest-{}", uuid::Uuid::new_v4().simple());
    let counters = redis_counters(&url, &prefix, Duration::from_secs(5)).await;
    counters
        .mark_fresh(Space::upstream(&id(UPSTREAM)))
        .await
        .expect("mark fresh");
    let req = request();
    let granted = counters
        .acquire(&fresh(&req))
        .await
        .expect("granted before");
    assert!(matches!(granted, AcquireOutcome::Granted(_)), "{granted:?}");
    // Any memory in use is over a 1-byte limit.
    config_set(&url, "maxmemory", "1").await;
    match counters.acquire(&fresh(&req)).await {
        Err(CounterError::Unavailable(message)) => {
            assert!(message.contains("maxmemory"), "{message}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}
